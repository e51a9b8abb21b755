"""AnnotateCost: the symbolic cost model against torch's FlopCounterMode."""
import copy
import json
import pickle
import time

import pytest
import sympy
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import lorafx
from lorafx.meta import CostRecord, describe, get_record
from lorafx.passes import AnnotateCost
from lorafx.passes.cost_model import BATCH, SEQ, evaluate, graph_cost, lora_linear_flops
from lorafx.schedules import ALL_SCHEDULES, lora_flops
from lorafx.pipeline import provided


def _fcm():
    return FlopCounterMode(display=False)


def fcm_counts(fn, inputs, grads):
    """FlopCounterMode's (forward, backward) count of ``fn(*inputs)`` with the
    inputs whose index is in ``grads`` requiring gradients."""
    ins = [t.detach().clone().requires_grad_(i in grads) if isinstance(t, torch.Tensor) and t.is_floating_point()
           else t for i, t in enumerate(inputs)]
    with _fcm() as f:
        out = fn(*ins)
    fwd = f.get_total_flops()
    bwd = 0
    if out.requires_grad:
        with _fcm() as f:
            out.backward(torch.ones_like(out))
        bwd = f.get_total_flops()
    return fwd, bwd


def model_counts(fn, inputs, grads, mode="fake"):
    """AnnotateCost's total (forward, backward) matmul FLOPs of ``fn`` traced by make_fx."""
    gm = make_fx(fn, tracing_mode=mode, pre_dispatch=True)(*inputs)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    res = AnnotateCost(grad_inputs=tuple(names[i] for i in grads))(gm)
    assert "cost" in provided(gm)
    total = graph_cost(gm)
    assert res.info["forward_flops"] == str(total.fwd_flops)
    return gm, total


dims = st.integers(1, 7)
grad_sets = st.sets(st.integers(0, 2), max_size=3)


# -- (a) per op, exactly FlopCounterMode's count -------------------------------------------------------


@given(m=dims, k=dims, n=dims, batch=dims, grads=grad_sets, op=st.sampled_from(["mm", "addmm", "bmm", "baddbmm"]))
def test_mm_family_matches_flop_counter(m, k, n, batch, grads, op):
    if op == "mm":
        fn, ins, g = torch.mm, [torch.randn(m, k), torch.randn(k, n)], {0, 1} & grads
    elif op == "addmm":
        fn, ins, g = torch.addmm, [torch.randn(n), torch.randn(m, k), torch.randn(k, n)], grads
    elif op == "bmm":
        fn, ins, g = torch.bmm, [torch.randn(batch, m, k), torch.randn(batch, k, n)], {0, 1} & grads
    else:
        fn, ins, g = torch.baddbmm, [torch.randn(batch, m, n), torch.randn(batch, m, k), torch.randn(batch, k, n)], grads
    _, total = model_counts(fn, ins, g)
    assert (int(total.fwd_flops), int(total.bwd_flops)) == fcm_counts(fn, ins, g)
    assert int(total.fwd_flops) > 0


@given(lead=st.lists(dims, min_size=0, max_size=2), k=dims, n=dims, bias=st.booleans(), grads=grad_sets)
def test_linear_matches_flop_counter(lead, k, n, bias, grads):
    ins = [torch.randn(*lead, k), torch.randn(n, k)] + ([torch.randn(n)] if bias else [])
    g = grads & set(range(len(ins)))
    _, total = model_counts(F.linear, ins, g)
    assert (int(total.fwd_flops), int(total.bwd_flops)) == fcm_counts(F.linear, ins, g)


@given(a_lead=st.lists(dims, min_size=0, max_size=2), data=st.data(),
       m=dims, k=dims, n=dims, a_vec=st.booleans(), b_vec=st.booleans(), grads=grad_sets)
def test_matmul_matches_flop_counter(a_lead, data, m, k, n, a_vec, b_vec, grads):
    """Every torch.matmul case: 1-d operands, folding into mm, broadcast batches.
    Matrix-vector products are not matmul FLOPs for FlopCounterMode, nor here."""
    # b's batch dims broadcast against a's: a suffix of them with some set to 1, or extra leading dims
    keep = data.draw(st.integers(0, len(a_lead)))
    ones = data.draw(st.lists(st.booleans(), min_size=keep, max_size=keep))
    extra = data.draw(st.lists(dims, max_size=1)) if keep == len(a_lead) else []
    b_lead = extra + [1 if o else d for o, d in zip(ones, a_lead[len(a_lead) - keep:])]
    a = torch.randn(k) if a_vec else torch.randn(*a_lead, m, k)
    b = torch.randn(k) if b_vec else torch.randn(*b_lead, k, n)
    g = grads & {0, 1}
    _, total = model_counts(torch.matmul, [a, b], g)
    assert (int(total.fwd_flops), int(total.bwd_flops)) == fcm_counts(torch.matmul, [a, b], g)


@given(lead=st.lists(dims, min_size=1, max_size=2), n=st.integers(2, 9), m=st.integers(2, 9), r=st.integers(1, 2),
       x_grad=st.booleans(), bias=st.booleans(), dropout=st.booleans(),
       schedule=st.sampled_from(ALL_SCHEDULES + ("f1b1|4:f2b5", "f1b3|6:f2b4")))
def test_lora_op_matches_flop_counter(lead, n, m, r, x_grad, bias, dropout, schedule):
    """Forward is the op's registered formula; backward is the aten GEMMs its kernel
    runs; every schedule, a dispatch rule, with and without dX and adapter dropout."""
    x = torch.randn(*lead, n)
    mask = torch.rand(*lead, n) > 0.3 if dropout else torch.empty(0, dtype=torch.bool)
    p = 0.3 if dropout else 0.0
    keep = schedule.endswith("k")
    op = torch.ops.lorafx.lora_linear_xa if keep else torch.ops.lorafx.lora_linear

    def fn(x, w, b, A, B, mask):
        y = op(x, w, b if bias else None, A, B, 2.0, mask, p, schedule)
        return y[0] if keep else y

    ins = [x, torch.randn(m, n), torch.randn(m), torch.randn(r, n), torch.randn(m, r), mask]
    g = {3, 4} | ({0} if x_grad else set())
    gm, total = model_counts(fn, ins, g)
    assert (int(total.fwd_flops), int(total.bwd_flops)) == fcm_counts(fn, ins, g)
    rec = next(get_record(nd, CostRecord) for nd in gm.graph.nodes if nd.target is op.default)
    assert rec.kind == "lora" and rec.requires_grad
    tokens = x.numel() // n
    assert (rec.fwd_flops, rec.bwd_flops) == lora_flops(schedule, tokens, n, m, r, x_requires_grad=x_grad,
                                                        dropout=dropout)


def test_lora_op_default_schedule_is_runlora_f1_b1():
    """The default kernel is RunLoRA's f1 forward and b1 backward when x needs a gradient;
    without it only the adapter GEMMs remain; with nothing to differentiate, nothing."""
    b, n, m, r = 5, 7, 6, 3
    fwd, bwd = lora_linear_flops(b, n, m, r, need_x=True)
    assert fwd == 2 * b * n * m + 2 * b * n * r + 2 * b * r * m
    assert bwd == 2 * b * n * m + 6 * b * n * r + 4 * b * m * r
    assert lora_linear_flops(b, n, m, r, need_x=False)[1] == 4 * b * n * r + 4 * b * m * r
    assert lora_linear_flops(b, n, m, r, need_x=False, need_a=False, need_b=False)[1] == 0

    # nothing needs a gradient: the record has no backward
    gm = make_fx(lambda x, w, A, B: torch.ops.lorafx.lora_linear(x, w, None, A, B, 1.0, None, 0.0),
                 tracing_mode="fake", pre_dispatch=True)(torch.randn(b, n), torch.randn(m, n),
                                                         torch.randn(r, n), torch.randn(m, r))
    AnnotateCost()(gm)
    total = graph_cost(gm)
    assert total.fwd_flops == fwd and total.bwd_flops == 0 and total.bwd_bytes == 0


def test_lora_rule_is_piecewise_in_tokens():
    """A dispatch rule on a symbolic token count gives a Piecewise cost that evaluates
    to each piece's schedule on its side of the threshold."""
    fn = lambda x, w, A, B: torch.ops.lorafx.lora_linear(x, w, None, A, B, 1.0, None, 0.0, "f1b1|8:f2b5")
    gm, total = model_counts(fn, [torch.randn(3, 5, 16), torch.randn(12, 16), torch.randn(2, 16),
                                  torch.randn(12, 2)], {0, 2, 3}, mode="symbolic")
    assert total.fwd_flops.has(sympy.Piecewise)
    example = AnnotateCost(grad_inputs=True)(gm).info["example"]  # every dim is a symbol here
    assert sorted(example.values()) == [2, 3, 5, 12, 16]
    s0, s1 = (str(d.node.expr) for d in next(iter(gm.graph.nodes)).meta["val"].shape[:2])
    for tokens, sched in ((7, "f1b1"), (8, "f2b5"), (12, "f2b5")):
        at = {**example, s0: 1, s1: tokens}
        got = evaluate(total.fwd_flops, **at), evaluate(total.bwd_flops, **at)
        assert got == lora_flops(sched, tokens, 16, 12, 2), (tokens, sched)


# -- (d) SDPA, analytically ----------------------------------------------------------------------------


@given(b=st.integers(1, 3), hkv=st.integers(1, 3), group=st.integers(1, 3), L=dims, S=dims, E=dims, Ev=dims)
def test_sdpa_matches_flop_counter_formulas(b, hkv, group, L, S, E, Ev):
    """FlopCounterMode counts no SDPA on CPU (the math kernel has no formula), so
    compare with its formula functions directly; GQA and Ev != E included."""
    q, k, v = torch.randn(b, hkv * group, L, E), torch.randn(b, hkv, S, E), torch.randn(b, hkv, S, Ev)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    _, total = model_counts(fn, [q, k, v], {0, 1, 2})
    assert int(total.fwd_flops) == sdpa_flop_count(q.shape, k.shape, v.shape)
    assert int(total.bwd_flops) == sdpa_backward_flop_count((b, hkv * group, L, Ev), q.shape, k.shape, v.shape)
    _, frozen = model_counts(fn, [q, k, v], set())
    assert frozen.fwd_flops == total.fwd_flops and frozen.bwd_flops == 0


def test_sdpa_symbolic():
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    gm, total = model_counts(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [q, k, v], {0},
                             mode="symbolic")
    syms = {s.name for s in total.fwd_flops.free_symbols}
    assert len(syms) >= 3  # unnamed dims keep torch's names
    values = dict(zip(sorted(syms), [3, 5, 7, 11, 13]))
    shapes = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shapes[node.name] = [values[str(d.node.expr)] if isinstance(d, torch.SymInt) else d
                                 for d in node.meta["val"].shape]
    qs, ks, vs = shapes["q_1"], shapes["k_1"], shapes["v_1"]
    assert evaluate(total.fwd_flops, **values) == sdpa_flop_count(qs, ks, vs)


# -- (b), (c) whole models ---------------------------------------------------------------------------


def _eager_model(family):
    import transformers as T
    torch.manual_seed(0)
    if family == "llama":  # 4 layers: also the performance check
        cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=96, attn_implementation="eager")
        return T.LlamaForCausalLM(cfg)
    if family == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
                           vocab_size=96, attn_implementation="eager")
        return T.GPT2LMHeadModel(cfg)
    cfg = T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, num_labels=3, vocab_size=96, attn_implementation="eager")
    return T.BertForSequenceClassification(cfg)


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(family):
        if family not in cache:
            model = _eager_model(family)
            assert model.config._attn_implementation == "eager"
            # LLaMA on one fixed schedule (polynomial costs); the others choose per node and
            # token count (SelectSchedule's default), which makes their costs piecewise
            options = {"schedule": "f1b1"} if family == "llama" else {}
            cache[family] = lorafx.compile(model, r=4, **options).eval()
        return cache[family]

    return get


def _measure(cm, batch, seq):
    ids = torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))
    with _fcm() as f:
        out = cm(input_ids=ids)
    fwd = f.get_total_flops()
    with _fcm() as f:
        out.logits.sum().backward()
    bwd = f.get_total_flops()
    for p in cm.parameters():
        p.grad = None
    return fwd, bwd


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_model_totals_match_flop_counter(compiled, family):
    cm = compiled(family)
    total = graph_cost(cm.graph_module)
    assert total.fwd_flops.free_symbols == {BATCH, SEQ}
    for batch, seq in ((3, 11), (4, 40)):  # not the (2, 16) example it was captured with
        fwd, bwd = _measure(cm, batch, seq)
        ours_fwd = evaluate(total.fwd_flops, batch=batch, seq=seq)
        ours_bwd = evaluate(total.bwd_flops, batch=batch, seq=seq)
        assert abs(ours_fwd - fwd) <= 0.01 * fwd, (family, batch, seq, ours_fwd, fwd)
        assert abs(ours_bwd - bwd) <= 0.01 * bwd, (family, batch, seq, ours_bwd, bwd)
    # the compile report carries the same totals, as strings that evaluate() reads
    report = cm.report()
    data = json.loads(report.to_json())
    assert sympy.sympify(data["cost"]["forward_flops"], locals={"batch": BATCH, "seq": SEQ}) == total.fwd_flops
    assert evaluate(data["cost"]["backward_flops"], batch=3, seq=11) == evaluate(total.bwd_flops, batch=3, seq=11)
    assert data["cost"]["example"] == {"batch": 2, "seq": 16}
    assert data["cost"]["at_example"]["forward_flops"] == evaluate(total.fwd_flops, batch=2, seq=16)
    text = str(report)
    assert "AnnotateCost" in text
    if total.fwd_flops.has(sympy.Piecewise):  # per-node schedule rules: summarised by their breakpoints
        assert "flops    forward piecewise in batch x seq (schedules switch at " in text
    else:
        assert f"flops    forward {total.fwd_flops}   backward {total.bwd_flops}" in text
    assert "at batch=2, seq=16: forward " in text


def test_expressions_scale_with_batch_and_seq(compiled):
    total = graph_cost(compiled("llama").graph_module)
    for expr in (total.fwd_flops, total.bwd_flops):
        poly = sympy.Poly(expr, BATCH, SEQ)
        assert poly.degree(BATCH) == 1 and poly.degree(SEQ) == 2  # eager attention is quadratic in seq
        f = lambda b, s: evaluate(expr, batch=b, seq=s)
        assert f(6, 10) == 3 * f(2, 10)  # every matmul is per sample
        # linear + quadratic in seq: second differences are constant
        assert f(2, 30) - 2 * f(2, 20) + f(2, 10) == f(2, 40) - 2 * f(2, 30) + f(2, 20) > 0
        assert f(2, 0) == 0
    # bytes include the weights, read once whatever the batch
    assert evaluate(total.fwd_bytes, batch=1, seq=1) > 0 and sympy.Poly(total.fwd_bytes, BATCH, SEQ).degree(SEQ) == 2


def test_gradient_flags_in_a_lora_model(compiled):
    """Frozen embedding and norms: the first layer's adapters get no dX; every
    later one does; the rotary table (computed under no_grad) has no backward."""
    gm = compiled("llama").graph_module
    ops = torch.ops.lorafx
    lora_nodes = [n for n in gm.graph.nodes if n.target in (ops.lora_linear.default, ops.lora_linear_recompute.default)]
    fused = {n.name: n for n in gm.graph.nodes if n.target is ops.lora_linear_siblings.default}
    tokens, d, kv = BATCH * SEQ, 32, 16
    assert {n.args[8] for n in lora_nodes} | {r for n in fused.values() for r in n.args[7].split(";")} == {"f1b1"}
    assert len(fused) == 8  # compile's eager default fuses q/k/v and gate/up of each of the 4 layers

    def qkv_cost(need_x):  # a fused node costs the sum of its adapters
        parts = [lora_linear_flops(tokens, d, out, 4, need_x=need_x) for out in (d, kv, kv)]
        return sum(f for f, _ in parts), sum(b for _, b in parts)

    q0 = get_record(fused["model_layers_0_self_attn_q_proj_k_proj_v_proj_lora"], CostRecord)
    assert (q0.fwd_flops, q0.bwd_flops) == qkv_cost(need_x=False)  # layer 0's input is the frozen embedding
    o0 = get_record(next(n for n in lora_nodes if n.name == "model_layers_0_self_attn_o_proj_lora"), CostRecord)
    assert o0.bwd_flops == lora_linear_flops(tokens, d, d, 4, need_x=True)[1]  # its input depends on q/k/v adapters
    q1 = get_record(fused["model_layers_1_self_attn_q_proj_k_proj_v_proj_lora"], CostRecord)
    assert (q1.fwd_flops, q1.bwd_flops) == qkv_cost(need_x=True)
    rotary = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.cos.default, torch.ops.aten.sin.default)]
    assert rotary
    for n in gm.graph.nodes:
        rec = get_record(n, CostRecord)
        if n in rotary or (n.op == "call_function" and "wrap_with_set_grad_enabled" in str(n.target)):
            assert not rec.requires_grad and rec.bwd_flops == 0 and rec.bwd_bytes == 0
        if n.target is torch.ops.aten.embedding.default:
            assert not rec.requires_grad and rec.bwd_bytes == 0 and rec.fwd_bytes > 0


def test_grad_mode_regions_stop_gradients():
    """A no_grad region, as the wrap_with_set_grad_enabled op torch.export makes or as
    the _set_grad_enabled calls InlineGradModeRegions leaves, has no backward."""
    from lorafx.passes import InlineGradModeRegions

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            with torch.no_grad():
                frozen = x @ self.w  # the parameter needs a gradient, but not in here
            return frozen @ self.w

    x = torch.randn(3, 6)
    module = M()
    with _fcm() as f:
        out = module(x)
    assert f.get_total_flops() == 2 * 2 * 3 * 6 * 6
    with _fcm() as f:
        out.sum().backward()
    assert f.get_total_flops() == 2 * 3 * 6 * 6
    for inline in (False, True):
        gm = lorafx.capture(module, (x,), dynamic=False)
        if inline:
            InlineGradModeRegions()(gm)
        assert any("set_grad_enabled" in str(n.target) for n in gm.graph.nodes)
        AnnotateCost()(gm)
        total = graph_cost(gm)
        assert (total.fwd_flops, total.bwd_flops) == (2 * 2 * 3 * 6 * 6, 2 * 3 * 6 * 6), inline  # only dW


def test_node_kinds_and_the_norm_chain(compiled):
    """LLaMA's RMSNorm exports as pow/mean/add/rsqrt/mul: elementwise and reduction
    work, never matmul FLOPs; views and shape ops cost nothing."""
    gm = compiled("llama").graph_module
    kinds = {}
    for n in gm.graph.nodes:
        rec = get_record(n, CostRecord)
        if n.op != "call_function":
            continue
        assert rec is not None, n.format_node()
        kinds.setdefault(rec.kind, []).append((n, rec))
    for kind in ("elementwise", "reduction", "softmax", "view", "matmul", "lora", "embedding"):
        assert kind in kinds, kind
    for n, rec in kinds["view"]:
        assert rec.fwd_flops == rec.fwd_other_flops == rec.fwd_bytes == rec.bwd_bytes == 0
    pow_nodes = [(n, r) for n, r in kinds["elementwise"] if n.target is torch.ops.aten.pow.Tensor_Scalar]
    assert pow_nodes and all(r.fwd_flops == 0 and r.fwd_other_flops == BATCH * SEQ * 32 for _, r in pow_nodes)
    means = [r for n, r in kinds["reduction"] if n.target is torch.ops.aten.mean.dim]
    assert len(means) == 2 * 4 + 1 and all(r.fwd_other_flops == BATCH * SEQ * 32 for r in means)
    assert all(r.fwd_flops == 0 and r.fwd_other_flops != 0 for _, r in kinds["softmax"])
    # the lm_head is a plain linear: frozen weight, dX only
    head = next(r for n, r in kinds["matmul"] if n.target is torch.ops.aten.linear.default)
    assert head.fwd_flops == 2 * BATCH * SEQ * 32 * 96 == head.bwd_flops
    assert lorafx.graph_record(gm).cost is not None and "uncovered" not in compiled("llama").report().cost


def test_pass_is_fast_and_records_copy(compiled):
    gm = compiled("llama").graph_module  # 4 layers
    start = time.perf_counter()
    res = AnnotateCost()(gm)
    seconds = time.perf_counter() - start
    assert seconds < 1.0, seconds
    assert not res.modified and res.info["nodes"] > 200
    lora = next(n for n in gm.graph.nodes if n.target is torch.ops.lorafx.lora_linear.default)
    rec = get_record(lora, CostRecord)
    assert pickle.loads(pickle.dumps(rec)) == rec
    assert copy.deepcopy(rec) == rec
    graph_copy = copy.deepcopy(gm.graph)
    copied = next(n for n in graph_copy.nodes if n.name == lora.name)
    assert get_record(copied, CostRecord) == rec
    # readable per-node lines, only where there are matmul FLOPs
    assert f"flops fwd={rec.fwd_flops} bwd={rec.bwd_flops}" in describe(lora)
    assert "flops" not in describe(next(n for n in gm.graph.nodes if n.target is torch.ops.aten.view.default))
    assert "flops fwd=" in lorafx.format_graph(gm)


def test_evaluate_and_options():
    assert evaluate("4096*batch*seq", batch=2, seq=16) == 131072
    assert evaluate(2 * BATCH * SEQ**2 + 3, batch=2, seq=3) == 39
    assert evaluate("5*s7 + batch", batch=1, s7=2) == 11
    assert evaluate(12) == 12
    with pytest.raises(ValueError, match="seq"):
        evaluate("batch*seq", batch=2)
    with pytest.raises(ValueError, match="grad_inputs"):
        AnnotateCost(grad_inputs=3)
    assert AnnotateCost(grad_inputs=["x"]).grad_inputs == ("x",)


def test_grad_inputs_option():
    """Placeholders need no gradient unless grad_inputs says so."""
    x, w = torch.randn(4, 5), torch.randn(5, 3)
    gm = make_fx(lambda x, w: torch.mm(x, w), tracing_mode="fake", pre_dispatch=True)(x, w)
    AnnotateCost()(gm)
    assert graph_cost(gm).bwd_flops == 0
    AnnotateCost(grad_inputs=True)(gm)
    assert graph_cost(gm).bwd_flops == 2 * 2 * 4 * 5 * 3
    AnnotateCost(grad_inputs=("x_1",))(gm)
    assert graph_cost(gm).bwd_flops == 2 * 4 * 5 * 3
