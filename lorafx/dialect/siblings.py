"""The ``lora_linear_siblings`` kind: the adapters that read one input, as one op.

``torch.ops.lorafx.lora_linear_siblings(x, weights, biases, has_bias, lora_As, lora_Bs, scales, schedules, recipe, sources)``
    k adapted linears that read the same ``x`` (q/k/v, gate/up), adapters without
    dropout.  Returns the k outputs.  Forward: one GEMM ``[A_1; ...; A_k] x^T``
    (the stacked A is built once per call, (sum r_i) x n) instead of k skinny ones;
    backward: the k ``dA_i`` come from one GEMM and the adapter part of dx from one
    GEMM with the stacked A; x is saved once (or, with a ``recipe``, rebuilt from
    ``sources`` as ``lora_linear_recompute`` does).  Base products stay one GEMM per
    linear (their weights are separate tensors).  ``schedules`` holds one rule per
    sibling, joined with ';'; each piece must be f1/f2 with b1/b5 (no 'k').

Kind: ``SIBLINGS``.  Requires a LoraRecord on each ``getitem(node, i)`` user (the
siblings' outputs keep their adapters' names and records).  Costs the sum of its
adapters' ``lora_linear`` costs (stacking changes GEMM shapes, not FLOPs).  Provides
``fuse`` (FuseSiblings) and ``split``; canonical form: one ``lora_linear`` per sibling.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import List, Optional, Sequence, Tuple

import sympy
import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from lorafx.meta import LoraRecord, get_record
from lorafx.schedules import DEFAULT_SCHEDULE, Rule, Schedule, lora_flops

from . import linear as L
from .recipe import compile_recipe
from .recompute import RECOMPUTE, rebuild_input
from .registry import InputQuery, NodeCost, OpKind, args_of, copy_meta, create, getitem_users, kind_of, register_kind, write

__all__ = ["lora_linear_siblings", "parse_rules", "SiblingsKind", "SIBLINGS"]


@functools.lru_cache(maxsize=1024)
def parse_rules(schedules: str) -> Tuple[Rule, ...]:
    """The siblings' schedule rules, joined with ';' in the op's argument, parsed."""
    return tuple(Rule.parse(rule) for rule in schedules.split(";"))


def runs(s: Schedule) -> bool:
    """Whether the sibling kernel runs schedule ``s`` (f1/f2 with b1/b5, XA not kept)."""
    return s.bwd in ("b1", "b5") and not s.keep_xa


def _sibling_schedules(schedules: str, tokens: int):
    """The schedule each sibling runs at ``tokens`` tokens (cached for an int count: the
    kernels ask on every call)."""
    if type(tokens) is int:
        return _sibling_schedules_at(schedules, tokens)
    return _resolve_siblings(schedules, tokens)


def _resolve_siblings(schedules: str, tokens: int) -> tuple:
    out = []
    for rule in parse_rules(schedules):
        s = rule.resolve(tokens)
        if not runs(s):
            raise ValueError(f"lorafx.lora_linear_siblings runs f1/f2 with b1/b5 (no 'k'); rule {str(rule)!r} "
                             f"picks {s.name} at {tokens} tokens")
        out.append(s)
    return tuple(out)


_sibling_schedules_at = functools.lru_cache(maxsize=4096)(_resolve_siblings)


def _spread(present: Sequence, has: Sequence[bool]) -> list:
    """[b0, b1] with has=[True, False, True] -> [b0, None, b1]."""
    it = iter(present)
    return [next(it) if h else None for h in has]


def _stacked(mats: Sequence[Tensor], chosen: Sequence[bool]):
    """(rows of each chosen matrix in the stack, the stack) -- the chosen matrices one under another."""
    rows, parts, start = [], [], 0
    for m, c in zip(mats, chosen):
        if c:
            rows.append(slice(start, start + m.shape[0]))
            parts.append(m)
            start += m.shape[0]
        else:
            rows.append(None)
    return rows, (torch.cat(parts) if len(parts) > 1 else parts[0]) if parts else None


@torch.library.custom_op("lorafx::lora_linear_siblings", mutates_args=())
def lora_linear_siblings(
    x: Tensor,
    weights: List[Tensor],
    biases: List[Tensor],
    has_bias: List[bool],
    lora_As: List[Tensor],
    lora_Bs: List[Tensor],
    scales: List[float],
    schedules: str,
    recipe: str,
    sources: List[Tensor],
) -> List[Tensor]:
    x2 = L.flat(x)
    sched = _sibling_schedules(schedules, x2.shape[0])
    if recipe:
        compile_recipe(recipe)
    biases = _spread(biases, has_bias)
    # one GEMM [A_i; ...] x^T for every sibling that runs f1: (sum r, tokens)
    rows, a_f1 = _stacked(lora_As, [s.fwd == "f1" for s in sched])
    xa_t = L.xa_t(x2, a_f1) if a_f1 is not None else None
    outs = []
    for w, b, a, bb, sc, s, rr in zip(weights, biases, lora_As, lora_Bs, scales, sched, rows):
        if s.fwd == "f1":
            y = torch.nn.functional.linear(x2, w, b)  # addmm(b, x2, W^T) / x2.mm(W^T)
            torch.addmm(y, xa_t[rr].t(), bb.t(), alpha=sc, out=y)
        else:  # f2: x (W + s B A)^T
            merged = torch.addmm(w, bb, a, alpha=sc)
            y = torch.nn.functional.linear(x2, merged, b)
            del merged
        outs.append(y.view(*x.shape[:-1], w.shape[0]))
    return outs


@lora_linear_siblings.register_fake
def _(x, weights, biases, has_bias, lora_As, lora_Bs, scales, schedules, recipe, sources):
    torch._check(len(weights) == len(has_bias) == len(lora_As) == len(lora_Bs) == len(scales) == len(schedules.split(";"))
                 and len(biases) == sum(has_bias),
                 lambda: "lora_linear_siblings: one weight, has_bias, A, B, scale and schedule per sibling, "
                         "one bias per True in has_bias")
    for w, a, bb in zip(weights, lora_As, lora_Bs):
        L.fake_checks(x, w, a, bb, "lora_linear_siblings")
    parse_rules(schedules)
    if recipe:
        compile_recipe(recipe)
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


def _setup_siblings(ctx, inputs, output):
    x, weights, biases, has_bias, lora_As, lora_Bs, scales, schedules, recipe, sources = inputs
    k = len(weights)
    ctx.k, ctx.scales, ctx.schedules, ctx.recipe = k, list(scales), schedules, recipe
    ctx.has_bias = list(has_bias)
    ctx.x_meta = (x.shape, x.dtype)
    ctx.n_sources = len(sources)
    kept = list(sources) if recipe else [x]  # x once for all siblings (or the recipe's sources)
    ctx.save_for_backward(*weights, *lora_As, *lora_Bs, *kept)


def _flags(f, n):
    return list(f) if isinstance(f, (list, tuple)) else [f] * n


def _backward_siblings(ctx, dys):
    k = ctx.k
    saved = ctx.saved_tensors
    weights, lora_As, lora_Bs, kept = saved[:k], saved[k:2 * k], saved[2 * k:3 * k], saved[3 * k:]
    need_x, need_w, need_b, _, need_a, need_bb = ctx.needs_input_grad[:6]
    need_w, need_a, need_bb = _flags(need_w, k), _flags(need_a, k), _flags(need_bb, k)
    need_b = _spread(_flags(need_b, sum(ctx.has_bias)), ctx.has_bias)
    shape, dtype = ctx.x_meta
    tokens = math.prod(shape[:-1])
    sched = _sibling_schedules(ctx.schedules, tokens)
    live = [dy is not None for dy in dys]
    reads_x = any(w and l for w, l in zip(need_w, live)) or any(need_a) or any(need_bb)
    if ctx.recipe:
        x = rebuild_input(ctx.recipe, kept, shape, dtype, "lora_linear_siblings") if reads_x else None
    else:
        x = kept[0]
    x2 = L.flat(x) if x is not None else None
    dy2 = [(L.flat(dy) if dy is not None else None) for dy in dys]
    # Z: s_i B_i^T dy_i^T stacked for the siblings with an output gradient, (sum r, tokens)
    rows, a_live = _stacked(lora_As, live)
    one_scale = len(set(ctx.scales)) == 1  # then one multiply scales every sibling's block
    blocks = []
    for dy, bb, sc in zip(dy2, lora_Bs, ctx.scales):
        if dy is not None:
            z = torch.nn.functional.linear(bb.t(), dy)  # B^T dy^T
            blocks.append(z if one_scale else z.mul_(sc))
    z_t = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    if one_scale:
        z_t.mul_(ctx.scales[0])
    dx = None
    if need_x:
        for dy, w, a, bb, sc, s in zip(dy2, weights, lora_As, lora_Bs, ctx.scales, sched):
            if dy is None:
                continue
            wt = torch.addmm(w, bb, a, alpha=sc) if s.bwd == "b5" else w  # b5: through W + s B A
            dx = dy.mm(wt) if dx is None else torch.addmm(dx, dy, wt, out=dx)
        b1 = [l and s.bwd == "b1" for l, s in zip(live, sched)]
        if any(b1):  # the b1 siblings' adapter parts of dx in one GEMM: Z^T [A_i; ...]
            if all(b1[i] == live[i] for i in range(k)):
                torch.addmm(dx, z_t.t(), a_live, out=dx)
            else:
                z_b1 = torch.cat([z_t[rr] for rr, f in zip(rows, b1) if f])
                torch.addmm(dx, z_b1.t(), _stacked(lora_As, b1)[1], out=dx)
        dx = dx.view(shape)
    da_all = z_t.mm(x2) if any(need_a) else None  # every dA_i in one GEMM: (sum r, in)
    xa_t = L.xa_t(x2, a_live) if any(need_bb) else None  # every A_i x^T in one GEMM: (sum r, tokens)
    dws, dbs, das, dbbs = [], [], [], []
    for i, (dy, sc, rr) in enumerate(zip(dy2, ctx.scales, rows)):
        dws.append(dy.t().mm(x2) if need_w[i] and dy is not None else None)
        if ctx.has_bias[i]:
            dbs.append(dy.sum(0) if need_b[i] and dy is not None else None)
        das.append(da_all[rr] if need_a[i] and dy is not None else None)  # a row block: contiguous
        dbbs.append(xa_t[rr].mm(dy).mul_(sc).t().contiguous() if need_bb[i] and dy is not None else None)
    return dx, dws, dbs, None, das, dbbs, None, None, None, [None] * ctx.n_sources


lora_linear_siblings.register_autograd(_backward_siblings, setup_context=_setup_siblings)


@register_flop_formula(torch.ops.lorafx.lora_linear_siblings)
def _siblings_flops(x_shape, w_shapes, b_shapes, has_bias, a_shapes, bb_shapes, scales=None, schedules=None,
                    *args, out_shape=None, **kwargs) -> int:
    tokens = math.prod(x_shape[:-1])
    rules = parse_rules(schedules) if schedules else [DEFAULT_SCHEDULE] * len(w_shapes)
    return int(sum(lora_flops(rule, tokens, w[1], w[0], a[0])[0] for w, a, rule in zip(w_shapes, a_shapes, rules)))


OP = torch.ops.lorafx.lora_linear_siblings.default


class SiblingsKind(OpKind):
    """``lora_linear_siblings``: k adapters on one input, their rank-r GEMMs stacked.

    Requires a LoraRecord on every getitem user.  Provides ``fuse``/``split``, the summed
    cost and the canonical form (one ``lora_linear`` per sibling).  Preserves outputs and
    gradients up to float rounding.
    """

    name = "lora_linear_siblings"
    ops = (OP,)

    def rule(self, node):
        return None

    def rules(self, node) -> Tuple[Rule, ...]:
        return parse_rules(self.view(node).schedules)

    def adapters(self, node) -> List[LoraRecord]:
        outs = getitem_users(node)
        recs = [get_record(outs[i], LoraRecord) for i in sorted(outs)]
        return [r for r in recs if r is not None]

    def check(self, node) -> Optional[str]:
        for i, out in sorted(getitem_users(node).items()):
            if get_record(out, LoraRecord) is None:
                return f"{self.name} node {node.name}: output {i} ({out.name}) has no LoraRecord"
        return None

    def describe(self, node) -> str:
        v = self.view(node)
        return f"siblings x{len(v.weights)}" + (" (x recomputed)" if v.recipe else "")

    def saved_inputs(self, node) -> set:
        v = self.view(node)
        kept = [*v.weights, *v.lora_As, *v.lora_Bs, *(v.sources if v.recipe else [v.x])]
        return {a for a in kept if isinstance(a, torch.fx.Node)}

    def cost(self, node, q: InputQuery) -> NodeCost:
        """Each adapter as a ``lora_linear`` with its own rule (siblings have no dropout)."""
        v = self.view(node)
        tokens = q.tokens(v.x)
        fwd = bwd = other = sympy.Integer(0)
        for w, a, b, rule, bias in zip(v.weights, v.lora_As, v.lora_Bs, self.rules(node), v.has_bias):
            m, n = q.shape(w)
            f, bw = lora_flops(rule, tokens, n, m, q.shape(a)[0], x_requires_grad=q.needs_grad(v.x),
                               w_requires_grad=q.needs_grad(w), a_requires_grad=q.needs_grad(a),
                               b_requires_grad=q.needs_grad(b))
            fwd, bwd = fwd + sympy.sympify(f), bwd + sympy.sympify(bw)
            if bias:
                other += tokens * m
        return NodeCost(fwd, bwd, other)

    # fusing and splitting ---------------------------------------------------------------------
    def joins(self, node) -> bool:
        """Whether ``node`` is an adapter the sibling op can take in (lora_linear or
        lora_linear_recompute, XA not kept)."""
        return node.op == "call_function" and node.target in (L.OP, RECOMPUTE.ops[0])

    def why_not(self, members: Sequence[torch.fx.Node]) -> Optional[str]:
        """Why these adapters cannot run as one sibling op, or None."""
        if len({m.target for m in members}) > 1:
            return "mixed lora_linear / lora_linear_recompute"
        views = [args_of(m) for m in members]
        for m, v in zip(members, views):
            rec = get_record(m, LoraRecord)
            if v.dropout_mask is not None or (rec is not None and rec.dropout > 0):
                return "adapter dropout (independent masks per adapter)"
        for text in dict.fromkeys(v.schedule for v in views):
            for s in Rule.parse(text).schedules:
                if not runs(s):
                    return f"schedule {text!r} uses {s.name} (the sibling kernel runs f1/f2 with b1/b5)"
        if "recipe" in views[0] and len({(v.recipe, tuple(v.sources)) for v in views}) > 1:
            return "different recipes"
        return None

    def fuse(self, graph: torch.fx.Graph, members: Sequence[torch.fx.Node], name: str) -> torch.fx.Node:
        """One sibling node, before ``members[0]``, for ``members`` (adapters on one x that
        ``why_not`` accepts); each member becomes ``getitem(node, i)``, keeping its name,
        users and records."""
        views = [args_of(m) for m in members]
        first = views[0]
        recipe, sources = (first.recipe, list(first.sources)) if "recipe" in first else ("", [])
        with graph.inserting_before(members[0]):
            node = create(graph, OP, name=name, x=first.x, weights=[v.weight for v in views],
                          biases=[v.bias for v in views if v.bias is not None],
                          has_bias=[v.bias is not None for v in views], lora_As=[v.lora_A for v in views],
                          lora_Bs=[v.lora_B for v in views], scales=[float(v.scale) for v in views],
                          schedules=";".join(v.schedule for v in views), recipe=recipe, sources=sources)
        node.meta["val"] = [m.meta.get("val") for m in members]
        copy_meta(members[0], node)
        for i, m in enumerate(members):
            m.target, m.args, m.kwargs = operator.getitem, (node, i), {}
        return node

    def split(self, graph: torch.fx.Graph, node: torch.fx.Node) -> List[torch.fx.Node]:
        """Undo ``fuse``: every used output ``getitem(node, i)`` becomes the sibling's own
        ``lora_linear`` (``lora_linear_recompute`` with the recipe) again, keeping its name,
        users and records; the sibling node is erased.  Returns the adapter nodes."""
        v = self.view(node)
        biases = iter(v.biases)
        outs = getitem_users(node)
        made = []
        for i, (w, a, b, s, rule) in enumerate(zip(v.weights, v.lora_As, v.lora_Bs, v.scales, v.schedules.split(";"))):
            bias = next(biases) if v.has_bias[i] else None
            out = outs.get(i)
            if out is None:  # an unused output
                continue
            values = dict(x=v.x, weight=w, bias=bias, lora_A=a, lora_B=b, scale=s, dropout_mask=None,
                          dropout_p=0.0, schedule=rule, recipe=v.recipe, sources=list(v.sources))
            write(out, values, RECOMPUTE.ops[0] if v.recipe else L.OP)
            made.append(out)
        graph.erase_node(node)
        return made

    def canonical(self, graph, node):
        return [c for m in self.split(graph, node) for c in kind_of(m).canonical(graph, m)]


SIBLINGS = register_kind(SiblingsKind())
