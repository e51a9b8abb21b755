"""The LoRA dialect: high-level ops that adapted graphs are made of.

``torch.ops.lorafx.lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_mask, dropout_p)``
    y = x W^T + b + scale * (d(x) A^T) B^T, where d(x) = x * mask / (1 - p) when a
    non-empty boolean ``dropout_mask`` is given and d(x) = x otherwise.
    ``weight`` is (out, in), ``lora_A`` is (r, in), ``lora_B`` is (out, r) (PEFT's layout).
    Backward saves only x, W, A, B and the boolean mask; x A^T is recomputed.
    The skinny (rank-r) products are computed as r-row matrices -- A d(x)^T,
    B^T dy^T, then (A d(x)^T) dy -- rather than as r-column ones (d(x) A^T,
    dy B, dy^T (d(x) A^T)): same arithmetic, but BLAS runs the r-row shapes
    several times faster (see ``_backward_lora_linear``).

``torch.ops.lorafx.dropout_mask(x, p, train)``
    A boolean keep-mask shaped like ``x`` when ``train`` and p > 0, else an empty
    tensor (which ``lora_linear`` reads as "no dropout").  SetTrainingMode flips
    ``train``, exactly as it flips ``aten.dropout``.

Both ops have fake kernels (so graphs re-export and run under meta tensors),
autograd formulas and FLOP formulas for ``FlopCounterMode``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

__all__ = ["lora_linear", "dropout_mask", "lora_linear_reference"]


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
) -> Tensor:
    x2 = _flat(x)
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2.mm(weight.t())
    xa_t = lora_A.mm(_dropped(x2, dropout_mask, dropout_p).t())  # (r, tokens) = (d(x) A^T)^T
    y.addmm_(xa_t.t(), lora_B.t(), alpha=scale)
    return y.view(*x.shape[:-1], weight.shape[0])


@lora_linear.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.0):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "lora_linear: x and weight disagree on in_features")
    torch._check(lora_A.shape[1] == weight.shape[1], lambda: "lora_linear: lora_A must be (r, in_features)")
    torch._check(lora_B.shape[0] == weight.shape[0], lambda: "lora_linear: lora_B must be (out_features, r)")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_lora_linear(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, mask, p = inputs
    ctx.scale, ctx.p = scale, p
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, lora_A, lora_B, mask)


def _backward_lora_linear(ctx, dy):
    # The rank-r products are formed with r rows (shape (r, tokens) / (r, features)),
    # never with r columns: on CPU (MKL) sgemm is 2-6x slower on (tokens, K) @ (K, r)
    # or (out, tokens) @ (tokens, r) than on the transposed problems, which compute the
    # same numbers.  The scale s is folded into the (r, tokens) factors.
    x, weight, lora_A, lora_B, mask = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    s = ctx.scale
    x2, dy2 = _flat(x), _flat(dy)
    dropout = mask is not None and mask.numel() > 0
    dx = dw = db = da = dbb = None
    # s * (dy B)^T, (r, tokens)
    z_t = lora_B.t().mm(dy2.t()).mul_(s) if (need_x or need_a) else None
    if need_x:
        dx = dy2.mm(weight)
        if dropout:
            dx.add_(_dropped(z_t.t().mm(lora_A), mask, ctx.p))
        else:
            dx.addmm_(z_t.t(), lora_A)
        dx = dx.view(x.shape)
    if need_a or need_bb:
        xd = _dropped(x2, mask, ctx.p)
        if need_a:
            da = z_t.mm(xd)  # s * (dy B)^T d(x)
        if need_bb:
            xa_t = lora_A.mm(xd.t()).mul_(s)  # s * (d(x) A^T)^T, recomputed, (r, tokens)
            dbb = xa_t.mm(dy2).t().contiguous()  # s * dy^T (d(x) A^T)
    if need_w:
        dw = dy2.t().mm(x2)
    if need_b and ctx.has_bias:
        db = dy2.sum(0)
    return dx, dw, db, da, dbb, None, None, None


lora_linear.register_autograd(_backward_lora_linear, setup_context=_setup_lora_linear)


@register_flop_formula(torch.ops.lorafx.lora_linear)
def _lora_linear_flops(x_shape, w_shape, b_shape, a_shape, bb_shape, *args, out_shape=None, **kwargs) -> int:
    tokens = 1
    for d in x_shape[:-1]:
        tokens *= d
    n, m, r = w_shape[1], w_shape[0], a_shape[0]
    return 2 * tokens * (n * m + n * r + r * m)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.0):
    """Plain-autograd definition of ``lora_linear`` (PEFT's formula), for tests."""
    y = torch.nn.functional.linear(x, weight, bias)
    xd = x
    if dropout_mask is not None and dropout_mask.numel() > 0:
        xd = x * dropout_mask / (1.0 - dropout_p)
    return y + scale * torch.nn.functional.linear(torch.nn.functional.linear(xd, lora_A), lora_B)
