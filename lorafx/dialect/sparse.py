"""The ``lora_linear_sparse`` kind: a LoRA linear on a pruned weight that stays sparse (LoRS).

``torch.ops.lorafx.lora_linear_sparse(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None,
dropout_p=0., schedule="f2b4", grad="exact")``
    y = x ((W + s·B A) ⊙ M)ᵀ + bias, with M = 1[W ≠ 0] (LoRS, arXiv 2501.08582).  With an
    active dropout mask the adapter reads d(x) as in ``lora_linear``:
    y = x Wᵀ + d(x) ((s·B A) ⊙ M)ᵀ + bias (W ⊙ M = W, since W is 0 where M is).

**The mask is recomputed, never stored.**  A pruned weight is 0 exactly where it was
pruned, so the op rebuilds M from W's zeros (M = |sign(W)|, one pass over W's m·n
elements, a transient m×n tensor) in the forward and again in the backward.  It costs no
memory between calls: no bool or bit-packed copy, and no dense masked weight kept between
forward and backward.  (The mask is applied by multiplying, so an inf or nan in an adapter
product at a pruned entry would give nan, not 0; such an adapter has diverged anyway.)  A
weight that was already 0 before pruning counts as pruned too (its adapter entry is held at 0), so the
zero pattern is exactly what is preserved, and N:M groups stay N:M.

**What autograd saves**: x, W, A, B (and the dropout mask), as for ``lora_linear``.  The
masked merged weight W' = (W + s·B A) ⊙ M (m×n) is formed in the forward, used for one
GEMM and freed, and formed again in the backward for dX = dy W'.  An SQFT-style
W + M ⊙ (B A) through autograd instead keeps W' (and B A) alive until backward.

**Two gradient modes** (``grad``), with G = dyᵀ d(x) (m×n, the dense weight gradient):

* ``"exact"``: the true gradient of the masked product,
  dA = s·Bᵀ (M ⊙ G),  dB = s·(M ⊙ G) Aᵀ.
  It needs G, an m×n matrix formed per step (one extra b·m·n GEMM, 2bmn FLOPs).
* ``"surrogate"``: LoRS's straight-through form, the gradient of the *unmasked* adapter,
  dA = s·(dy B)ᵀ d(x),  dB = s·dyᵀ (d(x) Aᵀ)  (= s·Bᵀ G and s·G Aᵀ),
  through rank-r intermediates: no m×n product is formed.  It differs from the exact
  gradient by the part of G on the pruned positions, s·Bᵀ((1-M) ⊙ G) and
  s·((1-M) ⊙ G) Aᵀ; the forward stays exactly masked either way.

dX is exact in both modes, dX = dy W' (with dropout: dy W + d(dy ((s·B A) ⊙ M))).

**Schedules.**  The forward always goes through the merged weight (``f2``); the backward is
``b5`` (adapter gradients through rank-r products: surrogate only) or ``b4`` (through G: the
only exact form, and the cheaper surrogate one at large r).  The names and the dispatch
rules are RunLoRA's (``lorafx.schedules``); the FLOP and byte formulas are this module's
(``sparse_steps``), which match the kernels' GEMMs exactly.

``torch.ops.lorafx.lora_linear_sparse_backward(...)`` is the backward as one op, used when
autograd's backward is traced (torch.compile), like ``lora_linear_backward``.

Kind: ``SPARSE``.  Requires a LoraRecord and a SparseRecord on each node.  Provides its
schedule family and cost, its merged weight W + (s·B A) ⊙ M (float32, exact zero pattern)
and ``unmerge``.  Canonical form: itself (a sparse adapter never becomes a dense one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from lorafx import schedules as S
from lorafx.graph_utils import get_attr
from lorafx.meta import LoraRecord, get_record, set_record
from lorafx.schedules import Rule, Step

from . import linear as L
from .registry import InputQuery, NodeCost, ScheduleFamily, register_kind, set_args

__all__ = ["lora_linear_sparse", "lora_linear_sparse_backward", "lora_linear_sparse_reference", "sparse_steps",
           "sparse_flops", "sparse_bytes", "sparse_candidates", "merged_sparse_weight", "SparseRecord",
           "SparseKind", "SPARSE", "GRAD_MODES", "SPARSE_SCHEDULES", "DEFAULT_SPARSE_SCHEDULE"]

GRAD_MODES = ("exact", "surrogate")
SPARSE_SCHEDULES = ("f2b5", "f2b4")
DEFAULT_SPARSE_SCHEDULE = "f2b4"  # the exact mode's only schedule (the default mode)
_EXACT_SCHEDULES = ("f2b4",)


@dataclass(frozen=True)
class SparseRecord:
    """On a ``lora_linear_sparse`` node: how its weight was pruned and how its adapter's
    gradient is computed.  ``zeros``/``numel``: the weight's zero count and size."""

    pattern: str  # "unstructured" | "2:4" | "4:8" | "keep"
    method: str  # "magnitude" | "wanda" | "keep"
    grad: str  # "exact" | "surrogate"
    zeros: int = 0
    numel: int = 0

    def describe(self) -> str:
        share = f" {self.zeros / self.numel:.0%}" if self.numel else ""
        return f"sparse({self.pattern}{share}, {self.method}, {self.grad} grad)"


def sparse_candidates(grad: str) -> Tuple[str, ...]:
    """The schedules a node in gradient mode ``grad`` may run."""
    return _EXACT_SCHEDULES if grad == "exact" else SPARSE_SCHEDULES


def check_sparse_rule(rule: Rule, grad: str, op: str = "lora_linear_sparse") -> None:
    """ValueError unless every piece of ``rule`` is a schedule the mode ``grad`` can run."""
    if grad not in GRAD_MODES:
        raise ValueError(f"lorafx.{op}: grad must be one of {GRAD_MODES}, got {grad!r}")
    allowed = sparse_candidates(grad)
    bad = [s.name for s in rule.schedules if s.name not in allowed]
    if bad:
        why = ("the exact masked gradient needs G = dyᵀx, so only f2b4 runs it" if grad == "exact" else
               "a sparse adapter's forward goes through the masked merged weight (f2), its backward is b5 or b4")
        raise ValueError(f"lorafx.{op}: schedule {str(rule)!r} is not one of {allowed} for grad={grad!r} ({why})")


# -- kernels ---------------------------------------------------------------------------------------

def _dropout_on(mask: Optional[Tensor]) -> bool:
    return mask is not None and mask.numel() > 0


def kept(weight: Tensor) -> Tensor:
    """M = 1[W ≠ 0] as 0./1. in W's dtype (|sign(W)|: one cheap pass; a bool compare plus
    ``masked_fill_`` is several times slower on CPU)."""
    return weight.sign().abs_()


def _masked_delta(lora_A: Tensor, lora_B: Tensor, s: float, keep: Tensor) -> Tensor:
    """(s·B A) ⊙ M, formed as a new m×n tensor."""
    return torch.mm(lora_B, lora_A).mul_(s).mul_(keep)


def _masked_merged(weight: Tensor, lora_A: Tensor, lora_B: Tensor, s: float, keep: Tensor) -> Tensor:
    """(W + s·B A) ⊙ M, formed as a new m×n tensor."""
    return torch.addmm(weight, lora_B, lora_A, alpha=s).mul_(keep)


def sparse_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, s: float,
                   mask: Optional[Tensor], p: float) -> Tensor:
    """The forward kernel (every schedule: through the masked merged weight)."""
    x2 = L.flat(x)
    keep = kept(weight)
    if _dropout_on(mask):
        y = F.linear(x2, weight, bias)
        y.addmm_(L.dropped(x2, mask, p), _masked_delta(lora_A, lora_B, s, keep).t())
    else:
        y = F.linear(x2, _masked_merged(weight, lora_A, lora_B, s, keep), bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


def sparse_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, mask: Optional[Tensor],
                    s: float, p: float, rule: Rule, grad: str, needs: Sequence[bool]):
    """(dx, dW, dbias, dA, dB), None where ``needs`` says no gradient is needed (see the module
    docstring for the formulas).  Accumulating GEMMs are aten calls FlopCounterMode counts."""
    need_x, need_w, need_b, need_a, need_bb = needs
    x2, dy2 = L.flat(x), L.flat(dy)
    dropout = _dropout_on(mask)
    sched = rule.resolve(x2.shape[0])
    L.schedule_counts[("bwd", "sparse_" + sched.bwd)] += 1
    keep = kept(weight) if (need_x or need_w or grad == "exact") else None
    dx = dw = db = da = dbb = None
    if need_x:
        if dropout:
            dx = dy2.mm(weight)
            dx.add_(L.dropped(dy2.mm(_masked_delta(lora_A, lora_B, s, keep)), mask, p))
        else:
            dx = dy2.mm(_masked_merged(weight, lora_A, lora_B, s, keep))
        dx = dx if x.dim() == 2 else dx.view(x.shape)
    if need_a or need_bb:
        xd = L.dropped(x2, mask, p)
        if sched.bwd == "b4":  # through G (m x n), masked in exact mode
            g = dy2.t().mm(xd)
            if grad == "exact":
                g.mul_(keep)
            if need_a:
                da = lora_B.t().mm(g).mul_(s)
            if need_bb:
                dbb = lora_A.mm(g.t()).mul_(s).t().contiguous()
            del g
        else:  # b5, surrogate: rank-r intermediates only
            if need_a:
                da = L.dyb_t(dy2, lora_B).mul_(s).mm(xd)  # s (dy B)^T d(x)
            if need_bb:
                dbb = L.xa_t(xd, lora_A).mm(dy2).mul_(s).t().contiguous()  # s dy^T (d(x) A^T)
    if need_w:  # d/dW of (W + s B A) ⊙ M
        dw = dy2.t().mm(x2).mul_(keep)
    if need_b:
        db = dy2.sum(0)
    return dx, dw, db, da, dbb


def _run_backward(dy, x, weight, lora_A, lora_B, mask, s, p, rule, grad, needs):
    if L._traced(dy, x):
        grads = torch.ops.lorafx.lora_linear_sparse_backward(dy, x, weight, lora_A, lora_B, mask, s, p, str(rule),
                                                             grad, list(needs))
        return tuple(g if need else None for g, need in zip(grads, needs))
    return sparse_backward(dy, x, weight, lora_A, lora_B, mask, s, p, rule, grad, needs)


# -- ops -------------------------------------------------------------------------------------------

@torch.library.custom_op("lorafx::lora_linear_sparse", mutates_args=())
def lora_linear_sparse(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    schedule: str = DEFAULT_SPARSE_SCHEDULE,
    grad: str = "exact",
) -> Tensor:
    check_sparse_rule(Rule.parse(schedule), grad)
    return sparse_forward(x, weight, bias, lora_A, lora_B, scale, dropout_mask, dropout_p)


@lora_linear_sparse.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.0, schedule=DEFAULT_SPARSE_SCHEDULE,
      grad="exact"):
    L.fake_checks(x, weight, lora_A, lora_B, "lora_linear_sparse")
    check_sparse_rule(Rule.parse(schedule), grad)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, mask, p, schedule, grad = inputs
    ctx.rule, ctx.scale, ctx.p, ctx.grad, ctx.has_bias = Rule.parse(schedule), scale, p, grad, bias is not None
    ctx.save_for_backward(x, weight, lora_A, lora_B, mask)  # never W' or M: both are rebuilt from W


def _backward(ctx, dy):
    x, weight, lora_A, lora_B, mask = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    needs = (need_x, need_w, need_b and ctx.has_bias, need_a, need_bb)
    grads = _run_backward(dy, x, weight, lora_A, lora_B, mask, ctx.scale, ctx.p, ctx.rule, ctx.grad, needs)
    return (*grads, None, None, None, None, None)


lora_linear_sparse.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("lorafx::lora_linear_sparse_backward", mutates_args=())
def lora_linear_sparse_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    dropout_mask: Optional[Tensor],
    scale: float,
    dropout_p: float,
    schedule: str,
    grad: str,
    needs: List[bool],
) -> List[Tensor]:
    """The backward of lora_linear_sparse as one opaque op (for traced backwards): (dx, dW,
    dbias, dA, dB), an empty tensor for each gradient not in ``needs``."""
    grads = sparse_backward(dy, x, weight, lora_A, lora_B, dropout_mask, scale, dropout_p, Rule.parse(schedule),
                            grad, tuple(needs))
    return [g if g is not None else dy.new_empty((0,)) for g in grads]


@lora_linear_sparse_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, dropout_mask, scale, dropout_p, schedule, grad, needs):
    likes = (x, weight, weight.new_empty((weight.shape[0],)), lora_A, lora_B)
    return [t.new_empty(t.shape) if need else dy.new_empty((0,)) for t, need in zip(likes, needs)]


def lora_linear_sparse_reference(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.0,
                                 schedule=None, grad="exact"):
    """Plain-autograd definition: eager masking ``(W + s·B A) ⊙ M`` with M = 1[W ≠ 0] (its
    autograd gradients are the ``exact`` mode's).  For tests."""
    keep = (weight != 0).to(weight.dtype)
    xd = x
    if dropout_mask is not None and dropout_mask.numel() > 0:
        xd = x * dropout_mask / (1.0 - dropout_p)
        return F.linear(x, weight * keep, bias) + F.linear(xd, (scale * lora_B @ lora_A) * keep)
    return F.linear(x, (weight + scale * lora_B @ lora_A) * keep, bias)


# -- cost ------------------------------------------------------------------------------------------

def sparse_steps(schedule, b, n, m, r, *, x_requires_grad: bool = True, w_requires_grad: bool = False,
                 a_requires_grad: bool = True, b_requires_grad: bool = True, bias: bool = False,
                 dropout: bool = False, grad: str = "surrogate", itemsize: int = 4) -> List[Step]:
    """The GEMMs and mask passes of one schedule, in the order the kernels above run them.
    A mask pass reads W and writes M; applying it reads M and a product and writes it."""
    s = S.parse_schedule(schedule) if isinstance(schedule, str) else schedule
    steps: List[Step] = []
    mask_pass = lambda phase: steps.append(Step(phase, "M=|sign W|", elementwise_bytes=2 * m * n * itemsize))
    apply = lambda phase, what: steps.append(Step(phase, what, elementwise_bytes=3 * m * n * itemsize))
    # forward
    mask_pass("fwd")
    if dropout:
        steps.append(Step("fwd", "x·Wᵀ", b, n, m, accumulate=bias))
        steps.append(Step("fwd", "B·A", m, r, n))
        apply("fwd", "D=(s·BA)⊙M")
        steps.append(Step("fwd", "d(x) Dᵀ", b, n, m, accumulate=True))
    else:
        steps.append(Step("fwd", "W+s·B·A", m, r, n, accumulate=True))
        apply("fwd", "W'⊙M")
        steps.append(Step("fwd", "x·W'ᵀ", b, n, m, accumulate=bias))
    # backward
    need_adapters = a_requires_grad or b_requires_grad
    if x_requires_grad or w_requires_grad or (grad == "exact" and need_adapters):
        mask_pass("bwd")
    if x_requires_grad:
        if dropout:
            steps.append(Step("bwd", "dy·W", b, m, n))
            steps.append(Step("bwd", "B·A", m, r, n))
            apply("bwd", "D=(s·BA)⊙M")
            steps.append(Step("bwd", "dy·D", b, m, n))
        else:
            steps.append(Step("bwd", "W+s·B·A", m, r, n, accumulate=True))
            apply("bwd", "W'⊙M")
            steps.append(Step("bwd", "dy·W'", b, m, n))
    if need_adapters:
        if s.bwd == "b4":
            steps.append(Step("bwd", "G=dyᵀ·d(x)", m, b, n))
            if grad == "exact":
                apply("bwd", "G⊙M")
            if a_requires_grad:
                steps.append(Step("bwd", "dA=s·Bᵀ·G", r, m, n))
            if b_requires_grad:
                steps.append(Step("bwd", "dBᵀ=s·A·Gᵀ", r, n, m))
        else:
            if a_requires_grad:
                steps.append(Step("bwd", "z=Bᵀ·dyᵀ", r, m, b))
                steps.append(Step("bwd", "dA=s·z·d(x)", r, b, n))
            if b_requires_grad:
                steps.append(Step("bwd", "xa=A·d(x)ᵀ", r, n, b))
                steps.append(Step("bwd", "dBᵀ=s·xa·dy", r, b, m))
    if w_requires_grad:
        steps.append(Step("bwd", "dW=M⊙(dyᵀ·x)", m, b, n))
    if bias:
        steps.append(Step("bwd", "dbias=Σdy", elementwise_bytes=b * m * itemsize + m * itemsize))
    return steps


def sparse_flops(schedule, b, n, m, r, **flags) -> Tuple:
    """``(forward, backward)`` FLOPs of ``lora_linear_sparse`` under ``schedule`` (a name or a
    rule): exactly what FlopCounterMode counts (its registered forward formula, the backward's
    aten GEMMs).  Flags as ``sparse_steps``; mask passes count 0 FLOPs (elementwise).

    >>> from lorafx.dialect.sparse import sparse_flops
    >>> from lorafx.schedules import b, n, m, r
    >>> sparse_flops("f2b5", b, n, m, r)
    (2*b*m*n + 2*m*n*r, 2*b*m*n + 4*b*m*r + 4*b*n*r + 2*m*n*r)
    >>> sparse_flops("f2b4", b, n, m, r, grad="exact")[1]
    4*b*m*n + 6*m*n*r
    """
    return S.step_totals(schedule, b, lambda s: sparse_steps(s, b, n, m, r, **flags),
                         lambda st: st.flops if not st.elementwise_bytes else 0)


def sparse_bytes(schedule, b, n, m, r, **flags) -> Tuple:
    """``(forward, backward)`` bytes moved, under ``lorafx.schedules``' traffic model."""
    itemsize = flags.get("itemsize", 4)
    return S.step_totals(schedule, b, lambda s: sparse_steps(s, b, n, m, r, **flags), lambda st: st.nbytes(itemsize))


@register_flop_formula(torch.ops.lorafx.lora_linear_sparse)
def _forward_flops(x_shape, w_shape, b_shape, a_shape, bb_shape, scale=1.0, mask_shape=None, p=0.0,
                   schedule=DEFAULT_SPARSE_SCHEDULE, grad="exact", *args, out_shape=None, **kwargs) -> int:
    if mask_shape is None:
        mask_shape = kwargs.get("dropout_mask")
    dropout = mask_shape is not None and math.prod(mask_shape) > 0
    tokens = math.prod(x_shape[:-1])
    return int(sparse_flops(schedule, tokens, w_shape[1], w_shape[0], a_shape[0], dropout=dropout)[0])


@register_flop_formula(torch.ops.lorafx.lora_linear_sparse_backward)
def _backward_flops(dy_shape, x_shape, w_shape, a_shape, bb_shape, mask_shape, scale, p, schedule, grad, needs,
                    *args, out_shape=None, **kwargs) -> int:
    dropout = mask_shape is not None and math.prod(mask_shape) > 0
    return int(sparse_flops(schedule, math.prod(x_shape[:-1]), w_shape[1], w_shape[0], a_shape[0],
                            x_requires_grad=needs[0], w_requires_grad=needs[1], bias=needs[2],
                            a_requires_grad=needs[3], b_requires_grad=needs[4], dropout=dropout, grad=grad)[1])


# -- merging ---------------------------------------------------------------------------------------

def merged_sparse_weight(W: Tensor, delta: Tensor) -> Tensor:
    """W + delta ⊙ 1[W ≠ 0] in W's dtype, computed in float32 or wider, with W's zero
    pattern exactly: pruned entries stay 0, and a kept entry that the sum rounds to 0 is
    stored as the smallest normal number of W's dtype with the sum's sign (or W's, for an
    exact cancellation), so no kept entry becomes a zero.  ``delta`` is in W's layout."""
    acc = torch.promote_types(W.dtype, torch.float32)
    kept = W != 0
    total = W.detach().to(acc) + delta.to(acc)
    out = torch.where(kept, total, 0).to(W.dtype)
    lost = kept & (out == 0)
    if bool(lost.any()):
        sign = torch.where(total != 0, torch.sign(total), torch.sign(W.detach().to(acc)))
        out = torch.where(lost, (sign * torch.finfo(W.dtype).tiny).to(W.dtype), out)
    return out


# -- the kind --------------------------------------------------------------------------------------

OP = torch.ops.lorafx.lora_linear_sparse.default


class SparseKind(L.AdapterKind):
    """``lora_linear_sparse``: y = x ((W + s·B A) ⊙ M)ᵀ + b with M = 1[W ≠ 0].

    Requires a LoraRecord and a SparseRecord on the node.  Provides its own schedule family
    (f2b5 / f2b4 in surrogate mode, f2b4 in exact mode), cost, masked merge and unmerge;
    preserves W's zero pattern through training and merge.
    """

    name = "lora_linear_sparse"
    ops = (OP,)
    helper_ops = (torch.ops.lorafx.lora_linear_sparse_backward.default,)
    scheduled = True

    def check(self, node) -> Optional[str]:
        problem = super().check(node)
        if problem is None and get_record(node, SparseRecord) is None:
            problem = f"{self.name} node {node.name} has no SparseRecord in node.meta['lorafx']"
        return problem

    def _flags(self, node, q: InputQuery) -> dict:
        v = self.view(node)
        return {"x_requires_grad": q.needs_grad(v.x), "w_requires_grad": q.needs_grad(v.weight),
                "a_requires_grad": q.needs_grad(v.lora_A), "b_requires_grad": q.needs_grad(v.lora_B),
                "bias": v.bias is not None, "dropout": self.dropout_active(node, q), "grad": v.grad}

    def cost(self, node, q: InputQuery) -> NodeCost:
        v = self.view(node)
        n, m, r = self.dims(node, q)
        tokens = q.tokens(v.x)
        flags = self._flags(node, q)
        fwd, bwd = sparse_flops(self.rule(node), tokens, n, m, r, **flags)
        other = 2 * n * m  # the mask compare and apply on W'
        if v.bias is not None:
            other += tokens * m
        if flags["dropout"]:
            other += 2 * tokens * n
        return NodeCost(sympy.sympify(fwd), sympy.sympify(bwd), sympy.sympify(other))

    def schedule_family(self, node, q: InputQuery, *, keep_xa: bool = False) -> ScheduleFamily:
        n, m, r = (int(d) for d in self.dims(node, q))
        flags = self._flags(node, q)
        flags["dropout"] = isinstance(self.view(node).dropout_mask, torch.fx.Node)
        return ScheduleFamily(
            candidates=sparse_candidates(flags["grad"]),
            key=(("n", n), ("m", m), ("r", r), *sorted(flags.items())),
            flops=lambda name, b: sparse_flops(name, b, n, m, r, **flags),
            bytes=lambda name, b: sparse_bytes(name, b, n, m, r, **flags))

    def fit_rule(self, node, rule: Rule) -> Rule:
        """The nearest rule this node can run: forward f2; b5 where the rule has b1/b5 and the
        mode allows it, else b4."""
        grad = self.view(node).grad
        return rule.map(lambda s: S.Schedule("f2", "b5" if grad != "exact" and s.bwd in ("b1", "b5") else "b4"))

    def set_rule(self, graph, node, rule: Rule) -> bool:
        return set_args(node, schedule=str(self.fit_rule(node, rule)))

    # merging -------------------------------------------------------------------------------
    def kept_records(self, node) -> list:
        return [get_record(node, SparseRecord)]

    def merged_weight(self, root, node) -> Tensor:
        rec = get_record(node, LoraRecord)
        W = get_attr(root, rec.weight)
        acc = torch.promote_types(W.dtype, torch.float32)
        delta = rec.scale * (get_attr(root, rec.lora_B).detach().to(acc) @ get_attr(root, rec.lora_A).detach().to(acc))
        return merged_sparse_weight(W, delta.t() if rec.weight_transposed else delta)

    def unmerge(self, graph, linear, record: LoraRecord, *, train: bool, created_by: str):
        sparse = get_record(linear, SparseRecord)
        node = L.LINEAR.unmerge(graph, linear, record, train=train, created_by=created_by)
        self.adopt(node, sparse)
        return node

    def adopt(self, node: torch.fx.Node, record: SparseRecord) -> None:
        """Make the ``lora_linear`` ``node`` a sparse one (``ApplySparsity``)."""
        set_args(node, OP, schedule="f2b5" if record.grad == "surrogate" else "f2b4", grad=record.grad)
        set_record(node, record)


SPARSE = register_kind(SparseKind())
