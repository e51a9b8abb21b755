"""Memory passes: CausalMaskToIsCausal, RecomputeInputs, FuseSiblings and their ops.

Every rewrite is checked for what it promises (outputs and gradients equal, in
float64), and for what it must leave alone.
"""
import copy
import importlib.util
import operator
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import lorafx
from lorafx.meta import LoraRecord, get_record
from lorafx.dialect.recipe import compile_recipe, run_recipe
from lorafx.passes import CausalMaskToIsCausal, FuseSiblings, RecomputeInputs, set_training_mode
from lorafx.testing import assert_equivalent, attention_models, lora_configs, residual_models

from conftest import _tiny, adapter_names, ids, randomise_lora_B

SDPA = torch.ops.aten.scaled_dot_product_attention.default
RECOMPUTE = torch.ops.lorafx.lora_linear_recompute.default
SIBLINGS = torch.ops.lorafx.lora_linear_siblings.default
LORA = torch.ops.lorafx.lora_linear.default


def _sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is SDPA]


def _lora_graph(family, passes=(), **options):
    """A float64 tiny model compiled without the memory passes, random B; (plain graph, model)."""
    model = _tiny(family, torch.float64).eval()
    if family == "mistral":
        model.config.sliding_window = None
    gm = lorafx.capture(model, (ids(2, 12),))
    set_training_mode(gm, False)
    from lorafx.passes import InsertLoRA, SelectSchedule
    InsertLoRA(r=2, seed=0, **options)(gm)
    SelectSchedule()(gm)
    randomise_lora_B(gm)
    return gm


# -- CausalMaskToIsCausal -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama"] + [pytest.param(f, marks=pytest.mark.slow) for f in ("qwen2", "mistral", "opt")])
def test_causal_mask_rewrite_equals_masked(family):
    model = _tiny(family, torch.float64).eval()
    if family == "mistral":
        model.config.sliding_window = None  # a plain causal Mistral (the window is tested below)
    gm = lorafx.capture(model, (ids(2, 12),))
    set_training_mode(gm, False)
    after = copy.deepcopy(gm)
    info = CausalMaskToIsCausal()(after).info
    assert info["rewritten"] == model.config.num_hidden_layers and not info["kept"]
    for n in _sdpa_nodes(after):
        assert n.args[3] is None and n.args[5] is True
    # no boolean (batch, 1, seq, seq) tensor is built any more
    assert not any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype == torch.bool
                   and n.meta["val"].dim() == 4 for n in after.graph.nodes)
    names = [n for n, _ in model.named_parameters()][1:8]
    for batch, seq in [(3, 9), (2, 12), (1, 5), (2, 33)]:
        x = {"input_ids": ids(batch, seq, seed=batch + seq)}
        assert_equivalent(gm, after, x, param_names=names, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(after(**x).logits, model(**x).logits, rtol=1e-10, atol=1e-12)


def test_causal_mask_keeps_sliding_window():
    model = _tiny("mistral", torch.float64).eval()
    model.config.sliding_window = 4
    gm = lorafx.capture(model, (ids(2, 12),))
    set_training_mode(gm, False)
    after = copy.deepcopy(gm)
    info = CausalMaskToIsCausal()(after).info
    assert info["rewritten"] == 0 and len(info["kept"]) == 2
    assert all("not the causal mask" in why for why in info["kept"].values())
    assert_equivalent(model, after, {"input_ids": ids(2, 11)}, grads=False, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_causal_mask_leaves_attention_mask_inputs_alone(family):
    model = _tiny(family, torch.float64).eval()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding: the mask is not the causal one
    gm = lorafx.capture(model, (), {"input_ids": ids(2, 12), "attention_mask": mask})
    set_training_mode(gm, False)
    after = copy.deepcopy(gm)
    info = CausalMaskToIsCausal()(after).info
    assert info["rewritten"] == 0 and len(info["kept"]) == model.config.num_hidden_layers
    for n in _sdpa_nodes(after):
        assert n.args[3] is not None
    x = {"input_ids": ids(2, 12, seed=3), "attention_mask": mask}
    torch.testing.assert_close(after(**x).logits, model(**x).logits, rtol=1e-10, atol=1e-12)


class _MaskedAttention(nn.Module):
    """SDPA with a mask ``cmp(kv + shift, q)`` built from aranges (is causal iff cmp is <= and shift 0,
    or cmp is < and shift -1)."""

    def __init__(self, cmp: str, shift: int, dim: int = 8):
        super().__init__()
        self.cmp, self.shift = cmp, shift
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        pos = torch.arange(s, device=x.device)
        kv, qi = pos[None, None, None, :] + self.shift, pos[None, None, :, None]
        mask = {"le": kv <= qi, "lt": kv < qi, "ge": kv >= qi, "eq": kv == qi}[self.cmp]
        mask = mask.expand(b, 1, s, s)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@given(st.sampled_from(["le", "lt", "ge", "eq"]), st.integers(-2, 2), st.integers(0, 2**16))
def test_causal_mask_rewrites_exactly_the_causal_masks(cmp, shift, seed):
    """The pass rewrites a mask iff it is the causal mask (for every size), and the result is equal."""
    torch.manual_seed(seed)
    model = _MaskedAttention(cmp, shift).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    gm = lorafx.capture(model, (x,))
    after = copy.deepcopy(gm)
    info = CausalMaskToIsCausal()(after).info
    causal = (cmp == "le" and shift == 0) or (cmp == "lt" and shift == -1)
    assert info["rewritten"] == int(causal), info
    for s in (2, 3, 7):
        # rows with every key masked give nan in both
        xs = torch.randn(3, s, 8, dtype=torch.float64)
        want = model(xs)
        got = after(x=xs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)


# -- RecomputeInputs ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "bert"] + [pytest.param(f, marks=pytest.mark.slow) for f in ("qwen2", "gpt2", "opt")])
def test_recompute_inputs_is_bit_exact(family):
    gm = _lora_graph(family)
    after = copy.deepcopy(gm)
    info = RecomputeInputs()(after).info
    assert info["rewritten"] > 0
    names = adapter_names(gm)
    for x in (ids(3, 9), ids(2, 20, seed=1)):
        # the same kernels on the same values: outputs and every adapter gradient bit for bit
        assert_equivalent(gm, after, {"input_ids": x}, param_names=names, rtol=0, atol=0)


def test_recompute_inputs_llama_sites():
    gm = _lora_graph("llama")
    info = RecomputeInputs()(gm).info
    rewritten = {n.name for n in gm.graph.nodes if n.target is RECOMPUTE}
    layers = range(2)
    want = {f"model_layers_{i}_mlp_{p}_proj_lora" for i in layers for p in ("gate", "up", "down")}
    want |= {f"model_layers_1_self_attn_{p}_proj_lora" for p in "qkv"}
    assert rewritten == want
    # layer 0's q/k/v read the frozen embedding (no autograd node saves it); o_proj reads a view of
    # the attention output, which SDPA saves anyway
    assert "model_layers_0_self_attn_q_proj_lora" in info["kept"]
    recipes = {r["recipe"] for r in info["recipes"].values()}
    assert "aten.mul.Tensor(s0, s1)" in recipes  # silu(gate) * up
    assert any("aten.mul.Tensor(s1, s2)" in r for r in recipes)  # norm weight * (h * rsqrt)


def _saved_storage_bytes(module, inputs):
    params = {p.untyped_storage().data_ptr() for p in list(module.parameters()) + list(module.buffers())}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(**inputs)
    return sum(seen.values()), out


def test_recompute_inputs_saves_memory():
    gm = _lora_graph("llama")
    after = copy.deepcopy(gm)
    RecomputeInputs()(after)
    x = {"input_ids": ids(4, 64)}
    before_bytes, _ = _saved_storage_bytes(gm, x)
    after_bytes, _ = _saved_storage_bytes(after, x)
    # per layer the norm outputs (32 wide) and silu(gate)*up (64 wide) are no longer kept;
    # layer 0's attention input still is: 2 + 2 + 1 tensors of 32 and 2 of 64 -> 9 x 32 columns
    tokens, item = 4 * 64, 8
    assert before_bytes - after_bytes == tokens * item * (32 * 3 + 64 * 2)


@given(st.one_of(residual_models(), attention_models()), lora_configs())
def test_recompute_inputs_property(case, config):
    """On random models (float inputs needing gradients): outputs and input/adapter grads bit-equal."""
    from lorafx.passes import InsertLoRA, SelectSchedule
    gm = lorafx.capture(case.model.eval(), example_kwargs=case.inputs)
    set_training_mode(gm, False)
    InsertLoRA(**config)(gm)
    SelectSchedule()(gm)
    randomise_lora_B(gm, config["seed"])
    after = copy.deepcopy(gm)
    info = RecomputeInputs(inputs_require_grad=True)(after).info
    assert info["rewritten"] > 0  # every drawn model has a norm (or a norm-free first layer) before an adapter
    assert_equivalent(gm, after, case.inputs, param_names=adapter_names(gm), rtol=0, atol=0, msg=repr(case))


def test_recompute_inputs_with_dropout_is_exact():
    """Adapter dropout: with the same random masks, outputs and gradients are bit-equal."""
    gm = _lora_graph("llama", dropout=0.3)
    set_training_mode(gm, True)
    after = copy.deepcopy(gm)
    assert RecomputeInputs()(after).info["rewritten"] > 0
    x = {"input_ids": ids(2, 10)}
    names = adapter_names(gm)

    def run(m):
        torch.manual_seed(7)
        loss = m(**x).logits.square().mean()
        return [loss] + list(torch.autograd.grad(loss, [dict(m.named_parameters())[n] for n in names]))

    for a, b in zip(run(gm), run(after)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("fuse", [False, True])
def test_recompute_inputs_reexports_and_merges(fuse):
    """compile()'s default pipeline (RecomputeInputs, then FuseSiblings in eager) re-exports with its
    ops as single nodes and merges exactly."""
    model = _tiny("llama", torch.float64).eval()
    cm = lorafx.compile(model, example_inputs=(ids(2, 12),), r=2, seed=0, fuse_siblings=fuse)
    gm = cm.graph_module
    # 2 layers: 9 adapters rebuild their input (q/k/v, gate/up, down; not o); fused, q/k/v and gate/up
    # become one op per group with the recipe, down stays a recompute op
    counts = {t: sum(n.target is t for n in gm.graph.nodes) for t in (RECOMPUTE, SIBLINGS)}
    assert counts == ({RECOMPUTE: 2, SIBLINGS: 4} if fuse else {RECOMPUTE: 9, SIBLINGS: 0})
    randomise_lora_B(gm)
    ep = torch.export.export(gm, (), {"input_ids": ids(2, 12)})
    assert {t: sum(n.target is t for n in ep.graph.nodes) for t in (RECOMPUTE, SIBLINGS)} == counts
    x = ids(2, 12, seed=4)  # the re-export is static: same shape
    torch.testing.assert_close(ep.module()(input_ids=x).logits, gm(input_ids=x).logits)
    unmerged = cm(input_ids=x).logits.detach()
    plain = cm.merge_and_unload()
    assert not any(n.target in (LORA, RECOMPUTE, SIBLINGS) for n in plain.graph.nodes)
    torch.testing.assert_close(plain(input_ids=x).logits, unmerged, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("schedule", ["f1b1", "f2b5", "f1b3", "f1b1|7:f2b5"])
@pytest.mark.parametrize("dropout", [False, True])
def test_lora_linear_recompute_opcheck_and_gradcheck(schedule, dropout):
    g = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    h = torch.randn(2, 3, 4, generator=g, **d).requires_grad_()
    u = torch.randn(2, 3, 4, generator=g, **d).requires_grad_()
    x = (h * u).detach().requires_grad_()
    W = torch.randn(5, 4, generator=g, **d)
    b = torch.randn(5, generator=g, **d)
    A = torch.randn(2, 4, generator=g, **d).requires_grad_()
    B = torch.randn(5, 2, generator=g, **d).requires_grad_()
    mask, p = ((torch.rand(2, 3, 4, generator=g) > 0.3), 0.3) if dropout else (None, 0.0)
    recipe = "aten.mul.Tensor(s0, s1)"
    args = (x, W, b, A, B, 2.0, mask, p, schedule, recipe, [h, u])
    torch.library.opcheck(RECOMPUTE, args)
    fn = lambda x, A, B, h, u: RECOMPUTE(x, W, b, A, B, 2.0, mask, p, schedule, recipe, [h, u])
    assert torch.autograd.gradcheck(fn, (x, A, B, h, u))
    from lorafx.dialect.linear import lora_linear_reference
    torch.testing.assert_close(RECOMPUTE(*args), lora_linear_reference(x, W, b, A, B, 2.0, mask, p))


def test_recipe_language():
    s = [torch.randn(3, 4), torch.randn(3, 4), torch.randn(4)]
    got = run_recipe("aten.mul.Tensor(s2, aten.to.dtype(aten.mul.Tensor(s0, s1), torch.float32))", s)
    torch.testing.assert_close(got, s[2] * (s[0] * s[1]), rtol=0, atol=0)
    got = run_recipe("aten.view.default(aten.layer_norm.default(s0, [4], s2, None, 1e-05, False), [-1, 2])", s)
    torch.testing.assert_close(got, torch.nn.functional.layer_norm(s[0], [4], s[2]).view(-1, 2))
    for bad in ("aten.bernoulli.default(s0)", "torch.ops.aten.mul.Tensor(s0, s1)", "s0 * s1", "__import__('os')",
                "aten.mul.Tensor(s0, x)", "aten.mul.Tensor(s0,", "aten.to.dtype(s0, torch.cuda)"):
        with pytest.raises(ValueError):
            compile_recipe(bad)


# -- FuseSiblings ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "bert"] + [pytest.param(f, marks=pytest.mark.slow) for f in ("qwen2", "opt")])
@pytest.mark.parametrize("recompute", [False, True])
def test_fuse_siblings_equals_separate(family, recompute):
    gm = _lora_graph(family)
    after = copy.deepcopy(gm)
    if recompute:
        RecomputeInputs()(after)
    info = FuseSiblings()(after).info
    layers = 2
    # llama/qwen2: q/k/v and gate/up per layer; opt/bert: q/k/v per layer
    assert info["groups"] == (2 * layers if family in ("llama", "qwen2") else layers), info
    assert not any(n.target in (LORA, RECOMPUTE) and n.name.endswith(("k_proj_lora", "up_proj_lora"))
                   for n in after.graph.nodes)
    # every adapter's output keeps its node name (now a getitem of the fused op), in the same order
    outputs = lambda g: [n.name for n in g.graph.nodes if get_record(n, LoraRecord) is not None
                         and n.target in (LORA, RECOMPUTE, operator.getitem)]
    assert outputs(after) == outputs(gm)
    names = adapter_names(gm)
    for x in (ids(3, 9), ids(2, 40, seed=2)):  # two token counts: different schedules in the rule
        assert_equivalent(gm, after, {"input_ids": x}, param_names=names, rtol=1e-9, atol=1e-11)


def test_split_siblings_undoes_the_fusion_and_merge_works():
    from lorafx.passes.fuse_siblings import split_siblings
    gm = _lora_graph("llama")
    RecomputeInputs()(gm)
    before = {n.name: (n.target, n.args[9] if n.target is RECOMPUTE else None) for n in gm.graph.nodes
              if n.target in (LORA, RECOMPUTE)}
    fused = copy.deepcopy(gm)
    FuseSiblings()(fused)
    split = copy.deepcopy(fused)
    assert split_siblings(split) == 4
    after = {n.name: (n.target, n.args[9] if n.target is RECOMPUTE else None) for n in split.graph.nodes
             if n.target in (LORA, RECOMPUTE)}
    assert after == before
    x = {"input_ids": ids(3, 9)}
    assert_equivalent(gm, split, x, param_names=adapter_names(gm), rtol=0, atol=0)
    # a compiled model with fused siblings merges (MergeLoRA splits them first)
    model = _tiny("llama", torch.float64).eval()
    cm = lorafx.compile(model, example_inputs=(ids(2, 12),), r=2, seed=0)
    FuseSiblings()(cm.graph_module)
    randomise_lora_B(cm.graph_module)
    want = cm(**x).logits.detach()
    plain = cm.merge_and_unload()
    assert not any(n.target in (LORA, RECOMPUTE, SIBLINGS) for n in plain.graph.nodes)
    torch.testing.assert_close(plain(**x).logits, want, rtol=1e-9, atol=1e-10)
    cm.merge()
    torch.testing.assert_close(cm(**x).logits, want, rtol=1e-9, atol=1e-10)
    cm.unmerge()
    torch.testing.assert_close(cm(**x).logits, want, rtol=1e-9, atol=1e-10)


def test_fuse_siblings_skips_dropout():
    gm = _lora_graph("llama", dropout=0.1)
    info = FuseSiblings()(gm).info
    assert info["fused_adapters"] == 0
    assert all("dropout" in why for why in info["kept"].values())


@pytest.mark.parametrize("column", [False, True])
def test_lora_linear_siblings_opcheck_and_gradcheck(column, monkeypatch):
    monkeypatch.setattr(lorafx.dialect.linear, "COLUMN_RANK", 1 if column else 10**9)  # both forms of the rank-r products
    g = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    x = torch.randn(2, 3, 4, generator=g, **d).requires_grad_()
    Ws = [torch.randn(5, 4, generator=g, **d), torch.randn(3, 4, generator=g, **d)]
    bias = torch.randn(3, generator=g, **d)
    As = [torch.randn(2, 4, generator=g, **d).requires_grad_(), torch.randn(1, 4, generator=g, **d).requires_grad_()]
    Bs = [torch.randn(5, 2, generator=g, **d).requires_grad_(), torch.randn(3, 1, generator=g, **d).requires_grad_()]
    from lorafx.dialect.linear import lora_linear_reference as ref
    for rules in ("f1b1;f1b1", "f2b5;f2b5", "f1b5;f2b1", "f1b1|7:f2b5;f1b1"):
        args = (x, Ws, [bias], [False, True], As, Bs, [2.0, 0.5], rules, "", [])
        torch.library.opcheck(SIBLINGS, args)
        fn = lambda x, a0, a1, b0, b1: SIBLINGS(x, Ws, [bias], [False, True], [a0, a1], [b0, b1], [2.0, 0.5],
                                                rules, "", [])
        assert torch.autograd.gradcheck(fn, (x, *As, *Bs))
        ys = SIBLINGS(*args)
        want = [ref(x, Ws[0], None, As[0], Bs[0], 2.0), ref(x, Ws[1], bias, As[1], Bs[1], 0.5)]
        for y, w in zip(ys, want):
            torch.testing.assert_close(y, w)
        # only the second output used: the first sibling's adapters get no gradient contribution
        got = torch.autograd.grad(SIBLINGS(*args)[1].sum(), [x, *As, *Bs], allow_unused=True, materialize_grads=True)
        want = torch.autograd.grad(ref(x, Ws[1], bias, As[1], Bs[1], 0.5).sum(), [x, *As, *Bs], allow_unused=True,
                                   materialize_grads=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


# -- the benchmark's pass selection ---------------------------------------------------------
def test_bench_pass_spec():
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "bench_train_step.py")
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    default = [CausalMaskToIsCausal(), RecomputeInputs()]
    got = bench.edit_passes(default, "-RecomputeInputs,+fuse_siblings")
    assert [type(p).__name__ for p in got] == ["CausalMaskToIsCausal", "FuseSiblings"]
    assert bench.edit_passes(default, "default") == default
    with pytest.raises(SystemExit):
        bench.edit_passes(default, "+NoSuchPass")
