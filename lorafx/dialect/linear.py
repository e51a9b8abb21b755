"""The ``lora_linear`` kind: one adapted linear, and its keep-XA variant.

``torch.ops.lorafx.lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_mask, dropout_p, schedule="f1b1")``
    Schema: ``lorafx::lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A,
    Tensor lora_B, float scale, Tensor? dropout_mask=None, float dropout_p=0.,
    str schedule="f1b1") -> Tensor``.
    y = x W^T + b + scale * (d(x) A^T) B^T, where d(x) = x * mask / (1 - p) when a
    non-empty boolean ``dropout_mask`` is given and d(x) = x otherwise.
    ``weight`` is (out, in), ``lora_A`` is (r, in), ``lora_B`` is (out, r) (PEFT's layout).
    ``schedule`` is a RunLoRA schedule (``f1``/``f2`` forward x ``b1``/``b3``/``b4``/``b5``
    backward) or a dispatch rule on the token count, ``"f1b1|4096:f2b5"`` (below 4096
    tokens f1b1, from 4096 f2b5), applied to ``x.numel() // in_features`` at run time;
    the formulas and the fall-backs under dropout are in ``lorafx/schedules.py``.
    Backward saves only x, W, A, B and the boolean mask; x A^T is recomputed.
    The skinny (rank-r) products x A^T and dy B are formed as r-row matrices
    (A d(x)^T, B^T dy^T) below r = ``COLUMN_RANK`` (32) and as r-column ones from
    there: same arithmetic, but BLAS runs the r-row shapes up to several times
    faster at small r and the r-column ones faster at large r (see ``xa_t``).

``torch.ops.lorafx.lora_linear_xa(...same..., schedule="f1b1k") -> (y, xa)``
    The same, for the schedules that keep XA (``f1b1k``, ``f1b5k``, ``f2b1k``, ``f2b5k``):
    also returns xa = A d(x)^T (r, tokens), a non-differentiable output that autograd
    saves (with x, W, A, B, mask) so that backward does not recompute it.  A
    ``custom_op``'s setup_context sees only inputs and outputs, hence the second output;
    graphs take ``getitem(node, 0)``.

``torch.ops.lorafx.lora_linear_backward(dy, x, W, A, B, mask, xa, scale, p, schedule, needs)``
    The backward as one op, used when autograd's backward is traced (torch.compile), so
    a rule is applied at run time there too; eager backward runs the same kernels
    (``backward``) directly, so FlopCounterMode sees their GEMMs.

``torch.ops.lorafx.dropout_mask(x, p, train)``
    A boolean keep-mask shaped like ``x`` when ``train`` and p > 0, else an empty
    tensor (which ``lora_linear`` reads as "no dropout").  SetTrainingMode flips
    ``train``, exactly as it flips ``aten.dropout``.

The kernels ``forward`` and ``backward`` are plain functions of tensors (the recompute
and folded kinds call them too); ``schedule_counts`` counts which forward/backward
kernels ran.  All ops have fake kernels, and FLOP formulas for ``FlopCounterMode``
that follow the schedule; the adapter ops have autograd formulas.

Kind: ``LINEAR`` owns lora_linear and lora_linear_xa (dropout_mask and the backward op
as helpers).  Requires a ``LoraRecord`` on each node.  Its schedule family is the RunLoRA
schedules (``lorafx.schedules.candidates``); a node switches between the two ops as its
rule keeps XA or not.  Canonical form: ``lora_linear`` (the keep-XA variant drops its
getitem users).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import operator
from typing import List, Optional, Sequence, Tuple

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from lorafx import schedules as S
from lorafx.graph_utils import find_linear_sites, safe_name
from lorafx.meta import LoraRecord, OriginRecord, get_record, set_record
from lorafx.schedules import DEFAULT_KEEP_XA_SCHEDULE, DEFAULT_SCHEDULE, Rule, effective, lora_flops

from .mha import MHA, mha_peft_tensors, mha_sites
from .registry import (InputQuery, NodeCost, OpKind, ScheduleFamily, args_of, copy_meta, create, getitem_index,
                       register_kind, replace_node, set_args)

__all__ = [
    "lora_linear", "lora_linear_xa", "lora_linear_backward", "dropout_mask", "lora_linear_reference",
    "schedule_counts", "forward", "backward", "run_backward", "COLUMN_RANK", "AdapterKind", "LinearKind", "LINEAR",
    "with_lora_bias",
]

# How often each forward / backward kernel ran: {("fwd", "f1"): count, ("bwd", "b5"): ...}.
# Cheap (one dict increment per call); tests and benchmarks read it to see what a rule dispatched to.
schedule_counts: collections.Counter = collections.Counter()


# -- kernels ---------------------------------------------------------------------------------------

def flat(x: Tensor) -> Tensor:
    """x as a (tokens, features) matrix (x itself when it is one: no view to make)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def dropped(x2: Tensor, mask: Optional[Tensor], p: float) -> Tensor:
    """d(x) = x * mask / (1 - p) for a non-empty mask, else x."""
    if mask is None or mask.numel() == 0:
        return x2
    return x2 * flat(mask) * (1.0 / (1.0 - p))


# The skinny rank-r products x A^T and dy B: at small r BLAS (MKL) runs the r-row form
# (A x^T, B^T dy^T) fastest, up to 2-6x; from r = 32 the r-column form (x A^T, dy B) is as
# fast or faster, ~15% at r=64 (tools/bench_rank_products.py --rank 8 / --rank 64).
COLUMN_RANK = 32


def xa_t(x2: Tensor, lora_A: Tensor) -> Tensor:
    """(x A^T)^T, shape (r, tokens): a transposed view of x A^T when r >= COLUMN_RANK."""
    # F.linear(a, b) is a.mm(b.t()) with the transpose taken in C++: one Python call fewer
    return F.linear(x2, lora_A).t() if lora_A.shape[0] >= COLUMN_RANK else F.linear(lora_A, x2)


def dyb_t(dy2: Tensor, lora_B: Tensor) -> Tensor:
    """(dy B)^T, shape (r, tokens): a transposed view of dy B when r >= COLUMN_RANK."""
    return dy2.mm(lora_B).t() if lora_B.shape[1] >= COLUMN_RANK else F.linear(lora_B.t(), dy2)


def check_rule(rule: Rule, keep_xa: bool, op: str) -> None:
    """Raise ValueError unless ``rule`` keeps XA exactly when the op does."""
    if rule.keep_xa != keep_xa:
        other = "lora_linear_xa" if not keep_xa else "lora_linear"
        raise ValueError(f"lorafx.{op}: schedule {str(rule)!r} "
                         + ("keeps XA ('k'); run it with lorafx.lora_linear_xa" if not keep_xa else
                            "does not keep XA; lora_linear_xa needs 'k' schedules (f1b1k, f1b5k, f2b1k, f2b5k)")
                         + f" (or use lorafx.{other})")


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scale: float,
            mask: Optional[Tensor], p: float, rule: Rule) -> Tuple[Tensor, Optional[Tensor]]:
    """The forward kernels.  Returns (y, xa_t) where xa_t = A d(x)^T (r, tokens) when it was
    formed (always for f1 and for the 'k' schedules), else None."""
    x2 = flat(x)
    dropout = mask is not None and mask.numel() > 0
    mixed = lora_A.dtype != x.dtype  # adapters in their own dtype (adapter_dtype=): f1, see mixed_dtype()
    s = mixed_dtype(effective(rule.resolve(x2.shape[0]), dropout), mixed)
    schedule_counts[("fwd", s.fwd)] += 1
    xa = None
    if s.fwd == "f1":  # x W^T + s (A d(x)^T)^T B^T
        y = F.linear(x2, weight, bias)  # addmm(bias, x2, W^T) / x2.mm(W^T)
        xa = xa_t(dropped(x2.to(lora_A.dtype) if mixed else x2, mask, p), lora_A)  # (r, tokens) = (d(x) A^T)^T
        if mixed:  # PEFT's order: base in x's dtype, the sum in the adapters' dtype, rounded back once
            y = torch.addmm(y.to(lora_A.dtype), xa.t(), lora_B.t(), alpha=scale).to(x.dtype)
        else:
            y.addmm_(xa.t(), lora_B.t(), alpha=scale)
    else:  # f2: x (W + s B A)^T; d(x) = x here (effective() sent active dropout to f1)
        merged = torch.addmm(weight, lora_B, lora_A, alpha=scale)
        y = F.linear(x2, merged, bias)
        del merged
        if s.keep_xa:
            xa = xa_t(x2, lora_A)
    return (y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])), xa


def mixed_dtype(s: S.Schedule, mixed: bool) -> S.Schedule:
    """``s`` for adapters in another dtype than x and W (``adapter_dtype="float32"`` on a bf16
    model, PEFT's ``autocast_adapter_dtype``): the merged-weight kernels (f2, b4, b5) would round
    W + s B A to W's dtype, losing the small adapter updates the wider dtype is there to keep,
    so the adapter products run apart from W in the adapters' dtype: f1 with b1 (b4 -> b3)."""
    if not mixed or (s.fwd == "f1" and s.bwd not in ("b4", "b5")):
        return s
    return S.Schedule("f1", {"b4": "b3", "b5": "b1"}.get(s.bwd, s.bwd), s.keep_xa)


def backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, mask: Optional[Tensor],
             xa: Optional[Tensor], s: float, p: float, rule: Rule, needs: Sequence[bool]):
    """The backward kernels: (dx, dW, dbias, dA, dB), None where ``needs`` (the same five
    flags) says no gradient is needed.  ``xa``: the forward's A d(x)^T, or None to recompute it."""
    # The rank-r intermediates are (r, tokens) matrices (or transposed views of (tokens, r)
    # ones from r = COLUMN_RANK, see xa_t); the adapter gradients are formed with r rows:
    # at small r, sgemm is 2-6x slower on (out, tokens) @ (tokens, r) than on the
    # transposed problem, which computes the same numbers.  Accumulating GEMMs use
    # torch.addmm(..., out=acc) (counted by FlopCounterMode; Tensor.addmm_ is not), so
    # lorafx.schedules' formulas match exactly.
    need_x, need_w, need_b, need_a, need_bb = needs
    x2, dy2 = flat(x), flat(dy)
    dropout = mask is not None and mask.numel() > 0
    mixed = lora_A.dtype != x.dtype  # the adapter products in the adapters' dtype (see mixed_dtype)
    sched = mixed_dtype(effective(rule.resolve(x2.shape[0]), dropout), mixed)
    schedule_counts[("bwd", sched.bwd)] += 1
    gram = sched.bwd in ("b3", "b4") and (need_a or need_bb)
    merged_dx = need_x and sched.bwd in ("b4", "b5")
    lowrank_dx = need_x and not merged_dx
    dya = dy2.to(lora_A.dtype) if mixed else dy2
    dx = dw = db = da = dbb = None
    z_t = None
    if lowrank_dx or (need_a and not gram):
        z_t = dyb_t(dya, lora_B).mul_(s)  # s (dy B)^T, (r, tokens)
    if merged_dx:  # b5/b4: dX through the merged weight W + s B A (no dropout here)
        dx = dy2.mm(torch.addmm(weight, lora_B, lora_A, alpha=s))
    elif lowrank_dx:  # b1/b3: dX = dy W + d(z^T A)
        dx = dy2.mm(weight)
        if dropout or mixed:
            dx.add_(dropped(z_t.t().mm(lora_A), mask, p).to(dx.dtype))
        else:
            torch.addmm(dx, z_t.t(), lora_A, out=dx)
    if dx is not None:
        dx = dx if x.dim() == 2 else dx.view(x.shape)
    if need_a or need_bb:
        xd = dropped(x2.to(lora_A.dtype) if mixed else x2, mask, p)
        if gram:  # b3/b4: G = dy^T d(x) (out, in), then both adapter grads from it
            g = dya.t().mm(xd)
            if need_a:
                da = lora_B.t().mm(g).mul_(s)  # s B^T G
            if need_bb:
                dbb = lora_A.mm(g.t()).mul_(s).t().contiguous()  # s G A^T, formed as (r, out)
            del g
        else:
            if need_a:
                da = z_t.mm(xd)  # s (dy B)^T d(x)
            if need_bb:
                if xa is None:
                    xa = xa_t(xd, lora_A)  # recomputed (d(x) A^T)^T, (r, tokens)
                dbb = xa.mm(dya).mul_(s).t().contiguous()  # s dy^T (d(x) A^T)
    if need_w:
        dw = dy2.t().mm(x2)
    if need_b:
        db = dy2.sum(0)
    return dx, dw, db, da, dbb


def _traced(*tensors) -> bool:
    """Whether a tensor is fake (the backward is being traced).  A plain tensor that is not a
    functional wrapper is real: checked first, as ``is_fake`` costs microseconds per call."""
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or torch._is_functional_tensor(t)):
            from torch._subclasses.fake_tensor import is_fake
            return any(t is not None and is_fake(t) for t in tensors)
    return False


def run_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, mask: Optional[Tensor],
                 xa: Optional[Tensor], s: float, p: float, rule: Rule, needs: Sequence[bool]):
    """``backward`` from an autograd formula: eagerly the aten GEMMs themselves (what
    FlopCounterMode counts); when the backward is traced (torch.compile, export), one
    ``lora_linear_backward`` op, so the rule is applied at run time there too."""
    if _traced(dy, x):
        grads = torch.ops.lorafx.lora_linear_backward(dy, x, weight, lora_A, lora_B, mask, xa, s, p, str(rule),
                                                      list(needs))
        return tuple(g if need else None for g, need in zip(grads, needs))
    return backward(dy, x, weight, lora_A, lora_B, mask, xa, s, p, rule, needs)


def fake_checks(x, weight, lora_A, lora_B, op: str = "lora_linear") -> None:
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"{op}: x and weight disagree on in_features")
    torch._check(lora_A.shape[1] == weight.shape[1], lambda: f"{op}: lora_A must be (r, in_features)")
    torch._check(lora_B.shape[0] == weight.shape[0], lambda: f"{op}: lora_B must be (out_features, r)")
    torch._check(lora_B.shape[1] == lora_A.shape[0], lambda: f"{op}: lora_A and lora_B disagree on r")


# -- ops -------------------------------------------------------------------------------------------

@torch.library.custom_op("lorafx::dropout_mask", mutates_args=())
def dropout_mask(x: Tensor, p: float, train: bool) -> Tensor:
    if not train or p <= 0.0:
        return x.new_empty((0,), dtype=torch.bool)
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)


@dropout_mask.register_fake
def _(x, p, train):
    if not train or p <= 0.0:
        return x.new_empty((0,), dtype=torch.bool)
    return x.new_empty(x.shape, dtype=torch.bool)


@torch.library.custom_op("lorafx::lora_linear", mutates_args=())
def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    schedule: str = DEFAULT_SCHEDULE,
) -> Tensor:
    rule = Rule.parse(schedule)
    check_rule(rule, False, "lora_linear")
    return forward(x, weight, bias, lora_A, lora_B, scale, dropout_mask, dropout_p, rule)[0]


@torch.library.custom_op("lorafx::lora_linear_xa", mutates_args=())
def lora_linear_xa(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    schedule: str = DEFAULT_KEEP_XA_SCHEDULE,
) -> Tuple[Tensor, Tensor]:
    rule = Rule.parse(schedule)
    check_rule(rule, True, "lora_linear_xa")
    y, xa = forward(x, weight, bias, lora_A, lora_B, scale, dropout_mask, dropout_p, rule)
    return y, xa.contiguous()  # (r, tokens) row-major, as the fake kernel says


@lora_linear.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.0, schedule=DEFAULT_SCHEDULE):
    fake_checks(x, weight, lora_A, lora_B)
    Rule.parse(schedule)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@lora_linear_xa.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.0, schedule=DEFAULT_KEEP_XA_SCHEDULE):
    fake_checks(x, weight, lora_A, lora_B)
    Rule.parse(schedule)
    tokens = 1
    for d in x.shape[:-1]:
        tokens = tokens * d
    return x.new_empty((*x.shape[:-1], weight.shape[0])), lora_A.new_empty((lora_A.shape[0], tokens))


def _setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, mask, p, schedule = inputs
    ctx.rule, ctx.scale, ctx.p, ctx.has_bias = Rule.parse(schedule), scale, p, bias is not None
    # Only the inputs (never a second copy of x, never the merged weight); the boolean mask.
    ctx.save_for_backward(x, weight, lora_A, lora_B, mask)


def _setup_xa(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, mask, p, schedule = inputs
    ctx.rule, ctx.scale, ctx.p, ctx.has_bias = Rule.parse(schedule), scale, p, bias is not None
    ctx.mark_non_differentiable(output[1])
    # The inputs plus the small xa = A d(x)^T (r, tokens), which backward then does not recompute.
    ctx.save_for_backward(x, weight, lora_A, lora_B, mask, output[1])


def _backward(ctx, dy, *ignored):
    x, weight, lora_A, lora_B, mask, *kept = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    needs = (need_x, need_w, need_b and ctx.has_bias, need_a, need_bb)
    grads = run_backward(dy, x, weight, lora_A, lora_B, mask, kept[0] if kept else None, ctx.scale, ctx.p,
                         ctx.rule, needs)
    return (*grads, None, None, None, None)


lora_linear.register_autograd(_backward, setup_context=_setup)
lora_linear_xa.register_autograd(_backward, setup_context=_setup_xa)


@torch.library.custom_op("lorafx::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    dropout_mask: Optional[Tensor],
    xa: Optional[Tensor],
    scale: float,
    dropout_p: float,
    schedule: str,
    needs: List[bool],
) -> List[Tensor]:
    """The backward of lora_linear[_xa] as one opaque op: (dx, dW, dbias, dA, dB), an empty
    tensor for each gradient not in ``needs``.  Used when the backward is traced
    (torch.compile / AOTAutograd), so the schedule rule is applied at run time there too
    instead of being fixed (and guarded) at trace time."""
    grads = backward(dy, x, weight, lora_A, lora_B, dropout_mask, xa, scale, dropout_p, Rule.parse(schedule),
                     tuple(needs))
    return [g if g is not None else dy.new_empty((0,)) for g in grads]


@lora_linear_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, dropout_mask, xa, scale, dropout_p, schedule, needs):
    likes = (x, weight, weight.new_empty((weight.shape[0],)), lora_A, lora_B)
    return [t.new_empty(t.shape) if need else dy.new_empty((0,)) for t, need in zip(likes, needs)]


@register_flop_formula(torch.ops.lorafx.lora_linear_backward)
def _backward_flops(dy_shape, x_shape, w_shape, a_shape, bb_shape, mask_shape, xa_shape, scale, p,
                    schedule, needs, *args, out_shape=None, **kwargs) -> int:
    tokens = math.prod(x_shape[:-1])
    dropout = mask_shape is not None and math.prod(mask_shape) > 0
    return int(lora_flops(schedule, tokens, w_shape[1], w_shape[0], a_shape[0], x_requires_grad=needs[0],
                          w_requires_grad=needs[1], bias=needs[2], a_requires_grad=needs[3],
                          b_requires_grad=needs[4], dropout=dropout)[1])


@register_flop_formula([torch.ops.lorafx.lora_linear, torch.ops.lorafx.lora_linear_xa])
def _forward_flops(x_shape, w_shape, b_shape, a_shape, bb_shape, scale=1.0, mask_shape=None, p=0.0,
                   schedule=None, *args, out_shape=None, **kwargs) -> int:
    """The forward GEMMs of the schedule the rule picks for this token count (lorafx.schedules)."""
    if schedule is None:
        keeps = isinstance(out_shape, (tuple, list)) and len(out_shape) == 2 and not isinstance(out_shape[0], int)
        schedule = kwargs.get("schedule", DEFAULT_KEEP_XA_SCHEDULE if keeps else DEFAULT_SCHEDULE)
    if mask_shape is None:
        mask_shape = kwargs.get("dropout_mask")
    tokens = math.prod(x_shape[:-1])
    dropout = mask_shape is not None and math.prod(mask_shape) > 0
    return int(lora_flops(schedule, tokens, w_shape[1], w_shape[0], a_shape[0], dropout=dropout)[0])


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.0,
                          schedule=None):
    """Plain-autograd definition of ``lora_linear`` (PEFT's formula), for tests; every
    schedule computes this (``schedule`` is accepted and ignored)."""
    y = torch.nn.functional.linear(x, weight, bias)
    xd = x
    if dropout_mask is not None and dropout_mask.numel() > 0:
        xd = x * dropout_mask / (1.0 - dropout_p)
    return y + scale * torch.nn.functional.linear(torch.nn.functional.linear(xd, lora_A), lora_B)


# -- the kind --------------------------------------------------------------------------------------

OP = torch.ops.lorafx.lora_linear.default
XA_OP = torch.ops.lorafx.lora_linear_xa.default
MASK_OP = torch.ops.lorafx.dropout_mask.default


def _drop_k(s: S.Schedule) -> S.Schedule:
    return S.Schedule(s.fwd, s.bwd, False)


class AdapterKind(OpKind):
    """The shared part of the single-adapter kinds whose arguments are ``lora_linear``'s
    (x, weight, bias, lora_A, lora_B, scale, dropout_mask, dropout_p, schedule): their
    dims, dropout and cost under their rule (``lorafx.schedules.lora_flops``)."""

    def weight(self, node):
        """The node's frozen-weight argument."""
        return self.view(node).weight

    def saved_inputs(self, node) -> set:
        v = self.view(node)
        return {a for a in (v.x, v.weight, v.lora_A, v.lora_B, v.dropout_mask) if isinstance(a, torch.fx.Node)}

    def dims(self, node, q: InputQuery):
        """(n, m, r): in and out features and rank, from the input shapes (or the record)."""
        rec = get_record(node, LoraRecord)
        w, a = q.shape(self.weight(node)), q.shape(self.view(node).lora_A)
        m, n = (w[0], w[1]) if w is not None else (rec.out_features, rec.in_features)
        r = a[0] if a is not None else rec.r
        return n, m, r

    def dropout_active(self, node, q: InputQuery) -> bool:
        """Whether the adapter's dropout mask is active: a ``dropout_mask`` node in train mode
        with p > 0, or a non-empty mask tensor with p > 0."""
        v = self.view(node)
        mask = v.dropout_mask
        if not isinstance(mask, torch.fx.Node):
            return False
        if mask.op == "call_function" and mask.target is MASK_OP:
            mv = args_of(mask)
            return bool(mv.train) and bool(mv.p) and float(mv.p) > 0
        shape = q.shape(mask)
        return shape is not None and math.prod(shape) != 0 and bool(v.dropout_p)

    def cost(self, node, q: InputQuery) -> NodeCost:
        v = self.view(node)
        n, m, r = self.dims(node, q)
        tokens = q.tokens(v.x)
        dropout = self.dropout_active(node, q)
        fwd, bwd = lora_flops(self.rule(node), tokens, n, m, r, x_requires_grad=q.needs_grad(v.x),
                              w_requires_grad=q.needs_grad(self.weight(node)), a_requires_grad=q.needs_grad(v.lora_A),
                              b_requires_grad=q.needs_grad(v.lora_B), dropout=dropout)
        other = 0
        if v.bias is not None:
            other += tokens * m  # bias add
        if dropout:
            other += 2 * tokens * n  # d(x) = x * mask / (1 - p)
        return NodeCost(sympy.sympify(fwd), sympy.sympify(bwd), sympy.sympify(other))


class LinearKind(AdapterKind):
    """``lora_linear`` / ``lora_linear_xa``: y = x Wᵀ + b + s·(d(x) Aᵀ) Bᵀ, one adapter.

    Requires a LoraRecord on the node.  Provides the RunLoRA schedule family, the cost
    formulas of ``lorafx.schedules`` and the canonical ``lora_linear`` form.  Also builds
    new adapter nodes (``build``) for InsertLoRA and UnmergeLoRA.
    """

    name = "lora_linear"
    layer = "Linear"
    supports_lora_bias = True  # PEFT's lora_bias: build adds B's bias into the bias argument (with_lora_bias)
    combinable = True  # several adapters at one site: A and scale·B stacked (lorafx/adapters.py)
    ops = (OP, XA_OP)
    helper_ops = (MASK_OP, torch.ops.lorafx.lora_linear_backward.default)
    scheduled = True

    def keeps_xa(self, node) -> bool:
        """Whether the node is the keep-XA variant (returns (y, xa); graphs read getitem(node, 0))."""
        return node.target is XA_OP

    def grad_outputs(self, node):
        return (True, False) if node.target is XA_OP else None

    def describe(self, node) -> str:
        return "xa kept" if node.target is XA_OP else ""

    # schedules ----------------------------------------------------------------------------
    def schedule_family(self, node, q: InputQuery, *, keep_xa: bool = False) -> ScheduleFamily:
        v = self.view(node)
        n, m, r = (int(d) for d in self.dims(node, q))
        flags = {"x_requires_grad": q.needs_grad(v.x), "w_requires_grad": q.needs_grad(v.weight),
                 "a_requires_grad": q.needs_grad(v.lora_A), "b_requires_grad": q.needs_grad(v.lora_B),
                 "bias": v.bias is not None, "dropout": isinstance(v.dropout_mask, torch.fx.Node)}
        xv, av = q.value(v.x), q.value(v.lora_A)
        dtype = xv.dtype if isinstance(xv, torch.Tensor) else torch.float32
        device = str(xv.device) if isinstance(xv, torch.Tensor) else "cpu"
        if device == "meta" and isinstance(av, torch.Tensor):
            device = str(av.device)
        p = float(v.dropout_p or 0.0) if flags["dropout"] else 0.0

        def time(names, tokens, repeats):
            return S.time_schedules(names, tokens, n, m, r, dtype=dtype, device=device, repeats=repeats,
                                    x_requires_grad=flags["x_requires_grad"],
                                    w_requires_grad=flags["w_requires_grad"], bias=flags["bias"], dropout=p)

        return ScheduleFamily(
            candidates=S.candidates(dropout=flags["dropout"], keep_xa=keep_xa),
            key=(("n", n), ("m", m), ("r", r), ("keep_xa", keep_xa), *sorted(flags.items())),
            flops=lambda name, b: S.lora_flops(name, b, n, m, r, **flags),
            bytes=lambda name, b: S.lora_bytes(name, b, n, m, r, **flags),
            time=time, time_key=(("dtype", str(dtype)), ("device", device)))

    def set_rule(self, graph, node, rule: Rule) -> bool:
        """Set the schedule, switching between lora_linear and lora_linear_xa as the rule needs."""
        want = XA_OP if rule.keep_xa else OP
        if node.target is want:
            return set_args(node, schedule=str(rule))
        if rule.keep_xa:  # lora_linear -> lora_linear_xa + getitem(., 0)
            val = node.meta.get("val")
            with graph.inserting_after(node):
                first = graph.call_function(operator.getitem, (node, 0))
            node.replace_all_uses_with(first, delete_user_cb=lambda u: u is not first)
            set_args(node, want, schedule=str(rule))
            if isinstance(val, torch.Tensor):
                first.meta["val"] = val
                try:
                    tokens = val.numel() // val.shape[-1] if val.shape[-1] else 0
                    node.meta["val"] = (val, val.new_empty((args_of(node).lora_A.meta["val"].shape[0], tokens)))
                except Exception:
                    node.meta["val"] = (val, None)
            copy_meta(node, first)
        else:
            self._drop_xa_output(graph, node)
            set_args(node, want, schedule=str(rule))
        return True

    def _drop_xa_output(self, graph, node) -> None:
        """Replace the getitem(node, 0) users by the node itself (which then returns y only)."""
        for user in list(node.users):
            if getitem_index(user) == 0:
                user.replace_all_uses_with(node)
                graph.erase_node(user)
            else:
                raise ValueError(f"{node.name}'s XA output is used by {user.name}; "
                                 "it cannot become a lora_linear without XA")
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            node.meta["val"] = val[0]

    # canonical form ------------------------------------------------------------------------
    def canonical(self, graph, node):
        if node.target is XA_OP:
            self._drop_xa_output(graph, node)
            set_args(node, OP, schedule=str(self.rule(node).map(_drop_k)))
        return [node]

    def set_training(self, node, train: bool) -> bool:
        if node.target is MASK_OP:
            return set_args(node, train=train)
        return False

    # building adapters -----------------------------------------------------------------------
    def build(self, graph, x, weight, bias, record: LoraRecord, *, train: bool, created_by: str,
              name: Optional[str] = None) -> torch.fx.Node:
        """A new ``lora_linear`` node for ``record`` (before the insertion point): the adapter's
        get_attrs, a dropout mask when ``record.dropout`` > 0, the Origin and Lora records.
        ``weight`` is the stored weight's node (transposed here for a Conv1D layout)."""
        w = graph.call_function(torch.ops.aten.t.default, (weight,)) if record.weight_transposed else weight
        bias = with_lora_bias(graph, bias, w, record, created_by)
        a, b = graph.get_attr(record.lora_A), graph.get_attr(record.lora_B)
        mask = None
        if record.dropout > 0:
            mask = create(graph, MASK_OP, x=x, p=record.dropout, train=train)
            set_record(mask, OriginRecord(record.site, created_by=created_by))
        new = create(graph, OP, name=name or safe_name(record.site) + "_lora", x=x, weight=w, bias=bias, lora_A=a, lora_B=b, scale=record.scale,
                     dropout_mask=mask, dropout_p=record.dropout)
        set_record(new, OriginRecord(record.site, "Linear", created_by=created_by))
        set_record(new, record)
        return new

    def find_sites(self, gm):
        return mha_sites(find_linear_sites(gm))  # (an nn.MultiheadAttention's two projections named as PEFT does)

    def insert(self, gm, site, record: LoraRecord, x, *, train: bool, created_by: str):
        g = gm.graph
        if site.layer == MHA and getattr(record, "lora_bias", None) is not None:
            raise ValueError(f"InsertLoRA: lora_bias=True on {site.module} ({MHA}): PEFT merges only B·A into an "
                             "attention's weights, so B's bias would never apply; compile with lora_bias=False, or "
                             f"leave {site.extra.get('target', site.module)} out of target_modules")
        if site.layer == MHA and record.dropout:  # PEFT runs these merged: its lora_dropout never applies
            record = dataclasses.replace(record, dropout=0.0)
        with g.inserting_before(site.node):
            new = self.build(g, x, site.weight, site.bias, record, train=train, created_by=created_by)
        replace_node(g, site.node, new)  # its users, provenance and value
        return new

    def peft_tensors(self, record: LoraRecord):
        return mha_peft_tensors(record) if record.layer == MHA else super().peft_tensors(record)

    def unmerge(self, graph, linear, record: LoraRecord, *, train: bool, created_by: str):
        v = args_of(linear)
        weight = args_of(v.weight).self if record.weight_transposed else v.weight  # t(W) -> W
        bias = v.bias
        if record.lora_bias is not None:  # the merged linear reads the merged bias: build from the layer's own
            bias = graph.get_attr(record.bias) if record.bias is not None else None
        return self.build(graph, v.input, weight, bias, record, train=train, created_by=created_by)


def with_lora_bias(graph, bias, weight, record: LoraRecord, created_by: str, layer: str = "Linear"):
    """The bias argument of an adapter node: ``bias`` itself, or with PEFT's ``lora_bias`` the
    layer's bias plus s·b (b: B's bias, ``record.lora_bias``; s·b alone for a layer without
    bias), in the weight's dtype.  Every kind passes its bias argument through and returns its
    gradient, so b trains without a kind of its own; MergeLoRA folds it into the layer's bias."""
    if record.lora_bias is None:
        return bias
    lb = graph.get_attr(record.lora_bias)
    if bias is None:
        total = graph.call_function(torch.ops.aten.mul.Tensor, (lb, record.scale))
    else:
        total = graph.call_function(torch.ops.aten.add.Tensor, (bias, lb), {"alpha": record.scale})
    out = graph.call_function(torch.ops.aten.type_as.default, (total, weight))
    for n in (total, out):
        set_record(n, OriginRecord(record.site, layer, created_by=created_by))
    return out


LINEAR = register_kind(LinearKind())

