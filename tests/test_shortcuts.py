"""LoRA-adapted shortcut connections (HeteroLoRA): the ``lora_shortcut`` op kind, the
InsertShortcuts pass and the shortcut adapter files.

* the op: its reference formula, gradcheck/opcheck, the fast eager path, its FLOPs
  against FlopCounterMode (through AnnotateCost);
* identity at init (B = 0), as a property over the residual and attention models of
  ``lorafx.testing``: outputs and gradients equal the captured graph's;
* site discovery from structure alone on every model family: 4 per layer minus 1,
  the links as documented, names stable across captures;
* training moves only adapters; merge keeps the shortcuts running, merge_and_unload
  lowers them to aten ops, merged_state_dict refuses them;
* save / load (lorafx and PEFT), atomic saves with a third file, bad options.
"""
import copy
import itertools
import json
import os
import shutil

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings, strategies as st
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.flop_counter import FlopCounterMode

import lorafx
from lorafx import eager
from lorafx.adapter_io import CONFIG_NAME, SHORTCUTS_NAME, WEIGHTS_NAME
from lorafx.compiler import without_linear_adapters
from lorafx.dialect import SHORTCUT, ShortcutRecord, kind_of, lint
from lorafx.dialect.shortcut import LINKS, lora_shortcut_reference, shortcut_flops
from lorafx.graph_utils import get_attr
from lorafx.meta import CostRecord, get_record, graph_record
from lorafx.passes import AnnotateCost, InsertShortcuts
from lorafx.passes.cost_model import BATCH, SEQ, graph_cost
from lorafx.passes.insert_shortcuts import ShortcutSite, find_shortcut_sites
from lorafx.testing import (MLP, AttentionBlock, ResidualBlock, assert_equivalent, attention_models,
                            residual_models)

from conftest import HF_FAMILIES, Faults, Warnings, folder_snapshot, ids, restore

OP = torch.ops.lorafx.lora_shortcut
F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


def randomize(cm, seed=1, scale=0.2, only=None):
    """Random values for every trainable tensor (``only``: names containing it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cm.named_parameters():
            if p.requires_grad and (only is None or only in name):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def logits(model, x):
    out = model(input_ids=x)
    return out.logits if hasattr(out, "logits") else out[0]


def lorafx_ops(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "lorafx" in str(n.target)]


def shortcut_nodes(gm):
    return [n for n in gm.graph.nodes if kind_of(n) is SHORTCUT]


@pytest.fixture(scope="module")
def llama(tiny_model):
    """A float64 tiny LLaMA compiled with adapters on q/v and shortcuts on every site."""
    model = tiny_model("llama", F64)
    x = ids(2, 8)
    cm = lorafx.compile(model, example_inputs=(x,), r=2, target_modules=["q_proj", "v_proj"], shortcuts=True,
                        shortcut_r=3, shortcut_alpha=6.0, seed=0)
    return model, cm, x


def residual_cm(seed=0, **options):
    torch.manual_seed(0)
    model = ResidualBlock(8, 12, depth=2).double()
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    if "passes" not in options:
        options = {"r": 2, **options}
    return model, lorafx.compile(model, example_inputs=(x,), seed=seed, **options), x


# -- the op ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("h_shape,y_shape", [((2, 3, 5), (2, 3, 5)), ((2, 3, 5), (6, 5)), ((6, 5), (6, 5))])
@pytest.mark.parametrize("r", [1, 3, 33])  # 33: the r-column products (COLUMN_RANK)
def test_op_is_its_formula_and_passes_gradcheck(h_shape, y_shape, r):
    gen = torch.Generator().manual_seed(r)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=F64, requires_grad=True)
    h, y, A, B = make(*h_shape), make(*y_shape), make(r, 5), make(5, r)
    out = OP(h, y, A, B, 1.5)
    torch.testing.assert_close(out, lora_shortcut_reference(h, y, A, B, 1.5), **TOL)
    assert out.shape == y.shape
    torch.autograd.gradcheck(lambda *a: OP(*a, 1.5), (h, y, A, B), fast_mode=True)


def test_opcheck_and_shape_errors():
    t = lambda *s: torch.randn(*s, requires_grad=True)
    torch.library.opcheck(OP, (t(2, 3, 4), t(2, 3, 4), t(2, 4), t(4, 2), 2.0))
    with pytest.raises(RuntimeError, match="lora_A must be"):
        OP(t(2, 4), t(2, 4), t(2, 5), t(4, 2), 1.0)
    with pytest.raises(RuntimeError, match="same number of tokens"):
        OP(t(3, 4), t(2, 4), t(2, 4), t(4, 2), 1.0)


def test_fast_eager_path_gives_the_ops_outputs_and_gradients():
    fast = eager.fast_op(OP.default)
    assert fast is not None and fast.apply is not None  # picked up like every lorafx op, with its autograd
    gen = torch.Generator().manual_seed(0)
    ins = [torch.randn(*s, generator=gen, requires_grad=True) for s in ((3, 4, 6), (3, 4, 6), (2, 6), (6, 2))]
    a, b = OP(*ins, 2.0), fast(*ins, 2.0)
    assert torch.equal(a, b)
    w = torch.randn(a.shape, generator=gen)
    ga = torch.autograd.grad((a * w).sum(), ins)
    gb = torch.autograd.grad((b * w).sum(), ins)
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))
    with torch.no_grad():
        assert torch.equal(fast(*ins, 2.0), a)


def test_a_compiled_model_runs_shortcuts_through_the_fast_path(llama):
    model, cm, x = llama
    gm = cm.graph_module
    assert eager.fast_forward(gm) is not None
    randomize(cm)
    cm.eval()
    try:
        params = [p for p in cm.parameters() if p.requires_grad]
        fast, plain = logits(cm, x), gm(input_ids=x)[0]  # eager.run vs the GraphModule itself
        assert torch.equal(fast, plain)
        g_fast = torch.autograd.grad(fast.sum(), params)
        g_plain = torch.autograd.grad(plain.sum(), params)
        assert all(torch.equal(u, v) for u, v in zip(g_fast, g_plain))
    finally:
        randomize(cm, scale=0.0, only="lora_B")


# -- cost ------------------------------------------------------------------------------------------
@settings(max_examples=8, deadline=None)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=2), dim=st.integers(1, 7), r=st.integers(1, 3),
       grads=st.sets(st.sampled_from(["h", "y", "A", "B"])))
def test_cost_matches_flop_counter(lead, dim, r, grads):
    """AnnotateCost (the kind's ``cost``) counts what FlopCounterMode counts, forward (the
    registered formula) and backward (the GEMMs the backward runs), for every set of inputs
    that need a gradient."""
    names = ("h", "y", "A", "B")
    shapes = ((*lead, dim), (*lead, dim), (r, dim), (dim, r))
    ins = [torch.randn(*s) for s in shapes]
    fn = lambda h, y, A, B: OP(h, y, A, B, 2.0)
    gm = make_fx(fn, tracing_mode="fake", pre_dispatch=True)(*ins)
    holders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    AnnotateCost(grad_inputs=tuple(h for h, n in zip(holders, names) if n in grads))(gm)
    total = graph_cost(gm)
    node = next(n for n in gm.graph.nodes if n.target is OP.default)
    assert get_record(node, CostRecord).kind == "lora"

    real = [t.clone().requires_grad_(n in grads) for t, n in zip(ins, names)]
    with FlopCounterMode(display=False) as f:
        out = fn(*real)
    fwd, bwd = f.get_total_flops(), 0
    if out.requires_grad:
        with FlopCounterMode(display=False) as f:
            out.backward(torch.ones_like(out))
        bwd = f.get_total_flops()
    assert (int(total.fwd_flops), int(total.bwd_flops)) == (fwd, bwd)
    tokens = out.numel() // dim
    assert (fwd, bwd) == shortcut_flops(tokens, dim, r, need_h="h" in grads, need_a="A" in grads,
                                        need_b="B" in grads)


def test_cost_records_in_a_compiled_model(llama):
    _, cm, _ = llama
    nodes = shortcut_nodes(cm.graph_module)
    assert len(nodes) == 7
    for node in nodes:
        rec = get_record(node, CostRecord)
        assert rec.kind == "lora" and rec.requires_grad
        assert rec.fwd_flops == 4 * BATCH * SEQ * 32 * 3  # 4 T dim r, symbolic in the token count
        assert rec.bwd_flops.free_symbols == {BATCH, SEQ}


# -- identity at init (property) ----------------------------------------------------------------
@settings(max_examples=6, deadline=None)
@given(case=st.one_of(residual_models(), attention_models()), shortcut_r=st.integers(1, 4),
       alpha=st.sampled_from([1.0, 8.0, 16.0]), seed=st.integers(0, 2**16))
def test_shortcuts_are_the_identity_at_init(case, shortcut_r, alpha, seed):
    """B = 0: the compiled model (adapters and shortcuts) and the pass alone on a captured
    graph give the captured graph's outputs and input gradients."""
    gm = lorafx.capture(case.model, example_kwargs=case.inputs)
    cm = lorafx.compile(case.model, example_kwargs=case.inputs, r=1, shortcuts=True, shortcut_r=shortcut_r,
                        shortcut_alpha=alpha, seed=seed)
    assert cm.shortcut_records()
    assert_equivalent(gm, cm, case.inputs, msg=case.description)
    alone = InsertShortcuts(shortcut_r=shortcut_r, shortcut_alpha=alpha, seed=seed)(copy.deepcopy(gm)).graph_module
    assert shortcut_nodes(alone)
    assert_equivalent(gm, alone, case.inputs, msg=case.description)
    trainable = {n for n, p in alone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("lorafx_shortcuts.") for n in trainable)


# -- site discovery --------------------------------------------------------------------------------
def check_links(sites, layers):
    """The documented links, per layer, in terms of the sites' src/dst nodes."""
    assert len(sites) == 4 * layers - 1
    by = {s.name: s for s in sites}
    assert set(by) == {f"shortcuts.{i}.{link}" for i in range(layers) for link in LINKS} - \
        {"shortcuts.0.prev_ffn_to_attn"}
    for i in range(layers):
        attn, ffn, cross = by[f"shortcuts.{i}.attn_skip"], by[f"shortcuts.{i}.ffn_skip"], by[f"shortcuts.{i}.input_to_ffn"]
        assert (attn.link, ffn.link, cross.link) == ("attn_skip", "ffn_skip", "input_to_ffn")
        assert attn.dst is not ffn.dst
        assert attn.src in attn.dst.args and ffn.src in ffn.dst.args  # the skip operands of the two adds
        assert cross.src is attn.src and cross.dst is ffn.dst  # the layer input to after the FFN add
        if i:
            prev = by[f"shortcuts.{i}.prev_ffn_to_attn"]
            assert prev.src is by[f"shortcuts.{i - 1}.ffn_skip"].src and prev.dst is attn.dst
    for s in sites:
        assert isinstance(s, ShortcutSite)
        assert s.src.meta["val"].shape[-1] == s.dst.meta["val"].shape[-1] == s.dim


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_sites_on_every_model_family(tiny_model, family):
    model = tiny_model(family)
    layers = model.config.num_hidden_layers
    first = find_shortcut_sites(lorafx.capture(model, example_kwargs={"input_ids": ids(2, 8)}))
    check_links(first, layers)
    assert {s.dim for s in first} == {model.config.hidden_size}
    other = find_shortcut_sites(lorafx.capture(model, example_kwargs={"input_ids": ids(3, 5)}, dynamic=False))
    assert [(s.name, s.link, s.dim) for s in other] == [(s.name, s.link, s.dim) for s in first]


def test_sites_on_the_testing_models():
    x = torch.randn(2, 3, 6)
    sites = find_shortcut_sites(lorafx.capture(AttentionBlock(6, 2), (x,)))
    check_links(sites, 1)
    residual = find_shortcut_sites(lorafx.capture(ResidualBlock(6, 10, depth=3), (x,)))
    # FFN-only blocks: one skip link each
    assert [(s.name, s.link) for s in residual] == [(f"shortcuts.{i}.ffn_skip", "ffn_skip") for i in range(3)]
    assert residual[0].src.op == "placeholder" and residual[1].src is residual[0].dst
    assert find_shortcut_sites(lorafx.capture(MLP([4, 6, 3]), (torch.randn(2, 4),))) == []


def test_the_rewritten_graph(llama):
    model, cm, _ = llama
    nodes = shortcut_nodes(cm.graph_module)
    records = cm.shortcut_records()
    assert list(records) == [get_record(n, ShortcutRecord).site for n in nodes]
    assert {r.link for r in records.values()} == set(LINKS)
    assert all(r.r == 3 and r.alpha == 6.0 and r.scale == 2.0 and r.dim == 32 for r in records.values())
    rec = records["shortcuts.1.attn_skip"]
    assert (rec.lora_A, rec.lora_B) == ("lorafx_shortcuts.layer1_attn_skip.lora_A",
                                        "lorafx_shortcuts.layer1_attn_skip.lora_B")
    assert get_attr(cm, rec.lora_A).shape == (3, 32) and get_attr(cm, rec.lora_B).shape == (32, 3)
    # not linear adapters: lora_records (and the PEFT files) see only q_proj and v_proj
    assert all(site.endswith(("q_proj", "v_proj")) for site in cm.lora_records())
    assert "shortcut(attn_skip, r=3, scale=2)" in cm.graph_report()
    assert "shortcuts.1.attn_skip" in cm.graph_report()
    assert "InsertShortcuts" in str(cm.report()) and "shortcut_sites=7/7" in str(cm.report())
    assert lint(cm.graph_module.graph) is None
    broken = copy.deepcopy(cm.graph_module.graph)
    node = next(n for n in broken.nodes if kind_of(n) is SHORTCUT)
    node.meta["lorafx"] = {k: v for k, v in node.meta["lorafx"].items() if k != "ShortcutRecord"}  # (meta is shared)
    assert "has no ShortcutRecord" in lint(broken)


def test_pattern_and_allocation_choose_the_sites():
    torch.manual_seed(0)
    model = AttentionBlock(8, 2).double()
    x = torch.randn(2, 4, 8, dtype=F64)
    gm = lorafx.capture(model, (x,))
    chosen = InsertShortcuts(shortcut_pattern={"shortcuts.0.ffn_skip": 2, "shortcuts.0.attn_skip": 0})
    out = chosen(copy.deepcopy(gm)).graph_module
    assert [get_record(n, ShortcutRecord).site for n in shortcut_nodes(out)] == ["shortcuts.0.ffn_skip"]
    assert get_record(shortcut_nodes(out)[0], ShortcutRecord).r == 2

    allocated = copy.deepcopy(gm)
    graph_record(allocated).allocation = {"attn.q_proj": 4, "shortcuts.0.input_to_ffn": 5, "shortcuts.0.ffn_skip": 0}
    out = InsertShortcuts(shortcut_r=2)(allocated).graph_module  # shortcut_r is ignored
    recs = [get_record(n, ShortcutRecord) for n in shortcut_nodes(out)]
    assert [(r.site, r.r) for r in recs] == [("shortcuts.0.input_to_ffn", 5)]

    both = copy.deepcopy(gm)
    graph_record(both).allocation = {"shortcuts.0.ffn_skip": 2}
    with pytest.raises(ValueError, match="pass only one"):
        chosen(both)


# -- bad options -----------------------------------------------------------------------------------
def test_bad_options_name_the_fix():
    model, x = MLP([4, 6, 3]).double(), torch.randn(2, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"shortcut_r must be a positive int.*shortcut_r=8"):
        lorafx.compile(model, example_inputs=(x,), shortcuts=True, shortcut_r=0)
    with pytest.raises(ValueError, match=r"shortcut_alpha must be a finite number > 0"):
        lorafx.compile(model, example_inputs=(x,), shortcuts=True, shortcut_alpha=0.0)
    with pytest.raises(ValueError, match=r"shortcut_pattern\['shortcuts.0.ffn_skip'\] must be a rank >= 0"):
        lorafx.compile(model, example_inputs=(x,), shortcuts=True, shortcut_pattern={"shortcuts.0.ffn_skip": -1})
    with pytest.raises(TypeError, match="shortcuts must be True or False"):
        lorafx.compile(model, example_inputs=(x,), shortcuts="yes")
    with pytest.raises(ValueError, match=r"no residual connections.*drop shortcuts=True"):
        lorafx.compile(model, example_inputs=(x,), r=2, shortcuts=True)
    block, xb = ResidualBlock(6, 8, depth=2).double(), torch.randn(2, 3, 6, dtype=F64)
    with pytest.raises(ValueError, match=r"unknown shortcut site\(s\) \['shortcuts.7.attn_skip'\].*"
                                         r"this model's sites: shortcuts.0.ffn_skip, shortcuts.1.ffn_skip"):
        lorafx.compile(block, example_inputs=(xb,), r=2, shortcuts=True, shortcut_pattern={"shortcuts.7.attn_skip": 2})


# -- training --------------------------------------------------------------------------------------
def test_training_moves_only_the_adapters(tiny_model):
    model = tiny_model("qwen2")
    x = ids(2, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cm = lorafx.compile(model, example_inputs=(x,), r=2, shortcuts=True, shortcut_r=2, seed=0)
    cm.train()
    trainable = set(cm.trainable_parameters())
    assert trainable == {n for n, _ in cm.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    assert sum(n.startswith("lorafx_shortcuts.") for n in trainable) == 2 * 7
    with torch.no_grad():
        start = logits(cm, x)
    opt = torch.optim.SGD(cm.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        out = cm(input_ids=x, labels=x)  # a second call signature: captured once, same adapters
        out.loss.backward()
        with_grad = {n for n, p in cm.named_parameters() if p.grad is not None}
        assert with_grad <= trainable
        assert all(cm.get_parameter(n).grad.abs().max() > 0 for n in with_grad if "lorafx_shortcuts" in n
                   and n.endswith("lora_B"))
        opt.step()
    with torch.no_grad():
        assert (logits(cm, x) - start).abs().max() > 1e-4
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the source model is untouched


# -- merging ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_merge_keeps_shortcuts_and_merge_and_unload_lowers_them(tiny_model, family):
    model = tiny_model(family, F64)
    x, other = ids(2, 8), ids(3, 5, seed=2)
    cm = lorafx.compile(model, example_inputs=(x,), r=2, shortcuts=True, shortcut_r=2, seed=0)
    randomize(cm)
    cm.eval()
    with torch.no_grad():
        want, want_other = logits(cm, x), logits(cm, other)
        cm.merge()
        assert len(shortcut_nodes(cm.graph_module)) == 7
        assert not [n for n in lorafx_ops(cm.graph_module) if kind_of(n) is not SHORTCUT]
        torch.testing.assert_close(logits(cm, x), want, **TOL)
        cm.unmerge()
        torch.testing.assert_close(logits(cm, x), want, **TOL)
        plain = cm.merge_and_unload()
        assert lorafx_ops(plain) == []
        assert not any(p.requires_grad for p in plain.parameters())
        assert sum(n.startswith("lorafx_shortcuts.") for n, _ in plain.named_parameters()) == 14
        torch.testing.assert_close(logits(plain, x), want, **TOL)
        torch.testing.assert_close(logits(plain, other), want_other, **TOL)  # dynamic shapes still
    assert all(p.requires_grad for n, p in cm.named_parameters() if n.startswith("lorafx_shortcuts."))
    with pytest.raises(ValueError, match=r"no place for them.*merge_and_unload.*save_adapter"):
        cm.merged_state_dict()


def test_a_model_with_shortcuts_only_merges_and_unloads():
    model, cm, x = residual_cm(passes=without_linear_adapters(lorafx.default_passes(shortcuts=True, shortcut_r=2)))
    assert not cm.lora_records() and len(cm.shortcut_records()) == 2
    randomize(cm)
    cm.eval()
    with torch.no_grad():
        want = cm(x)
        cm.merge()
        torch.testing.assert_close(cm(x), want, **TOL)
        cm.unmerge()
        plain = cm.merge_and_unload()
        assert lorafx_ops(plain) == []
        torch.testing.assert_close(plain(x), want, **TOL)


# -- saving and loading -----------------------------------------------------------------------------
def test_save_and_load_round_trip(llama, tmp_path):
    model, cm, x = llama
    randomize(cm)
    cm.eval()
    try:
        with Warnings() as logged:
            cm.save_adapter(str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME, SHORTCUTS_NAME]
        message = " ".join(r.getMessage() for r in logged)
        assert "PEFT cannot express shortcut adapters" in message and SHORTCUTS_NAME in message
        assert "lorafx.load_adapter" in message
        saved = safetensors.torch.load_file(str(tmp_path / SHORTCUTS_NAME))
        assert set(saved) == {f"{s}.lora_{ab}" for s in cm.shortcut_records() for ab in "AB"}
        with safetensors.safe_open(str(tmp_path / SHORTCUTS_NAME), "pt") as f:
            listed = json.loads(f.metadata()["lorafx_shortcuts"])
        assert listed["shortcuts.1.prev_ffn_to_attn"] == {"r": 3, "alpha": 6.0, "scale": 2.0,
                                                          "link": "prev_ffn_to_attn"}
        with torch.no_grad():
            want = logits(cm, x)
            loaded = lorafx.load_adapter(model, str(tmp_path), example_inputs=(x,)).eval()
            assert loaded.shortcut_records() == cm.shortcut_records()
            assert torch.equal(logits(loaded, x), want)
            fresh = lorafx.compile(model, example_inputs=(x,), r=2, target_modules=["q_proj", "v_proj"],
                                   shortcuts=True, shortcut_r=3, shortcut_alpha=6.0, seed=7).eval()
            fresh.load_adapter(str(tmp_path))
            assert torch.equal(logits(fresh, x), want)
            fresh.merge().load_adapter(str(tmp_path))  # into a merged model too
            torch.testing.assert_close(logits(fresh, x), want, **TOL)
    finally:
        randomize(cm, scale=0.0, only="lora_B")


def test_mismatched_shortcuts_are_refused_with_the_fix(llama, tmp_path):
    model, cm, x = llama
    cm.save_adapter(str(tmp_path / "with"))
    plain = lorafx.compile(model, example_inputs=(x,), r=2, target_modules=["q_proj", "v_proj"], seed=0)
    with pytest.raises(ValueError, match=r"compiled without shortcuts; load it with lorafx.load_adapter"):
        plain.load_adapter(str(tmp_path / "with"))
    plain.save_adapter(str(tmp_path / "without"))
    with pytest.raises(ValueError, match=r"shortcut adapter\(s\) \(shortcuts=True\) but the adapter in .* has none"):
        cm.load_adapter(str(tmp_path / "without"))
    fewer = lorafx.compile(model, example_inputs=(x,), r=2, target_modules=["q_proj", "v_proj"], shortcuts=True,
                           shortcut_alpha=6.0, shortcut_r=3, seed=0,
                           shortcut_pattern={"shortcuts.0.attn_skip": 3, "shortcuts.1.ffn_skip": 3})
    with pytest.raises(ValueError, match=r"saved shortcuts without a site \['shortcuts.0.ffn_skip'"):
        fewer.load_adapter(str(tmp_path / "with"))
    other_scale = lorafx.compile(model, example_inputs=(x,), r=2, target_modules=["q_proj", "v_proj"],
                                 shortcuts=True, shortcut_r=3, seed=0)
    with pytest.raises(ValueError, match=r"shortcuts.0.attn_skip: .*scale 2 .*shortcut_alpha=6"):
        other_scale.load_adapter(str(tmp_path / "with"))


def test_peft_loads_the_peft_part(tiny_model, tmp_path):
    """PEFT ignores the shortcuts file; with the shortcuts' B = 0 it computes lorafx's outputs."""
    peft = pytest.importorskip("peft")
    model = tiny_model("gpt2", F64)
    x = ids(2, 7)
    cm = lorafx.compile(model, example_inputs=(x,), dynamic=False, r=2, alpha=4,
                        target_modules=["c_attn", "c_fc"], shortcuts=True, shortcut_r=2, seed=0)
    randomize(cm)
    randomize(cm, scale=0.0, only="lorafx_shortcuts.")  # B = 0 (and A = 0): the identity
    randomize(cm, seed=3, only="lorafx_shortcuts.layer0_attn_skip.lora_A")  # A alone changes nothing
    cm.eval()
    cm.save_adapter(str(tmp_path))
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert set(config) <= set(peft.LoraConfig.__dataclass_fields__)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    peft_sites = {n[len("base_model.model."):-len(".lora_A.default.weight")]
                  for n, _ in loaded.named_parameters() if n.endswith(".lora_A.default.weight")}
    assert peft_sites == set(cm.lora_records())
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, x), logits(cm, x), **TOL)


def test_shortcuts_only_save_and_load(tmp_path):
    model, cm, x = residual_cm(passes=without_linear_adapters(lorafx.default_passes(shortcuts=True, shortcut_r=2)))
    randomize(cm)
    with Warnings() as logged:
        cm.save_adapter(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, SHORTCUTS_NAME]
    assert "shortcut adapters only" in logged[0].getMessage()
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"] == []
    loaded = lorafx.load_adapter(model, str(tmp_path), example_inputs=(x,))
    assert not loaded.lora_records() and list(loaded.shortcut_records()) == list(cm.shortcut_records())
    with torch.no_grad():
        assert torch.equal(loaded(x), cm(x))
    _, with_linear, _ = residual_cm(shortcuts=True, shortcut_r=2)
    with pytest.raises(ValueError, match="shortcut adapters only"):
        with_linear.load_adapter(str(tmp_path))
    # a save without shortcuts moves the old shortcuts file out; one with both writes all three
    with_linear.save_adapter(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME, SHORTCUTS_NAME]
    cm.save_adapter(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, SHORTCUTS_NAME]
    _, linear_only, _ = residual_cm()
    linear_only.save_adapter(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]


# -- atomic saves ----------------------------------------------------------------------------------
def params(cm):
    return {n: p.detach().clone() for n, p in cm.trainable_parameters().items()}


@pytest.mark.parametrize("old,new", [("both", "both"), pytest.param("linear", "both", marks=pytest.mark.slow),
                                     ("both", "linear"), pytest.param("shortcuts", "both", marks=pytest.mark.slow)])
def test_an_interrupted_save_leaves_the_old_adapter(tmp_path, monkeypatch, old, new):
    """A fault at any filesystem step (every step of a save of up to three files, and moving
    out a file the new save does not write) leaves the previous adapter byte-identical."""
    options = {"both": dict(shortcuts=True, shortcut_r=2), "linear": {},
               "shortcuts": dict(passes=without_linear_adapters(lorafx.default_passes(shortcuts=True, shortcut_r=2)))}
    model, first, x = residual_cm(**options[old])
    randomize(first, seed=1)
    first.save_adapter(str(tmp_path))
    old_files, old_params = folder_snapshot(tmp_path), params(first)
    _, second, _ = residual_cm(**options[new])
    randomize(second, seed=2)
    steps = set()
    for k in itertools.count():
        restore(tmp_path, old_files)
        faults = Faults(k)
        with monkeypatch.context() as m:
            faults.install(m)
            try:
                second.save_adapter(str(tmp_path))
                error = None
            except OSError as e:
                error = e
        if error is not None:
            steps.add(faults.calls[k])
            assert folder_snapshot(tmp_path) == old_files, f"a fault in {faults.calls[k]} changed the folder"
            loaded = lorafx.load_adapter(model, str(tmp_path), example_inputs=(x,))
            assert params(loaded).keys() == old_params.keys()
            assert all(torch.equal(params(loaded)[n], v) for n, v in old_params.items())
        elif not faults.fired:
            break
    assert {"os.replace", "safetensors.torch.save_file", "json.dump"} <= steps
    loaded = lorafx.load_adapter(model, str(tmp_path), example_inputs=(x,))
    assert all(torch.equal(params(loaded)[n], v) for n, v in params(second).items())


def test_files_of_different_saves_are_refused(tmp_path):
    """Same config bytes, other weights: a shortcuts file from another save is caught by the save id."""
    _, cm, _ = residual_cm(shortcuts=True, shortcut_r=2)
    randomize(cm, seed=1)
    cm.save_adapter(str(tmp_path / "a"))
    randomize(cm, seed=2)
    cm.save_adapter(str(tmp_path / "b"))
    assert (tmp_path / "a" / CONFIG_NAME).read_bytes() == (tmp_path / "b" / CONFIG_NAME).read_bytes()
    shutil.copyfile(tmp_path / "b" / SHORTCUTS_NAME, tmp_path / "a" / SHORTCUTS_NAME)
    with pytest.raises(ValueError, match="come from different saves"):
        cm.load_adapter(str(tmp_path / "a"))
