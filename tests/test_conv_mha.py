"""LoRA on convolutions (lora_conv) and on nn.MultiheadAttention (its packed in_proj and its out_proj):
the op against a plain-autograd reference, and compile / identity / training / merge / PEFT parity and
the PEFT format both ways on small models."""
import contextlib
import copy
import json
import re
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import lorafx
from lorafx.graph_utils import get_attr
from lorafx.dialect.conv import conv_delta_weight, lora_conv_reference

op = torch.ops.lorafx.lora_conv
_CONVS = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}


def _conv_args(dim, groups, stride, padding, dilation, kernel, r, mask=False, bias=True, unbatched=False, seed=0,
               dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()
    cin, cout = 2 * groups, 3 * groups
    size = (2, cin, *[5 + dim % 2] * dim)[1 if unbatched else 0:]
    x = mk(*size)
    W = mk(cout, cin // groups, *[kernel] * dim)
    b = mk(cout) if bias else None
    A = mk(r, cin, *[kernel] * dim)
    B = mk(cout, r // groups, *[1] * dim)
    m = (torch.rand(size, generator=g) > 0.3) if mask else None
    return x, W, b, A, B, [stride] * dim, [padding] * dim, [dilation] * dim, groups, m


# -- the op ---------------------------------------------------------------------------------------

@settings(max_examples=8, deadline=None)
@given(dim=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2]), stride=st.sampled_from([1, 2]),
       padding=st.sampled_from([0, 1]), dilation=st.sampled_from([1, 2]), kernel=st.sampled_from([1, 2, 3]),
       rmul=st.sampled_from([1, 2]), mask=st.booleans(), bias=st.booleans(), unbatched=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_lora_conv_matches_the_reference(dim, groups, stride, padding, dilation, kernel, rmul, mask, bias, unbatched,
                                         seed):
    """lora_conv equals PEFT's formula computed with plain autograd (conv + s·conv1x1(conv(d(x), A), B)):
    outputs and the gradients of x, W, b, A and B, over conv dims 1/2/3, groups, stride, padding, dilation,
    1x1 kernels, dropout masks and unbatched inputs."""
    x, W, b, A, B, s, p, d, groups, m = _conv_args(dim, groups, stride, padding, dilation, kernel, rmul * groups,
                                                 mask, bias, unbatched, seed)
    args = (W, b, A, B, 0.7, s, p, d, groups, m, 0.3 if mask else 0.0)
    y, ref = op(x, *args), lora_conv_reference(x, *args)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    wrt = [t for t in (x, W, b, A, B) if t is not None]
    for got, want in zip(torch.autograd.grad(y, wrt, dy), torch.autograd.grad(ref, wrt, dy)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dim,groups,kernel", [(1, 1, 3), (2, 2, 3), (3, 1, 1)])
def test_lora_conv_gradcheck_and_flops(dim, groups, kernel):
    """Gradients by finite differences; FlopCounterMode counts the op as its three convolutions."""
    x, W, b, A, B, s, p, d, groups, m = _conv_args(dim, groups, 2, 1, 1, kernel, 2 * groups, mask=True)
    f = lambda x, A, B: op(x, W, b, A, B, 0.5, s, p, d, groups, m, 0.25)
    assert torch.autograd.gradcheck(f, (x, A, B), fast_mode=True)
    with FlopCounterMode(display=False) as counted:
        lora_conv_reference(x, W, b, A, B, 0.5, s, p, d, groups)
    with FlopCounterMode(display=False) as ours:
        op(x, W, b, A, B, 0.5, s, p, d, groups)
    assert ours.get_total_flops() == counted.get_total_flops() > 0


def test_lora_conv_backward_saves_only_inputs_and_skips_unneeded_gradients():
    x, W, b, A, B, s, p, d, groups, _ = _conv_args(2, 1, 1, 1, 1, 3, 2)
    W.requires_grad_(False)
    x = x.detach()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = op(x, W, b, A, B, 1.0, s, p, d, groups)
    assert {id(t) for t in saved} <= {id(x), id(W), id(A), id(B)}  # (and the empty mask: None here)
    y.sum().backward()
    assert W.grad is None and A.grad is not None and B.grad is not None and b.grad is not None


@pytest.mark.slow
def test_lora_conv_opcheck():
    """torch.library.opcheck: schema, fake kernel and autograd registration agree with the kernel."""
    x, W, b, A, B, s, p, d, groups, m = _conv_args(1, 2, 2, 1, 1, 3, 2, mask=True)
    torch.library.opcheck(op.default, (x, W, b, A, B, 0.5, s, p, d, groups, m, 0.25))


@pytest.mark.parametrize("dim,kernel", [(1, 3), (2, 1), (2, 3), (3, 2)])
def test_conv_delta_weight_is_the_adapter_as_one_convolution(dim, kernel):
    """Merging (groups == 1): conv(x, W + ΔW) equals lora_conv, and ΔW equals PEFT's get_delta_weight."""
    x, W, b, A, B, s, p, d, groups, _ = _conv_args(dim, 1, 2, 1, 1, kernel, 3)
    with torch.no_grad():
        merged = _CONVS[dim](x, W + conv_delta_weight(A, B, 0.7), b, s, p, d, 1)
        torch.testing.assert_close(merged, op(x, W, b, A, B, 0.7, s, p, d, 1))
        # PEFT's general formula (its 1x1 case is the same product)
        peft = _CONVS[dim](A.transpose(0, 1), B).transpose(0, 1) * 0.7
        torch.testing.assert_close(conv_delta_weight(A, B, 0.7), peft)


def test_lora_conv_adapters_in_their_own_dtype():
    """adapter_dtype=float32 on a bfloat16 layer: the adapter runs in float32, rounded back once (PEFT's order)."""
    x, W, b, A, B, s, p, d, groups, _ = _conv_args(2, 1, 1, 1, 1, 3, 2, dtype=torch.float32)
    xb, Wb, bb = x.detach().bfloat16(), W.detach().bfloat16(), b.detach().bfloat16()
    y = op(xb, Wb, bb, A, B, 0.5, s, p, d, 1)
    assert y.dtype == torch.bfloat16
    want = (torch.conv2d(xb, Wb, bb, s, p, d).float() + 0.5 * torch.conv2d(torch.conv2d(xb.float(), A, None, s, p, d), B))
    torch.testing.assert_close(y, want.bfloat16())
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad is not None


# -- models ---------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")
DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


class ConvNet(torch.nn.Module):
    """Conv2d (strided, grouped, 1x1), Conv1d, Conv3d (1x1 and 3x3 without bias) and a linear head."""

    def __init__(self, groups=2):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.c3 = torch.nn.Conv2d(8, 6, 1)
        self.d1 = torch.nn.Conv1d(6, 4, 3, padding=1)
        self.e1 = torch.nn.Conv3d(4, 4, 1)
        self.e2 = torch.nn.Conv3d(4, 4, 3, padding=1, bias=False)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        h = self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))
        h = self.d1(h.flatten(2))
        h = self.e2(self.e1(h.view(h.shape[0], 4, 4, 2, 2)))
        return self.fc(h.mean((2, 3, 4)))


CONV_TARGETS = ["c1", "c2", "c3", "d1", "e1", "e2", "fc"]


class MhaNet(torch.nn.Module):
    """A linear, a self-attention nn.MultiheadAttention (sequence first) and a head."""

    def __init__(self, **mha):
        super().__init__()
        self.lin = torch.nn.Linear(6, 10)
        self.mha = torch.nn.MultiheadAttention(10, 2, **mha)
        self.head = torch.nn.Linear(10, 3)

    def forward(self, x):
        h = self.lin(x)
        return self.head(self.mha(h, h, h)[0])


def _conv_net(groups=2):
    torch.manual_seed(0)
    return ConvNet(groups).to(DTYPE), torch.randn(3, 3, 8, 8, dtype=DTYPE)


def _mha_net(**mha):
    torch.manual_seed(0)
    return MhaNet(**mha).to(DTYPE), torch.randn(5, 2, 6, dtype=DTYPE)


@contextlib.contextmanager
def warnings_ignored():
    """PEFT warns on grouped convolutions ("Merging is not supported")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _peft_key(key):  # a peft_tensors key as PEFT's named_parameters spell it
    return "base_model.model." + key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")


def _peft_model(base, targets, **config):
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=targets, init_lora_weights=False,
                                                                    **config))


def _copy_from_peft(cm, pm):
    """Copy PEFT's (non-zero) adapters into cm, by the keys lorafx saves; returns {key: path}."""
    from lorafx.adapter_io import peft_keys
    keys = peft_keys(cm.lora_records())
    params = dict(pm.named_parameters())
    assert {_peft_key(k) for k in keys} == {n for n in params if ".lora_" in n}
    with torch.no_grad():
        for key, path in keys.items():
            get_attr(cm, path).copy_(params[_peft_key(key)])
    return keys


def _assert_parity(cm, pm, x, keys, factor=None):
    """Outputs and every adapter gradient allclose (``factor``: {key: multiplier} of lorafx's gradient)."""
    params = dict(pm.named_parameters())
    cm.zero_grad(set_to_none=True)
    pm.zero_grad(set_to_none=True)
    got, want = cm(x), pm(x)
    torch.testing.assert_close(got, want, **TOL)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    (got * w).sum().backward()
    (want * w).sum().backward()
    for key, path in keys.items():
        g_cm, g_pm = get_attr(cm, path).grad, params[_peft_key(key)].grad
        assert g_pm.abs().max() > 0, key
        torch.testing.assert_close(g_cm * (factor or {}).get(key, 1.0), g_pm, **TOL, msg=lambda m: f"{key}: {m}")


# -- convolutions ----------------------------------------------------------------------------------

def test_conv_model_compiles_identity_at_init_and_only_adapters_train():
    base, x = _conv_net()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cm = lorafx.compile(base, example_inputs=(x,), r=4, alpha=8, target_modules=CONV_TARGETS)
    recs = cm.lora_records()
    assert {s: (r.kind, r.layer) for s, r in recs.items()} == {
        **{s: ("lora_conv", "Conv2d") for s in ("c1", "c2", "c3")}, "d1": ("lora_conv", "Conv1d"),
        "e1": ("lora_conv", "Conv3d"), "e2": ("lora_conv", "Conv3d"), "fc": ("lora_linear", "Linear")}
    assert tuple(get_attr(cm, recs["c2"].lora_A).shape) == (4, 8, 3, 3)  # PEFT's layout: A (r, in, *kernel)
    assert tuple(get_attr(cm, recs["c2"].lora_B).shape) == (8, 2, 1, 1)  # B (out, r / groups, 1, 1)
    assert {k: len(v) for k, v in cm.report().sites_by_layer.items()} == {"Conv2d": 3, "Conv1d": 1, "Conv3d": 2,
                                                                          "Linear": 1}
    torch.testing.assert_close(cm(x), base(x), **TOL)  # B = 0
    trainable = {n for n, p in cm.named_parameters() if p.requires_grad}
    assert trainable == {f"{s}.lora_{ab}" for s in recs for ab in "AB"}
    opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.1)
    frozen = {n: p.clone() for n, p in cm.named_parameters() if not p.requires_grad}
    for _ in range(2):
        opt.zero_grad()
        cm(x).pow(2).sum().backward()
        opt.step()
    assert all(get_attr(cm, recs[s].lora_B).abs().max() > 0 for s in recs)
    assert all(torch.equal(p, dict(cm.named_parameters())[n]) for n, p in frozen.items())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # the user's model is untouched


@pytest.mark.slow
def test_conv_peft_parity_and_round_trips(tmp_path):
    """With A/B copied from PEFT: outputs and adapter gradients equal PEFT's; save_adapter loads in PEFT and
    PEFT's save_pretrained loads in lorafx, with the same outputs (grouped, strided, 1x1, 1d/2d/3d)."""
    base, x = _conv_net()
    cm = lorafx.compile(base, example_inputs=(x,), r=4, alpha=8, target_modules=CONV_TARGETS).eval()
    with warnings_ignored():
        pm = _peft_model(base, CONV_TARGETS, r=4, lora_alpha=8).eval()
    keys = _copy_from_peft(cm, pm)
    _assert_parity(cm, pm, x, keys)
    want = pm(x).detach()
    cm.save_adapter(str(tmp_path / "lorafx"))
    with warnings_ignored():
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lorafx")).eval()
    torch.testing.assert_close(back(x), want, **TOL)
    pm.save_pretrained(str(tmp_path / "peft"))
    loaded = lorafx.load_adapter(base, str(tmp_path / "peft"), example_inputs=(x,)).eval()
    assert {s: r.layer for s, r in loaded.lora_records().items()} == {s: r.layer for s, r in cm.lora_records().items()}
    torch.testing.assert_close(loaded(x), want, **TOL)


def test_conv_merge_unmerge_and_merge_and_unload_equal_the_unmerged_model():
    base, x = _conv_net(groups=1)
    cm = lorafx.compile(base, example_inputs=(x,), r=4, alpha=8, target_modules=CONV_TARGETS, init="gaussian").eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for rec in cm.lora_records().values():
            B = get_attr(cm, rec.lora_B)
            B.copy_(torch.randn(B.shape, generator=gen, dtype=DTYPE) * 0.3)
    want = cm(x).detach()
    assert not torch.allclose(want, base(x))
    cm.merge()
    assert not any(p.requires_grad for n, p in cm.named_parameters() if n.endswith("weight"))
    torch.testing.assert_close(cm(x), want, **TOL)
    cm.unmerge()
    torch.testing.assert_close(cm(x), want, **TOL)
    gm = cm.merge_and_unload()
    assert not any(".lora_" in n for n, _ in gm.named_parameters())
    assert not any(str(n.target).startswith("lorafx.") for n in gm.graph.nodes if n.op == "call_function")
    torch.testing.assert_close(gm(x=x), want, **TOL)  # (the graph is called by the forward's argument names)
    merged = copy.deepcopy(base)
    merged.load_state_dict(cm.merged_state_dict(), strict=True)
    torch.testing.assert_close(merged(x), want, **TOL)


def test_grouped_conv_adapter_keeps_running_when_merged():
    """A grouped convolution's update is no grouped weight (PEFT refuses to merge it): merge() folds the
    other adapters and leaves it running, merge_and_unload() writes it as plain aten convolutions, and
    merged_state_dict() refuses it, naming it, with nothing changed."""
    base, x = _conv_net(groups=2)
    cm = lorafx.compile(base, example_inputs=(x,), r=4, target_modules=["c1", "c2"], init="gaussian").eval()
    with torch.no_grad():
        for rec in cm.lora_records().values():
            get_attr(cm, rec.lora_B).fill_(0.1)
    want = cm(x).detach()
    weights = {n: p.clone() for n, p in cm.named_parameters()}
    cm.merge()
    assert [n.name for n in cm.graph_module.graph.nodes if n.target is op.default] == ["c2_lora"]
    torch.testing.assert_close(cm(x), want, **TOL)
    cm.unmerge()
    assert all(torch.equal(p, weights[n]) for n, p in cm.named_parameters())
    plain = cm.merge_and_unload()
    assert not any(str(n.target).startswith("lorafx.") for n in plain.graph.nodes if n.op == "call_function")
    assert not any(p.requires_grad for p in plain.parameters())
    torch.testing.assert_close(plain(x=x), want, **TOL)
    with pytest.raises(ValueError, match=r"c2 \(a convolution with groups=2\).*PEFT refuses to merge it too.*"
                                         r"merge_and_unload"):
        cm.merged_state_dict()
    assert not cm.merged and all(torch.equal(p, weights[n]) for n, p in cm.named_parameters())
    torch.testing.assert_close(cm(x), want, **TOL)


class _OneConv(torch.nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("conv,r,match", [
    (torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2), 2, r"'conv' \(Conv2d\): it is dilated .*PEFT fails in forward"),
    (torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), 2, r"'conv' \(Conv2d\): it pads its input itself"),
    (torch.nn.Conv2d(4, 4, 2, padding="same"), 2, r"padding='same' pads one side more"),
    (torch.nn.Conv2d(4, 6, 3, groups=2), 3, r"conv is a Conv2d with groups=2 and rank 3: .*divisible by groups"),
])
def test_convolutions_peft_cannot_adapt_are_refused(conv, r, match):
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(ValueError, match=match):
        lorafx.compile(_OneConv(conv), example_inputs=(x,), r=r, target_modules=["conv"])


def test_conv_rank_above_its_smaller_side_is_accepted_with_the_warning():
    """PEFT's r=8 on a 5 -> 1 convolution with a 1-wide kernel: accepted (B·A has rank 1), warned once."""
    from conftest import Warnings
    x = torch.randn(2, 5, 7)
    with Warnings() as records:
        cm = lorafx.compile(_OneConv(torch.nn.Conv1d(5, 1, 1)), example_inputs=(x,), r=8, target_modules=["conv"])
    assert cm.lora_records()["conv"].r == 8
    assert any("rank above min(in, out)" in r.getMessage() for r in records)
    with Warnings() as records:  # a 3-wide kernel: A's fan-in is 5 · 3 = 15 >= 8, and out = 1 < 8 still warns
        lorafx.compile(_OneConv(torch.nn.Conv1d(5, 16, 3)), example_inputs=(x,), r=8, target_modules=["conv"])
    assert not any("rank above" in r.getMessage() for r in records)



def _conv_lora_bias_pair(base, x):
    """(lorafx, PEFT) with lora_bias=True on every layer of ConvNet, PEFT's non-zero A/B/b copied into lorafx."""
    cm = lorafx.compile(base, example_inputs=(x,), r=4, alpha=8, target_modules=CONV_TARGETS, lora_bias=True).eval()
    torch.testing.assert_close(cm(x), base(x), **TOL)  # B = 0 and b = 0 at init
    with warnings_ignored():
        pm = _peft_model(base, CONV_TARGETS, r=4, lora_alpha=8, lora_bias=True).eval()
    return cm, pm, _copy_from_peft(cm, pm)


def test_conv_lora_bias_matches_peft_and_merges():
    """lora_bias=True on convolutions (PEFT's B: a 1x1 conv with a bias b; y += s·b per channel): with
    A/B/b copied from PEFT, outputs and adapter gradients (lora_B.bias's included) equal PEFT's; merge
    folds s·b into the layer's bias (a conv without one, e2, gets one, removed again by unmerge), a
    grouped conv keeps running with its b; merge_and_unload equals the unmerged model; merged_state_dict
    refuses a bias-less layer as for linear, and loads into the source without one."""
    base, x = _conv_net(groups=2)
    cm, pm, keys = _conv_lora_bias_pair(base, x)
    recs = cm.lora_records()
    assert all(r.lora_bias == f"{s}.lora_bias" for s, r in recs.items())
    assert tuple(get_attr(cm, recs["c1"].lora_bias).shape) == (8,)
    assert {"c1.lora_B.bias", "c2.lora_B.bias", "e2.lora_B.bias", "fc.lora_B.bias"} <= set(keys)
    assert get_attr(cm, recs["c1"].lora_bias).abs().max() > 0  # PEFT's init_lora_weights=False: b non-zero
    _assert_parity(cm, pm, x, keys)
    want = pm(x).detach()
    cm.zero_grad(set_to_none=True)
    weights = {n: p.clone() for n, p in cm.named_parameters()}

    cm.merge()
    assert get_attr(cm, "e2.bias").shape == (4,) and not get_attr(cm, "e2.bias").requires_grad
    assert [n.name for n in cm.graph_module.graph.nodes if n.target is op.default] == ["c2_lora"]  # grouped
    torch.testing.assert_close(cm(x), want, **TOL)
    with pytest.raises(ValueError, match=r"c2 \(a convolution with groups=2\)"):  # (as without lora_bias)
        cm.merged_state_dict()
    cm.unmerge()
    assert not hasattr(cm.graph_module.e2, "bias") or cm.graph_module.e2.bias is None
    assert {n for n, _ in cm.named_parameters()} == set(weights)
    assert all(torch.equal(p, weights[n]) for n, p in cm.named_parameters())
    torch.testing.assert_close(cm(x), want, **TOL)
    assert "e2.bias" not in cm.state_dict()

    gm = cm.merge_and_unload()
    assert not any(str(n.target).startswith("lorafx.") for n in gm.graph.nodes if n.op == "call_function")
    assert not any(p.requires_grad for p in gm.parameters())
    assert {n for n, _ in gm.named_parameters() if ".lora_" in n} == {"c2.lora_A", "c2.lora_B", "c2.lora_bias"}
    torch.testing.assert_close(gm(x=x), want, **TOL)

    # merged_state_dict: refused for a conv without bias (as for linear); without it the source holds the state
    base1, _ = _conv_net(groups=1)
    cm1 = lorafx.compile(base1, example_inputs=(x,), r=4, target_modules=["c2", "e2"], lora_bias=True, init=False)
    with pytest.raises(ValueError, match=r"'e2.bias'.*lora_bias=True adapted a layer without bias"):
        cm1.merged_state_dict()
    cm1 = lorafx.compile(base1, example_inputs=(x,), r=4, target_modules=["c1", "c2", "d1", "e1"], lora_bias=True,
                         init=False).eval()
    want1 = cm1(x).detach()
    assert not torch.allclose(want1, base1(x))
    merged = copy.deepcopy(base1)
    merged.load_state_dict(cm1.merged_state_dict(), strict=True)
    torch.testing.assert_close(merged(x), want1, **TOL)


@pytest.mark.slow
def test_conv_lora_bias_round_trips_with_peft(tmp_path):
    """lora_bias=True on convolutions in PEFT's format: save_adapter writes <site>.lora_B.bias and loads in
    PEFT with PEFT's outputs; PEFT's save_pretrained loads in lorafx with the biases and the same outputs."""
    base, x = _conv_net(groups=2)
    cm, pm, _ = _conv_lora_bias_pair(base, x)
    want = pm(x).detach()
    cm.save_adapter(str(tmp_path / "lorafx"))
    assert json.loads((tmp_path / "lorafx" / "adapter_config.json").read_text())["lora_bias"] is True
    with warnings_ignored():
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lorafx")).eval()
    torch.testing.assert_close(back(x), want, **TOL)
    pm.save_pretrained(str(tmp_path / "peft"))
    loaded = lorafx.load_adapter(base, str(tmp_path / "peft"), example_inputs=(x,)).eval()
    assert all(r.lora_bias is not None for r in loaded.lora_records().values())
    torch.testing.assert_close(loaded(x), want, **TOL)


# -- nn.MultiheadAttention ---------------------------------------------------------------------------

MHA_KEYS = {"mha.lora_A.weight": (8, 10), "mha.lora_B.weight": (30, 8),  # the packed in_proj (3E = 30 rows)
            "mha.base_layer.out_proj.lora_A.weight": (8, 10), "mha.base_layer.out_proj.lora_B.weight": (10, 8)}
OUT_A, OUT_B = "mha.base_layer.out_proj.lora_A.weight", "mha.base_layer.out_proj.lora_B.weight"


def _reference_mha(base, pm, factor=1.0):
    """A plain copy of ``base`` with the adapters of PEFT model ``pm`` merged by hand: in_proj_weight + s·B·A,
    out_proj.weight + factor·s·B·A (and lin's, when adapted)."""
    ref = copy.deepcopy(base)
    layer = pm.base_model.model.mha
    s = layer.scaling["default"]
    out = layer.base_layer.out_proj
    lin = pm.base_model.model.lin
    with torch.no_grad():
        ref.mha.in_proj_weight += s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        ref.mha.out_proj.weight += factor * s * out.lora_B["default"].weight @ out.lora_A["default"].weight
        if hasattr(lin, "lora_A"):  # (a plain lora.Linear: W + s·B·A once)
            ref.lin.weight += lin.get_delta_weight("default")
    return ref


def _peft_out_proj_factor(base, pm, x) -> float:
    """How many times PEFT adds an nn.MultiheadAttention's out_proj update in forward: PEFT 0.21.2's
    MultiheadAttention.merge() writes W + ΔW into out_proj and then calls out_proj.merge(), which adds ΔW
    again (huggingface/peft#3774 fixes it): 2 there, 1 in a PEFT without the bug."""
    got = pm(x)
    for factor in (1.0, 2.0):
        if torch.allclose(got, _reference_mha(base, pm, factor)(x), rtol=1e-9, atol=1e-10):
            return factor
    raise AssertionError("PEFT's nn.MultiheadAttention adapter is neither W + ΔW nor W + 2ΔW")


def test_mha_adapts_in_proj_and_out_proj_named_as_peft_names_them():
    """target_modules=["mha"] adapts both projections, as PEFT does, under PEFT's names and shapes: the
    adapter on the packed in_proj is (3E, r), never the out_proj's (the issue's size mismatch)."""
    from lorafx.adapter_io import peft_keys
    from peft.utils import get_peft_model_state_dict
    base, x = _mha_net()
    cm = lorafx.compile(base, example_inputs=(x,), r=8, alpha=8, target_modules=["mha"])
    recs = cm.lora_records()
    assert cm.report().sites_by_layer == {"MultiheadAttention": ["mha", "mha.out_proj"]}
    assert {s: (r.layer, r.weight) for s, r in recs.items()} == {
        "mha": ("MultiheadAttention", "mha.in_proj_weight"),
        "mha.out_proj": ("MultiheadAttention", "mha.out_proj.weight")}
    keys = peft_keys(recs)
    assert {k: tuple(get_attr(cm, p).shape) for k, p in keys.items()} == MHA_KEYS
    pm = _peft_model(base, ["mha"], r=8, lora_alpha=8)
    assert {k[len("base_model.model."):]: tuple(v.shape) for k, v in get_peft_model_state_dict(pm).items()} == MHA_KEYS
    torch.testing.assert_close(cm(x), base(x), **TOL)  # B = 0
    assert {n for n, p in cm.named_parameters() if p.requires_grad} == set(keys.values())
    cm(x).pow(2).sum().backward()
    assert all(get_attr(cm, p).grad is not None for p in keys.values())


def test_mha_parity_with_peft():
    """With A/B copied from PEFT: lorafx computes W + s·B·A on both projections (checked against a plain
    nn.MultiheadAttention holding those weights), and equals PEFT's outputs and adapter gradients up to
    PEFT 0.21.2's doubled out_proj update (see _peft_out_proj_factor)."""
    base, x = _mha_net()
    cm = lorafx.compile(base, example_inputs=(x,), r=8, alpha=8, target_modules=["mha", "lin"]).eval()
    pm = _peft_model(base, ["mha", "lin"], r=8, lora_alpha=8).eval()
    keys = _copy_from_peft(cm, pm)
    torch.testing.assert_close(cm(x), _reference_mha(base, pm)(x), **TOL)
    factor = _peft_out_proj_factor(base, pm, x)
    with torch.no_grad():
        get_attr(cm, keys[OUT_B]).mul_(factor)
    # PEFT's second out_proj update is written through .data, so autograd sees one: its gradients are a single
    # update's, at the doubled point: B's equal lorafx's for B' = factor·B, A's are lorafx's / factor
    _assert_parity(cm, pm, x, keys, factor={OUT_A: 1.0 / factor})


def test_mha_round_trips_with_peft(tmp_path):
    """The issue's bug: lorafx's save_adapter loads in PEFT (it failed with a size mismatch on mha.lora_B), and
    PEFT's adapter loads in lorafx; each side then holds the same tensors and gives the same outputs."""
    base, x = _mha_net()
    cm = lorafx.compile(base, example_inputs=(x,), r=8, alpha=8, target_modules=["mha", "lin"]).eval()
    pm = _peft_model(base, ["mha", "lin"], r=8, lora_alpha=8).eval()
    keys = _copy_from_peft(cm, pm)
    cm.save_adapter(str(tmp_path / "lorafx"))
    config = json.loads((tmp_path / "lorafx" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["lin", "mha"]
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lorafx")).eval()
    params = dict(back.named_parameters())
    assert all(torch.equal(params[_peft_key(k)], get_attr(cm, p)) for k, p in keys.items())
    torch.testing.assert_close(back(x), pm(x), **TOL)
    pm.save_pretrained(str(tmp_path / "peft"))
    loaded = lorafx.load_adapter(base, str(tmp_path / "peft"), example_inputs=(x,)).eval()
    assert sorted(loaded.lora_records()) == ["lin", "mha", "mha.out_proj"]
    assert all(torch.equal(get_attr(loaded, p), get_attr(cm, p)) for p in keys.values())
    torch.testing.assert_close(loaded(x), cm(x), **TOL)


def test_mha_merge_unmerge_and_merged_state_dict():
    """Merging writes W + s·B·A into copies of in_proj_weight and out_proj.weight (never the user's)."""
    base, x = _mha_net()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cm = lorafx.compile(base, example_inputs=(x,), r=4, alpha=8, target_modules=["mha"]).eval()
    pm = _peft_model(base, ["mha"], r=4, lora_alpha=8)
    _copy_from_peft(cm, pm)
    want = cm(x).detach()
    cm.merge()
    torch.testing.assert_close(cm(x), want, **TOL)
    cm.unmerge()
    torch.testing.assert_close(cm(x), want, **TOL)
    torch.testing.assert_close(cm.merge_and_unload()(x=x), want, **TOL)
    state = cm.merged_state_dict()
    ref = _reference_mha(base, pm)
    for key in ("mha.in_proj_weight", "mha.out_proj.weight"):
        torch.testing.assert_close(state[key], ref.state_dict()[key], **TOL)
    merged = copy.deepcopy(base)
    merged.load_state_dict(state, strict=True)
    torch.testing.assert_close(merged(x), want, **TOL)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())


def test_mha_selection_dropout_and_all_linear(tmp_path):
    """rank_pattern on the attention's name ranks both projections (PEFT's rule); PEFT never applies
    lora_dropout to an attention's adapters (it runs them merged), nor does lorafx; all-linear adapts the
    attention too."""
    base, x = _mha_net()
    cm = lorafx.compile(base, example_inputs=(x,), r=4, rank_pattern={"mha": 2}, dropout=0.1,
                        target_modules=["mha", "lin"])
    assert {s: (r.r, r.dropout) for s, r in cm.lora_records().items()} == {
        "lin": (4, 0.1), "mha": (2, 0.0), "mha.out_proj": (2, 0.0)}
    cm.save_adapter(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"mha": 2} and config["lora_dropout"] == 0.1
    every = lorafx.compile(base, example_inputs=(x,), r=2, target_modules="all-linear")
    assert {"lin", "mha", "mha.out_proj"} <= set(every.lora_records())


class _CrossAttention(torch.nn.Module):
    def __init__(self, **mha):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(10, 2, **mha)

    def forward(self, q, kv):
        return self.mha(q, kv, kv)[0]


@pytest.mark.parametrize("model,targets,match", [
    (lambda: MhaNet(), ["out_proj", "lin"],
     r"names 'mha.out_proj', a projection of the MultiheadAttention 'mha'.*Target 'mha' instead"),
    (lambda: _CrossAttention(), ["mha"], r"'mha' \(MultiheadAttention\): it is called with different query, key"),
    (lambda: _CrossAttention(kdim=6, vdim=6), ["mha"], r"'mha' \(MultiheadAttention\): it has separate query, key "
     r"and value weights .*PEFT does not adapt either"),
])
def test_mha_lorafx_cannot_adapt_is_refused(model, targets, match):
    m = model().to(DTYPE)
    x = (torch.randn(5, 2, 6, dtype=DTYPE),) if isinstance(m, MhaNet) else \
        (torch.randn(5, 2, 10, dtype=DTYPE), torch.randn(4, 2, m.mha.kdim, dtype=DTYPE))
    with pytest.raises(ValueError, match=match + ".*nothing was compiled"):
        lorafx.compile(m, example_inputs=x, r=2, target_modules=targets)


def test_conv_cost_model_counts_what_flop_counter_mode_counts():
    """AnnotateCost's FLOPs for lora_conv nodes equal FlopCounterMode's count of a training step (groups == 1:
    torch's formula for a grouped convolution's weight gradient ignores the groups)."""
    base, x = _conv_net(groups=1)
    cm = lorafx.compile(base, example_inputs=(x,), r=4, target_modules=CONV_TARGETS, dynamic=False)
    with FlopCounterMode(display=False) as fwd:
        y = cm(x)
    with FlopCounterMode(display=False) as bwd:
        y.sum().backward()
    cost = cm.report().cost["at_example"]
    assert (cost["forward_flops"], cost["backward_flops"]) == (fwd.get_total_flops(), bwd.get_total_flops())


def test_conv_dropout_is_on_in_train_and_off_in_eval():
    base, x = _conv_net(groups=1)
    cm = lorafx.compile(base, example_inputs=(x,), r=4, target_modules=["c1", "d1"], dropout=0.3)
    with torch.no_grad():
        for rec in cm.lora_records().values():
            get_attr(cm, rec.lora_B).fill_(0.2)
    cm.train()
    assert not torch.allclose(cm(x), cm(x))
    cm.eval()
    want = cm(x)
    cm.merge()  # (merged: no dropout to apply)
    torch.testing.assert_close(cm(x), want, **TOL)


@pytest.mark.parametrize("make,targets,named", [(_conv_net, ["c1", "fc"], "'c1' (Conv2d)"),
                                                (_mha_net, "all-linear", "'mha' (MultiheadAttention)")])
def test_rank_budget_refuses_convolutions_and_attention(make, targets, named):
    """AllocateRanks ranks plain linears (PEFT gives an attention's two projections one rank): a convolution or
    an nn.MultiheadAttention under rank_budget is refused, naming it, never left out silently."""
    base, x = make()
    with pytest.raises(ValueError, match=re.escape(named) + r".*exclude_modules"):
        lorafx.compile(base, example_inputs=(x,), target_modules=targets, rank_budget=200, proxy="constant")


@pytest.mark.parametrize("make,targets", [(_conv_net, ["c1", "c2", "fc"]),
                                          pytest.param(_mha_net, ["mha", "lin"], marks=pytest.mark.slow)])
def test_several_adapters_on_convolutions_and_attention(make, targets):
    """add_adapter / set_adapter / disable_adapters / merge / delete_adapter through the kinds' base_op,
    unmerge and insert: a second adapter on a grouped convolution and on an attention's projections."""
    base, x = make()
    cm = lorafx.compile(base, example_inputs=(x,), r=2, target_modules=targets).eval()
    with torch.no_grad():
        for rec in cm.lora_records().values():
            get_attr(cm, rec.lora_B).fill_(0.05)
    want = cm(x).detach()
    cm.add_adapter("other", r=4, target_modules=targets, seed=3)
    cm.set_adapter("other")
    torch.testing.assert_close(cm(x), base(x), **TOL)  # its B = 0
    cm.set_adapter("default")
    torch.testing.assert_close(cm(x), want, **TOL)
    with cm.disable_adapters():
        torch.testing.assert_close(cm(x), base(x), **TOL)
    cm.merge()
    torch.testing.assert_close(cm(x), want, **TOL)
    cm.unmerge()
    cm.delete_adapter("other")
    torch.testing.assert_close(cm(x), want, **TOL)
