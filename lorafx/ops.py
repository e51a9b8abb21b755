"""The LoRA dialect: high-level ops that adapted graphs are made of.

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
    faster at small r and the r-column ones faster at large r (see ``_xa_t``).

``torch.ops.lorafx.lora_linear_xa(...same..., schedule="f1b1k") -> (y, xa)``
    The same, for the schedules that keep XA (``f1b1k``, ``f1b5k``, ``f2b1k``, ``f2b5k``):
    also returns xa = A d(x)^T (r, tokens), a non-differentiable output that autograd
    saves (with x, W, A, B, mask) so that backward does not recompute it.  A
    ``custom_op``'s setup_context sees only inputs and outputs, hence the second output;
    graphs take ``getitem(node, 0)``.

``torch.ops.lorafx.lora_linear_backward(dy, x, W, A, B, mask, xa, scale, p, schedule, needs)``
    The backward as one op, used when autograd's backward is traced (torch.compile), so
    a rule is applied at run time there too; eager backward runs the same kernels
    (``_backward_impl``) directly, so FlopCounterMode sees their GEMMs.

``torch.ops.lorafx.dropout_mask(x, p, train)``
    A boolean keep-mask shaped like ``x`` when ``train`` and p > 0, else an empty
    tensor (which ``lora_linear`` reads as "no dropout").  SetTrainingMode flips
    ``train``, exactly as it flips ``aten.dropout``.

All ops have fake kernels (so graphs re-export and run under meta tensors), and
FLOP formulas for ``FlopCounterMode`` that follow the schedule; the lora ops have
autograd formulas.  ``schedule_counts`` counts which forward/backward kernels ran.
"""
from __future__ import annotations

import collections
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .schedules import DEFAULT_SCHEDULE, effective, lora_flops, parse_rule, resolve, rule_keeps_xa

__all__ = [
    "lora_linear", "lora_linear_xa", "lora_linear_backward", "dropout_mask", "lora_linear_reference",
    "schedule_counts",
]

# How often each forward / backward kernel ran: {("fwd", "f1"): count, ("bwd", "b5"): ...}.
# Cheap (one dict increment per call); tests and benchmarks read it to see what a rule dispatched to.
schedule_counts: collections.Counter = collections.Counter()


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _dropped(x2: Tensor, mask: Optional[Tensor], p: float) -> Tensor:
    if mask is None or mask.numel() == 0:
        return x2
    return x2 * _flat(mask) * (1.0 / (1.0 - p))


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


# The skinny rank-r products x A^T and dy B: at small r BLAS (MKL) runs the r-row form
# (A x^T, B^T dy^T) fastest, up to 2-6x; from r = 32 the r-column form (x A^T, dy B) is as
# fast or faster, ~15% at r=64 (tools/bench_rank_products.py --rank 8 / --rank 64).
COLUMN_RANK = 32


def _xa_t(x2: Tensor, lora_A: Tensor) -> Tensor:
    """(x A^T)^T, shape (r, tokens): a transposed view of x A^T when r >= COLUMN_RANK."""
    return x2.mm(lora_A.t()).t() if lora_A.shape[0] >= COLUMN_RANK else lora_A.mm(x2.t())


def _dyb_t(dy2: Tensor, lora_B: Tensor) -> Tensor:
    """(dy B)^T, shape (r, tokens): a transposed view of dy B when r >= COLUMN_RANK."""
    return dy2.mm(lora_B).t() if lora_B.shape[1] >= COLUMN_RANK else lora_B.t().mm(dy2.t())


def _tokens(x2: Tensor) -> int:
    return x2.shape[0]


def _check_schedule(schedule: str, keep_xa: bool, op: str) -> None:
    if rule_keeps_xa(schedule) != keep_xa:
        other = "lora_linear_xa" if not keep_xa else "lora_linear"
        raise ValueError(f"lorafx.{op}: schedule {schedule!r} "
                         + ("keeps XA ('k'); run it with lorafx.lora_linear_xa" if not keep_xa else
                            "does not keep XA; lora_linear_xa needs 'k' schedules (f1b1k, f1b5k, f2b1k, f2b5k)")
                         + f" (or use lorafx.{other})")


def _forward(x, weight, bias, lora_A, lora_B, scale, mask, p, schedule, keep_xa):
    """The forward kernels.  Returns (y, xa_t) where xa_t = A d(x)^T (r, tokens) when it was
    formed (always for f1 and for the 'k' schedules), else None."""
    x2 = _flat(x)
    dropout = mask is not None and mask.numel() > 0
    s = effective(resolve(schedule, _tokens(x2)), dropout)
    schedule_counts[("fwd", s.fwd)] += 1
    xa_t = None
    if s.fwd == "f1":  # x W^T + s (A d(x)^T)^T B^T
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2.mm(weight.t())
        xa_t = _xa_t(_dropped(x2, mask, p), lora_A)  # (r, tokens) = (d(x) A^T)^T
        y.addmm_(xa_t.t(), lora_B.t(), alpha=scale)
    else:  # f2: x (W + s B A)^T; d(x) = x here (effective() sent active dropout to f1)
        merged = torch.addmm(weight, lora_B, lora_A, alpha=scale)
        y = torch.addmm(bias, x2, merged.t()) if bias is not None else x2.mm(merged.t())
        del merged
        if s.keep_xa:
            xa_t = _xa_t(x2, lora_A)
    return y.view(*x.shape[:-1], weight.shape[0]), xa_t


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
    _check_schedule(schedule, False, "lora_linear")
    return _forward(x, weight, bias, lora_A, lora_B, scale, dropout_mask, dropout_p, schedule, False)[0]


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
    schedule: str = "f1b1k",
) -> Tuple[Tensor, Tensor]:
    _check_schedule(schedule, True, "lora_linear_xa")
    y, xa_t = _forward(x, weight, bias, lora_A, lora_B, scale, dropout_mask, dropout_p, schedule, True)
    return y, xa_t.contiguous()  # (r, tokens) row-major, as the fake kernel says


def _fake_checks(x, weight, lora_A, lora_B):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "lora_linear: x and weight disagree on in_features")
    torch._check(lora_A.shape[1] == weight.shape[1], lambda: "lora_linear: lora_A must be (r, in_features)")
    torch._check(lora_B.shape[0] == weight.shape[0], lambda: "lora_linear: lora_B must be (out_features, r)")
    torch._check(lora_B.shape[1] == lora_A.shape[0], lambda: "lora_linear: lora_A and lora_B disagree on r")


@lora_linear.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.0, schedule=DEFAULT_SCHEDULE):
    _fake_checks(x, weight, lora_A, lora_B)
    parse_rule(schedule)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@lora_linear_xa.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.0, schedule="f1b1k"):
    _fake_checks(x, weight, lora_A, lora_B)
    parse_rule(schedule)
    tokens = 1
    for d in x.shape[:-1]:
        tokens = tokens * d
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((lora_A.shape[0], tokens))


def _setup_lora_linear(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, mask, p = inputs[:8]
    ctx.schedule = inputs[8] if len(inputs) > 8 else DEFAULT_SCHEDULE
    ctx.scale, ctx.p = scale, p
    ctx.has_bias = bias is not None
    # Only the inputs (never a second copy of x, never the merged weight); the boolean mask.
    ctx.save_for_backward(x, weight, lora_A, lora_B, mask)


def _setup_lora_linear_xa(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, mask, p = inputs[:8]
    ctx.schedule = inputs[8] if len(inputs) > 8 else "f1b1k"
    ctx.scale, ctx.p = scale, p
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])
    # The inputs plus the small xa = A d(x)^T (r, tokens), which backward then does not recompute.
    ctx.save_for_backward(x, weight, lora_A, lora_B, mask, output[1])


def _backward_impl(dy, x, weight, lora_A, lora_B, mask, xa_t, s, p, schedule, needs):
    """The backward kernels; returns (dx, dW, dbias, dA, dB), None where not needed."""
    # The rank-r intermediates are (r, tokens) matrices (or transposed views of (tokens, r)
    # ones from r = COLUMN_RANK, see _xa_t); the adapter gradients are formed with r rows:
    # at small r, sgemm is 2-6x slower on (out, tokens) @ (tokens, r) than on the
    # transposed problem, which computes the same numbers.  Accumulating GEMMs use
    # torch.addmm(..., out=acc) (counted by FlopCounterMode; Tensor.addmm_ is not), so
    # lorafx.schedules' formulas match exactly.
    need_x, need_w, need_b, need_a, need_bb = needs
    x2, dy2 = _flat(x), _flat(dy)
    dropout = mask is not None and mask.numel() > 0
    sched = effective(resolve(schedule, _tokens(x2)), dropout)
    schedule_counts[("bwd", sched.bwd)] += 1
    gram = sched.bwd in ("b3", "b4") and (need_a or need_bb)
    merged_dx = need_x and sched.bwd in ("b4", "b5")
    lowrank_dx = need_x and not merged_dx
    dx = dw = db = da = dbb = None
    z_t = None
    if lowrank_dx or (need_a and not gram):
        z_t = _dyb_t(dy2, lora_B).mul_(s)  # s (dy B)^T, (r, tokens)
    if merged_dx:  # b5/b4: dX through the merged weight W + s B A (no dropout here)
        dx = dy2.mm(torch.addmm(weight, lora_B, lora_A, alpha=s))
    elif lowrank_dx:  # b1/b3: dX = dy W + d(z^T A)
        dx = dy2.mm(weight)
        if dropout:
            dx.add_(_dropped(z_t.t().mm(lora_A), mask, p))
        else:
            torch.addmm(dx, z_t.t(), lora_A, out=dx)
    if dx is not None:
        dx = dx.view(x.shape)
    if need_a or need_bb:
        xd = _dropped(x2, mask, p)
        if gram:  # b3/b4: G = dy^T d(x) (out, in), then both adapter grads from it
            g = dy2.t().mm(xd)
            if need_a:
                da = lora_B.t().mm(g).mul_(s)  # s B^T G
            if need_bb:
                dbb = lora_A.mm(g.t()).mul_(s).t().contiguous()  # s G A^T, formed as (r, out)
            del g
        else:
            if need_a:
                da = z_t.mm(xd)  # s (dy B)^T d(x)
            if need_bb:
                if xa_t is None:
                    xa_t = _xa_t(xd, lora_A)  # recomputed (d(x) A^T)^T, (r, tokens)
                dbb = xa_t.mm(dy2).mul_(s).t().contiguous()  # s dy^T (d(x) A^T)
    if need_w:
        dw = dy2.t().mm(x2)
    if need_b:
        db = dy2.sum(0)
    return dx, dw, db, da, dbb


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
    grads = _backward_impl(dy, x, weight, lora_A, lora_B, dropout_mask, xa, scale, dropout_p, schedule,
                           tuple(needs))
    return [g if g is not None else dy.new_empty((0,)) for g in grads]


@lora_linear_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, dropout_mask, xa, scale, dropout_p, schedule, needs):
    likes = (x, weight, weight.new_empty((weight.shape[0],)), lora_A, lora_B)
    return [t.new_empty(t.shape) if need else dy.new_empty((0,)) for t, need in zip(likes, needs)]


@register_flop_formula(torch.ops.lorafx.lora_linear_backward)
def _lora_linear_backward_flops(dy_shape, x_shape, w_shape, a_shape, bb_shape, mask_shape, xa_shape, scale, p,
                                schedule, needs, *args, out_shape=None, **kwargs) -> int:
    tokens = math.prod(x_shape[:-1])
    dropout = mask_shape is not None and math.prod(mask_shape) > 0
    return int(lora_flops(schedule, tokens, w_shape[1], w_shape[0], a_shape[0], x_requires_grad=needs[0],
                          w_requires_grad=needs[1], bias=needs[2], a_requires_grad=needs[3],
                          b_requires_grad=needs[4], dropout=dropout)[1])


def _traced(*tensors) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return any(t is not None and is_fake(t) for t in tensors)


def _backward_lora_linear(ctx, dy, *ignored):
    x, weight, lora_A, lora_B, mask, *kept = ctx.saved_tensors
    xa_t = kept[0] if kept else None
    needs = tuple(bool(v) for v in ctx.needs_input_grad[:5])
    needs = needs[:2] + (needs[2] and ctx.has_bias,) + needs[3:]
    if _traced(dy, x):  # torch.compile / export of the backward: one op, dispatched at run time
        grads = torch.ops.lorafx.lora_linear_backward(dy, x, weight, lora_A, lora_B, mask, xa_t, ctx.scale,
                                                      ctx.p, ctx.schedule, list(needs))
        grads = [g if need else None for g, need in zip(grads, needs)]
    else:  # eager: the aten GEMMs themselves (what FlopCounterMode counts)
        grads = _backward_impl(dy, x, weight, lora_A, lora_B, mask, xa_t, ctx.scale, ctx.p, ctx.schedule, needs)
    return (*grads, None, None, None, None)


lora_linear.register_autograd(_backward_lora_linear, setup_context=_setup_lora_linear)
lora_linear_xa.register_autograd(_backward_lora_linear, setup_context=_setup_lora_linear_xa)


@register_flop_formula([torch.ops.lorafx.lora_linear, torch.ops.lorafx.lora_linear_xa])
def _lora_linear_flops(x_shape, w_shape, b_shape, a_shape, bb_shape, scale=1.0, mask_shape=None, p=0.0,
                       schedule=None, *args, out_shape=None, **kwargs) -> int:
    """The forward GEMMs of the schedule the rule picks for this token count (lorafx.schedules)."""
    if schedule is None:
        schedule = kwargs.get("schedule", "f1b1k" if isinstance(out_shape, (tuple, list)) and
                              len(out_shape) == 2 and not isinstance(out_shape[0], int) else DEFAULT_SCHEDULE)
    if mask_shape is None:
        mask_shape = kwargs.get("dropout_mask")
    tokens = 1
    for d in x_shape[:-1]:
        tokens *= d
    dropout = mask_shape is not None and math.prod(mask_shape) > 0
    n, m, r = w_shape[1], w_shape[0], a_shape[0]
    return int(lora_flops(schedule, tokens, n, m, r, dropout=dropout)[0])


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.0,
                          schedule=None):
    """Plain-autograd definition of ``lora_linear`` (PEFT's formula), for tests; every
    schedule computes this (``schedule`` is accepted and ignored)."""
    y = torch.nn.functional.linear(x, weight, bias)
    xd = x
    if dropout_mask is not None and dropout_mask.numel() > 0:
        xd = x * dropout_mask / (1.0 - dropout_p)
    return y + scale * torch.nn.functional.linear(torch.nn.functional.linear(xd, lora_A), lora_B)
