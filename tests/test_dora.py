"""DoRA (use_dora=True): the lora_dora op against its plain-autograd definition, its FLOP
formula, PEFT parity on LLaMA and BERT, the PEFT format both ways, merge and unmerge."""
import pytest
import torch
from hypothesis import given, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import lorafx  # noqa: F401
from lorafx.dialect.dora import dora_flops, dora_norm, lora_dora_reference, merged_dora_weight

op = torch.ops.lorafx.lora_dora


def _args(tokens=(2, 5), n=6, m=4, r=3, bias=True, mask=False, seed=0, dtype=torch.float64, zero_m=False):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(True)
    x, W, A, B = mk(*tokens, n), mk(m, n), mk(r, n), mk(m, r)
    mag = (torch.rand(m, generator=g, dtype=dtype) + 0.5)
    if zero_m:
        mag[0] = 0.0
    mag.requires_grad_(True)
    b = mk(m) if bias else None
    keep = (torch.rand(*tokens, n, generator=g) > 0.3) if mask else None
    return x, W, b, A, B, mag, keep


def _check_against_reference(x, W, b, A, B, mag, keep, s=0.7, p=0.3, atol=None):
    y = op(x, W, b, A, B, mag, s, keep, p)
    ref = lora_dora_reference(x, W, b, A, B, mag, s, keep, p)
    torch.testing.assert_close(y, ref, atol=atol, rtol=atol)
    inputs = [t for t in (x, W, A, B, mag, b) if t is not None]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    for name, a, w in zip("x W A B m b".split(), got, want):
        torch.testing.assert_close(a, w, atol=atol, rtol=atol, msg=lambda e: f"d{name}: {e}")


@given(tokens=st.sampled_from([(1,), (3,), (2, 4)]), n=st.integers(1, 9), m=st.integers(1, 9),
       r=st.integers(1, 12), bias=st.booleans(), mask=st.booleans(), zero_m=st.booleans(),
       seed=st.integers(0, 100))
def test_lora_dora_matches_reference(tokens, n, m, r, bias, mask, zero_m, seed):
    """Output and the gradients of x, W, A, B, m and the bias equal PEFT's formula through plain
    autograd, at ranks above and below min(in, out), with and without bias and dropout, and with
    a zero magnitude entry (where u is recomputed)."""
    _check_against_reference(*_args(tokens, n, m, r, bias, mask, seed, zero_m=zero_m))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask", [True, False])
def test_lora_dora_gradcheck_and_opcheck(bias, mask):
    """gradcheck in the inputs the norm does not depend on (x, m, bias: for A, B and W the norm is
    a constant to autograd, DoRA §4.3, which finite differences cannot see; the hypothesis test
    compares those gradients with the detached-norm reference), and torch.library.opcheck."""
    x, W, b, A, B, mag, keep = _args(bias=bias, mask=mask, seed=1)
    inputs = (x, mag) + ((b,) if bias else ())
    f = lambda x, mag, *b: op(x, W.detach(), b[0] if b else None, A.detach(), B.detach(), mag, 0.5, keep, 0.3)
    assert torch.autograd.gradcheck(f, inputs)
    torch.library.opcheck(op.default, (x, W, b, A, B, mag, 0.5, keep, 0.3))


def test_norm_never_forms_the_merged_weight():
    """dora_norm equals ||W + sBA|| row-wise, and allocates nothing of the size of W."""
    x, W, b, A, B, mag, _ = _args(m=64, n=96, r=4, dtype=torch.float32)
    want = torch.linalg.norm(W + 0.5 * B @ A, dim=1)
    torch.testing.assert_close(dora_norm(W.detach(), A.detach(), B.detach(), 0.5), want.detach())
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        dora_norm(W.detach(), A.detach(), B.detach(), 0.5)
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert sizes and max(sizes) < W.numel() * 4 // 4, sizes


def test_norm_clamps_rounding_below_zero():
    W = torch.tensor([[1.0, 2.0]])
    A = torch.tensor([[1.0, 2.0]])
    B = torch.tensor([[-1.0]])
    assert dora_norm(W, A, B, 1.0).item() == 0.0  # W + sBA = 0 exactly: never nan


def test_only_needed_gradients_and_saved_tensors():
    """A frozen W gets no gradient; autograd keeps the inputs and y, never an out x in matrix
    or a second (tokens, out) tensor."""
    x, W, b, A, B, mag, _ = _args(tokens=(16,), n=8, m=8, dtype=torch.float32)
    W.requires_grad_(False)
    x = x.detach()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = op(x, W, b, A, B, mag, 1.0, None, 0.0)
    y.sum().backward()
    assert W.grad is None and A.grad is not None and B.grad is not None and mag.grad is not None
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    allowed = {t.untyped_storage().data_ptr() for t in (x, W, b, A, B, mag, y)}
    assert ptrs <= allowed


@pytest.mark.parametrize("mask", [False, True])
def test_flop_formula_counts_what_runs(mask):
    x, W, b, A, B, mag, keep = _args(tokens=(3, 5), n=12, m=10, r=4, mask=mask, dtype=torch.float32)
    with FlopCounterMode(display=False) as fwd:
        y = op(x, W, b, A, B, mag, 0.5, keep, 0.2)
    with FlopCounterMode(display=False) as bwd:
        y.sum().backward()
    want = dora_flops(15, 12, 10, 4, w_requires_grad=True, dropout=mask)
    assert (fwd.get_total_flops(), bwd.get_total_flops()) == want


def test_merged_weight_in_stored_layout():
    x, W, b, A, B, mag, _ = _args(dtype=torch.float32)
    W, A, B, mag = W.detach(), A.detach(), B.detach(), mag.detach()
    merged = merged_dora_weight(W, A, B, mag, 0.7)
    V = W + 0.7 * B @ A
    torch.testing.assert_close(merged, V * (mag / torch.linalg.norm(V, dim=1))[:, None])
    torch.testing.assert_close(merged_dora_weight(W.t().contiguous(), A, B, mag, 0.7, transposed=True), merged.t())
    y = op(x.detach(), W, b.detach(), A, B, mag, 0.7)
    torch.testing.assert_close(y, torch.nn.functional.linear(x.detach(), merged, b.detach()))
