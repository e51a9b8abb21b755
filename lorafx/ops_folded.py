"""``lorafx::lora_linear_folded``: LoRA with A folded into the base GEMM (made by FoldLoRAIntoBase).

``torch.ops.lorafx.lora_linear_folded(x, weight_ext, bias, lora_A, lora_B, scale, dropout_mask=None,
dropout_p=0., schedule="f1b1k") -> (y, xa)``
    ``weight_ext`` is one (m + r, n) buffer: its first m rows are the frozen weight W, its
    last r rows *are* ``lora_A`` (the same storage: ``lora_A`` is a view of
    ``weight_ext[m:]``, so an optimizer step on A updates the buffer and nothing is
    copied per step).  Forward is one GEMM ``x [W; A]^T = [x W^T | x A^T]`` -- x is read
    once for the base and the adapter -- then ``y = x W^T + b + scale (x A^T) B^T``
    accumulated in place into the first m columns.  ``y`` is returned as that (tokens,
    m) block of the (tokens, m + r) product (row stride m + r), so no copy is made; it
    views to the input's leading shape like a plain linear's output.  ``xa`` = A x^T
    (r, tokens) is the second, non-differentiable output, saved for backward (never
    recomputed).  ``schedule`` is a rule of ``f1b1k`` / ``f1b5k`` pieces: the forward is
    always the folded f1; the backward is b1 or b5 at the run-time token count, the
    kernels of ``lorafx.ops`` with W = ``weight_ext[:m]``.  No adapter dropout: A
    multiplies the same x as W (``dropout_mask`` must be None or empty).

The op computes with W = ``weight_ext[:m]`` and A = ``lora_A``; when ``lora_A`` is not
the same memory as ``weight_ext[m:]`` (a clone: ``copy.deepcopy``, opcheck) it copies
them into one buffer per call and counts ``("fwd", "fold-copy")`` in
``lorafx.ops.schedule_counts`` instead of ``("fwd", "fold")``.  FLOPs equal those of ``lora_linear_xa`` with the same rule
(``2 t n (m + r) + 2 t r m`` forward), so the cost model and FlopCounterMode count it so.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import ops as _ops
from .schedules import lora_flops, parse_rule, resolve

__all__ = ["lora_linear_folded", "check_folded_rule"]


def check_folded_rule(schedule: str) -> None:
    """Raise ValueError unless every piece of the rule is ``f1b1k`` or ``f1b5k``."""
    for _, s in parse_rule(schedule):
        if s.name not in ("f1b1k", "f1b5k"):
            raise ValueError(f"lorafx.lora_linear_folded runs the folded f1 forward with b1 or b5 and keeps XA: "
                             f"its rule must use f1b1k / f1b5k only, got {schedule!r} (piece {s.name})")


def _no_dropout(dropout_mask: Optional[Tensor], dropout_p: float) -> None:
    if (dropout_mask is not None and dropout_mask.numel() > 0) or dropout_p != 0.0:
        raise ValueError("lorafx.lora_linear_folded has no adapter dropout (A multiplies the same x as W); "
                         "use lorafx.lora_linear for adapters with dropout")


@torch.library.custom_op("lorafx::lora_linear_folded", mutates_args=())
def lora_linear_folded(
    x: Tensor,
    weight_ext: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    schedule: str = "f1b1k",
) -> Tuple[Tensor, Tensor]:
    check_folded_rule(schedule)
    _no_dropout(dropout_mask, dropout_p)
    r = lora_A.shape[0]
    m = weight_ext.shape[0] - r
    x2 = _ops._flat(x)
    resolve(schedule, x2.shape[0])  # validates the rule at this token count
    if lora_A.data_ptr() == weight_ext[m:].data_ptr() and lora_A.stride() == weight_ext[m:].stride():
        _ops.schedule_counts[("fwd", "fold")] += 1
    else:  # not folded in memory (a clone, e.g. opcheck or a deep copy): same numbers, one copy
        _ops.schedule_counts[("fwd", "fold-copy")] += 1
        weight_ext = torch.cat([weight_ext[:m], lora_A])
    full = x2.mm(weight_ext.t())  # (tokens, m + r) = [x W^T | x A^T]
    xa_t = full[:, m:].t().contiguous()  # (r, tokens)
    y = full[:, :m]
    if bias is not None:
        y.add_(bias)
    y.addmm_(xa_t.t(), lora_B.t(), alpha=scale)
    return y.view(*x.shape[:-1], m), xa_t


@lora_linear_folded.register_fake
def _(x, weight_ext, bias, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.0, schedule="f1b1k"):
    check_folded_rule(schedule)
    r = lora_A.shape[0]
    m = weight_ext.shape[0] - r
    torch._check(x.shape[-1] == weight_ext.shape[1], lambda: "lora_linear_folded: x and weight_ext disagree on in_features")
    torch._check(lora_A.shape[1] == weight_ext.shape[1], lambda: "lora_linear_folded: lora_A must be (r, in_features)")
    torch._check(lora_B.shape[0] == m and lora_B.shape[1] == r,
                 lambda: "lora_linear_folded: lora_B must be (out_features, r) with out_features = rows(weight_ext) - r")
    lead = list(x.shape[:-1])
    tokens = 1
    for d in lead:
        tokens = tokens * d
    # the (tokens, m) block of a (tokens, m + r) product, viewed to x's leading shape
    strides, acc = [], m + r
    for d in reversed(lead):
        strides.append(acc)
        acc = acc * d
    y = x.new_empty_strided((*lead, m), (*reversed(strides), 1))
    return y, x.new_empty((r, tokens))


def _setup(ctx, inputs, output):
    x, weight_ext, bias, lora_A, lora_B, scale = inputs[:6]
    ctx.schedule = inputs[8] if len(inputs) > 8 else "f1b1k"
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight_ext, lora_A, lora_B, output[1])


def _backward(ctx, dy, *ignored):
    x, weight_ext, lora_A, lora_B, xa_t = ctx.saved_tensors
    m = weight_ext.shape[0] - lora_A.shape[0]
    inner = _SavedLike((x, weight_ext[:m], lora_A, lora_B, None, xa_t), ctx)
    dx, dw, db, da, dbb = _ops._backward_lora_linear(inner, dy)[:5]
    return dx, None, db, da, dbb, None, None, None, None


class _SavedLike:
    """What ``lorafx.ops._backward_lora_linear`` reads from a ctx: W is weight_ext's first m rows
    (frozen: never a gradient), no dropout, the kept xa."""

    def __init__(self, saved, ctx):
        self.saved_tensors = saved
        need = ctx.needs_input_grad
        self.needs_input_grad = (need[0], False, need[2], need[3], need[4])
        self.scale, self.p, self.has_bias, self.schedule = ctx.scale, 0.0, ctx.has_bias, ctx.schedule


lora_linear_folded.register_autograd(_backward, setup_context=_setup)


@register_flop_formula(torch.ops.lorafx.lora_linear_folded)
def _folded_flops(x_shape, w_shape, b_shape, a_shape, bb_shape, scale=1.0, mask_shape=None, p=0.0,
                  schedule="f1b1k", *args, out_shape=None, **kwargs) -> int:
    tokens = math.prod(x_shape[:-1])
    r = a_shape[0]
    return int(lora_flops(kwargs.get("schedule", schedule), tokens, w_shape[1], w_shape[0] - r, r)[0])
