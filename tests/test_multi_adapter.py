"""Several adapters on one compiled model (lorafx/adapters.py), against PEFT's behaviour.

* add_adapter: initialised as compile would with the same options and seed; not active and
  frozen until set_adapter (PEFT's rule); only active adapters train;
* acceptance: two adapters trained on one compiled model, switching between them, each
  equal to a single-adapter compile trained the same way from the same init;
* set_adapter([a, b]) equals PEFT with both active (values copied from PEFT); switching
  never captures again; a call signature captured after a switch runs the active adapters;
* disable_adapters() gives the base outputs exactly, and restores on exit (also on error);
* delete_adapter, merge(names), merge_and_unload(names), state_dict round trip;
* PEFT's multi-adapter folder layout both ways.
"""
import copy
import json
import os
import sys
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

import lorafx
import lorafx.adapters
from lorafx.graph_utils import get_attr

from conftest import ids

peft = pytest.importorskip("peft")

DTYPE = torch.float64


class MLP(torch.nn.Module):
    def __init__(self, dims=(6, 5, 4, 3), dropout=0.0):
        super().__init__()
        self.a = torch.nn.Linear(dims[0], dims[1])
        self.b = torch.nn.Linear(dims[1], dims[2])
        self.c = torch.nn.Linear(dims[2], dims[3])
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x, shift=None):
        h = torch.relu(self.a(x))
        if shift is not None:
            h = h + shift
        return self.c(torch.relu(self.b(self.drop(h))))


def mlp(seed=0):
    torch.manual_seed(seed)
    return MLP().to(DTYPE)


def inputs(seed=1, n=7):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


A_OPTS = dict(r=2, alpha=4, target_modules=["a", "b"], seed=11)
B_OPTS = dict(r=3, alpha=6, target_modules=["a", "c"], seed=22)


def two_adapters(model=None, x=None):
    model = model if model is not None else mlp()
    x = x if x is not None else inputs()
    cm = lorafx.compile(model, example_inputs=(x,), **A_OPTS)
    cm.add_adapter("other", **B_OPTS)
    return cm, model, x


def randomise(cm, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for rec in cm.adapter_records(name).values():
            for path in (rec.lora_A, rec.lora_B):
                p = get_attr(cm, path)
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)


def values(cm, name):
    return {f"{s}.{ab}": get_attr(cm, getattr(r, f"lora_{ab}")).detach().clone()
            for s, r in cm.adapter_records(name).items() for ab in "AB"}


def reference(model, x, adapters):
    """The base model plus Σ scale·B A at each adapted linear, by hand (adapters: [(cm, name)])."""
    deltas = {}
    for cm, name in adapters:
        for site, rec in cm.adapter_records(name).items():
            A, B = get_attr(cm, rec.lora_A).detach(), get_attr(cm, rec.lora_B).detach()
            deltas.setdefault(site, []).append((A, B, rec.scale))
    hooks = []
    for site, ds in deltas.items():
        mod = model.get_submodule(site)
        hooks.append(mod.register_forward_hook(
            lambda m, inp, out, ds=ds: out + sum(s * (inp[0] @ A.t()) @ B.t() for A, B, s in ds)))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


# -- adding -----------------------------------------------------------------------------------

def test_add_adapter_initialised_as_compile_inactive_and_frozen():
    cm, model, x = two_adapters()
    single = lorafx.compile(model, example_inputs=(x,), **B_OPTS)
    other = values(cm, "other")
    assert set(other) == {"a.A", "a.B", "c.A", "c.B"}
    for key, value in values(single, "default").items():
        assert torch.equal(other[key], value), key  # same draws as compile with the same options and seed
    assert cm.adapter_names == ["default", "other"]
    assert cm.active_adapters == ["default"] and cm.active_adapter == "default"
    flags = {n: p.requires_grad for n, p in cm.named_parameters() if "lora" in n}
    assert flags == {"a.lora_A": True, "a.lora_B": True, "b.lora_A": True, "b.lora_B": True,
                     "a.lora_A_other": False, "a.lora_B_other": False, "c.lora_A_other": False,
                     "c.lora_B_other": False}
    assert set(cm.lora_records()) == {"a", "b"} and set(cm.adapter_records("other")) == {"a", "c"}
    assert torch.equal(cm(x), model(x))  # B = 0 for both


def test_new_adapter_matches_peft_requires_grad_rule():
    """PEFT: add_adapter leaves the new adapter frozen; set_adapter makes exactly the active ones train."""
    model, x = mlp(), inputs()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b"]))
    pm.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=6, target_modules=["a", "c"]))
    cm, _, _ = two_adapters(model, x)

    def flags_peft():
        return {n.replace("base_model.model.", "").replace(".default.weight", "").replace(".other.weight", "_other"):
                p.requires_grad for n, p in pm.named_parameters() if "lora" in n}

    def flags_lorafx():
        return {n: p.requires_grad for n, p in cm.named_parameters() if "lora" in n}

    assert flags_peft() == flags_lorafx()
    for active in (["other"], ["default", "other"], ["default"]):
        pm.base_model.set_adapter(active)
        cm.set_adapter(active)
        assert flags_peft() == flags_lorafx(), active
        assert cm.active_adapters == active


def test_add_adapter_refusals_leave_the_model_as_it_was():
    cm, model, x = two_adapters()
    before = dict(cm.state_dict())
    with pytest.raises(ValueError, match="already has an adapter named 'other'"):
        cm.add_adapter("other", r=2)
    with pytest.raises(ValueError, match="letters, digits"):
        cm.add_adapter("bad.name")
    with pytest.raises(TypeError, match="unknown option.*'rank'"):
        cm.add_adapter("x", rank=2)
    with pytest.raises(ValueError, match="matched no linear layer"):
        cm.add_adapter("x", target_modules=["nothing"])
    with pytest.raises(ValueError, match="r must be"):
        cm.add_adapter("x", r=0)
    with pytest.raises(ValueError, match="init='lors'"):
        cm.add_adapter("x", init="lors")
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        cm.set_adapter("nope")
    assert cm.adapter_names == ["default", "other"]
    assert set(cm.state_dict()) == set(before)


def test_add_adapter_takes_peft_names():
    """lora_alpha / lora_dropout / init_lora_weights work as in compile; both names for one option is an error."""
    cm, model, x = two_adapters()
    cm.add_adapter("peft_named", r=3, lora_alpha=6, lora_dropout=0.0, init_lora_weights=True,
                   target_modules=["a", "c"], seed=22)
    named, other = values(cm, "peft_named"), values(cm, "other")
    assert set(named) == set(other) and all(torch.equal(named[k], v) for k, v in other.items())  # same seed
    assert {r.scale for r in cm.adapter_records("peft_named").values()} == {2.0}
    with pytest.raises(TypeError, match="both alpha=6 and lora_alpha=6"):
        cm.add_adapter("twice", alpha=6, lora_alpha=6)
    assert "twice" not in cm.adapter_names


# -- switching --------------------------------------------------------------------------------

def test_switching_outputs_and_no_capture(monkeypatch):
    cm, model, x = two_adapters()
    randomise(cm, "default", 1)
    randomise(cm, "other", 2)
    cm.eval()
    y_default = cm(x)

    def no_capture(*a, **k):
        raise AssertionError("switching captured the model again")

    monkeypatch.setattr(lorafx.compiled, "capture", no_capture)
    monkeypatch.setattr(sys.modules["lorafx.capture"], "capture", no_capture)
    monkeypatch.setattr(lorafx.adapters, "capture", no_capture)
    assert torch.allclose(y_default, reference(model, x, [(cm, "default")]), rtol=1e-12, atol=1e-12)
    cm.set_adapter("other")
    assert torch.allclose(cm(x), reference(model, x, [(cm, "other")]), rtol=1e-12, atol=1e-12)
    cm.set_adapter(["default", "other"])
    both = reference(model, x, [(cm, "default"), (cm, "other")])
    assert torch.allclose(cm(x), both, rtol=1e-12, atol=1e-12)
    cm.set_adapter(["other", "default"])
    assert torch.allclose(cm(x), both, rtol=1e-12, atol=1e-12)
    cm.set_adapter("default")
    assert torch.equal(cm(x), y_default)  # the compile's own graph again
    assert len(cm._variants) == 1


@pytest.mark.slow
def test_switch_restores_the_compiled_graph_of_default(tiny_model):
    """On a model whose compile fused siblings and chose schedules, switching away canonicalises the
    graph; switching back to "default" alone gives the compile's optimised graph back."""
    model = tiny_model("llama", DTYPE)
    x = ids(2, 6)
    cm = lorafx.compile(model, example_inputs=(x,), dynamic=False, r=2, alpha=4,
                        target_modules=["q_proj", "k_proj", "v_proj"], seed=3)
    code = cm.graph_module.code
    cm.add_adapter("v_only", r=2, alpha=2, target_modules=["v_proj"], seed=4)
    cm.set_adapter("v_only")
    assert "v_proj.lora_A_v_only" in cm.graph_report() or "lora_A_v_only" in cm.graph_module.code
    cm.set_adapter("default")
    assert cm.graph_module.code == code


@pytest.mark.slow
@given(st.lists(st.sampled_from(["default", "x", "y"]), min_size=1, max_size=3, unique=True),
       st.integers(1, 4), st.sampled_from([["a"], ["b", "c"], ["a", "b", "c"]]), st.booleans())
def test_any_active_set_is_the_sum_of_its_deltas(active, r, targets, rslora):
    """Property: whatever adapters are active, the output is the base plus each active adapter's
    scale·B A at its sites (the concatenated node at shared sites is exact)."""
    model, x = mlp(), inputs()
    cm = lorafx.compile(model, example_inputs=(x,), r=2, alpha=4, target_modules=["a", "b"], seed=0)
    cm.add_adapter("x", r=r, alpha=3, target_modules=targets, use_rslora=rslora, seed=1)
    cm.add_adapter("y", r=1, alpha=1, target_modules=["c", "a"], seed=2)
    for i, name in enumerate(cm.adapter_names):
        randomise(cm, name, i)
    cm.set_adapter(active)
    cm.eval()
    want = reference(model, x, [(cm, n) for n in active])
    assert torch.allclose(cm(x), want, rtol=1e-11, atol=1e-12)
    grads_flow = cm.train()(x).sum()
    grads_flow.backward()
    for name in cm.adapter_names:
        for rec in cm.adapter_records(name).values():
            g = get_attr(cm, rec.lora_B).grad
            assert (g is not None) == (name in active), (name, rec.site)


@pytest.mark.slow
def test_set_adapter_list_equals_peft_with_both_active(tiny_model):
    """Two adapters on a LLaMA, values from PEFT: outputs and gradients with both active equal PEFT's."""
    model = tiny_model("llama", DTYPE)
    x = ids(2, 6, seed=3)
    cfg_a = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    cfg_b = dict(r=3, lora_alpha=3, target_modules=["v_proj", "o_proj"], use_rslora=True)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg_a))
    pm.add_adapter("second", peft.LoraConfig(**cfg_b))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    cm = lorafx.compile(model, example_inputs=(x,), dynamic=False, r=2, alpha=4,
                        target_modules=cfg_a["target_modules"])
    cm.add_adapter("second", r=3, alpha=3, target_modules=cfg_b["target_modules"], use_rslora=True)
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for name in ("default", "second"):
            for site, rec in cm.adapter_records(name).items():
                for ab in "AB":
                    get_attr(cm, getattr(rec, f"lora_{ab}")).copy_(params[f"base_model.model.{site}.lora_{ab}.{name}.weight"])
    pm.base_model.set_adapter(["default", "second"])
    cm.set_adapter(["default", "second"])
    pm.eval(), cm.eval()
    y_peft, y = pm(input_ids=x).logits, cm(input_ids=x).logits
    assert torch.allclose(y, y_peft, rtol=1e-9, atol=1e-10)
    y_peft.square().mean().backward()
    y.square().mean().backward()
    for name in ("default", "second"):
        for site, rec in cm.adapter_records(name).items():
            for ab in "AB":
                got = get_attr(cm, getattr(rec, f"lora_{ab}")).grad
                want = params[f"base_model.model.{site}.lora_{ab}.{name}.weight"].grad
                assert torch.allclose(got, want, rtol=1e-8, atol=1e-10), (name, site, ab)
    pm.base_model.set_adapter("second")
    cm.set_adapter("second")
    assert torch.allclose(cm(input_ids=x).logits, pm(input_ids=x).logits, rtol=1e-9, atol=1e-10)


def test_set_adapter_list_equals_peft_on_an_mlp(tmp_path):
    """Both adapters active (values copied from PEFT): outputs and every adapter gradient equal PEFT's."""
    model, x = mlp(), inputs()
    pm = _peft_two(model, tmp_path)
    cm, _, _ = two_adapters(model, x)
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for name in ("default", "other"):
            for site, rec in cm.adapter_records(name).items():
                for ab in "AB":
                    get_attr(cm, getattr(rec, f"lora_{ab}")).copy_(params[f"base_model.model.{site}.lora_{ab}.{name}.weight"])
    pm.base_model.set_adapter(["default", "other"])
    cm.set_adapter(["default", "other"])
    y_peft, y = pm(x), cm(x)
    assert torch.allclose(y, y_peft, rtol=1e-12, atol=1e-12)
    y_peft.square().sum().backward()
    y.square().sum().backward()
    for name in ("default", "other"):
        for site, rec in cm.adapter_records(name).items():
            for ab in "AB":
                want = params[f"base_model.model.{site}.lora_{ab}.{name}.weight"].grad
                assert torch.allclose(get_attr(cm, getattr(rec, f"lora_{ab}")).grad, want, rtol=1e-10, atol=1e-12)


def test_new_call_signature_after_a_switch_runs_the_active_adapters():
    cm, model, x = two_adapters()
    randomise(cm, "default", 1)
    randomise(cm, "other", 2)
    cm.eval()
    cm.set_adapter("other")
    shift = torch.full((7, 5), 0.25, dtype=DTYPE)
    y = cm(x, shift=shift)  # a second signature, captured now
    assert len(cm._variants) == 2
    assert torch.allclose(y, reference_with_shift(model, x, shift, [(cm, "other")]), rtol=1e-12, atol=1e-12)
    cm.set_adapter("default")
    assert torch.allclose(cm(x, shift=shift), reference_with_shift(model, x, shift, [(cm, "default")]),
                          rtol=1e-12, atol=1e-12)


def reference_with_shift(model, x, shift, adapters):
    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m(x, shift=shift)
    deltas = {}
    for cm, name in adapters:
        for site, rec in cm.adapter_records(name).items():
            deltas.setdefault(site, []).append((get_attr(cm, rec.lora_A).detach(), get_attr(cm, rec.lora_B).detach(),
                                                rec.scale))
    hooks = [model.get_submodule(s).register_forward_hook(
        lambda m, i, o, ds=ds: o + sum(sc * (i[0] @ A.t()) @ B.t() for A, B, sc in ds)) for s, ds in deltas.items()]
    try:
        with torch.no_grad():
            return model(x, shift=shift)
    finally:
        for h in hooks:
            h.remove()


# -- training: the acceptance test -----------------------------------------------------------------

def _steps(cm, params, opt, batches):
    for xb, yb in batches:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(cm(xb), yb)
        loss.backward()
        opt.step()


def test_two_adapters_trained_on_one_model_equal_single_adapter_compiles():
    """The acceptance test: adapters "default" and "other" trained on one compiled model with AdamW,
    interleaved (a step of one, switch, a step of the other), each equal a single-adapter compile
    trained the same way from the same init."""
    model = mlp()
    x = inputs()
    gen = torch.Generator().manual_seed(9)
    batches = [(torch.randn(5, 6, generator=gen, dtype=DTYPE), torch.randn(5, 3, generator=gen, dtype=DTYPE))
               for _ in range(8)]
    A = dict(A_OPTS, dropout=0.1)  # dropout on: each adapter trains alone, with its own masks
    cm = lorafx.compile(model, example_inputs=(x,), **A)
    cm.add_adapter("other", **B_OPTS)
    single_a = lorafx.compile(model, example_inputs=(x,), **A)
    single_b = lorafx.compile(model, example_inputs=(x,), **B_OPTS)
    init = {"default": values(cm, "default"), "other": values(cm, "other")}
    assert all(torch.equal(init["default"][k], v) for k, v in values(single_a, "default").items())
    assert all(torch.equal(init["other"][k], v) for k, v in values(single_b, "default").items())
    for c in (cm, single_a, single_b):
        c.train()
    params = {n: [get_attr(cm, getattr(r, f"lora_{ab}")) for r in cm.adapter_records(n).values() for ab in "AB"]
              for n in ("default", "other")}
    opts = {n: torch.optim.AdamW(ps, lr=0.05) for n, ps in params.items()}
    opt_a = torch.optim.AdamW([p for p in single_a.parameters() if p.requires_grad], lr=0.05)
    opt_b = torch.optim.AdamW([p for p in single_b.parameters() if p.requires_grad], lr=0.05)
    for i in range(4):
        for name, single, opt in (("default", single_a, opt_a), ("other", single_b, opt_b)):
            cm.set_adapter(name)
            with torch.random.fork_rng():
                torch.manual_seed(100 + i)
                _steps(cm, params[name], opts[name], batches[2 * i:2 * i + 2])
            with torch.random.fork_rng():
                torch.manual_seed(100 + i)
                _steps(single, None, opt, batches[2 * i:2 * i + 2])
    for name, single in (("default", single_a), ("other", single_b)):
        got, want = values(cm, name), values(single, "default")
        assert set(got) == set(want)
        for key in got:
            assert not torch.equal(got[key], init[name][key]), (name, key)  # it trained
            assert torch.allclose(got[key], want[key], rtol=1e-10, atol=1e-12), (name, key)
        cm.set_adapter(name)
        cm.eval(), single.eval()
        assert torch.allclose(cm(x), single(x), rtol=1e-10, atol=1e-12), name
        cm.train(), single.train()


def test_several_active_adapters_with_dropout_are_refused_while_training():
    model, x = mlp(), inputs()
    cm = lorafx.compile(model, example_inputs=(x,), **dict(A_OPTS, dropout=0.2))
    cm.add_adapter("other", **B_OPTS)
    cm.set_adapter(["default", "other"])
    cm.train()
    with pytest.raises(RuntimeError, match="one dropout mask"):
        cm(x)
    with torch.no_grad():
        cm(x)  # no gradient: fine
    cm.eval()
    randomise(cm, "default", 1)
    randomise(cm, "other", 2)
    assert torch.allclose(cm(x), reference(model, x, [(cm, "default"), (cm, "other")]), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_gradient_checkpointing_with_several_adapters(tiny_model):
    model = tiny_model("llama", DTYPE)
    x = ids(2, 6, seed=4)
    cm = lorafx.compile(model, example_inputs=(x,), dynamic=False, r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    cm.add_adapter("other", r=2, alpha=2, target_modules=["v_proj", "up_proj"], seed=5)
    for name in cm.adapter_names:
        randomise(cm, name, len(name))
    cm.set_adapter(["default", "other"])
    cm.train()

    def grads():
        cm.zero_grad()
        cm(input_ids=x).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in cm.named_parameters() if p.grad is not None}

    plain = grads()
    cm.gradient_checkpointing_enable()
    checkpointed = grads()
    assert set(plain) == set(checkpointed) and any("_other" in n for n in plain)
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], rtol=1e-9, atol=1e-12), n


# -- disabling, deleting, merging -----------------------------------------------------------------

def test_disable_adapters_gives_the_base_outputs_and_restores():
    cm, model, x = two_adapters()
    randomise(cm, "default", 1)
    randomise(cm, "other", 2)
    cm.set_adapter(["default", "other"])
    cm.eval()
    y = cm(x)
    with cm.disable_adapters():
        assert torch.equal(cm(x), model(x))
        assert cm.active_adapters == ["default", "other"]
    assert torch.equal(cm(x), y)
    with pytest.raises(ZeroDivisionError):
        with cm.disable_adapters():
            assert torch.equal(cm(x), model(x))
            1 / 0
    assert torch.equal(cm(x), y)
    cm.merge()
    with cm.disable_adapter():  # PeftModel's name; a merged model is unmerged inside
        assert torch.equal(cm(x), model(x))
    assert cm.merged and torch.allclose(cm(x), y, rtol=1e-12, atol=1e-12)


def test_disable_adapters_on_a_single_adapter_model():
    model, x = mlp(), inputs()
    cm = lorafx.compile(model, example_inputs=(x,), r=2, target_modules=["a", "b", "c"])
    randomise(cm, "default", 3)
    cm.eval()
    y = cm(x)
    with cm.disable_adapters():
        assert torch.equal(cm(x), model(x))
    assert torch.equal(cm(x), y)


def test_delete_adapter():
    cm, model, x = two_adapters()
    randomise(cm, "other", 2)
    cm.eval()
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        cm.delete_adapter("nope")
    cm.set_adapter(["default", "other"])
    cm.merge()
    with pytest.raises(ValueError, match="merged"):
        cm.delete_adapter("other")
    cm.unmerge()
    with pytest.warns(UserWarning, match="active adapter is now 'other'"):
        cm.set_adapter("default")
        cm.delete_adapter("default")  # PEFT: the first remaining adapter becomes active
    assert cm.adapter_names == ["other"] and cm.active_adapters == ["other"]
    assert not any(k in cm.state_dict() for k in ("a.lora_A", "b.lora_B"))
    assert torch.allclose(cm(x), reference(model, x, [(cm, "other")]), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="last adapter"):
        cm.delete_adapter("other")
    cm.add_adapter("third", r=1, target_modules=["b"], seed=3)
    cm.set_adapter(["other", "third"])
    cm.delete_adapter("third")  # an active one, another stays active: no warning
    assert cm.active_adapters == ["other"]


def test_merge_names_and_unmerge():
    cm, model, x = two_adapters()
    randomise(cm, "default", 1)
    randomise(cm, "other", 2)
    cm.eval()
    y_default = cm(x)
    both = reference(model, x, [(cm, "default"), (cm, "other")])
    cm.merge(["default", "other"])
    assert cm.merged and cm.active_adapters == ["default", "other"]
    assert torch.allclose(cm(x), both, rtol=1e-12, atol=1e-12)
    # while merged: the state dict is the unmerged one, and loads back
    sd = cm.state_dict()
    assert torch.equal(sd["a.weight"], model.a.weight)
    assert "a.lora_A_other" in sd
    cm.unmerge()  # the merged adapters stay active, so unmerge/merge pairs merge the same ones
    assert cm.active_adapters == ["default", "other"]
    assert torch.allclose(cm(x), both, rtol=1e-12, atol=1e-12)
    assert torch.equal(cm.a.weight, model.a.weight)
    cm.load_state_dict(sd)  # (an unmerge/merge pair inside)
    cm.set_adapter("default")
    assert torch.equal(cm(x), y_default)
    cm.merge("other")
    cm.load_state_dict(sd)
    assert cm.merged and cm.active_adapters == ["other"]
    assert torch.allclose(cm(x), reference(model, x, [(cm, "other")]), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="merged already"):
        cm.merge(["default"])
    cm.unmerge()
    cm.set_adapter("default")
    cm.merge()  # no names: the active ones, as before
    assert torch.allclose(cm(x), y_default, rtol=1e-12, atol=1e-12)
    cm.unmerge()
    with pytest.warns(UserWarning, match="unmerging"):
        cm.merge()
        cm.set_adapter("other")  # PEFT: set_adapter unmerges first
    assert not cm.merged


def test_merge_and_unload_names():
    cm, model, x = two_adapters()
    randomise(cm, "default", 1)
    randomise(cm, "other", 2)
    cm.eval()
    y = cm(x)
    for names, used in ((["other"], [(cm, "other")]), (["default", "other"], [(cm, "default"), (cm, "other")]),
                        (None, [(cm, "default")])):
        plain = cm.merge_and_unload(names)
        assert not any("lora" in n for n, _ in plain.named_parameters())
        assert all(n.op != "call_function" or "lorafx" not in str(n.target) for n in plain.graph.nodes)
        assert torch.allclose(plain(x), reference(model, x, used), rtol=1e-12, atol=1e-12), names
        assert set(plain.state_dict()) == set(model.state_dict())
    assert not cm.merged and cm.active_adapters == ["default"] and torch.equal(cm(x), y)


def test_state_dict_round_trip_with_several_adapters():
    cm, model, x = two_adapters()
    randomise(cm, "default", 1)
    randomise(cm, "other", 2)
    sd = {k: v.clone() for k, v in cm.state_dict().items()}
    assert {"a.lora_A", "a.lora_B_other", "c.lora_A_other"} <= set(sd)
    other, _, _ = two_adapters(model, x)
    other.load_state_dict(sd)
    for name in ("default", "other"):
        for key, value in values(cm, name).items():
            assert torch.equal(values(other, name)[key], value)


def test_rebuild_and_unsupported_refused():
    cm, model, x = two_adapters()
    with pytest.raises(RuntimeError, match="ReallocateRanks"):
        cm._rebuild_graphs()
    with pytest.raises(ValueError, match="save_program saves one adapter"):
        cm.save_program("/nonexistent-lorafx-folder")


# -- saving and loading ----------------------------------------------------------------------------

def _peft_two(model, tmp_path):
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b"]))
    pm.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=6, target_modules=["a", "c"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return pm


def test_save_in_peft_layout_loads_in_peft(tmp_path):
    cm, model, x = two_adapters()
    randomise(cm, "default", 1)
    randomise(cm, "other", 2)
    cm.save_adapter(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    assert sorted(os.listdir(tmp_path / "other")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["r"] == 3
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    pm.load_adapter(str(tmp_path / "other"), adapter_name="other")
    pm.eval(), cm.eval()
    for active in (["default"], ["other"], ["default", "other"]):
        pm.base_model.set_adapter(active)
        cm.set_adapter(active)
        assert torch.allclose(pm(x), cm(x), rtol=1e-12, atol=1e-12), active
    same = tmp_path / "same"
    lorafx.save_adapter(cm, str(same))  # the function too writes PEFT's layout
    assert sorted(os.listdir(same)) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    sel = tmp_path / "sel"
    cm.save_pretrained(str(sel), selected_adapters=["other"])
    assert sorted(os.listdir(sel)) == ["other"]


def test_peft_multi_adapter_folder_loads_in_lorafx(tmp_path):
    model, x = mlp(), inputs()
    pm = _peft_two(model, tmp_path)
    pm.save_pretrained(str(tmp_path))
    pm.eval()
    # lorafx.load_adapter: the folder's "default"
    loaded = lorafx.load_adapter(model, str(tmp_path), example_inputs=(x,))
    loaded.eval()
    pm.base_model.set_adapter("default")
    assert torch.allclose(loaded(x), pm(x), rtol=1e-12, atol=1e-12)
    # cm.load_adapter(folder/<name>, adapter_name=name): a new named adapter from the saved config
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    assert loaded.adapter_names == ["default", "other"] and loaded.active_adapters == ["default"]
    assert not get_attr(loaded, loaded.adapter_records("other")["a"].lora_A).requires_grad
    for active in (["other"], ["default", "other"]):
        pm.base_model.set_adapter(active)
        loaded.set_adapter(active)
        assert torch.allclose(loaded(x), pm(x), rtol=1e-12, atol=1e-12), active
    # into an existing adapter: checked, then copied
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    with pytest.raises(ValueError, match="does not fit"):
        loaded.load_adapter(str(tmp_path), adapter_name="other")
    # a refused load of a new name creates nothing
    with pytest.raises(FileNotFoundError):
        loaded.load_adapter(str(tmp_path / "missing"), adapter_name="third")
    assert loaded.adapter_names == ["default", "other"]


def test_round_trip_lorafx_to_lorafx(tmp_path):
    cm, model, x = two_adapters()
    randomise(cm, "default", 1)
    randomise(cm, "other", 2)
    cm.save_pretrained(str(tmp_path))
    fresh = lorafx.load_adapter(model, str(tmp_path), example_inputs=(x,))
    fresh.load_adapter(str(tmp_path / "other"), adapter_name="other")
    for name in ("default", "other"):
        for key, value in values(cm, name).items():
            assert torch.equal(values(fresh, name)[key], value), (name, key)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fresh.set_adapter(["default", "other"])


def test_set_adapter_inside_disable_adapters_takes_effect_on_exit():
    cm, model, x = two_adapters()
    randomise(cm, "default", 1)
    randomise(cm, "other", 2)
    cm.eval()
    with cm.disable_adapters():
        cm.set_adapter("other")
        assert torch.equal(cm(x), model(x))
    assert cm.active_adapters == ["other"]
    assert torch.allclose(cm(x), reference(model, x, [(cm, "other")]), rtol=1e-12, atol=1e-12)


def test_train_eval_switching_with_a_dropout_adapter():
    """An added adapter with dropout: masks on in train(), off in eval(), also after switches."""
    cm, model, x = two_adapters()
    cm.add_adapter("drop", r=2, alpha=2, target_modules=["b"], dropout=0.5, seed=3)
    randomise(cm, "drop", 3)
    cm.set_adapter("drop")
    cm.eval()
    want = reference(model, x, [(cm, "drop")])
    assert torch.allclose(cm(x), want, rtol=1e-12, atol=1e-12)
    cm.train()
    with torch.no_grad():
        assert not torch.allclose(cm(x), want)  # dropout on the adapter's input
    cm.set_adapter("default")
    cm.set_adapter("drop")  # rebuilt in train mode
    with torch.no_grad():
        assert not torch.allclose(cm(x), want)
    cm.eval()
    assert torch.allclose(cm(x), want, rtol=1e-12, atol=1e-12)


def test_set_adapter_inference_mode_freezes_the_active_adapters():
    cm, _, _ = two_adapters()
    cm.set_adapter(["default", "other"], inference_mode=True)
    assert not any(p.requires_grad for p in cm.parameters())
    cm.set_adapter("other")
    assert {n for n, p in cm.named_parameters() if p.requires_grad} == {
        "a.lora_A_other", "a.lora_B_other", "c.lora_A_other", "c.lora_B_other"}


def test_default_deleted_and_added_again_with_other_sites():
    """A signature captured later builds the compile's "default"; after "default" was deleted and added
    again with other sites and rank, those stale nodes are replaced by the current adapters."""
    cm, model, x = two_adapters()
    cm.set_adapter("other")
    cm.delete_adapter("default")
    cm.add_adapter("default", r=1, alpha=3, target_modules=["b", "c"], seed=5)
    randomise(cm, "default", 1)
    randomise(cm, "other", 2)
    cm.set_adapter(["default", "other"])
    cm.eval()
    assert torch.allclose(cm(x), reference(model, x, [(cm, "default"), (cm, "other")]), rtol=1e-12, atol=1e-12)
    shift = torch.full((7, 5), -0.5, dtype=DTYPE)
    assert torch.allclose(cm(x, shift=shift), reference_with_shift(model, x, shift, [(cm, "default"), (cm, "other")]),
                          rtol=1e-12, atol=1e-12)
    cm.set_adapter("default")
    assert torch.allclose(cm(x, shift=shift), reference_with_shift(model, x, shift, [(cm, "default")]),
                          rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_gpt2_conv1d_weights(tiny_model):
    """GPT-2's Conv1D weights are stored (in, out): switching, combining, disabling and merging there."""
    model = copy.deepcopy(tiny_model("gpt2", DTYPE)).eval()
    x = ids(2, 6)
    cm = lorafx.compile(model, example_inputs=(x,), dynamic=False, r=2, alpha=4, target_modules=["c_attn", "c_proj"])
    cm.add_adapter("o", r=3, alpha=3, target_modules=["c_attn", "c_fc"], seed=1)
    for name in cm.adapter_names:
        randomise(cm, name, len(name))
    cm.eval()

    def want(active):
        deltas = {}
        for n in active:
            for site, rec in cm.adapter_records(n).items():
                deltas.setdefault(site, []).append((get_attr(cm, rec.lora_A).detach(), get_attr(cm, rec.lora_B).detach(),
                                                    rec.scale))
        hooks = [model.get_submodule(s).register_forward_hook(
            lambda m, i, o, ds=ds: o + sum(sc * (i[0] @ A.t()) @ B.t() for A, B, sc in ds)) for s, ds in deltas.items()]
        try:
            with torch.no_grad():
                return model(input_ids=x).logits
        finally:
            for h in hooks:
                h.remove()

    for active in (["o"], ["default", "o"], ["default"]):
        cm.set_adapter(active)
        assert torch.allclose(cm(input_ids=x).logits, want(active), rtol=1e-10, atol=1e-10), active
    with cm.disable_adapters():
        assert torch.equal(cm(input_ids=x).logits, model(input_ids=x).logits)
    cm.merge(["default", "o"])
    assert torch.allclose(cm(input_ids=x).logits, want(["default", "o"]), rtol=1e-10, atol=1e-10)
    cm.unmerge()


@pytest.mark.parametrize("opts", [dict(fold_a=True), dict(schedule_keep_xa=True), dict(schedule="f2b5")],
                         ids=["fold_a", "keep_xa", "f2b5"])
def test_switching_from_optimised_forms(opts):
    """Folded A, keep-XA and merged-weight schedules are canonicalised at the first switch; every active
    set computes its deltas; "default" alone gets the compile's graph back; disabling is exact."""
    model, x = mlp(), inputs()
    cm = lorafx.compile(model, example_inputs=(x,), r=2, alpha=4, target_modules=["a", "b"], seed=0, **opts)
    cm.add_adapter("o", r=3, alpha=3, target_modules=["a", "c"], seed=1)
    randomise(cm, "default", 1)
    randomise(cm, "o", 2)
    cm.eval()
    y0 = cm(x)
    assert torch.allclose(y0, reference(model, x, [(cm, "default")]), rtol=1e-11, atol=1e-12)
    for active in (["default", "o"], ["o"]):
        cm.set_adapter(active)
        assert torch.allclose(cm(x), reference(model, x, [(cm, n) for n in active]), rtol=1e-11, atol=1e-12)
    cm.train()
    cm(x).sum().backward()
    assert get_attr(cm, "c.lora_B_o").grad is not None and get_attr(cm, "b.lora_B").grad is None
    cm.eval()
    cm.set_adapter("default")
    assert torch.equal(cm(x), y0)
    with cm.disable_adapters():
        assert torch.equal(cm(x), model(x))


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 6)
        self.b = torch.nn.Linear(6, 6)

    def forward(self, x):
        h = x + self.b(torch.relu(self.a(x)))
        return h + self.b(torch.relu(self.a(h)))


def test_shortcut_models_refuse_named_adapters():
    torch.manual_seed(0)
    model, x = Residual().to(DTYPE), inputs()
    cm = lorafx.compile(model, example_inputs=(x,), r=2, target_modules=["a"], shortcuts=True)
    assert cm.shortcut_records()
    with pytest.raises(ValueError, match="shortcut adapters"):
        cm.add_adapter("x", r=2, target_modules=["b"])
    with pytest.raises(ValueError, match="shortcut adapters"):
        with cm.disable_adapters():
            pass
