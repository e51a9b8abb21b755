"""The LoRA dialect ops: autograd, opcheck, dropout semantics, FLOP formula."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lorafx  # noqa: F401
from lorafx.dialect.linear import lora_linear_reference

op = torch.ops.lorafx.lora_linear


def _args(bias=True, mask=False, seed=0, shape=(2, 5, 6), out=4, r=3):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    x, W, A, B = mk(*shape), mk(out, shape[-1]), mk(r, shape[-1]), mk(out, r)
    b = mk(out) if bias else None
    m = (torch.rand(shape, generator=g) > 0.3) if mask else None
    return x, W, b, A, B, m


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask", [True, False])
def test_lora_linear_gradcheck_and_opcheck(bias, mask):
    x, W, b, A, B, m = _args(bias, mask)
    inputs = (x, W, A, B) + ((b,) if bias else ())
    f = lambda x, W, A, B, *b: op(x, W, b[0] if b else None, A, B, 0.5, m, 0.3)
    assert torch.autograd.gradcheck(f, inputs)
    torch.library.opcheck(op.default, (x, W, b, A, B, 0.5, m, 0.3))


@pytest.mark.parametrize("mask", [True, False])
def test_lora_linear_matches_reference(mask):
    x, W, b, A, B, m = _args(True, mask, seed=3)
    y = op(x, W, b, A, B, 0.7, m, 0.25)
    ref = lora_linear_reference(x, W, b, A, B, 0.7, m, 0.25)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, (x, A, B, b), g)
    gr = torch.autograd.grad(ref, (x, A, B, b), g)
    for a, r in zip(ga, gr):
        torch.testing.assert_close(a, r)


def test_only_needed_gradients_are_computed():
    x, W, b, A, B, _ = _args()
    W.requires_grad_(False)
    x = x.detach()  # the first linear of a model: no gradient for x
    y = op(x, W, b, A, B, 1.0, None, 0.0)
    y.sum().backward()
    assert W.grad is None and A.grad is not None and B.grad is not None and b.grad is not None


def test_dropout_mask_train_and_eval():
    x = torch.randn(64, 32)
    m = torch.ops.lorafx.dropout_mask(x, 0.25, True)
    assert m.dtype == torch.bool and m.shape == x.shape
    assert 0.6 < m.float().mean().item() < 0.9
    assert torch.ops.lorafx.dropout_mask(x, 0.25, False).numel() == 0
    assert torch.ops.lorafx.dropout_mask(x, 0.0, True).numel() == 0


def test_empty_mask_means_no_dropout():
    x, W, b, A, B, _ = _args()
    empty = torch.ops.lorafx.dropout_mask(x, 0.5, False)
    torch.testing.assert_close(op(x, W, b, A, B, 1.0, empty, 0.5), op(x, W, b, A, B, 1.0, None, 0.0))


def test_fake_kernel_checks_shapes():
    x, W, b, A, B, _ = _args()
    with torch.device("meta"):
        bad_A = torch.empty(3, 7, dtype=torch.float64)
    with pytest.raises(Exception, match="lora_A"):
        op(x.to("meta"), W.to("meta"), None, bad_A, B.to("meta"), 1.0, None, 0.0)


def test_flop_formula_counts_forward():
    b, n, m, r = 10, 6, 4, 3
    x, W, bias, A, B, _ = _args(shape=(2, 5, n), out=m, r=r)
    with FlopCounterMode(display=False) as counter:
        op(x.detach(), W.detach(), None, A.detach(), B.detach(), 1.0, None, 0.0)
    assert counter.get_total_flops() == 2 * b * (n * m + n * r + r * m)
