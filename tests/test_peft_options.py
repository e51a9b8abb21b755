"""PEFT's LoraConfig names in ``lorafx.compile`` and the options behind them: ``lora_bias``,
``layers_to_transform``/``layers_pattern``, and the inits ``False``, ``"pissa"``, ``"olora"``.

Every option is checked against PEFT itself on a small float64 model: the same sites, outputs
and adapter gradients with the same A/B (copied through PEFT's own save format), and adapters
moving both ways.  PiSSA/OLoRA are deterministic (SVD, QR), so lorafx's init equals PEFT's;
their adapters are saved converted to plain LoRA on the original base, and PEFT loads them there.
"""
import copy
import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

import lorafx
from lorafx.graph_utils import get_attr
from lorafx.passes.peft_init import in_selected_layers, residual_init

from conftest import Warnings

peft = pytest.importorskip("peft")

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(12, 10)
        self.v = torch.nn.Linear(10, 12, bias=False)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


class Inner(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = torch.nn.ModuleList([Block() for _ in range(n)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


class Net(torch.nn.Module):
    """``model.layers.<i>.q`` (with bias) and ``.v`` (without), and a head."""

    def __init__(self, n=3):
        super().__init__()
        self.model = Inner(n)
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.model(x))


def base_model(seed=0, dtype=DTYPE):
    torch.manual_seed(seed)
    return Net().to(dtype).eval()


def inputs(seed=1, dtype=DTYPE):
    return torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(seed), dtype=dtype)


F32 = dict(rtol=1e-5, atol=1e-5)  # PEFT computes PiSSA/OLoRA on float32 weights only


def compiled(model, **options):
    x = inputs(dtype=next(model.parameters()).dtype)
    return lorafx.compile(model, example_inputs=(x,), dynamic=False, seed=0, **options)


def peft_model(base, **fields):
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields)).eval()


def adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# -- names ------------------------------------------------------------------------------------------

def test_a_lora_configs_fields_passed_straight_through_compile_as_the_lorafx_names():
    base, x = base_model(), inputs()
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q", "v"], lora_dropout=0.1,
                             init_lora_weights="gaussian", rank_pattern={"v": 2}, alpha_pattern={"q": 3},
                             use_rslora=True, task_type=None)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}  # as they are (sets and all)
    mine = compiled(base, r=4, alpha=6, target_modules=["q", "v"], dropout=0.1, init="gaussian",
                    rank_pattern={"v": 2}, alpha_pattern={"q": 3}, use_rslora=True)
    for cm in (compiled(base, **fields), compiled(base, **lorafx.peft_options(config))):
        assert cm.lora_records() == mine.lora_records()
        assert {n: p for n, p in cm.state_dict().items()}.keys() == mine.state_dict().keys()
        for name, value in mine.state_dict().items():
            assert torch.equal(cm.state_dict()[name], value), name
        assert torch.equal(cm.eval()(x), mine.eval()(x))


def test_peft_options_refuses_a_config_without_target_modules():
    with pytest.raises(ValueError, match="target_modules=None"):
        lorafx.peft_options(peft.LoraConfig(r=4))


def test_a_lorafx_name_and_its_peft_alias_together_are_refused_naming_both():
    for mine, theirs, value in (("alpha", "lora_alpha", 8), ("dropout", "lora_dropout", 0.1),
                                ("init", "init_lora_weights", "gaussian")):
        with pytest.raises(TypeError, match=rf"both {mine}=.* and {theirs}="):
            lorafx.compile(base_model(), example_inputs=(inputs(),), **{mine: value, theirs: value})


@pytest.mark.parametrize("field, value", [("use_qalora", True), ("bias", "all"), ("layer_replication", [[0, 1]]),
                                          ("loftq_config", {"loftq_bits": 4}), ("ensure_weight_tying", True)])
def test_a_peft_field_lorafx_does_not_implement_is_refused_by_name_unless_at_its_default(field, value):
    with pytest.raises(NotImplementedError, match=rf"lorafx does not implement PEFT's LoraConfig field {field}="):
        lorafx.compile(base_model(), example_inputs=(inputs(),), target_modules=["q"], **{field: value})
    default = {f.name: getattr(peft.LoraConfig(), f.name) for f in dataclasses.fields(peft.LoraConfig)}[field]
    assert lorafx.default_passes(target_modules=["q"], **{field: default})  # accepted and ignored


@pytest.mark.parametrize("init", ["loftq", "eva", "corda", "orthogonal"])
def test_an_init_lorafx_does_not_implement_is_refused_by_name(init):
    with pytest.raises(NotImplementedError, match=f"init_lora_weights='{init}'"):
        lorafx.default_passes(init_lora_weights=init)


def test_the_declarations_and_the_options_table_show_peft_names():
    names = {o.name: o.peft_name for _, opts in lorafx.compiler.declarations() for o in opts}
    assert (names["alpha"], names["dropout"], names["init"], names["r"]) == \
        ("lora_alpha", "lora_dropout", "init_lora_weights", None)
    table = lorafx.options.options_table(lorafx.compiler.declarations())
    for mine, theirs in (("alpha", "lora_alpha"), ("dropout", "lora_dropout"), ("init", "init_lora_weights")):
        assert f"| `{mine}` (PEFT: `{theirs}`) |" in table
    for name in ("lora_bias", "layers_to_transform", "layers_pattern", "fan_in_fan_out"):
        assert f"| `{name}` |" in table


def test_fan_in_fan_out_that_disagrees_with_the_layer_warns_as_peft_does():
    with Warnings() as records:
        cm = compiled(base_model(), target_modules=["q"], fan_in_fan_out=True)
    assert any("fan_in_fan_out=True" in r.getMessage() for r in records)
    assert not any(rec.weight_transposed for rec in cm.lora_records().values())


# -- lora_bias --------------------------------------------------------------------------------------

def peft_pair(tmp_path, base, **fields):
    """A PEFT model with ``fields`` (non-zero adapters: init False) and lorafx's load of its save."""
    pm = peft_model(base, **fields)
    pm.save_pretrained(str(tmp_path / "peft"))
    cm = lorafx.load_adapter(base, str(tmp_path / "peft"), example_inputs=(inputs(),), dynamic=False)
    return pm, cm


def test_lora_bias_matches_peft_outputs_gradients_and_round_trips(tmp_path):
    base, x = base_model(), inputs()
    pm, cm = peft_pair(tmp_path, base, r=3, lora_alpha=5, target_modules=["q", "v"], lora_bias=True,
                       init_lora_weights=False)
    recs = cm.lora_records()
    assert all(rec.lora_bias is not None for rec in recs.values())
    for site, rec in recs.items():  # loaded from PEFT's lora_B.bias
        assert torch.equal(get_attr(cm, rec.lora_bias), get_attr(pm.base_model.model, f"{site}.lora_B.default.bias"))
    cm.train(), pm.train()
    y, y_peft = cm(x), pm(x)
    torch.testing.assert_close(y, y_peft, **TOL)
    y.square().sum().backward()
    y_peft.square().sum().backward()
    for site, rec in recs.items():
        torch.testing.assert_close(get_attr(cm, rec.lora_bias).grad,
                                   get_attr(pm.base_model.model, f"{site}.lora_B.default.bias").grad, **TOL)
        torch.testing.assert_close(get_attr(cm, rec.lora_A).grad,
                                   get_attr(pm.base_model.model, f"{site}.lora_A.default.weight").grad, **TOL)
    cm.eval()
    cm.save_adapter(str(tmp_path / "lorafx"))
    config = json.load(open(tmp_path / "lorafx" / "adapter_config.json"))
    assert config["lora_bias"] is True
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lorafx")).eval()
    torch.testing.assert_close(back(x), cm(x), **TOL)


def test_lora_bias_merges_into_the_layers_bias_and_a_layer_without_gets_one(tmp_path):
    base, x = base_model(), inputs()
    pm, cm = peft_pair(tmp_path, base, r=3, lora_alpha=5, target_modules=["q", "v"], lora_bias=True,
                       init_lora_weights=False)
    y = cm.eval()(x)
    cm.merge()
    torch.testing.assert_close(cm(x), y, **TOL)
    q = cm.lora_records()["model.layers.0.q"]
    assert cm.state_dict()["model.layers.0.q.bias"].equal(base.model.layers[0].q.bias)  # the unmerged state
    assert "model.layers.0.v.bias" not in cm.state_dict()
    cm.unmerge()
    torch.testing.assert_close(cm(x), y, **TOL)
    assert not hasattr(get_attr(cm, "model.layers.0.v"), "bias")
    plain = cm.merge_and_unload()
    torch.testing.assert_close(plain(x), y, **TOL)
    assert not any("lora" in n for n in plain.state_dict())
    assert plain.state_dict()["model.layers.0.v.bias"].shape == (12,)
    with pytest.raises(ValueError, match="lora_bias=True adapted a layer without bias"):
        cm.merged_state_dict()
    # where every adapted layer has a bias, the merged state dict is PEFT's merge
    pm_q, cm_q = peft_pair(tmp_path / "q", base, r=3, lora_alpha=5, target_modules=["q"], lora_bias=True,
                           init_lora_weights=False)
    merged = pm_q.merge_and_unload().state_dict()
    ours = cm_q.merged_state_dict()
    assert ours.keys() == merged.keys()
    for key in merged:
        torch.testing.assert_close(ours[key], merged[key], **TOL)
    assert q.scale == 5 / 3


@pytest.mark.parametrize("rewrite", [dict(fold_a=True), dict(fuse_siblings=True),
                                     dict(schedule="f2b5"), dict(schedule="f1b1k")])
def test_lora_bias_survives_the_rewrites_of_adapter_nodes(rewrite):
    """B's bias reaches every kind through its bias argument: the same outputs, grads and merge."""
    base, x = base_model(), inputs()
    options = dict(target_modules=["q", "v"], r=3, init=False, lora_bias=True)
    plain, other = compiled(base, **options), compiled(base, **options, **rewrite)
    for cm in (plain, other):
        cm.train()
        cm(x).square().sum().backward()
    torch.testing.assert_close(other(x), plain(x), **TOL)
    for rec in plain.lora_records().values():
        torch.testing.assert_close(get_attr(other, rec.lora_bias).grad, get_attr(plain, rec.lora_bias).grad, **TOL)
    other.eval().merge()
    torch.testing.assert_close(other(x), plain.eval()(x), **TOL)


def test_lora_bias_starts_at_zero_and_is_refused_with_pissa():
    cm = compiled(base_model(), target_modules=["q"], lora_bias=True)
    assert all(get_attr(cm, r.lora_bias).abs().sum() == 0 for r in cm.lora_records().values())
    with pytest.raises(ValueError, match="lora_bias=True works with init"):
        lorafx.default_passes(lora_bias=True, init="pissa")


def test_an_adapter_without_lora_bias_does_not_load_into_a_model_with_it(tmp_path):
    base = base_model()
    compiled(base, target_modules=["q"]).save_adapter(str(tmp_path))
    with pytest.raises(ValueError, match="has no bias on lora_B"):
        compiled(base, target_modules=["q"], lora_bias=True).load_adapter(str(tmp_path))


# -- layers_to_transform ------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [dict(layers_to_transform=[0, 2]),
                                    dict(layers_to_transform=1),
                                    dict(layers_to_transform=[1], layers_pattern="layers"),
                                    dict(layers_to_transform=[0], layers_pattern=["h", "layers"])])
def test_layers_to_transform_adapts_the_sites_peft_adapts_and_round_trips(tmp_path, layers):
    base, x = base_model(), inputs()
    pm, cm = peft_pair(tmp_path, base, r=2, lora_alpha=4, target_modules=["q", "v"], init_lora_weights=False,
                       **layers)
    theirs = {n for n, m in pm.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(cm.lora_records()) == theirs
    mine = compiled(base, r=2, alpha=4, target_modules=["q", "v"], **layers)
    assert set(mine.lora_records()) == theirs
    torch.testing.assert_close(cm.eval()(x), pm(x), **TOL)
    cm.save_adapter(str(tmp_path / "lorafx"))
    config = json.load(open(tmp_path / "lorafx" / "adapter_config.json"))
    assert config["layers_to_transform"] is not None
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lorafx")).eval()
    torch.testing.assert_close(back(x), cm(x), **TOL)
    again = lorafx.load_adapter(base, str(tmp_path / "lorafx"), example_inputs=(x,), dynamic=False)
    assert set(again.lora_records()) == theirs


def test_layers_to_transform_names_what_it_found_when_it_keeps_nothing():
    with pytest.raises(lorafx.PassError, match=r"keeps none .* their layer indices: \[0, 1, 2\]"):
        compiled(base_model(), target_modules=["q"], layers_to_transform=[7])
    with pytest.raises(ValueError, match="need target_modules as a list"):
        lorafx.default_passes(target_modules="all-linear", layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_pattern=.* needs layers_to_transform"):
        lorafx.default_passes(target_modules=["q"], layers_pattern="layers")


# -- inits --------------------------------------------------------------------------------------------

def test_init_false_draws_a_and_b_as_peft_does():
    base, x = base_model(), inputs()
    cm = compiled(base, r=4, target_modules=["q"], init_lora_weights=False, lora_bias=True)
    pm = peft_model(base, r=4, target_modules=["q"], init_lora_weights=False, lora_bias=True)
    for site, rec in cm.lora_records().items():
        ours = {"A": get_attr(cm, rec.lora_A), "B": get_attr(cm, rec.lora_B), "b": get_attr(cm, rec.lora_bias)}
        layer = get_attr(pm.base_model.model, site)
        theirs = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight,
                  "b": layer.lora_B["default"].bias}
        for key in ours:  # nn.Linear's rule: uniform within ±1/sqrt(fan_in), fan_in = in for A, r for B and b
            bound = 1 / (12 ** 0.5) if key == "A" else 1 / 2
            assert ours[key].abs().max() <= bound and theirs[key].abs().max() <= bound
            assert ours[key].abs().max() > 0.5 * bound  # drawn, not zero
    assert not torch.allclose(cm.eval()(x), base(x))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_equal_peft_at_init_and_leave_the_model_alone(init):
    """The same A, B and residual W as PEFT's, so the same outputs (the base's) and adapter gradients."""
    base, x = base_model(dtype=torch.float32), inputs(dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cm = compiled(base, r=3, lora_alpha=6, target_modules=["q", "v"], init_lora_weights=init)
    pm = peft_model(base, r=3, lora_alpha=6, target_modules=["q", "v"], init_lora_weights=init)
    for site, rec in cm.lora_records().items():
        layer = get_attr(pm.base_model.model, site)
        torch.testing.assert_close(get_attr(cm, rec.lora_A), layer.lora_A["default"].weight, **F32)
        torch.testing.assert_close(get_attr(cm, rec.lora_B), layer.lora_B["default"].weight, **F32)
        torch.testing.assert_close(get_attr(cm, rec.weight), layer.base_layer.weight, **F32)  # the residual
        assert get_attr(cm, rec.weight).untyped_storage().data_ptr() != \
            get_attr(base, rec.weight).untyped_storage().data_ptr()
    torch.testing.assert_close(cm.eval()(x), pm(x), **F32)
    torch.testing.assert_close(cm(x), base(x), **F32)  # W_res + s·B A = W
    cm(x).square().sum().backward()
    pm(x).square().sum().backward()
    for site, rec in cm.lora_records().items():  # and the first step is PEFT's
        layer = get_attr(pm.base_model.model, site)
        torch.testing.assert_close(get_attr(cm, rec.lora_A).grad, layer.lora_A["default"].weight.grad, **F32)
        torch.testing.assert_close(get_attr(cm, rec.lora_B).grad, layer.lora_B["default"].weight.grad, **F32)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_save_a_plain_lora_that_peft_loads_on_the_original_base(tmp_path, init):
    base, x = base_model(), inputs()
    cm = compiled(base, r=3, lora_alpha=6, target_modules=["q", "v"], init=init, use_rslora=init == "olora",
                  rank_pattern={"layers.1.v": 1})  # rank 1: alpha/r = alpha/sqrt(r), converted at rank 2
    cm.train()
    opt = torch.optim.SGD(cm.trainable_parameters().values(), lr=0.1)
    cm(x).square().mean().backward()
    opt.step()
    cm.eval()
    y = cm(x)
    with Warnings() as records:
        cm.save_adapter(str(tmp_path))
    assert any("converted to plain LoRA" in r.getMessage() for r in records)
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["r"] == 6 and config["init_lora_weights"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(loaded(x), y, **TOL)
    again = lorafx.load_adapter(base, str(tmp_path), example_inputs=(x,), dynamic=False)
    torch.testing.assert_close(again.eval()(x), y, **TOL)
    # merged: W_original + ΔW, as PEFT's merge of the converted adapter
    merged = cm.merged_state_dict()
    theirs = loaded.merge_and_unload().state_dict()
    for key in theirs:
        torch.testing.assert_close(merged[key], theirs[key], **TOL)
    cm.merge()
    torch.testing.assert_close(cm(x), y, **TOL)
    cm.unmerge()
    torch.testing.assert_close(cm.merge_and_unload()(x), y, **TOL)


def test_pissa_converts_as_peft_does(tmp_path):
    """PEFT's own conversion (path_initial_model_for_weight_conversion) and lorafx's save agree."""
    base, x = base_model(dtype=torch.float32), inputs(dtype=torch.float32)
    pm = peft_model(base, r=2, lora_alpha=4, target_modules=["q"], init_lora_weights="pissa")
    pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial adapter first
    pm.save_pretrained(str(tmp_path / "initial"))
    pm.peft_config["default"].init_lora_weights = "pissa"
    cm = lorafx.compile(base, example_inputs=(x,), dynamic=False, r=2, lora_alpha=4, target_modules=["q"],
                        init_lora_weights="pissa")
    with torch.no_grad():
        for site, rec in cm.lora_records().items():  # the same trained values in both
            layer = get_attr(pm.base_model.model, site)
            layer.lora_A["default"].weight.add_(0.01)
            get_attr(cm, rec.lora_A).copy_(layer.lora_A["default"].weight)
    pm.save_pretrained(str(tmp_path / "peft"),
                       path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    cm.save_adapter(str(tmp_path / "lorafx"))
    from safetensors.torch import load_file
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "lorafx" / "adapter_model.safetensors"))
    assert theirs.keys() == ours.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], **F32)
    peft_cfg = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    our_cfg = json.load(open(tmp_path / "lorafx" / "adapter_config.json"))
    assert (our_cfg["r"], our_cfg["lora_alpha"]) == (peft_cfg["r"], peft_cfg["lora_alpha"])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_unconverted_peft_pissa_adapter_loads_on_the_original_base_as_in_peft(tmp_path, init):
    """PEFT's from_pretrained recomputes the init from the original weights, then loads A and B:
    lorafx.load_adapter compiles with the init and does the same."""
    base, x = base_model(dtype=torch.float32), inputs(dtype=torch.float32)
    pm = peft_model(base, r=2, lora_alpha=4, target_modules=["q", "v"], init_lora_weights=init)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    pm.save_pretrained(str(tmp_path))
    cm = lorafx.load_adapter(base, str(tmp_path), example_inputs=(x,), dynamic=False).eval()
    assert all(rec.lora_A0 is not None for rec in cm.lora_records().values())
    torch.testing.assert_close(cm(x), pm(x), **F32)
    assert (pm(x) - base(x)).abs().max() > 1e-3
    with pytest.raises(ValueError, match=f"trained with init_lora_weights='{init}'.*compile with init='{init}'"):
        compiled(base, r=2, lora_alpha=4, target_modules=["q", "v"]).load_adapter(str(tmp_path))
    cm.save_adapter(str(tmp_path / "converted"))  # and back to PEFT on the original base, converted
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "converted")).eval()
    torch.testing.assert_close(back(x), pm(x), **F32)
    with pytest.raises(ValueError, match="is a plain LoRA for the original weights"):
        cm.load_adapter(str(tmp_path / "converted"))


def test_a_peft_pissa_niter_adapter_is_still_refused(tmp_path):
    base = base_model(dtype=torch.float32)
    peft_model(base, r=2, target_modules=["q"], init_lora_weights="pissa_niter_2").save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="changes the base weights"):
        lorafx.load_adapter(base, str(tmp_path), example_inputs=(inputs(),))


def test_pissa_refuses_a_rank_above_the_layer():
    with pytest.raises(lorafx.PassError, match="exceeds min"):
        compiled(base_model(), r=11, target_modules=["q"], init="pissa")


def test_pissa_niter_is_seeded():
    a = compiled(base_model(), r=2, target_modules=["q"], init="pissa_niter_2")
    b = compiled(base_model(), r=2, target_modules=["q"], init="pissa_niter_2")
    for rec in a.lora_records().values():
        assert torch.equal(get_attr(a, rec.lora_A), get_attr(b, rec.lora_A))
    torch.testing.assert_close(a.eval()(inputs()), base_model()(inputs()), **TOL)


# -- the rules themselves, on generated cases ----------------------------------------------------------

_segment = st.sampled_from(["model", "layers", "h", "blocks", "0", "1", "2", "13", "attn", "q", "v", "mlp", "experts"])


@settings(max_examples=100, deadline=None)
@given(path=st.lists(_segment, min_size=1, max_size=6), targets=st.lists(st.sampled_from(["q", "v", "attn.q", "mlp"]),
       min_size=1, max_size=3), layers=st.one_of(st.integers(0, 3), st.lists(st.integers(0, 13), max_size=3)),
       pattern=st.sampled_from([None, "layers", ["h", "blocks"]]))
def test_the_layer_rule_is_peft_check_target_module_exists(path, targets, layers, pattern):
    from peft.tuners.tuners_utils import check_target_module_exists
    name = ".".join(path)
    config = peft.LoraConfig(target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
    theirs = bool(check_target_module_exists(config, name))
    matched = name in targets or any(name.endswith("." + t) for t in targets)
    ours = matched and in_selected_layers(name, tuple(targets), layers, pattern)
    assert ours == theirs


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 9), inp=st.integers(1, 9), r=st.integers(1, 9), init=st.sampled_from(["pissa", "olora"]),
       transposed=st.booleans(), seed=st.integers(0, 99))
def test_a_residual_init_plus_its_adapter_is_the_weight(out, inp, r, init, transposed, seed):
    r = min(r, out, inp)
    W = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    stored = W.t().contiguous() if transposed else W
    A, B, res = residual_init(stored, r, 1.5, init, transposed=transposed)
    assert A.shape == (r, inp) and B.shape == (out, r) and res.shape == stored.shape
    rebuilt = (res.t() if transposed else res) + 1.5 * B @ A
    torch.testing.assert_close(rebuilt, W, rtol=1e-9, atol=1e-9)
    if init == "pissa":  # s·B A is W's best rank-r approximation
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        torch.testing.assert_close(1.5 * B @ A, (U[:, :r] * S[:r]) @ Vh[:r], rtol=1e-8, atol=1e-8)


@pytest.mark.slow
def test_pissa_on_gpt2s_conv1d_layers_equals_peft_with_fan_in_fan_out(tiny_model):
    from conftest import ids
    base, x = tiny_model("gpt2"), ids(2, 8)
    cm = lorafx.compile(base, example_inputs=(x,), dynamic=False, r=2, lora_alpha=4, target_modules=["c_attn"],
                        init_lora_weights="pissa")
    pm = peft_model(base, r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights="pissa",
                    fan_in_fan_out=True)
    for site, rec in cm.lora_records().items():
        assert rec.weight_transposed
        layer = get_attr(pm.base_model.model, site)
        torch.testing.assert_close(get_attr(cm, rec.lora_A), layer.lora_A["default"].weight, **F32)
        torch.testing.assert_close(get_attr(cm, rec.weight), layer.base_layer.weight, **F32)
    torch.testing.assert_close(cm.eval()(x).logits, pm(x).logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cm(x).logits, base.eval()(x).logits, rtol=1e-4, atol=1e-4)


def test_pissa_is_refused_with_a_rank_budget():
    with pytest.raises(lorafx.PassError, match="rank allocation"):
        compiled(base_model(), target_modules=["q"], init="pissa", rank_budget=200, proxy="constant")


def test_lora_bias_and_pissa_name_a_layer_kind_that_lacks_them():
    class WithEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 12)
            self.q = torch.nn.Linear(12, 4)

        def forward(self, ids):
            return self.q(self.emb(ids))

    ids = torch.randint(0, 10, (2, 5))
    for options in (dict(lora_bias=True), dict(init="pissa", r=2)):
        with pytest.raises(lorafx.PassError, match="does not implement .* for Embedding layers.*'emb'"):
            lorafx.compile(WithEmbedding(), example_inputs=(ids,), target_modules=["emb", "q"], **options)


def test_add_adapter_takes_init_false_and_refuses_pissa():
    cm = compiled(base_model(), target_modules=["q"], r=2)
    cm.add_adapter("other", target_modules=["q"], r=2, init=False)
    for rec in cm.adapter_records("other").values():
        assert get_attr(cm, rec.lora_A).abs().max() > 0 and get_attr(cm, rec.lora_B).abs().max() > 0
    with pytest.raises(ValueError, match="replaces the frozen weights by residuals"):
        cm.add_adapter("third", target_modules=["q"], r=2, init="pissa")
