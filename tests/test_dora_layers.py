"""DoRA on convolutions and embeddings (lorafx/dialect/dora_layers.py): the ops against their
plain-autograd definitions, PEFT parity of outputs and adapter gradients, merge and unmerge, and
the PEFT format both ways."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import lorafx
from lorafx.dialect.dora_layers import (conv_dora_norm, embedding_dora_norm, lora_dora_conv_reference,
                                        lora_dora_embedding_reference)
from lorafx.graph_utils import get_attr

conv_op = torch.ops.lorafx.lora_dora_conv
emb_op = torch.ops.lorafx.lora_dora_embedding


def _conv_args(dims=2, cin=4, cout=6, k=3, r=4, groups=1, bias=True, mask=False, batched=True, zero_m=False,
               seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(True)
    kernel = (k,) * dims
    x = mk(*((2,) if batched else ()), cin, *(5,) * dims)
    W, A, B = mk(cout, cin // groups, *kernel), mk(r, cin, *kernel), mk(cout, r // groups, *(1,) * dims)
    mag = torch.rand(1, cout, *(1,) * dims, generator=g, dtype=dtype) + 0.5
    if zero_m:
        mag.view(-1)[0] = 0.0
    mag.requires_grad_(True)
    b = mk(cout) if bias else None
    keep = (torch.rand(x.shape, generator=g) > 0.3) if mask else None
    geo = ([1] * dims, [1] * dims, [1] * dims, groups)
    return (x, W, b, A, B, mag), geo, keep


def _same_grads(y, ref, inputs, names, atol=None):
    torch.testing.assert_close(y, ref, atol=atol, rtol=atol)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
    got = torch.autograd.grad(y, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    for name, a, w in zip(names, got, want):
        torch.testing.assert_close(a, w, atol=atol, rtol=atol, msg=lambda e: f"d{name}: {e}")


@settings(max_examples=6, deadline=None)
@given(dims=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2]), r=st.sampled_from([2, 4, 6]),
       k=st.sampled_from([1, 3]), bias=st.booleans(), mask=st.booleans(), batched=st.booleans(),
       zero_m=st.booleans(), seed=st.integers(0, 50))
def test_conv_op_matches_reference(dims, groups, r, k, bias, mask, batched, zero_m, seed):
    """lora_dora_conv's output and the gradients of x, W, A, B, m and the bias equal PEFT's formula
    through plain autograd (V formed, n detached): Conv1d/2d/3d, grouped, 1x1 and 3x3 kernels,
    dropout, unbatched inputs and a zero magnitude entry (u recomputed)."""
    (x, W, b, A, B, mag), geo, keep = _conv_args(dims, 4, 6, k, r, groups, bias, mask, batched, zero_m, seed)
    y = conv_op(x, W, b, A, B, mag, 0.7, *geo, keep, 0.3)
    ref = lora_dora_conv_reference(x, W, b, A, B, mag, 0.7, *geo, keep, 0.3)
    inputs = [t for t in (x, W, A, B, mag, b) if t is not None]
    _same_grads(y, ref, inputs, "x W A B m b".split())


def test_conv_norm_is_peft_norm():
    """groups == 1 (any kernel): the cheap expansion equals ||W + s·B ∘ A|| per output channel;
    groups > 1: PEFT's W-sized rearrangement of the update."""
    for groups in (1, 2):
        (x, W, b, A, B, mag), geo, _ = _conv_args(groups=groups, r=4)
        W, A, B = W.detach(), A.detach(), B.detach()
        delta = (B.reshape(-1, 4) @ A.reshape(4, -1)).reshape(W.shape)
        want = (W + 0.3 * delta).flatten(1).norm(dim=1)
        torch.testing.assert_close(conv_dora_norm(W, A, B, 0.3), want)


def test_conv_op_opcheck_and_saved_tensors():
    """torch.library.opcheck passes; autograd keeps the inputs, y and n, nothing W- or x-sized more."""
    (x, W, b, A, B, mag), geo, keep = _conv_args(seed=3)
    torch.library.opcheck(conv_op.default, (x, W, b, A, B, mag, 0.5, *geo, keep, 0.3))
    W.requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = conv_op(x, W, b, A, B, mag, 0.5, *geo, None, 0.0)
    allowed = {t.untyped_storage().data_ptr() for t in (x, W, b, A, B, mag, y)}
    extra = [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in allowed]
    assert extra == [(6,)]  # n


@pytest.mark.parametrize("mask", [False, True])
def test_conv_flop_formula_counts_what_runs(mask):
    """The registered forward formula equals what FlopCounterMode counts when the op runs the
    reference's aten ops on a frozen W, and the cost model's entry equals the counted FLOPs."""
    (x, W, b, A, B, mag), geo, keep = _conv_args(mask=mask, dtype=torch.float32)
    with FlopCounterMode(display=False) as fwd:
        conv_op(x, W, b, A, B, mag, 0.5, *geo, keep, 0.3)
    from lorafx.dialect.conv import conv_flops
    from lorafx.dialect.dora_layers import _conv_norm_flops
    y = torch.nn.functional.conv2d(x, W, None, 1, 1)
    base, fa, fb = conv_flops(tuple(x.shape), tuple(W.shape), tuple(A.shape), tuple(B.shape), tuple(y.shape))
    assert fwd.get_total_flops() == base * (2 if mask else 1) + fa + fb + _conv_norm_flops(W.shape, A.shape, B.shape)


@settings(max_examples=10, deadline=None)
@given(num=st.integers(2, 12), dim=st.integers(1, 7), r=st.integers(1, 9), pad=st.booleans(), zero_m=st.booleans(),
       seed=st.integers(0, 50))
def test_embedding_op_matches_reference(num, dim, r, pad, zero_m, seed):
    """lora_dora_embedding's output and the gradients of W, A, B and m equal PEFT's formula through
    plain autograd (padding_idx: no gradient into that id's column of A)."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)
    ids = torch.randint(0, num, (3, 4), generator=g)
    W, A, B = mk(num, dim), mk(r, num), mk(dim, r)
    mag = torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    if zero_m:
        mag[0] = 0.0
    mag.requires_grad_(True)
    p = int(ids[0, 0]) if pad else -1
    y = emb_op(ids, W, A, B, mag, 0.8, p)
    ref = lora_dora_embedding_reference(ids, W, A, B, mag, 0.8, p)
    _same_grads(y, ref, [W, A, B, mag], "W A B m".split())


def test_embedding_norm_over_the_vocabulary_and_opcheck():
    """n[j] = ||W[:, j] + s·(B A)[j]|| (PEFT's norm, one per embedding dim); opcheck passes."""
    g = torch.Generator().manual_seed(0)
    W, A, B = torch.randn(11, 5, generator=g), torch.randn(3, 11, generator=g), torch.randn(5, 3, generator=g)
    torch.testing.assert_close(embedding_dora_norm(W, A, B, 0.5), (W.t() + 0.5 * B @ A).norm(dim=1))
    ids = torch.randint(0, 11, (2, 3), generator=g)
    mag = torch.rand(5, generator=g).requires_grad_(True)
    torch.library.opcheck(emb_op.default, (ids, W, A.requires_grad_(True), B.requires_grad_(True), mag, 0.5, 1))


# -- compiled models against PEFT ---------------------------------------------------------------------
peft = pytest.importorskip("peft")


class ConvNet(torch.nn.Module):
    """conv (3 -> 6, 3x3, stride 2, padding 1) on 7x7 images, then a linear head."""

    def __init__(self, groups=1):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups)
        self.head = torch.nn.Linear(6 * 16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


class EmbNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 6, padding_idx=0)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, ids):
        return self.head(self.emb(ids)).mean(1)


CASES = {
    "conv": (ConvNet, lambda g: torch.randn(2, 4, 7, 7, generator=g, dtype=torch.float64), "conv"),
    "conv_groups": (lambda: ConvNet(groups=2), lambda g: torch.randn(2, 4, 7, 7, generator=g, dtype=torch.float64),
                    "conv"),
    "embedding": (EmbNet, lambda g: torch.tensor([[0, 3, 5, 19], [2, 0, 7, 7]]), "emb"),
}


def _pair(case, r=4, alpha=6):
    make, inp, target = CASES[case]
    torch.manual_seed(0)
    base = make().double().eval()
    x = inp(torch.Generator().manual_seed(1))
    cm = lorafx.compile(copy.deepcopy(base), example_inputs=(x,), dynamic=False, r=r, alpha=alpha,
                        target_modules=[target], use_dora=True, seed=0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=[target],
                                                                  use_dora=True, init_lora_weights=False))
    return base, x, cm, pm, target


def _copy_from_peft(cm, pm):
    """{PEFT key: (lorafx tensor, PEFT tensor)}, with PEFT's (non-trivial) tensors copied into cm."""
    from lorafx import adapter_io
    theirs = {k[len("base_model.model."):]: v for k, v in peft.get_peft_model_state_dict(pm).items()}
    params = {(p.data_ptr(), p.shape): p for p in pm.parameters() if p.requires_grad}
    out = {}
    with torch.no_grad():
        for key, path in adapter_io.peft_keys(cm.lora_records()).items():
            mine, peft_t = get_attr(cm, path), params[(theirs[key].data_ptr(), theirs[key].shape)]
            assert mine.shape == peft_t.shape, key
            mine.copy_(peft_t)
            out[key] = (mine, peft_t)
    assert sorted(out) == sorted(theirs)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_parity_outputs_and_grads(case):
    """With PEFT's tensors (init_lora_weights=False: B ≠ 0, and m = ||W + s·ΔW||) copied in, outputs and
    the gradients of A, B and the magnitude equal PEFT's use_dora=True layer."""
    base, x, cm, pm, _ = _pair(case)
    pairs = _copy_from_peft(cm, pm)
    cm.train(), pm.train()
    got, want = cm(x), pm(x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(2), dtype=got.dtype)
    (got * w).sum().backward()
    (want * w).sum().backward()
    for key, (mine, theirs) in pairs.items():
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-10, msg=lambda e: f"{key}: {e}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_unload(case):
    """merge(), unmerge() and merge_and_unload() compute the unmerged outputs (a grouped convolution's
    adapter keeps running when merged, and is lowered to aten ops when unloaded)."""
    base, x, cm, pm, _ = _pair(case)
    _copy_from_peft(cm, pm)
    cm.eval()
    with torch.no_grad():
        want = cm(x)
        cm.merge()
        torch.testing.assert_close(cm(x), want, rtol=1e-9, atol=1e-10)
        cm.unmerge()
        torch.testing.assert_close(cm(x), want, rtol=0, atol=0)
        plain = cm.merge_and_unload()
        torch.testing.assert_close(plain(x), want, rtol=1e-9, atol=1e-10)
    assert not any(n.op == "call_function" and "lorafx" in str(n.target) for n in plain.graph.nodes)


def test_merged_weight_is_peft_merge():
    """The merged convolution and embedding weights equal PEFT's merge_and_unload."""
    for case in ("conv", "embedding"):
        base, x, cm, pm, target = _pair(case)
        _copy_from_peft(cm, pm)
        merged = pm.merge_and_unload()
        sd = cm.merged_state_dict() if hasattr(cm, "merged_state_dict") else None
        if sd is None:
            pytest.skip("no merged_state_dict")
        torch.testing.assert_close(sd[f"{target}.weight"], getattr(merged, target).weight, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", ["conv", "embedding"])
def test_peft_format_both_ways(case, tmp_path):
    """save_adapter -> PeftModel.from_pretrained, and PEFT's save_pretrained -> lorafx.load_adapter,
    compute the same outputs (magnitudes under PEFT's key and shape)."""
    base, x, cm, pm, target = _pair(case)
    _copy_from_peft(cm, pm)
    cm.eval(), pm.eval()
    with torch.no_grad():
        want = cm(x)
    cm.save_adapter(str(tmp_path / "lorafx"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lorafx")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=1e-9, atol=1e-10)
    pm.save_pretrained(str(tmp_path / "peft"))
    back = lorafx.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"), example_inputs=(x,), dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), pm(x), rtol=1e-9, atol=1e-10)
    assert {r.kind for r in back.lora_records().values()} == {"lora_dora_conv" if case == "conv"
                                                              else "lora_dora_embedding"}


def test_identity_at_init_and_only_adapters_train():
    """PEFT's init (m = ||W + s·ΔW||) keeps the model the identity; A, B and m are what trains."""
    for case in CASES:
        make, inp, target = CASES[case]
        torch.manual_seed(0)
        base = make().double().eval()
        x = inp(torch.Generator().manual_seed(1))
        cm = lorafx.compile(copy.deepcopy(base), example_inputs=(x,), dynamic=False, r=4, target_modules=[target],
                            use_dora=True)
        with torch.no_grad():
            torch.testing.assert_close(cm(x), base(x), rtol=1e-12, atol=1e-12)
        names = sorted(n for n, p in cm.named_parameters() if p.requires_grad)
        assert names == sorted(f"{target}.{t}" for t in ("lora_A", "lora_B", "lora_magnitude")), names


def test_cost_model_counts_what_flop_counter_counts():
    """AnnotateCost's matmul FLOPs (the kinds' ``cost``) equal FlopCounterMode's count of a training
    step, with and without dropout."""
    from passes.cost_model import graph_cost
    for case, dropout in (("conv", 0.0), ("conv", 0.2), ("embedding", 0.0)):
        make, inp, target = CASES[case]
        torch.manual_seed(0)
        base = make().float()
        x = inp(torch.Generator().manual_seed(1))
        x = x.float() if x.is_floating_point() else x
        cm = lorafx.compile(base, example_inputs=(x,), dynamic=False, r=4, target_modules=[target],
                            use_dora=True, dropout=dropout).train()
        total = graph_cost(cm.graph_module)
        with FlopCounterMode(display=False) as fwd:
            y = cm(x)
        with FlopCounterMode(display=False) as bwd:
            y.sum().backward()
        assert (int(total.fwd_flops), int(total.bwd_flops)) == (fwd.get_total_flops(), bwd.get_total_flops()), case


@pytest.mark.parametrize("case", ["conv", "embedding"])
def test_switching_between_a_dora_adapter_and_a_lora_one(case):
    """A DoRA default adapter on a convolution or embedding and an added (plain LoRA) one: switching
    away and back restores the DoRA outputs exactly, with its kind rebuilt from the base op."""
    base, x, cm, pm, target = _pair(case)
    _copy_from_peft(cm, pm)
    cm.eval()
    with torch.no_grad():
        want = cm(x)
        cm.add_adapter("other", r=2, target_modules=[target], init=False)
        cm.set_adapter("other")
        assert not torch.allclose(cm(x), want)
        cm.set_adapter("default")
        assert torch.equal(cm(x), want)
