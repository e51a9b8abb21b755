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


@pytest.mark.parametrize("train", [True, False])
def test_matches_peft_dora_layer_with_dropout(train):
    """PEFT's own DoRA linear, its dropout replaced by a fixed mask: the same output and the same
    gradients of x, A, B and m (in train mode PEFT keeps x Wᵀ on the undropped x and rescales the
    dropped one; in eval it rescales x Wᵀ)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pm = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 4)).double(),
                             peft.LoraConfig(r=3, lora_alpha=5, lora_dropout=0.3, use_dora=True,
                                             target_modules=["0"]))
    layer = pm.base_model.model[0]
    keep = torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(2)) > 0.3

    class FixedMask(torch.nn.Module):
        def forward(self, t):
            return t * keep / 0.7

    layer.lora_dropout["default"] = FixedMask()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    pm.train(train)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    want = layer(x)
    got = op(x, layer.base_layer.weight, layer.base_layer.bias, A, B, mag, layer.scaling["default"],
             keep if train else None, 0.3)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    for a, w in zip(torch.autograd.grad(got, (x, A, B, mag), g), torch.autograd.grad(want, (x, A, B, mag), g)):
        torch.testing.assert_close(a, w)


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
    """A frozen W gets no gradient; autograd keeps the inputs, y and the norm vector n, never an
    out x in matrix or a second (tokens, out) tensor; backward does not recompute n."""
    x, W, b, A, B, mag, _ = _args(tokens=(16,), n=8, m=8, dtype=torch.float32)
    W.requires_grad_(False)
    x = x.detach()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = op(x, W, b, A, B, mag, 1.0, None, 0.0)
    y.sum().backward()
    assert W.grad is None and A.grad is not None and B.grad is not None and mag.grad is not None
    allowed = {t.untyped_storage().data_ptr() for t in (x, W, b, A, B, mag, y)}
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in allowed]
    assert [tuple(t.shape) for t in extra] == [(8,)]  # n
    torch.testing.assert_close(extra[0], dora_norm(W, A.detach(), B.detach(), 1.0))


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


# -- models: PEFT parity, the PEFT format both ways, merging (slow; the fast tier has a small MLP below
# and tests/test_peft_interop.py::test_dora_adapter_round_trip, LLaMA both ways) ----------------------
import copy  # noqa: E402
import json  # noqa: E402

from conftest import ids  # noqa: E402

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)
# family -> (LoraConfig-style settings shared by PEFT and lorafx)
MODELS = {
    "llama": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                  rank_pattern={"q_proj": 2}),  # r=4 > min(in, out)? no; rank 2 below, 4 at the MLP
    "bert": dict(r=2, alpha=4, target_modules=["query", "value", "dense"]),
}
_PEFT = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_magnitude": "lora_magnitude_vector"}


def _peft_param(site, which):
    return f"base_model.model.{site}.{_PEFT[which]}.default.weight"


def _logits(model, x):
    out = model(input_ids=x)
    return out.logits


class Pair:
    """A lorafx DoRA model and a PEFT DoRA model on the same base, holding the same random
    A, B (B != 0) and magnitudes (perturbed away from their init)."""

    def __init__(self, family, base):
        peft = pytest.importorskip("peft")
        settings = MODELS[family]
        self.base, self.x = base, ids(3, 7, 96, seed=5)
        self.cm = lorafx.compile(copy.deepcopy(base), example_inputs=(self.x,), dynamic=False, use_dora=True,
                                 seed=0, **settings)
        cfg = peft.LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], use_dora=True,
                              target_modules=settings["target_modules"],
                              rank_pattern=settings.get("rank_pattern", {}))
        self.pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        self.init_magnitudes = {n: p.detach().clone() for n, p in self.cm.trainable_parameters().items()
                                if n.endswith("lora_magnitude")}
        self.init_logits = _logits(self.cm.eval(), self.x).detach()
        gen = torch.Generator().manual_seed(11)
        pp = dict(self.pm.named_parameters())
        with torch.no_grad():
            for name, p in self.cm.trainable_parameters().items():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=DTYPE) * 0.3)
                elif name.endswith("lora_magnitude"):
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=DTYPE))
                site, which = name.rsplit(".", 1)
                pp[_peft_param(site, which)].copy_(p)
        self.cm.eval()
        self.pm.eval()


@pytest.fixture(scope="module")
def pairs(tiny_model):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = Pair(family, tiny_model(family, DTYPE))
        return cache[family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_peft_parity_logits_and_adapter_grads(pairs, family):
    """Same logits as PEFT's use_dora=True, and the same gradients of every A, B and magnitude;
    the magnitude starts where PEFT's does (||W|| row-wise, B = 0) and the model is the base
    model at init."""
    p = pairs(family)
    cm, pm = p.cm, p.pm
    peft_params = dict(pm.named_parameters())
    for name, m0 in p.init_magnitudes.items():  # PEFT's init: ||W + s·B A|| with B = 0
        site = name.rsplit(".", 1)[0]
        W = p.base.get_submodule(site).weight
        torch.testing.assert_close(m0, torch.linalg.norm(W, dim=1), **TOL)
    torch.testing.assert_close(p.init_logits, _logits(p.base.eval(), p.x), **TOL)
    assert {n.rsplit(".", 1)[1] for n in cm.trainable_parameters()} == set(_PEFT)
    assert {r.kind for r in cm.lora_records().values()} == {"lora_dora"}

    got, want = _logits(cm, p.x), _logits(pm, p.x)
    torch.testing.assert_close(got, want, **TOL)
    assert (got - p.init_logits).abs().max() > 1e-3
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    for model, out in ((cm, got), (pm, want)):
        model.zero_grad(set_to_none=True)
        (out * weight).sum().backward()
    for name, param in cm.trainable_parameters().items():
        ref = peft_params[_peft_param(*name.rsplit(".", 1))].grad
        assert ref is not None and ref.abs().max() > 0, name
        torch.testing.assert_close(param.grad, ref, **TOL, msg=lambda m: f"{name}: {m}")
    for model in (cm, pm):
        model.zero_grad(set_to_none=True)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_save_adapter_loads_in_peft_and_back(pairs, family, tmp_path):
    """save_adapter -> PeftModel.from_pretrained, and PEFT's save_pretrained ->
    lorafx.load_adapter, both give the same outputs."""
    peft = pytest.importorskip("peft")
    p = pairs(family)
    want = _logits(p.cm, p.x)
    p.cm.save_adapter(str(tmp_path / "lorafx"))
    config = json.loads((tmp_path / "lorafx" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(p.base), str(tmp_path / "lorafx")).eval()
    torch.testing.assert_close(_logits(loaded, p.x), want, **TOL)

    p.pm.save_pretrained(str(tmp_path / "peft"))
    cm = lorafx.load_adapter(copy.deepcopy(p.base), str(tmp_path / "peft"), example_inputs=(p.x,),
                             dynamic=False).eval()
    torch.testing.assert_close(_logits(cm, p.x), _logits(p.pm, p.x), **TOL)


@pytest.mark.slow
def test_merge_unmerge_and_unload_llama(pairs):
    """merge() folds m / ||W + s·BA|| ⊙ (W + s·BA) into W; unmerge() restores it exactly;
    merge_and_unload() and merged_state_dict() give the same model without adapters."""
    p = pairs("llama")
    cm = p.cm
    want = _logits(cm, p.x).detach()
    with torch.no_grad():
        cm.merge()
        assert not any(r.kind == "lora_dora" and not r.merged for r in cm.lora_records().values())
        torch.testing.assert_close(_logits(cm, p.x), want, **TOL)
        cm.unmerge()
        assert torch.equal(_logits(cm, p.x), want)
        plain = cm.merge_and_unload()
        assert not [n for n in plain.graph.nodes if "lorafx" in str(n.target)]
        assert not [n for n, _ in plain.named_parameters() if "lora_" in n]
        torch.testing.assert_close(plain(input_ids=p.x).logits, want, **TOL)
        merged = copy.deepcopy(p.base)
        merged.load_state_dict(cm.merged_state_dict(), strict=True)
        torch.testing.assert_close(_logits(merged.eval(), p.x), want, **TOL)


@pytest.mark.slow
def test_activation_checkpointing_keeps_dora_gradients(tiny_model):
    """CheckpointLayers (gradient_checkpointing_enable) recomputes each decoder layer, its
    lora_dora nodes included: the same loss and adapter gradients."""
    base = tiny_model("llama", DTYPE)
    x = ids(2, 6, 96, seed=3)
    grads = []
    for checkpointing in (False, True):
        cm = lorafx.compile(copy.deepcopy(base), example_kwargs={"input_ids": x, "labels": x}, dynamic=False,
                            r=4, alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True, seed=0)
        _perturb(cm)
        if checkpointing:
            cm.gradient_checkpointing_enable()
        cm.train()
        cm(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in cm.trainable_parameters().items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **TOL)


# -- a small MLP: the fast tier (PEFT parity, merging, the passes DoRA meets, refusals) -------------
class Block(torch.nn.Module):
    """Two linears reading one input (siblings), a Conv1D-free stack, biases on and off."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(12, 8)
        self.k = torch.nn.Linear(12, 8, bias=False)
        self.out = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.out(torch.relu(self.q(x)) * self.k(x))


def _block():
    torch.manual_seed(0)
    return Block().to(DTYPE)


X = torch.randn(6, 12, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
TARGETS = ["q", "k", "out"]


def _compile(base, **options):
    return lorafx.compile(copy.deepcopy(base), example_inputs=(X,), dynamic=False, r=3, alpha=6,
                          target_modules=TARGETS, use_dora=True, seed=0, **options)


def _perturb(cm, seed=4):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(cm.trainable_parameters().items()):
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
            elif name.endswith("lora_magnitude"):
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _out_and_grads(cm):
    cm.zero_grad(set_to_none=True)
    y = cm(X)
    (y * torch.linspace(-1, 1, y.numel(), dtype=DTYPE).view(y.shape)).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in cm.trainable_parameters().items()}


def test_small_model_peft_parity_and_merge():
    """PEFT's use_dora=True on the same block, same A/B/m: equal outputs and gradients of
    every A, B and m; identity at init; merge/unmerge/merge_and_unload/merged_state_dict."""
    peft = pytest.importorskip("peft")
    base = _block()
    cm = _compile(base)
    torch.testing.assert_close(cm(X), base(X), **TOL)  # identity at init (B = 0, m = ||W||)
    _perturb(cm)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS,
                                                                   use_dora=True))
    pp = dict(pm.named_parameters())
    with torch.no_grad():
        for name, p in cm.trainable_parameters().items():
            pp[_peft_param(*name.rsplit(".", 1))].copy_(p)
    y, grads = _out_and_grads(cm)
    yp = pm(X)
    (yp * torch.linspace(-1, 1, yp.numel(), dtype=DTYPE).view(yp.shape)).sum().backward()
    torch.testing.assert_close(y, yp, **TOL)
    for name, g in grads.items():
        torch.testing.assert_close(g, pp[_peft_param(*name.rsplit(".", 1))].grad, **TOL,
                                   msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        cm.eval()
        want = cm(X)
        cm.merge()
        torch.testing.assert_close(cm(X), want, **TOL)
        cm.unmerge()
        assert torch.equal(cm(X), want)
        torch.testing.assert_close(cm.merge_and_unload()(X), want, **TOL)
        merged = copy.deepcopy(base)
        merged.load_state_dict(cm.merged_state_dict(), strict=True)
        torch.testing.assert_close(merged(X), want, **TOL)


@pytest.mark.parametrize("options", [dict(fold_a=True), dict(fuse_siblings=True), dict(schedule="f2b5")],
                         ids=lambda o: next(iter(o)))
def test_passes_leave_dora_adapters_exact(options):
    """The rewrites keyed on lora_linear (FoldLoRAIntoBase, FuseSiblings, SelectSchedule) leave
    lora_dora nodes as they are: the same outputs and gradients as the default pipeline."""
    base = _block()
    ref, cm = _compile(base), _compile(base, **options)
    _perturb(ref), _perturb(cm)
    y0, g0 = _out_and_grads(ref)
    y1, g1 = _out_and_grads(cm)
    assert torch.equal(y0, y1) and g0.keys() == g1.keys()
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


@pytest.mark.parametrize("options,match", [
    (dict(target="cim"), "use_dora=True is not supported with target='cim'"),
    (dict(sparsity=0.5, sparsity_method="magnitude"), "use_dora=True and sparsity= cannot be combined"),
])
def test_unsupported_combinations_are_refused(options, match):
    base = _block()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(Exception, match=match):
        _compile(base, **options)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_planned_on_meta_then_materialized_equals_compiling_the_loaded_model():
    """use_dora=True on the meta device plans the magnitudes; lorafx.materialize computes them
    from the loaded W and the drawn A and B: the same model as compiling the loaded one."""
    torch.manual_seed(0)
    real = Block()
    with torch.device("meta"):
        planned_base = Block()
    options = dict(dynamic=False, r=3, target_modules=TARGETS, use_dora=True, seed=0)
    planned = lorafx.compile(planned_base, example_inputs=(torch.empty(6, 12, device="meta"),), **options)
    assert all(p.is_meta for p in planned.trainable_parameters().values())
    lorafx.materialize(planned, real.state_dict())
    direct = lorafx.compile(copy.deepcopy(real), example_inputs=(X.float(),), **options)
    sa, sb = planned.state_dict(), direct.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(k.endswith("lora_magnitude") for k in sa)
    torch.testing.assert_close(planned(X.float()), real(X.float()))


def test_dora_on_embeddings_compiles_and_parameters_are_refused_by_name():
    """use_dora on an embedding beside a linear builds a DoRA op on each (lorafx/dialect/dora_layers.py);
    a target_parameters site (PEFT refuses DoRA there too) is refused, naming it and its kind."""
    from types import SimpleNamespace
    from passes.insert_lora import _refuse_dora_on_other_layers

    class EmbLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 6)
            self.lin = torch.nn.Linear(6, 3)

        def forward(self, i):
            return self.lin(self.emb(i))

    i = torch.randint(0, 10, (2, 4))
    cm = lorafx.compile(EmbLinear(), example_inputs=(i,), dynamic=False, r=2, target_modules=["emb", "lin"],
                        use_dora=True)
    assert sorted(r.kind for r in cm.lora_records().values()) == ["lora_dora", "lora_dora_embedding"]
    sites = [SimpleNamespace(module="q", kind="lora_linear", layer="Linear"),
             SimpleNamespace(module="c", kind="lora_conv", layer="Conv2d"),
             SimpleNamespace(module="p", kind="lora_parameter", layer="Parameter")]
    with pytest.raises(ValueError, match=r"'p' \(Parameter\); nothing was compiled"):
        _refuse_dora_on_other_layers(sites)
    _refuse_dora_on_other_layers(sites[:2])


def test_conv1d_layout_peft_parity_and_merge():
    """transformers' Conv1D (weight stored (in, out), PEFT's fan_in_fan_out=True): the same
    outputs and gradients as PEFT, and a merged weight in the stored layout."""
    peft = pytest.importorskip("peft")
    from transformers.pytorch_utils import Conv1D

    class Conv1DBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = Conv1D(16, 12)
            self.c_proj = Conv1D(5, 16)

        def forward(self, x):
            return self.c_proj(torch.tanh(self.c_fc(x)))

    torch.manual_seed(0)
    base = Conv1DBlock().to(DTYPE)
    cm = lorafx.compile(copy.deepcopy(base), example_inputs=(X,), dynamic=False, r=3, alpha=6,
                        target_modules=["c_fc", "c_proj"], use_dora=True, seed=0)
    assert all(r.weight_transposed for r in cm.lora_records().values())
    torch.testing.assert_close(cm(X), base(X), **TOL)
    _perturb(cm)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, use_dora=True,
                                                                   target_modules=["c_fc", "c_proj"],
                                                                   fan_in_fan_out=True))
    pp = dict(pm.named_parameters())
    with torch.no_grad():
        for name, p in cm.trainable_parameters().items():
            pp[_peft_param(*name.rsplit(".", 1))].copy_(p)
    y, grads = _out_and_grads(cm)
    yp = pm(X)
    (yp * torch.linspace(-1, 1, yp.numel(), dtype=DTYPE).view(yp.shape)).sum().backward()
    torch.testing.assert_close(y, yp, **TOL)
    for name, g in grads.items():
        torch.testing.assert_close(g, pp[_peft_param(*name.rsplit(".", 1))].grad, **TOL)
    with torch.no_grad():
        cm.eval()
        cm.merge()
        torch.testing.assert_close(cm(X), y, **TOL)
        cm.unmerge()
        merged = copy.deepcopy(base)
        merged.load_state_dict(cm.merged_state_dict(), strict=True)
        torch.testing.assert_close(merged(X), y, **TOL)


def test_rank_budget_allocates_dora_adapters_and_reallocation_is_refused():
    """AllocateRanks gives DoRA adapters their ranks (identity at init); ReallocateRanks, which
    would restart the learned magnitudes, refuses a DoRA model by name."""
    base = _block()
    cm = _compile(base, rank_budget=1.0, proxy="constant")
    assert {r.kind for r in cm.lora_records().values()} == {"lora_dora"}
    torch.testing.assert_close(cm(X), base(X), **TOL)
    with pytest.raises(ValueError, match="ReallocateRanks does not support DoRA"):
        lorafx.ReallocateRanks(cm)


@pytest.mark.slow
def test_program_save_and_load(tmp_path):
    """save_program / load_program keep the lora_dora nodes and the magnitudes: same outputs
    and gradients."""
    cm = _compile(_block())
    _perturb(cm)
    y, grads = _out_and_grads(cm)
    cm.save_program(str(tmp_path / "program"))
    loaded = lorafx.load_program(str(tmp_path / "program"))
    y2, grads2 = _out_and_grads(loaded)
    torch.testing.assert_close(y2, y, **TOL)
    assert grads2.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], **TOL)


def test_cost_model_counts_what_flop_counter_counts():
    """AnnotateCost's matmul FLOPs of a DoRA model (the kind's ``cost``) equal FlopCounterMode's
    count of its forward and backward."""
    from passes.cost_model import graph_cost
    cm = _compile(_block())
    _perturb(cm)
    total = graph_cost(cm.graph_module)
    with FlopCounterMode(display=False) as fwd:
        y = cm(X)
    with FlopCounterMode(display=False) as bwd:
        y.sum().backward()
    assert (int(total.fwd_flops), int(total.bwd_flops)) == (fwd.get_total_flops(), bwd.get_total_flops())


def test_adapter_dropout_on_in_train_off_in_eval():
    """dropout= gives DoRA adapters PEFT's dropout: active in train() (the output changes with the
    mask), the identity in eval() (the output of a model compiled without dropout)."""
    base = _block()
    plain, dropped = _compile(base), _compile(base, dropout=0.3)
    _perturb(plain), _perturb(dropped)
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(X), plain.eval()(X), **TOL)
        torch.manual_seed(0)
        assert not torch.allclose(dropped.train()(X), plain.train()(X))


def test_switching_between_a_dora_adapter_and_a_lora_one():
    """A DoRA default adapter and an added (plain LoRA) one: switching away and back restores
    the DoRA outputs exactly; activating both at one site is refused, naming the magnitude."""
    cm = _compile(_block())
    _perturb(cm)
    with torch.no_grad():
        want = cm(X)
        cm.add_adapter("other", r=2, target_modules=["q"])
        for name, p in cm.named_parameters():
            if name.endswith("lora_B_other"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
        cm.set_adapter("other")
        assert not torch.allclose(cm(X), want)
        cm.set_adapter("default")
        assert torch.equal(cm(X), want)
    with pytest.raises(ValueError, match="DoRA magnitude"):
        cm.set_adapter(["default", "other"])
