"""A new kind of LoRA op, defined entirely here, goes through the whole compiler.

The kind: a LoRA linear with a learned per-output gate g,

    y = x Wᵀ + b + s·g ⊙ (x Aᵀ Bᵀ)        merged: W + s·diag(g)·B·A

with its ``torch.library`` op (kernel, fake kernel, autograd, FLOP formula), its
``OpKind`` (costs, its own schedule family, merged weight, how to rebuild it after a
merge), and a pass that turns ``lora_linear`` nodes into it.  Nothing in lorafx/,
passes/ or hw_targets/ knows about it: ``lorafx.compile(passes=[...])`` runs it through
schedule selection, the cost model, the lint, merging, the report, printing and drawing.
"""
import copy
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

import lorafx
from lorafx import schedules as S
from lorafx.dialect import LINEAR, NodeCost, OpKind, ScheduleFamily, args_of, create, kind_of, register_kind
from lorafx.graph_utils import get_attr, set_parameter
from lorafx.meta import CostRecord, LoraRecord, OriginRecord, ScheduleRecord, get_record, records, set_record
from lorafx.passes import AnnotateCost, InlineGradModeRegions, InsertLoRA, MergeLoRA, SelectSchedule, UnmergeLoRA
from lorafx.passes import SetTrainingMode
from lorafx.passes.cost_model import evaluate, graph_cost
from lorafx.pipeline import Pass, PassError, PassResult, lint_graph

# -- the op --------------------------------------------------------------------------------------------

SCHEDULES = ("f1b1", "f1b5", "f2b1", "f2b5")  # f1/f2 forward x b1/b5 backward; no 'k', no b3/b4


def _schedule(rule: str, tokens: int) -> S.Schedule:
    s = S.Rule.parse(rule).resolve(tokens)
    if s.name not in SCHEDULES:
        raise ValueError(f"gated_lora_linear runs {SCHEDULES}, not {s.name}")
    return s


def gated_flops(s: S.Schedule, b, n, m, r, *, need_x=True, need_w=False, need_a=True, need_b=True, need_g=True):
    """(forward, backward) GEMM FLOPs of the kernels below (FlopCounterMode's convention)."""
    fwd = 2 * b * n * m + 2 * b * n * r + 2 * b * r * m if s.fwd == "f1" else 2 * m * r * n + 2 * b * n * m
    bwd = 0
    if need_a or (need_x and s.bwd == "b1"):
        bwd += 2 * b * m * r  # z = s·dy·(gB)
    if need_x:
        bwd += 2 * m * r * n + 2 * b * m * n if s.bwd == "b5" else 2 * b * m * n + 2 * b * r * n
    if need_a:
        bwd += 2 * b * r * n  # dA = zᵀ·x
    if need_b or need_g:
        bwd += 2 * b * n * r + 2 * b * m * r  # xa = x·Aᵀ, P = dyᵀ·xa
    if need_w:
        bwd += 2 * b * m * n
    return fwd, bwd


@torch.library.custom_op("lorafx_test::gated_lora_linear", mutates_args=())
def gated_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                      gate: Tensor, scale: float, schedule: str = "f1b1") -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    s = _schedule(schedule, x2.shape[0])
    gb = lora_B * gate[:, None]
    if s.fwd == "f1":
        y = x2.mm(weight.t()) + scale * x2.mm(lora_A.t()).mm(gb.t())
    else:
        y = x2.mm((weight + scale * gb.mm(lora_A)).t())
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


@gated_lora_linear.register_fake
def _(x, weight, bias, lora_A, lora_B, gate, scale, schedule="f1b1"):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, gate, scale, schedule = inputs
    ctx.scale, ctx.schedule, ctx.has_bias = scale, schedule, bias is not None
    ctx.save_for_backward(x, weight, lora_A, lora_B, gate)


def _backward(ctx, dy):
    x, W, A, B, g = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb, need_g = ctx.needs_input_grad[:6]
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    s, sc = _schedule(ctx.schedule, x2.shape[0]), ctx.scale
    gb = B * g[:, None]
    dx = dw = db = da = dbb = dg = None
    z = dy2.mm(gb) * sc if need_a or (need_x and s.bwd == "b1") else None
    if need_x:
        dx = dy2.mm(W + sc * gb.mm(A)) if s.bwd == "b5" else dy2.mm(W) + z.mm(A)
        dx = dx.view(x.shape)
    if need_a:
        da = z.t().mm(x2)
    if need_bb or need_g:
        p = dy2.t().mm(x2.mm(A.t()))  # (out, r)
        dbb = sc * p * g[:, None] if need_bb else None
        dg = sc * (p * B).sum(1) if need_g else None
    if need_w:
        dw = dy2.t().mm(x2)
    if need_b and ctx.has_bias:
        db = dy2.sum(0)
    return dx, dw, db, da, dbb, dg, None, None


gated_lora_linear.register_autograd(_backward, setup_context=_setup)
OP = torch.ops.lorafx_test.gated_lora_linear.default


@register_flop_formula(torch.ops.lorafx_test.gated_lora_linear)
def _(x_shape, w_shape, b_shape, a_shape, bb_shape, g_shape, scale=1.0, schedule="f1b1", *args, out_shape=None,
      **kwargs):
    tokens = math.prod(x_shape[:-1])
    return gated_flops(_schedule(schedule, tokens), tokens, w_shape[1], w_shape[0], a_shape[0])[0]


def reference(x, W, bias, A, B, g, scale):
    return torch.nn.functional.linear(x, W, bias) + scale * g * (x @ A.t() @ B.t())


# -- the kind ----------------------------------------------------------------------------------------


class GatedKind(OpKind):
    """``gated_lora_linear``: requires a LoraRecord; the gate lives at ``<site>.lora_gate``."""

    name = "gated_lora_linear"
    ops = (OP,)
    scheduled = True

    @staticmethod
    def gate_path(rec: LoraRecord) -> str:
        return rec.site + ".lora_gate"

    def describe(self, node) -> str:
        return "gated"

    def saved_inputs(self, node) -> set:
        v = self.view(node)
        return {a for a in (v.x, v.weight, v.lora_A, v.lora_B, v.gate) if isinstance(a, torch.fx.Node)}

    def adapter_tensors(self, node):
        rec = get_record(node, LoraRecord)
        return [rec.lora_A, rec.lora_B, self.gate_path(rec)]

    def _flops(self, node, q, b, n, m, r):
        v = self.view(node)
        return lambda s: gated_flops(s, b, n, m, r, need_x=q.needs_grad(v.x), need_w=q.needs_grad(v.weight),
                                     need_a=q.needs_grad(v.lora_A), need_b=q.needs_grad(v.lora_B),
                                     need_g=q.needs_grad(v.gate))

    def cost(self, node, q) -> NodeCost:
        v = self.view(node)
        (m, n), r, tokens = q.shape(v.weight), q.shape(v.lora_A)[0], q.tokens(v.x)
        fwd, bwd = S.piecewise(v.schedule, tokens, self._flops(node, q, tokens, n, m, r))
        return NodeCost(fwd, bwd, other=tokens * m * (3 if v.bias is not None else 2))

    def schedule_family(self, node, q, *, keep_xa=False) -> ScheduleFamily:
        v = self.view(node)
        (m, n), r = q.shape(v.weight), q.shape(v.lora_A)[0]
        flags = tuple(q.needs_grad(a) for a in (v.x, v.weight, v.lora_A, v.lora_B, v.gate))
        return ScheduleFamily(candidates=SCHEDULES, key=(("n", n), ("m", m), ("r", r), ("grads", flags)),
                              flops=lambda name, b: self._flops(node, q, b, n, m, r)(S.parse_schedule(name)))

    def merged_weight(self, root, node) -> Tensor:
        rec = get_record(node, LoraRecord)
        W = get_attr(root, rec.weight)
        A, B, g = (get_attr(root, p).detach().double() for p in (rec.lora_A, rec.lora_B, self.gate_path(rec)))
        return (W.detach().double() + rec.scale * (g[:, None] * B) @ A).to(W.dtype)

    def unmerge(self, graph, linear, record, *, train, created_by):
        v = args_of(linear)
        new = create(graph, OP, x=v.input, weight=v.weight, bias=v.bias, lora_A=graph.get_attr(record.lora_A),
                     lora_B=graph.get_attr(record.lora_B), gate=graph.get_attr(self.gate_path(record)),
                     scale=record.scale)
        set_record(new, OriginRecord(record.site, "Linear", created_by=created_by))
        set_record(new, record)
        return new


GATED = register_kind(GatedKind())


# -- the pass ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateAdapters(Pass):
    """Turn every ``lora_linear`` without dropout into a ``gated_lora_linear`` with a
    trainable gate g = 1 (so the model is unchanged).  Requires ``"lora"``; provides ``"gated"``."""

    requires = frozenset({"lora"})
    provides = frozenset({"gated"})

    def run(self, gm, ctx=None) -> PassResult:
        gated = 0
        for node in list(gm.graph.nodes):
            if kind_of(node) is not LINEAR or LINEAR.keeps_xa(node) or args_of(node).dropout_mask is not None:
                continue
            v, rec = args_of(node), get_record(node, LoraRecord)
            set_parameter(gm, GATED.gate_path(rec), torch.nn.Parameter(torch.ones(rec.out_features)))
            with gm.graph.inserting_before(node):
                new = create(gm.graph, OP, name=node.name + "_gated", x=v.x, weight=v.weight, bias=v.bias,
                             lora_A=v.lora_A, lora_B=v.lora_B, gate=gm.graph.get_attr(GATED.gate_path(rec)),
                             scale=v.scale, schedule=v.schedule)
            new.meta.update({k: val for k, val in node.meta.items() if k != "lorafx"})
            for kept in records(node).values():
                set_record(new, kept)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            gated += 1
        return PassResult(gm, gated > 0, {"gated_adapters": gated})


# -- the test ------------------------------------------------------------------------------------------


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 24, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = MLP()
    passes = [InlineGradModeRegions(), InsertLoRA(r=4, seed=0), GateAdapters(), SelectSchedule(), AnnotateCost(),
              SetTrainingMode(train=True)]
    cm = lorafx.compile(model, example_inputs=(torch.randn(2, 5, 16),), passes=passes)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial adapters: B != 0, g != 1
        for name, p in cm.named_parameters():
            if name.endswith(("lora_B", "lora_gate")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model, cm


def _gated(gm):
    return [n for n in gm.graph.nodes if kind_of(n) is GATED]


def test_the_op_matches_its_reference_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    x, W, b, A, B, gate = mk(2, 3, 6), mk(5, 6), mk(5), mk(2, 6), mk(5, 2), mk(5)
    ref = reference(x, W, b, A, B, gate, 0.7)
    ref_grads = torch.autograd.grad(ref.sum(), (x, W, b, A, B, gate))
    for rule in (*SCHEDULES, "f1b1|4:f2b5"):
        y = gated_lora_linear(x, W, b, A, B, gate, 0.7, rule)
        torch.testing.assert_close(y, ref)
        for got, want in zip(torch.autograd.grad(y.sum(), (x, W, b, A, B, gate)), ref_grads):
            torch.testing.assert_close(got, want)
    torch.library.opcheck(OP, (x, W, b, A, B, gate, 0.7, "f2b5"))


def test_compile_runs_the_new_kind_and_it_trains(compiled):
    model, cm = compiled
    gm = cm.graph_module
    assert len(_gated(gm)) == 2 and not any(kind_of(n) is LINEAR for n in gm.graph.nodes)
    assert set(cm.lora_records()) == {"up", "down"}
    x = torch.randn(3, 7, 16)
    up, down = (args_of(n) for n in _gated(gm))
    p = dict(cm.named_parameters())
    h = torch.relu(reference(x, p["up.weight"], p["up.bias"], p["up.lora_A"], p["up.lora_B"], p["up.lora_gate"],
                             up.scale))
    want = reference(h, p["down.weight"], None, p["down.lora_A"], p["down.lora_B"], p["down.lora_gate"], down.scale)
    torch.testing.assert_close(cm(x), want)
    assert sorted(cm.trainable_parameters()) == sorted(
        f"{site}.{t}" for site in ("up", "down") for t in ("lora_A", "lora_B", "lora_gate"))
    cm(x).square().mean().backward()
    assert all(q.grad is not None for q in cm.trainable_parameters().values())
    for q in cm.parameters():
        q.grad = None


def test_schedule_selection_uses_the_kinds_own_family(compiled):
    _, cm = compiled
    for node in _gated(cm.graph_module):
        v = args_of(node)
        rule = S.Rule.parse(v.schedule)
        assert get_record(node, ScheduleRecord).rule == v.schedule
        assert {s.name for s in rule.schedules} <= set(SCHEDULES)
        (m, n), r = v.weight.meta["val"].shape, get_attr(cm.graph_module, v.lora_A.target).shape[0]
        need_x = node.name.startswith("down")  # the first layer's input needs no gradient
        for tokens in (1, 5, 11, 40, 1000):
            costs = {s: sum(gated_flops(S.parse_schedule(s), tokens, n, m, r, need_x=need_x)) for s in SCHEDULES}
            assert costs[rule.resolve(tokens).name] == min(costs.values()), (node.name, tokens, v.schedule)
        assert rule.resolve(1000).fwd == "f2" and rule.resolve(1).fwd == "f1"  # the rule switches


def _flop_counter(cm, x):
    with FlopCounterMode(display=False) as f:
        y = cm(x)
    fwd = f.get_total_flops()
    with FlopCounterMode(display=False) as f:
        y.sum().backward()
    for q in cm.parameters():
        q.grad = None
    return fwd, f.get_total_flops()


def test_cost_model_equals_flop_counter_mode(compiled):
    _, cm = compiled
    gm = cm.graph_module
    assert all(get_record(n, CostRecord).kind == "lora" for n in _gated(gm))
    total = graph_cost(gm)
    info = next(r.info for r in cm.report().passes if r.name == "AnnotateCost")
    batch, seq = sorted(info["example"], key=info["example"].get)  # the example is (2, 5, 16)
    for b, s in ((2, 5), (3, 7), (4, 30)):  # 10, 21 and 120 tokens: both sides of the rules' switches
        want = _flop_counter(cm, torch.randn(b, s, 16))
        dims = {batch: b, seq: s}
        assert (evaluate(total.fwd_flops, **dims), evaluate(total.bwd_flops, **dims)) == want, (b, s)


def test_merge_unmerge_and_merge_and_unload(compiled):
    _, cm = compiled
    x = torch.randn(3, 7, 16)
    cm.eval()
    try:
        with torch.no_grad():
            want = cm(x)
            cm.merge()
            assert not _gated(cm.graph_module)
            torch.testing.assert_close(cm(x), want, rtol=1e-5, atol=1e-5)
            cm.unmerge()
            assert len(_gated(cm.graph_module)) == 2
            torch.testing.assert_close(cm(x), want)
            plain = cm.merge_and_unload()
            torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)
            assert not any(kind_of(n) for n in plain.graph.nodes)
            assert not any("lora" in name for name, _ in plain.named_parameters())
            # MergeLoRA / UnmergeLoRA on a graph: the kind rebuilds its node after a merge
            gm = copy.deepcopy(cm.graph_module)
            weights = {n: w.clone() for n, w in gm.named_parameters() if n.endswith("weight")}
            MergeLoRA()(gm)
            torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
            UnmergeLoRA()(gm)
            assert len(_gated(gm)) == 2
            assert all(torch.equal(w, dict(gm.named_parameters())[n]) for n, w in weights.items())
            torch.testing.assert_close(gm(x), want)
    finally:
        cm.train()


def test_lint_report_print_and_draw(compiled, tmp_path):
    _, cm = compiled
    gm = cm.graph_module
    lint_graph(gm)
    broken = copy.deepcopy(gm)
    node = _gated(broken)[0]
    node.meta["lorafx"] = {k: v for k, v in records(node).items() if k != "LoraRecord"}  # (meta is shared)
    with pytest.raises(PassError, match="gated_lora_linear node .* has no LoraRecord"):
        lint_graph(broken)
    report = str(cm.report())
    assert "GateAdapters" in report and "gated_adapters=2" in report and "flops    forward" in report
    text = lorafx.format_graph(gm)
    line = next(l for l in text.splitlines() if "lorafx_test.gated_lora_linear(" in l)
    assert "# gated; " in line and "lora(r=4, alpha=16" in line and "schedule=" in line and "flops fwd=" in line
    svg = open(lorafx.draw(gm, str(tmp_path / "graph.svg"))).read()
    assert "2 LoRA adapters" in svg and "LoRA r=4 alpha=16 16-&gt;32 (gated)" in svg
