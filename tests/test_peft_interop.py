"""PEFT interop: lorafx computes what PEFT computes, and adapters move both ways.

For every case (model family x LoRA settings) the same base model gets a PEFT
LoRA model and a lorafx CompiledModel with the same r/alpha/targets, both
holding the same random nonzero A/B.  Then:

* parity: equal logits and equal gradients of every adapter parameter;
* lorafx -> PEFT: ``cm.save_adapter`` loads with ``PeftModel.from_pretrained``;
* PEFT -> lorafx: ``save_pretrained`` loads with ``lorafx.load_adapter`` and
  ``cm.load_adapter`` (also into a merged model);
* DoRA adapters both ways; unsupported adapters (other PEFT types, ...), shapes, sites or scales
  that do not fit, and missing files are refused with clear errors;
* ``save_adapter`` leaves no partial files when it fails.

Models are float64 so that equality is tight.
"""
import copy
import json
import os
import re

import pytest
import torch

import lorafx
from lorafx.graph_utils import get_attr

from conftest import folder_snapshot, ids

peft = pytest.importorskip("peft")

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)

# name -> (family, LoraConfig-style settings shared by PEFT and lorafx)
CASES = {
    # non-uniform ranks and alphas, one pattern naming a single layer; dynamic shapes
    "llama": ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                            rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                            alpha_pattern={"o_proj": 3.0, "gate_proj": 32})),
    # rsLoRA, with a rank-1 site (where alpha/r == alpha/sqrt(r)) among rank-4 ones
    "llama-rslora": ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                   use_rslora=True, rank_pattern={"v_proj": 1})),
    # Conv1D weights stored (in, out): PEFT needs fan_in_fan_out=True
    "gpt2": ("gpt2", dict(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])),
    # BERT has dropout (off in eval, as is the adapter dropout); "dense" includes the pooler
    "bert": ("bert", dict(r=2, alpha=4, target_modules=["query", "key", "value", "dense"],
                          rank_pattern={"value": 3}, dropout=0.1)),
}
DYNAMIC = {"llama"}  # captured with dynamic shapes; the others only for the test input's shape (faster)


def peft_config(family, settings, **extra):
    s = dict(settings)
    return peft.LoraConfig(r=s.pop("r"), lora_alpha=s.pop("alpha"), lora_dropout=s.pop("dropout", 0.0),
                           fan_in_fan_out=family == "gpt2", **s, **extra)


def compile_options(name, x, dynamic=False):
    """example_inputs/dynamic for lorafx.compile or lorafx.load_adapter."""
    if dynamic:
        return dict(example_inputs=(ids(2, 8, 96),))
    return dict(example_inputs=(x,), dynamic=False)


def peft_name(site, ab):
    return f"base_model.model.{site}.lora_{ab}.default.weight"


def logits(model, x):
    return model(input_ids=x).logits


def lora_state(cm):
    return {s: (get_attr(cm, r.lora_A).detach().clone(), get_attr(cm, r.lora_B).detach().clone())
            for s, r in cm.lora_records().items()}


def randomize(cm, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for rec in cm.lora_records().values():
            for path in (rec.lora_A, rec.lora_B):
                p = get_attr(cm, path)
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)


class Built:
    def __init__(self, name, base, pm, cm, x):
        self.name, self.base, self.pm, self.cm, self.x = name, base, pm, cm, x
        self.family, self.settings = CASES[name]


def _build(name, base):
    family, settings = CASES[name]
    x = ids(3, 7, base.config.vocab_size, seed=5)
    cm = lorafx.compile(base, **compile_options(name, x, dynamic=name in DYNAMIC), **settings)
    pm = peft.get_peft_model(copy.deepcopy(base), peft_config(family, settings))
    records = cm.lora_records()
    peft_sites = {n[len("base_model.model."):-len(".lora_A.default.weight")]
                  for n, _ in pm.named_parameters() if n.endswith(".lora_A.default.weight")}
    assert set(records) == peft_sites, "lorafx and PEFT adapt different modules"
    randomize(cm, seed=sum(map(ord, name)))
    peft_params = dict(pm.named_parameters())
    with torch.no_grad():
        for site, rec in records.items():
            for ab, path in (("A", rec.lora_A), ("B", rec.lora_B)):
                src, dst = get_attr(cm, path), peft_params[peft_name(site, ab)]
                assert dst.shape == src.shape and dst.dtype == src.dtype, (site, ab)
                dst.copy_(src)
    cm.eval()
    pm.eval()
    return Built(name, base, pm, cm, x)


@pytest.fixture(scope="module")
def built(tiny_model):
    cache = {}

    def get(name):
        if name not in cache:
            family, _ = CASES[name]
            cache[name] = _build(name, tiny_model(family, DTYPE))
        return cache[name]

    return get


def assert_same_sites(cm, pm):
    """PEFT adapts the same modules, each with lorafx's rank and scaling."""
    peft_sites = {n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.r}
    assert peft_sites == set(cm.lora_records())
    for site, rec in cm.lora_records().items():
        layer = pm.base_model.model.get_submodule(site)
        assert layer.r["default"] == rec.r, site
        assert layer.scaling["default"] == pytest.approx(rec.scale, rel=1e-12), site


# -- parity ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_peft_parity_logits_and_adapter_grads(built, name):
    b = built(name)
    cm, pm, x = b.cm, b.pm, b.x
    assert_same_sites(cm, pm)

    for model in (cm, pm):
        model.zero_grad(set_to_none=True)
    got, want = logits(cm, x), logits(pm, x)
    torch.testing.assert_close(got, want, **TOL)
    with pm.disable_adapter(), torch.no_grad():
        base_out = logits(pm, x)
    assert (want - base_out).abs().max() > 1e-3, "the adapters should change the logits"

    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    (got * weight).sum().backward()
    (want * weight).sum().backward()
    cm_params = dict(cm.named_parameters())
    peft_params = dict(pm.named_parameters())
    assert {n for n, p in cm_params.items() if p.requires_grad} == \
        {f"{s}.lora_{ab}" for s in cm.lora_records() for ab in "AB"}
    for site in cm.lora_records():
        for ab in "AB":
            g_cm = cm_params[f"{site}.lora_{ab}"].grad
            g_pm = peft_params[peft_name(site, ab)].grad
            assert g_cm is not None and g_pm is not None, (site, ab)
            assert g_pm.abs().max() > 0, (site, ab)
            torch.testing.assert_close(g_cm, g_pm, **TOL, msg=lambda m: f"{site}.lora_{ab}: {m}")
    for model in (cm, pm):
        model.zero_grad(set_to_none=True)


# -- lorafx -> PEFT ----------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_save_adapter_loads_in_peft(built, name, tmp_path):
    b = built(name)
    b.cm.save_adapter(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["fan_in_fan_out"] is (b.family == "gpt2")
    assert config["use_rslora"] is bool(b.settings.get("use_rslora"))

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(b.base), str(tmp_path)).eval()
    assert_same_sites(b.cm, loaded)
    torch.testing.assert_close(logits(loaded, b.x), logits(b.cm, b.x), **TOL)


def test_save_adapter_mixed_linear_and_conv1d(tiny_model, tmp_path):
    """GPT-2's Conv1D c_attn and its nn.Linear lm_head in one adapter (untied: an adapter on a
    lm_head tied to the embedding is refused, see test_reliability)."""
    import transformers as T
    torch.manual_seed(0)
    base = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                          eos_token_id=0, vocab_size=96, tie_word_embeddings=False)).to(DTYPE)
    x = ids(3, 7, 96)
    cm = lorafx.compile(base, example_inputs=(x,), dynamic=False, r=4, alpha=8,
                        target_modules=["c_attn", "lm_head"]).eval()
    assert {r.weight_transposed for r in cm.lora_records().values()} == {True, False}
    randomize(cm, seed=11)
    cm.save_adapter(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert_same_sites(cm, loaded)
    torch.testing.assert_close(logits(loaded, x), logits(cm, x), **TOL)


# -- PEFT -> lorafx ----------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_peft_adapter_loads_in_lorafx(built, name, tmp_path):
    b = built(name)
    b.pm.save_pretrained(str(tmp_path))
    want = logits(b.pm, b.x)

    cm = lorafx.load_adapter(b.base, str(tmp_path), **compile_options(name, b.x)).eval()
    assert sorted(cm.lora_records()) == sorted(b.cm.lora_records())
    assert_same_sites(cm, b.pm)
    torch.testing.assert_close(logits(cm, b.x), want, **TOL)

    # into an existing compiled model: other weights first, then the adapter's
    randomize(cm, seed=99)
    assert not torch.allclose(logits(cm, b.x), want)
    assert cm.load_adapter(str(tmp_path)) is cm
    torch.testing.assert_close(logits(cm, b.x), want, **TOL)
    # ... and into a merged one, which stays merged (merging rounds through float32)
    randomize(cm, seed=98)
    cm.merge()
    cm.load_adapter(str(tmp_path))
    assert cm.merged
    torch.testing.assert_close(logits(cm, b.x), want, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(logits(cm, b.x), want, **TOL)


# -- errors -----------------------------------------------------------------------------
def _peft_saved(base, directory, config):
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    pm.save_pretrained(str(directory))
    return directory


def _assert_refused(b, directory, exc, match):
    """lorafx.load_adapter and cm.load_adapter both refuse, and cm is left as it was."""
    before = lora_state(b.cm)
    with pytest.raises(exc, match=match):
        lorafx.load_adapter(b.base, str(directory), **compile_options(b.name, b.x))
    with pytest.raises(exc, match=match):
        b.cm.load_adapter(str(directory))
    for site, (A, B) in lora_state(b.cm).items():
        assert torch.equal(A, before[site][0]) and torch.equal(B, before[site][1]), site


def test_dora_adapter_round_trip(built, tmp_path):
    """A PEFT DoRA adapter (use_dora=True, with its magnitude vectors) loads into lorafx with
    PEFT's outputs, and lorafx saves it back in a form PEFT loads with the same outputs; a
    model compiled without use_dora refuses it, naming use_dora."""
    b = built("llama")
    pm = peft.get_peft_model(copy.deepcopy(b.base), peft_config("llama", b.settings, use_dora=True))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_magnitude_vector" in n:
                p.copy_(p * (1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=DTYPE)) if "magnitude" in n
                        else torch.randn(p.shape, generator=gen, dtype=DTYPE) * 0.3)
    pm.eval().save_pretrained(str(tmp_path / "peft"))
    want = logits(pm, b.x)
    cm = lorafx.load_adapter(b.base, str(tmp_path / "peft"), **compile_options("llama", b.x)).eval()
    assert {r.kind for r in cm.lora_records().values()} == {"lora_dora"}
    torch.testing.assert_close(logits(cm, b.x), want, **TOL)
    cm.save_adapter(str(tmp_path / "lorafx"))
    assert json.loads((tmp_path / "lorafx" / "adapter_config.json").read_text())["use_dora"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(b.base), str(tmp_path / "lorafx")).eval()
    torch.testing.assert_close(logits(loaded, b.x), want, **TOL)
    before = lora_state(b.cm)
    with pytest.raises(ValueError, match="use_dora=True but this model was compiled with use_dora=False"):
        b.cm.load_adapter(str(tmp_path / "peft"))
    assert all(torch.equal(lora_state(b.cm)[s][1], before[s][1]) for s in before)


def test_non_lora_adapter_is_refused(built, tmp_path):
    b = built("llama")
    _peft_saved(b.base, tmp_path, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]))
    _assert_refused(b, tmp_path, ValueError, "peft_type 'IA3' is not supported")


@pytest.mark.parametrize("key,value", [
    ("bias", "all"), ("lora_bias", True),
    ("init_lora_weights", "pissa_niter_4"), ("alora_invocation_tokens", [5]),
])
def test_unsupported_config_is_refused(built, tmp_path, key, value):
    b = built("llama")
    b.cm.save_adapter(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    _assert_refused(b, tmp_path, ValueError, re.escape(key))


def test_missing_files(built, tmp_path):
    b = built("llama")
    _assert_refused(b, tmp_path, FileNotFoundError, "adapter_config.json")
    b.cm.save_adapter(str(tmp_path))
    os.remove(tmp_path / "adapter_model.safetensors")
    _assert_refused(b, tmp_path, FileNotFoundError, "adapter_model.safetensors")


def test_wrong_rank_names_the_site(built, tmp_path):
    b = built("llama")
    _peft_saved(b.base, tmp_path, peft_config("llama", {**b.settings, "rank_pattern": {"q_proj": 3}}))
    before = lora_state(b.cm)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: adapter shapes A\(3, 32\)"):
        b.cm.load_adapter(str(tmp_path))
    assert all(torch.equal(lora_state(b.cm)[s][0], before[s][0]) for s in before)


def test_tensor_of_wrong_shape_names_the_site(built, tmp_path):
    from safetensors.torch import load_file, save_file

    b = built("llama-rslora")
    b.cm.save_adapter(str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1], dtype=DTYPE)
    save_file(tensors, path)
    before = lora_state(b.cm)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj: adapter shapes .* B\(17, 1\)"):
        b.cm.load_adapter(str(tmp_path))
    assert all(torch.equal(lora_state(b.cm)[s][0], before[s][0]) for s in before)


def test_other_target_modules_name_the_missing_site(built, tmp_path):
    b = built("llama")
    _peft_saved(b.base, tmp_path, peft_config("llama", {**b.settings, "target_modules": ["q_proj"],
                                                         "rank_pattern": {"q_proj": 2}, "alpha_pattern": {}}))
    with pytest.raises(ValueError, match=r"sites without weights \[.*model\.layers\.0\.self_attn\.v_proj"):
        b.cm.load_adapter(str(tmp_path))


def test_other_scale_is_refused_by_an_existing_model(built, tmp_path):
    """Same shapes but another lora_alpha: cm.load_adapter would silently compute other outputs."""
    b = built("llama")
    _peft_saved(b.base, tmp_path, peft_config("llama", {**b.settings, "alpha": 16}))
    before = lora_state(b.cm)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: .*scale 8 .*scale 4"):
        b.cm.load_adapter(str(tmp_path))
    assert all(torch.equal(lora_state(b.cm)[s][1], before[s][1]) for s in before)


# -- atomic save ------------------------------------------------------------------------
def _fail_weights(monkeypatch):
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)


def _fail_config(monkeypatch):
    def broken(obj, fp, **kw):
        fp.write('{"peft_type": "LO')
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken)


@pytest.mark.parametrize("fail", [_fail_weights, _fail_config])
def test_failed_save_leaves_no_partial_files(built, tmp_path, monkeypatch, fail):
    cm = built("llama").cm
    old = tmp_path / "old"
    cm.save_adapter(str(old))
    before = folder_snapshot(old)
    assert set(before) == {"adapter_config.json", "adapter_model.safetensors"}
    fresh = tmp_path / "fresh"
    fail(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        cm.save_adapter(str(old))
    with pytest.raises(OSError, match="disk full"):
        cm.save_adapter(str(fresh))
    monkeypatch.undo()
    assert folder_snapshot(old) == before
    assert not folder_snapshot(fresh)  # absent or empty


class _TwoHeads(torch.nn.Module):
    """Module names where one is a dotted suffix of another ("head", "block.head")."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Module()
        self.block.head = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.head(torch.tanh(self.block.head(x)))


def test_save_adapter_patterns_do_not_leak_to_longer_names(tmp_path):
    """rank/alpha_pattern keys written for "head" must not also set "block.head" in PEFT."""
    torch.manual_seed(0)
    model = _TwoHeads().to(DTYPE)
    x = torch.randn(3, 8, dtype=DTYPE)
    cm = lorafx.compile(model, example_inputs=(x,), dynamic=False, r=2, alpha=4, target_modules=["head"],
                        rank_pattern={"^head": 4}, alpha_pattern={"^head": 3.0}).eval()
    assert {s: (r.r, r.alpha) for s, r in cm.lora_records().items()} == {"block.head": (2, 4.0), "head": (4, 3.0)}
    randomize(cm, seed=5)
    cm.save_adapter(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    assert_same_sites(cm, loaded)
    torch.testing.assert_close(loaded(x), cm(x), **TOL)
    # and back: lorafx reads the same ranks and alphas from that config
    back = lorafx.load_adapter(model, str(tmp_path), example_inputs=(x,), dynamic=False).eval()
    assert {s: (r.r, r.alpha) for s, r in back.lora_records().items()} == {"block.head": (2, 4.0), "head": (4, 3.0)}
    torch.testing.assert_close(back(x), cm(x), **TOL)


def test_save_adapter_targets_only_the_adapted_modules(tmp_path):
    """Only "head" is adapted: the saved target_modules must not also select "block.head"."""
    torch.manual_seed(1)
    model = _TwoHeads().to(DTYPE)
    x = torch.randn(3, 8, dtype=DTYPE)
    cm = lorafx.compile(model, example_inputs=(x,), dynamic=False, r=2, alpha=4, target_modules="head").eval()
    assert set(cm.lora_records()) == {"head"}
    randomize(cm, seed=6)
    cm.save_adapter(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    assert_same_sites(cm, loaded)
    torch.testing.assert_close(loaded(x), cm(x), **TOL)
    back = lorafx.load_adapter(model, str(tmp_path), example_inputs=(x,), dynamic=False).eval()
    assert set(back.lora_records()) == {"head"}
    torch.testing.assert_close(back(x), cm(x), **TOL)


def test_rank_above_min_in_out_round_trips_with_peft(tmp_path):
    """PEFT's default r=8 on a 20 -> 2 linear (r > min(in, out)): PEFT's adapter loads into lorafx and
    lorafx's loads into PEFT, with the same outputs both ways."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 2))
    x = torch.randn(4, 10)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    cm = lorafx.load_adapter(base, str(tmp_path / "peft"), example_inputs=(x,)).eval()
    assert cm.lora_records()["2"].r == 8 and cm.lora_records()["2"].in_features == 20
    want = pm(x)
    torch.testing.assert_close(cm(x), want, rtol=1e-5, atol=1e-6)
    cm.save_adapter(str(tmp_path / "lorafx"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lorafx")).eval()
    torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-6)
