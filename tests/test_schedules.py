"""RunLoRA schedules: every kernel computes the same function, the sympy formulas count
exactly what FlopCounterMode counts, rules dispatch at run time, SelectSchedule picks the
cheapest, and a compiled model with it is still the identity at B = 0 and trains."""
import json
import math
import operator
from unittest import mock

import pytest
import sympy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import lorafx
from lorafx.dialect import linear as linear_kind
from lorafx import schedules as S
from lorafx.meta import ScheduleRecord, get_record
from lorafx.dialect.linear import lora_linear_reference, schedule_counts
from lorafx.passes import SelectSchedule
from lorafx.passes.select_schedule import lora_nodes

op, op_xa = torch.ops.lorafx.lora_linear, torch.ops.lorafx.lora_linear_xa
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def call(x, W, bias, A, B, scale, mask, p, schedule):
    """Run ``schedule`` (a name or rule) on the right op; returns y."""
    if S.rule_keeps_xa(schedule):
        return op_xa(x, W, bias, A, B, scale, mask, p, schedule)[0]
    return op(x, W, bias, A, B, scale, mask, p, schedule)


def make(seed, lead, n, m, r, *, bias, dropout, x_grad, w_grad=False):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, grad=True: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)
    x = mk(*lead, n, grad=x_grad)
    W = mk(m, n, grad=w_grad)
    A, B = mk(r, n), mk(m, r)
    bv = mk(m) if bias else None
    mask = (torch.rand(*lead, n, generator=g) > 0.3) if dropout else None
    gy = mk(*lead, m, grad=False)
    return x, W, bv, A, B, mask, gy


shapes = st.fixed_dictionaries({
    "lead": st.sampled_from([(3,), (2, 3), (1, 5), (4, 1, 2)]),
    "n": st.integers(1, 9), "m": st.integers(1, 9), "r": st.integers(1, 5),
    "bias": st.booleans(), "dropout": st.booleans(), "x_grad": st.booleans(), "seed": st.integers(0, 10_000),
    "column": st.booleans(),  # the rank-r products in r-column form (as from r = COLUMN_RANK) or r-row form
})


def orientation(c):
    """Make the kernels use the drawn orientation of the rank-r products at this small r."""
    return mock.patch.object(linear_kind, "COLUMN_RANK", 1 if c["column"] else 10**9)


@FAST
@given(shapes)
def test_every_schedule_gives_the_same_outputs_and_gradients(c):
    x, W, bv, A, B, mask, gy = make(c["seed"], c["lead"], c["n"], c["m"], c["r"], bias=c["bias"],
                                    dropout=c["dropout"], x_grad=c["x_grad"])
    inputs = [t for t in (x, A, B, bv) if t is not None and t.requires_grad]
    ref = lora_linear_reference(x, W, bv, A, B, 0.7, mask, 0.25)
    ref_grads = torch.autograd.grad(ref, inputs, gy)
    tokens = math.prod(c["lead"])
    rules = list(S.ALL_SCHEDULES) + [f"f1b3|{tokens}:f2b5", f"f2b4|{tokens + 1}:f1b1", f"f1b1k|{tokens}:f2b5k"]
    with orientation(c):
        for schedule in rules:
            y = call(x, W, bv, A, B, 0.7, mask, 0.25, schedule)
            torch.testing.assert_close(y, ref, msg=schedule)
            for got, want in zip(torch.autograd.grad(y, inputs, gy), ref_grads):
                torch.testing.assert_close(got, want, msg=schedule)


@FAST
@given(shapes, st.booleans())
def test_sympy_flops_equal_flop_counter_mode_exactly(c, w_grad):
    n, m, r = c["n"], c["m"], c["r"]
    x, W, bv, A, B, mask, gy = make(c["seed"], c["lead"], n, m, r, bias=c["bias"], dropout=c["dropout"],
                                    x_grad=c["x_grad"], w_grad=w_grad)
    inputs = [t for t in (x, W, A, B, bv) if t is not None and t.requires_grad]
    tokens = math.prod(c["lead"])
    for schedule in S.ALL_SCHEDULES:
        with orientation(c), FlopCounterMode(display=False) as counter:
            y = call(x, W, bv, A, B, 0.5, mask, 0.25, schedule)
            fwd = counter.get_total_flops()
            torch.autograd.grad(y, inputs, gy)
            bwd = counter.get_total_flops() - fwd
        want = S.lora_flops(schedule, tokens, n, m, r, x_requires_grad=c["x_grad"], w_requires_grad=w_grad,
                            bias=c["bias"], dropout=c["dropout"])
        assert (fwd, bwd) == want, schedule
        # and the symbolic expressions, evaluated, agree with the concrete ones
        fs, bs = S.lora_flops(schedule, S.b, S.n, S.m, S.r, x_requires_grad=c["x_grad"], w_requires_grad=w_grad,
                              dropout=c["dropout"])
        at = {S.b: tokens, S.n: n, S.m: m, S.r: r}
        assert (fs.subs(at), bs.subs(at)) == want


def test_runlora_formulas_and_crossovers():
    b, n, m, r = S.b, S.n, S.m, S.r
    assert S.lora_flops("f1b1", b, n, m, r) == (2*b*n*m + 2*b*n*r + 2*b*r*m, 2*b*n*m + 6*b*n*r + 4*b*m*r)
    assert S.lora_flops("f2b5", b, n, m, r) == (2*n*m*r + 2*b*n*m, 2*b*n*m + 4*b*n*r + 4*b*m*r + 2*n*m*r)
    assert sympy.simplify(S.crossover("f1b1", "f2b1", n, m, r) - n*m/(n + m)) == 0  # f2 wins when b > nm/(n+m)
    assert S.crossover("f1b1", "f1b5", n, m, r) == m  # b5 wins when b > m
    fwd, bwd = S.lora_flops("f1b1|4096:f2b5", b, n, m, r)
    assert isinstance(fwd, sympy.Piecewise)
    assert fwd.subs(b, 4095) == S.lora_flops("f1b1", 4095, n, m, r)[0]
    assert bwd.subs(b, 4096) == S.lora_flops("f2b5", 4096, n, m, r)[1]
    # keeping XA moves 2bnr out of backward (b1) and costs 2bnr more in f2's forward
    assert S.lora_flops("f1b1", b, n, m, r)[1] - S.lora_flops("f1b1k", b, n, m, r)[1] == 2*b*n*r
    assert S.lora_flops("f2b5k", b, n, m, r)[0] - S.lora_flops("f2b5", b, n, m, r)[0] == 2*b*n*r
    # active dropout: f2/b5/b4 run as f1/b1/b3
    assert S.lora_flops("f2b5", 64, 8, 8, 2, dropout=True) == S.lora_flops("f1b1", 64, 8, 8, 2, dropout=True)
    fb, bb = S.lora_bytes("f1b1", b, n, m, r)
    assert fb.subs({b: 1, n: 1, m: 1, r: 1}) > 0 and bb.has(b)


def test_rule_parsing_and_errors():
    assert S.parse_rule("f1b1|4096:f2b5") == ((0, S.Schedule("f1", "b1")), (4096, S.Schedule("f2", "b5")))
    assert S.format_rule([(0, "f1b1"), (10, "f1b1"), (20, "f2b5")]) == "f1b1|20:f2b5"
    for bad in ("f3b1", "f1b2", "f1b3k", "f1b1|0:f2b5", "f1b1|20:f2b5|10:f1b3", "f1b1|x:f2b5", "f1b1|9:f2b5k", ""):
        with pytest.raises(ValueError):
            S.parse_rule(bad)
    x, W, bv, A, B, _, _ = make(0, (3,), 4, 5, 2, bias=False, dropout=False, x_grad=True)
    with pytest.raises(Exception, match="lora_linear_xa"):
        op(x, W, None, A, B, 1.0, None, 0.0, "f1b1k")
    with pytest.raises(Exception, match="'k'"):
        op_xa(x, W, None, A, B, 1.0, None, 0.0, "f1b1")


@pytest.mark.parametrize("threshold", [5, 6])
def test_runtime_rule_switches_at_the_threshold(threshold):
    n, m, r = 6, 4, 2
    rule = f"f1b1|{threshold}:f2b5"
    for tokens in (threshold - 1, threshold):
        x, W, bv, A, B, _, gy = make(tokens, (tokens,), n, m, r, bias=True, dropout=False, x_grad=True)
        schedule_counts.clear()
        with FlopCounterMode(display=False) as counter:
            y = op(x, W, bv, A, B, 0.5, None, 0.0, rule)
            fwd = counter.get_total_flops()
            torch.autograd.grad(y, (x, A, B, bv), gy)
        expect = "f1b1" if tokens < threshold else "f2b5"
        assert dict(schedule_counts) == {("fwd", expect[:2]): 1, ("bwd", expect[2:]): 1}
        assert (fwd, counter.get_total_flops() - fwd) == S.lora_flops(expect, tokens, n, m, r)
        assert (fwd, counter.get_total_flops() - fwd) == S.lora_flops(rule, tokens, n, m, r)


def test_dropout_makes_merged_schedules_fall_back():
    x, W, bv, A, B, mask, gy = make(1, (2, 3), 5, 4, 2, bias=False, dropout=True, x_grad=True)
    schedule_counts.clear()
    y = op(x, W, None, A, B, 0.5, mask, 0.2, "f2b5")
    torch.autograd.grad(y, (x, A, B), gy)
    assert dict(schedule_counts) == {("fwd", "f1"): 1, ("bwd", "b1"): 1}
    empty = torch.ops.lorafx.dropout_mask(x, 0.2, False)  # eval mode: no dropout, f2b5 runs
    schedule_counts.clear()
    op(x, W, None, A, B, 0.5, empty, 0.2, "f2b5")
    assert dict(schedule_counts) == {("fwd", "f2"): 1}


def test_autograd_saves_only_what_it_must():
    x, W, bv, A, B, mask, gy = make(2, (2, 3), 5, 4, 2, bias=True, dropout=True, x_grad=True)
    for schedule, extra in (("f2b5", None), ("f1b1", None), ("f1b1k", (2, 6)), ("f2b5k", (2, 6))):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            call(x, W, bv, A, B, 0.5, mask, 0.2, schedule)
        inputs = [x, W, A, B, mask]
        assert len(saved) == 5 + (extra is not None)
        for t, want in zip(saved, inputs):
            assert t.data_ptr() == want.data_ptr() and t.shape == want.shape and t.dtype == want.dtype
        if extra:
            assert tuple(saved[5].shape) == extra  # xa = A d(x)^T, (r, tokens)


@pytest.mark.parametrize("schedule", ["f1b1|4:f2b5", "f2b4", "f1b5k|4:f2b1k"])
def test_opcheck_gradcheck(schedule):
    x, W, bv, A, B, mask, _ = make(3, (2, 3), 5, 4, 2, bias=True, dropout=True, x_grad=True)
    target = op_xa.default if S.rule_keeps_xa(schedule) else op.default
    for m in (mask, None):
        torch.library.opcheck(target, (x, W, bv, A, B, 0.5, m, 0.3, schedule))
    f = lambda x, A, B, bv: call(x, W, bv, A, B, 0.5, mask, 0.3, schedule)
    assert torch.autograd.gradcheck(f, (x, A, B, bv))


class _Two(torch.nn.Module):
    def __init__(self, n=12, m=10):
        super().__init__()
        self.a = torch.nn.Linear(n, m)
        self.b = torch.nn.Linear(m, n, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


_CAPTURED = {}


def _lora_gm(dropout=0.0):
    """A captured two-linear model (dynamic batch and seq) with LoRA inserted; the capture
    is shared, each call gets a fresh copy."""
    import copy

    from lorafx.passes import InsertLoRA
    if "gm" not in _CAPTURED:
        torch.manual_seed(0)
        _CAPTURED["gm"] = lorafx.capture(_Two(), (torch.randn(4, 8, 12),))
    gm = copy.deepcopy(_CAPTURED["gm"])
    gm = InsertLoRA(r=2, dropout=dropout, seed=0)(gm).graph_module
    return None, gm


def test_select_schedule_matches_the_formulas():
    _, gm = _lora_gm()
    result = SelectSchedule()(gm)
    nodes = lora_nodes(gm)
    assert len(nodes) == 2 and result.info["criterion"] == "flops"
    first, second = nodes  # a: 12 -> 10, input needs no grad; b: 10 -> 12
    for node, (n, m, x_grad) in zip(nodes, ((12, 10, False), (10, 12, True))):
        rule = node.args[8]
        assert get_record(node, ScheduleRecord).rule == rule and f"'{rule}'" in gm.code
        f_vs = math.floor(n * m / (n + m)) + 1  # f2 beats f1 when b > nm/(n+m)
        for tokens in (1, f_vs - 1, f_vs, m, m + 1, 4 * m, 1000):
            s = S.resolve(rule, tokens)
            costs = {c: sum(S.lora_flops(c, tokens, n, m, 2, x_requires_grad=x_grad, bias=(node is first)))
                     for c in S.SCHEDULES}
            assert costs[s.name] == min(costs.values()), (rule, tokens)
            assert s.fwd == ("f2" if tokens >= f_vs else "f1")
            if x_grad:
                assert s.bwd == ("b5" if tokens > m else "b1")  # b5 beats b1 when b > m
    assert result.info["choices"]["b"] == second.args[8]


@FAST
@given(st.integers(1, 4096), st.integers(1, 4096), st.sampled_from([1, 4, 8, 64, 256]), st.booleans())
def test_best_rule_is_the_lower_envelope(n, m, r, x_grad):
    r = min(r, n, m)
    rule = S.best_rule(n, m, r, x_requires_grad=x_grad)
    for tokens in (1, 7, 64, 300, 1000, 5000, 100_000):
        costs = {c: sum(S.lora_flops(c, tokens, n, m, r, x_requires_grad=x_grad)) for c in S.SCHEDULES}
        assert costs[S.resolve(rule, tokens).name] == min(costs.values())


def test_select_schedule_keep_xa_and_fixed_and_dropout():
    model, gm = _lora_gm()
    x = torch.randn(3, 5, 12)
    ref = gm(x=x)
    SelectSchedule(keep_xa=True)(gm)
    gm.graph.lint()
    assert all(n.target is op_xa.default and S.rule_keeps_xa(n.args[8]) for n in lora_nodes(gm))
    assert sum(n.target is operator.getitem for n in gm.graph.nodes) == 2
    torch.testing.assert_close(gm(x=x), ref)
    SelectSchedule(schedule="f2b4")(gm)  # back to lora_linear, the getitems go away
    assert [n.args[8] for n in lora_nodes(gm)] == ["f2b4", "f2b4"]
    assert all(n.target is op.default for n in lora_nodes(gm))
    assert get_record(lora_nodes(gm)[0], ScheduleRecord).criterion == "fixed"
    torch.testing.assert_close(gm(x=x), ref)
    with pytest.raises(ValueError, match="schedule"):
        SelectSchedule(schedule="f9b9")
    with pytest.raises(ValueError, match="criterion"):
        SelectSchedule(criterion="vibes")
    _, gmd = _lora_gm(dropout=0.1)
    SelectSchedule()(gmd)
    for node in lora_nodes(gmd):
        assert all(s.fwd == "f1" and s.bwd in ("b1", "b3") for _, s in S.parse_rule(node.args[8]))


def test_select_schedule_time_criterion_caches(tmp_path, monkeypatch):
    _, gm = _lora_gm()
    path = tmp_path / "times.json"
    res = SelectSchedule(criterion="time", token_counts=(4, 64), repeats=1, cache_path=str(path))(gm)
    data = json.loads(path.read_text())
    assert len(data) == 4  # 2 distinct (n, m, flags) x 2 token counts
    assert all(set(e["seconds"]) == set(S.SCHEDULES) for e in data.values())
    rules = [n.args[8] for n in lora_nodes(gm)]
    assert set(res.info["choices"].values()) == set(rules)
    # a second run, in a fresh process (memory cache cleared), reads the file and measures nothing
    import lorafx.passes.select_schedule as mod
    monkeypatch.setattr(mod, "_TIME_MEMORY", {})
    monkeypatch.setattr(S, "time_schedules", lambda *a, **k: pytest.fail("measured again"))
    _, gm2 = _lora_gm()
    SelectSchedule(criterion="time", token_counts=(4, 64), repeats=1, cache_path=str(path))(gm2)
    assert [n.args[8] for n in lora_nodes(gm2)] == rules
    assert S.rule_from_measurements([(64, "f2b5"), (4, "f1b1"), (1024, "f2b5")]) == "f1b1|16:f2b5"


def test_export_and_torch_compile_keep_one_node():
    _, gm = _lora_gm()
    SelectSchedule(schedule="f1b1|16:f2b5")(gm)
    x = torch.randn(3, 7, 12)
    ep = torch.export.export(gm, (), {"x": x})
    ops = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is op.default]
    assert len(ops) == 2 and all(n.args[8] == "f1b1|16:f2b5" for n in ops)
    torch.testing.assert_close(ep.module()(x=x), gm(x=x))
    # torch.compile: the op stays opaque and the backward is one lorafx.lora_linear_backward op,
    # so the rule is applied at run time in both directions, with no recompilation
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager", dynamic=True)
    for shape, sched in (((2, 5, 12), "f1b1"), ((4, 8, 12), "f2b5"), ((2, 3, 12), "f1b1"), ((2, 9, 12), "f2b5")):
        xx = torch.randn(*shape, requires_grad=True)
        schedule_counts.clear()
        y = compiled(x=xx)
        y.sum().backward()
        assert dict(schedule_counts) == {("fwd", sched[:2]): 2, ("bwd", sched[2:]): 2}, shape
        torch.testing.assert_close(y, gm(x=xx))
    assert counters["stats"]["unique_graphs"] == 1
    x, W, bv, A, B, mask, gy = make(5, (2, 3), 5, 4, 2, bias=True, dropout=True, x_grad=True)
    args = [t.detach() for t in (gy, x, W, A, B)]  # it runs inside backward: no autograd of its own
    torch.library.opcheck(torch.ops.lorafx.lora_linear_backward.default,
                          (*args, mask, None, 0.5, 0.2, "f1b3|4:f2b5", [True, False, True, True, True]))


def test_min_lora_overhead_reproduces_the_design_figures():
    r8, r64 = S.min_lora_overhead(8), S.min_lora_overhead(64)
    assert 0.015 < r8["bound_over_linear_floor"] < 0.025  # "at r=8 the FLOP minimum is ~2%"
    assert 0.14 <= r64["bound_over_linear_floor"] <= 0.16  # "at r=64 ... no less than ~14%"
    assert r8["best_over_floor"] < 0.025 and r64["best_over_floor"] < 0.18  # the implemented schedules
    assert r8["best_flops"] >= r8["bound_flops"] * 0.99 or r8["best_over_floor"] > r8["bound_over_floor"]


def test_compiled_model_with_select_schedule_is_identity_and_trains():
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, use_cache=False,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, 64, (2, 8))
    cm = lorafx.compile(model, example_kwargs={"input_ids": ids, "labels": ids}, r=4, seed=0)
    gm = cm.graph_module
    rules = {n.args[8] for n in lora_nodes(gm)}
    assert any("|" in rule for rule in rules)  # thresholds inside the range of token counts
    long_ids = torch.randint(0, 64, (4, 40))  # 160 tokens: past every threshold at these sizes
    with torch.no_grad():
        for batch in (ids, long_ids):
            torch.testing.assert_close(cm(input_ids=batch).logits, model(input_ids=batch).logits)
    # gradients equal those of the default schedule (f1b1), at short and long batches
    params = list(cm.trainable_parameters().values())
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    for batch in (ids, long_ids):
        grads = {}
        for label in ("auto", "f1b1"):
            if label == "f1b1":
                saved = {n: n.args for n in lora_nodes(gm)}
                SelectSchedule(schedule="f1b1")(gm)
            loss = cm(input_ids=batch, labels=batch).loss
            grads[label] = torch.autograd.grad(loss, params)
            if label == "f1b1":
                for n, args in saved.items():
                    n.args = args
                gm.recompile()
        for a, b in zip(grads["auto"], grads["f1b1"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = cm(input_ids=long_ids, labels=long_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
