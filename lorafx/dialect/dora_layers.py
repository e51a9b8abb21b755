"""DoRA on convolutions and embeddings: the ``lora_dora_conv`` and ``lora_dora_embedding`` kinds.

Weight-decomposed LoRA (DoRA, Liu et al., arXiv 2402.09353) on the layers PEFT's ``use_dora=True``
adapts besides linears.  Both rescale the adapted layer by c = m / n, with m the trained magnitude
and n the norm of the adapted weight V = W + s·ΔW, treated as a constant for autograd (the paper's
§4.3, PEFT's ``weight_norm.detach()``).

``torch.ops.lorafx.lora_dora_conv(x, weight, bias, lora_A, lora_B, magnitude, scale, stride, padding, dilation, groups, dropout_mask=None, dropout_p=0.)``
    The ``lora_conv`` adapter (``lorafx/dialect/conv.py``: A a convolution with the layer's kernel,
    B a grouped 1x1) under PEFT's ``_DoraConvNdLayer``.  n has one entry per output channel: the
    norm of V[o] over every other dim (in-channels and kernel).  ``magnitude`` has PEFT's shape
    (1, out, 1, ...) and broadcasts over the output channel dim.  With u(z) = conv(z, W) +
    s·conv1x1(conv(z, A), B) and d(x) the adapter's dropout:

        y = c ⊙ u(x) + b                                     (no dropout, or eval)
        y = conv(x − d(x), W) + c ⊙ u(d(x)) + b              (dropout active)

    (PEFT adds (c − 1) ⊙ conv(d(x), W) + c ⊙ s·B(A(d(x))) to the frozen layer's output: the bias is
    never scaled).  **The norm**: for groups == 1 ΔW = B ∘ A is, flattened to (out, in·kernel),
    B (out × r) times A (r × in·kernel), so n is linear DoRA's cheap expansion
    (``lorafx.dialect.dora.dora_norm`` on the flattened weights): the merged weight is never formed.
    For groups > 1 the adapter's update is dense (it mixes every input channel into each group) and
    has no place in the grouped weight; PEFT then takes ``(B.view(-1, r) @ A.view(r, -1))`` reshaped
    to W's shape as ΔW (a rearrangement of that update, W-sized).  lorafx forms the same W-sized
    V = W + s·ΔW there, as PEFT does, for parity (``conv_dora_norm``); such a layer is not merged
    (``merge_problem``, as PEFT refuses) and ``merge_and_unload`` lowers it to aten ops.

``torch.ops.lorafx.lora_dora_embedding(ids, weight, lora_A, lora_B, magnitude, scale, padding_idx=-1)``
    The ``lora_embedding`` adapter under PEFT's ``DoraEmbeddingLayer``: y = c ⊙ (W[ids] +
    s·Aᵀ[ids] Bᵀ), c over the embedding dim.  PEFT takes the norm of Vᵀ = Wᵀ + s·B A (dim ×
    num_embeddings) row-wise, so n has one entry per embedding dim, over the vocabulary, and
    ``magnitude`` is (dim,).  That is linear DoRA's norm with Wᵀ as the weight: ``dora_norm(Wᵀ,
    A, B, s)`` (Wᵀ A's product Aᵀ, 2·num·dim·r FLOPs; never the num × dim V).  No dropout (PEFT
    applies none to embeddings); ``padding_idx``: no gradient into A's column of that id.

**Autograd** saves the inputs, the output y (not under dropout, where y does not give u) and n
(out or dim numbers: the forward kernel's n handed over as linear DoRA does; recomputed where the
link is missing, e.g. a traced backward, which also recomputes u for dm rather than branch on m's
zeros).  Nothing W-sized or x-sized beyond those is kept.  dy' = dy ⊙ c; the LoRA kind's backward on dy'
gives dx (dids: none), dW, dA and dB; db = Σ dy; dm = Σ dy ⊙ (y − b) / m over every dim but the
channel (or Σ dy ⊙ u / n with u recomputed, under dropout or where some m is 0).  Under dropout
the frozen term adds g = the input gradient of conv(·, W) on dy: dx = g + D(dx' − g), and dW
gains the weight gradient of conv(x − d(x), W) (as linear DoRA).

Kinds: ``DORA_CONV`` and ``DORA_EMBEDDING``.  Each requires a LoraRecord whose ``magnitude``
names m.  InsertLoRA creates them (``use_dora=True``) on ``lora_conv`` and ``lora_embedding`` sites
(``DORA_KIND_OF``); they find no sites of their own.  Provide cost, merged weight c ⊙ (W + s·ΔW)
(c scales W's output channels, or the embedding table's columns), base ops and unmerge (those of
the LoRA kinds), and PEFT's keys (the LoRA kind's plus ``<site>.lora_magnitude_vector``).
"""
from __future__ import annotations

import math
from typing import List, Optional

import sympy
import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from lorafx.graph_utils import get_attr, safe_name
from lorafx.meta import LoraRecord, OriginRecord, get_record, set_record

from . import conv as C
from . import embedding as E
from .dora import DoraAdapter, _hand_over, _take_norm, dora_norm
from .linear import _traced
from .registry import InputQuery, NodeCost, create, register_kind, replace_node

__all__ = ["lora_dora_conv", "lora_dora_embedding", "lora_dora_conv_reference", "lora_dora_embedding_reference",
           "conv_dora_norm", "embedding_dora_norm", "DoraConvKind", "DoraEmbeddingKind", "DORA_CONV",
           "DORA_EMBEDDING"]

aten = torch.ops.aten


def _acc(weight: Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


def _on(mask: Optional[Tensor]) -> bool:
    return mask is not None and mask.numel() > 0


# -- convolutions ----------------------------------------------------------------------------------

def conv_groups(lora_A: Tensor, lora_B: Tensor) -> int:
    """The layer's groups, read from the adapter's shapes (A: (r, in, ...), B: (out, r / groups, 1, ...))."""
    return lora_A.shape[0] // lora_B.shape[1]


def conv_delta(lora_A: Tensor, lora_B: Tensor) -> Tensor:
    """PEFT's ΔW (without the scale), flattened (out-ish rows): B.view(-1, r) @ A.view(r, -1); for
    groups == 1 this is B ∘ A as an (out, in·kernel) matrix."""
    r = lora_A.shape[0]
    return lora_B.reshape(-1, r) @ lora_A.reshape(r, -1)


def conv_dora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, s: float) -> Tensor:
    """n[o] = ||W[o] + s·ΔW[o]|| over every dim but the output channel, (out,), in float32 or wider.
    groups == 1: the cheap expansion (no merged weight); groups > 1: PEFT's W-sized V (module docstring)."""
    out, r = weight.shape[0], lora_A.shape[0]
    if conv_groups(lora_A, lora_B) == 1:
        return dora_norm(weight.reshape(out, -1), lora_A.reshape(r, -1), lora_B.reshape(out, r), s)
    acc = _acc(weight)
    V = weight.detach().to(acc).reshape(out, -1) + s * conv_delta(lora_A.detach().to(acc),
                                                                   lora_B.detach().to(acc)).reshape(out, -1)
    return torch.linalg.vector_norm(V, dim=1)


def _channel_shape(weight: Tensor):
    return (-1,) + (1,) * (weight.dim() - 2)


def _channel_dims(x: Tensor, weight: Tensor):
    """The dims of the layer's output that are not its channel dim (batched or not)."""
    k = weight.dim()
    return tuple(i for i in range(k if x.dim() == k else k - 1) if i != (1 if x.dim() == k else 0))


def _u(xd, weight, lora_A, lora_B, s, stride, padding, dilation, groups) -> Tensor:
    """conv(z, W) + s·conv1x1(conv(z, A), B): the un-normalised output, no bias."""
    return C.forward(xd, weight, None, lora_A, lora_B, s, stride, padding, dilation, groups, None, 0.0)


def conv_dora_forward(x, weight, bias, lora_A, lora_B, magnitude, s, stride, padding, dilation, groups, mask, p):
    n = conv_dora_norm(weight, lora_A, lora_B, s)
    shape = _channel_shape(weight)
    c = (magnitude.reshape(-1).to(n.dtype) / n).to(x.dtype).view(shape)
    if _on(mask):
        xd = C._dropped(x, mask, p)
        y = C._conv(x - xd, weight, bias, stride, padding, dilation, groups)
        y.add_(_u(xd, weight, lora_A, lora_B, s, stride, padding, dilation, groups) * c)
    else:
        y = _u(x, weight, lora_A, lora_B, s, stride, padding, dilation, groups).mul_(c)
        if bias is not None:
            y.add_(bias.view(shape))
    _hand_over(y, n)
    return y


def _conv_grads(dy, x, weight, stride, padding, dilation, groups, need_x: bool, need_w: bool):
    """The input and weight gradients of conv(x, W) (no bias) for ``dy``, unbatched inputs allowed."""
    unbatched = x.dim() == weight.dim() - 1
    if unbatched:
        x, dy = x.unsqueeze(0), dy.unsqueeze(0)
    n = weight.dim() - 2
    dx, dw, _ = aten.convolution_backward(dy, x, weight, None, list(stride), list(padding), list(dilation), False,
                                          [0] * n, groups, [need_x, need_w, False])
    if unbatched and dx is not None:
        dx = dx.squeeze(0)
    return dx, dw


def conv_dora_backward(dy, x, weight, bias, lora_A, lora_B, magnitude, mask, y, n, s, p, geo, needs):
    """(dx, dW, dbias, dA, dB, dm), None where ``needs`` (six flags) says no gradient is needed."""
    need_x, need_w, need_b, need_a, need_bb, need_m = needs
    stride, padding, dilation, groups = geo
    if n is None:
        n = conv_dora_norm(weight, lora_A, lora_B, s)
    shape, dims = _channel_shape(weight), _channel_dims(x, weight)
    mag = magnitude.reshape(-1).to(n.dtype)
    dropout = _on(mask)
    xd = C._dropped(x, mask, p) if dropout else x
    dx = dw = db = da = dbb = dm = None
    if need_m:
        if dropout or y is None or not bool((mag != 0).all()):
            u = _u(xd, weight, lora_A, lora_B, s, stride, padding, dilation, groups)
            dm = (dy * u).sum(dims, dtype=n.dtype).div_(n)
        else:
            yb = y - bias.view(shape) if bias is not None else y
            dm = (dy * yb).sum(dims, dtype=n.dtype).div_(mag)
        dm = dm.to(magnitude.dtype).view(magnitude.shape)
    if need_x or need_w or need_a or need_bb:
        dyc = dy * (mag / n).to(dy.dtype).view(shape)
        dx, dw, _, da, dbb = C.backward(dyc, xd, weight, lora_A, lora_B, None, s, 0.0, stride, padding, dilation,
                                        groups, (need_x, need_w, False, need_a, need_bb))
        if dropout:  # the frozen term conv(x − d(x), W)
            if need_x:
                g, _ = _conv_grads(dy, x, weight, stride, padding, dilation, groups, True, False)
                dx = C._dropped(dx - g, mask, p) + g
            if need_w:
                _, gw = _conv_grads(dy, x - xd, weight, stride, padding, dilation, groups, False, True)
                dw = dw + gw
    if need_b:
        db = dy.sum(dims)
    return dx, dw, db, da, dbb, dm


@torch.library.custom_op("lorafx::lora_dora_conv", mutates_args=())
def lora_dora_conv(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scale: float,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    dropout_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    return conv_dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, stride, padding, dilation, groups,
                             dropout_mask, dropout_p)


@lora_dora_conv.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, scale, stride, padding, dilation, groups, dropout_mask=None,
      dropout_p=0.0):
    C._fake_checks(x, weight, lora_A, lora_B, groups)
    torch._check(magnitude.numel() == weight.shape[0], lambda: "lora_dora_conv: magnitude must have out_channels "
                                                                "entries (PEFT's (1, out, 1, ...))")
    return C._conv(x, weight, bias, stride, padding, dilation, groups)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, scale, stride, padding, dilation, groups, mask, p = inputs
    ctx.geometry = (list(stride), list(padding), list(dilation), groups)
    ctx.scale, ctx.p, ctx.has_bias = scale, p, bias is not None
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, magnitude, mask, None if _on(mask) else output,
                          _take_norm(output))


def _conv_backward(ctx, dy):
    x, weight, bias, lora_A, lora_B, magnitude, mask, y, n = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb, need_m = ctx.needs_input_grad[:6]
    if _traced(dy, x):  # no data-dependent branch (a zero in m) in a traced backward: u is recomputed
        y = None
    grads = conv_dora_backward(dy, x, weight, bias, lora_A, lora_B, magnitude, mask, y, n, ctx.scale, ctx.p,
                               ctx.geometry, (need_x, need_w, need_b and ctx.has_bias, need_a, need_bb, need_m))
    return (*grads, None, None, None, None, None, None, None)


lora_dora_conv.register_autograd(_conv_backward, setup_context=_conv_setup)


def _conv_norm_flops(w_shape, a_shape, bb_shape) -> int:
    out, r = w_shape[0], a_shape[0]
    k = math.prod(a_shape[1:])  # in · kernel
    if r // bb_shape[1] == 1:
        return 2 * out * k * r + 2 * k * r * r + 2 * out * r * r  # W Aᵀ, A Aᵀ, B G
    return 2 * (math.prod(bb_shape) // r) * r * k  # PEFT's ΔW


@register_flop_formula(torch.ops.lorafx.lora_dora_conv)
def _conv_flops(x_shape, w_shape, b_shape, a_shape, bb_shape, m_shape, scale=1.0, stride=None, padding=None,
                dilation=None, groups=1, mask_shape=None, p=0.0, *args, out_shape=None, **kwargs) -> int:
    if mask_shape is None:
        mask_shape = kwargs.get("dropout_mask")
    base, fa, fb = C.conv_flops(x_shape, w_shape, a_shape, bb_shape, out_shape)
    dropout = mask_shape is not None and math.prod(mask_shape) > 0
    return int(base * (2 if dropout else 1) + fa + fb + _conv_norm_flops(w_shape, a_shape, bb_shape))


def lora_dora_conv_reference(x, weight, bias, lora_A, lora_B, magnitude, scale, stride, padding, dilation, groups,
                             dropout_mask=None, dropout_p=0.0):
    """Plain-autograd definition (PEFT's formula: forms V = W + s·ΔW, n detached).  For tests."""
    r = lora_A.shape[0]
    delta = (lora_B.reshape(-1, r) @ lora_A.reshape(r, -1)).reshape(weight.shape)
    n = (weight + scale * delta.detach()).flatten(1).norm(dim=1).detach()
    c = (magnitude.reshape(-1) / n).view(_channel_shape(weight))
    xd = C._dropped(x, dropout_mask, dropout_p)
    base = C._conv(x, weight, bias, stride, padding, dilation, groups)
    nb = weight.dim() - 2
    lora = C._conv(C._conv(xd, lora_A, None, stride, padding, dilation, 1), lora_B, None, [1] * nb, [0] * nb,
                   [1] * nb, groups)
    return base + (c - 1) * C._conv(xd, weight, None, stride, padding, dilation, groups) + c * scale * lora


# -- embeddings ------------------------------------------------------------------------------------

def embedding_dora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, s: float) -> Tensor:
    """n[j] = ||W[:, j] + s·(B A)[j]|| over the vocabulary, (dim,), in float32 or wider (never the num × dim V)."""
    return dora_norm(weight.t(), lora_A, lora_B, s)


def _emb_forward(ids, weight, lora_A, lora_B, magnitude, s) -> Tensor:
    n = embedding_dora_norm(weight, lora_A, lora_B, s)
    y = E._forward(ids, weight, lora_A, lora_B, s)
    y = y.mul_((magnitude.to(n.dtype) / n).to(y.dtype))
    _hand_over(y, n)
    return y


@torch.library.custom_op("lorafx::lora_dora_embedding", mutates_args=())
def lora_dora_embedding(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scale: float,
                        padding_idx: int = -1) -> Tensor:
    E._checks(ids, weight, lora_A, lora_B)
    return _emb_forward(ids, weight, lora_A, lora_B, magnitude, scale)


@lora_dora_embedding.register_fake
def _(ids, weight, lora_A, lora_B, magnitude, scale, padding_idx=-1):
    E._checks(ids, weight, lora_A, lora_B)
    torch._check(magnitude.dim() == 1 and magnitude.shape[0] == weight.shape[1],
                 lambda: "lora_dora_embedding: magnitude must be (embedding_dim,)")
    return weight.new_empty((*ids.shape, weight.shape[1]))


def _emb_setup(ctx, inputs, output):
    ids, weight, lora_A, lora_B, magnitude, scale, padding_idx = inputs
    ctx.scale, ctx.padding_idx = scale, padding_idx
    ctx.save_for_backward(ids, weight, lora_A, lora_B, magnitude, output, _take_norm(output))


def embedding_dora_backward(dy, ids, weight, lora_A, lora_B, magnitude, y, n, s, pad, needs):
    """(dW, dA, dB, dm), None where ``needs`` (four flags) says no gradient is needed."""
    need_w, need_a, need_b, need_m = needs
    if n is None:
        n = embedding_dora_norm(weight, lora_A, lora_B, s)
    mag = magnitude.to(n.dtype)
    dm = None
    dy2 = dy.reshape(-1, dy.shape[-1])
    if need_m:
        if y is None or not bool((mag != 0).all()):
            u = E._forward(ids, weight, lora_A, lora_B, s).reshape(dy2.shape)
            dm = (dy2 * u).sum(0, dtype=n.dtype).div_(n)
        else:
            dm = (dy2 * y.reshape(dy2.shape)).sum(0, dtype=n.dtype).div_(mag)
        dm = dm.to(magnitude.dtype)
    dw = da = db = None
    if need_w or need_a or need_b:
        dw, da, db = E.backward(dy * (mag / n).to(dy.dtype), ids, weight, lora_A, lora_B, s, pad, need_w, need_a,
                                need_b)
    return dw, da, db, dm


def _emb_backward(ctx, dy):
    ids, weight, lora_A, lora_B, magnitude, y, n = ctx.saved_tensors
    _, need_w, need_a, need_b, need_m = ctx.needs_input_grad[:5]
    if _traced(dy, weight):  # no data-dependent branch (a zero in m) in a traced backward: u is recomputed
        y = None
    dw, da, db, dm = embedding_dora_backward(dy, ids, weight, lora_A, lora_B, magnitude, y, n, ctx.scale,
                                             ctx.padding_idx, (need_w, need_a, need_b, need_m))
    return None, dw, da, db, dm, None, None


lora_dora_embedding.register_autograd(_emb_backward, setup_context=_emb_setup)


def _emb_norm_flops(num, dim, r):
    return 2 * num * dim * r + 2 * num * r * r + 2 * dim * r * r  # (Wᵀ Aᵀ), A Aᵀ, B G


@register_flop_formula(torch.ops.lorafx.lora_dora_embedding)
def _emb_flops(ids_shape, w_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return int(E.embedding_flops(math.prod(ids_shape), w_shape[1], a_shape[0])[0]
               + _emb_norm_flops(w_shape[0], w_shape[1], a_shape[0]))


def lora_dora_embedding_reference(ids, weight, lora_A, lora_B, magnitude, scale, padding_idx=-1):
    """Plain-autograd definition (PEFT's formula: forms Vᵀ, n detached).  For tests."""
    n = (weight.t() + scale * (lora_B @ lora_A).detach()).norm(dim=1).detach()
    return (magnitude / n) * E.lora_embedding_reference(ids, weight, lora_A, lora_B, scale, padding_idx)


# -- the kinds ---------------------------------------------------------------------------------------

CONV_OP = torch.ops.lorafx.lora_dora_conv.default
EMB_OP = torch.ops.lorafx.lora_dora_embedding.default


class DoraConvKind(DoraAdapter, C.ConvKind):
    """``lora_dora_conv``: PEFT's DoRA convolution (module docstring).  Requires a LoraRecord with
    ``magnitude``; merged for groups == 1 (c ⊙ (W + s·B ∘ A), per output channel), lowered to
    aten ops by ``merge_and_unload`` otherwise.  Not scheduled."""

    name = "lora_dora_conv"
    ops = (CONV_OP,)
    layer = ""  # InsertLoRA builds it on lora_conv sites (use_dora=True)
    own_records = True
    supports_lora_bias = False  # (use_dora with lora_bias is refused, as in PEFT)

    def initial_magnitude(self, W: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, transposed=False) -> Tensor:
        """m = n at init (PEFT's), in PEFT's shape (1, out, 1, ...), float32 or wider."""
        return conv_dora_norm(W, lora_A, lora_B, scale).view(1, -1, *(1,) * (W.dim() - 2))

    def build(self, graph, x, weight, bias, record: LoraRecord, geometry: dict, *, train: bool, created_by: str,
              layer: str = "") -> torch.fx.Node:
        from .linear import MASK_OP
        a, b, m = graph.get_attr(record.lora_A), graph.get_attr(record.lora_B), graph.get_attr(record.magnitude)
        mask = None
        if record.dropout > 0:
            mask = create(graph, MASK_OP, x=x, p=record.dropout, train=train)
            set_record(mask, OriginRecord(record.site, created_by=created_by))
        new = create(graph, CONV_OP, name=safe_name(record.site) + "_dora", x=x, weight=weight, bias=bias, lora_A=a,
                     lora_B=b, magnitude=m, scale=record.scale, stride=list(geometry["stride"]),
                     padding=list(geometry["padding"]), dilation=list(geometry["dilation"]),
                     groups=int(geometry["groups"]), dropout_mask=mask, dropout_p=record.dropout)
        set_record(new, OriginRecord(record.site, layer or getattr(record, "layer", "") or "Conv",
                                     created_by=created_by))
        set_record(new, record)
        return new

    def merged_weight(self, root, node) -> Tensor:
        rec = get_record(node, LoraRecord)
        problem = self.merge_problem(node)
        if problem:
            return super().merged_weight(root, node)  # (raises, naming the problem)
        W = get_attr(root, rec.weight)
        acc = _acc(W)
        A, B = get_attr(root, rec.lora_A).detach().to(acc), get_attr(root, rec.lora_B).detach().to(acc)
        V = W.detach().to(acc) + rec.scale * conv_delta(A, B).reshape(W.shape)
        n = torch.linalg.vector_norm(V.flatten(1), dim=1)
        c = get_attr(root, rec.magnitude).detach().to(acc).reshape(-1) / n
        return (V * c.view(-1, *(1,) * (W.dim() - 1))).to(W.dtype)

    def lower(self, graph, node) -> torch.fx.Node:
        """``merge_and_unload`` of a grouped layer's adapter: c (from W, A, B and m, as aten ops) ⊙ (the
        three convolutions of ``lora_conv``) + b, before ``node`` (eval: no dropout)."""
        v = self.view(node)
        k = len(v.stride)
        geo = (list(v.stride), list(v.padding), list(v.dilation), False, [0] * k)
        f = graph.call_function
        with graph.inserting_before(node):
            base = f(aten.convolution.default, (v.x, v.weight, None, *geo, int(v.groups)))
            h = f(aten.convolution.default, (v.x, v.lora_A, None, *geo, 1))
            z = f(aten.convolution.default, (h, v.lora_B, None, [1] * k, [0] * k, [1] * k, False, [0] * k,
                                             int(v.groups)))
            u = f(aten.add.Tensor, (base, z), {"alpha": v.scale})
            # c = m / ||W + s·ΔW|| (PEFT's ΔW: B.view(-1, r) @ A.view(r, -1), reshaped to W's shape)
            r = f(aten.sym_size.int, (v.lora_A, 0))
            bm = f(aten.reshape.default, (v.lora_B, [-1, r]))
            am = f(aten.reshape.default, (v.lora_A, [r, -1]))
            delta = f(aten.mm.default, (bm, am))
            out = f(aten.sym_size.int, (v.weight, 0))
            wf = f(aten.reshape.default, (v.weight, [out, -1]))
            vf = f(aten.add.Tensor, (wf, f(aten.reshape.default, (delta, [out, -1]))), {"alpha": v.scale})
            n = f(aten.linalg_vector_norm.default, (vf, 2, [1]))
            c = f(aten.div.Tensor, (f(aten.reshape.default, (v.magnitude, [-1])), n))
            cv = f(aten.reshape.default, (c, [-1] + [1] * k))
            y = f(aten.mul.Tensor, (u, cv))
            made = [base, h, z, u, r, bm, am, delta, out, wf, vf, n, c, cv, y]
            if v.bias is not None:
                y = f(aten.add.Tensor, (y, f(aten.reshape.default, (v.bias, [-1] + [1] * k))))
                made += [y.args[1], y]
        rec = get_record(node, LoraRecord)
        if rec is not None:
            for m in made:
                set_record(m, OriginRecord(rec.site, rec.layer, created_by="merge_and_unload"))
        replace_node(graph, node, y, *made[:-1])
        return y

    def saved_inputs(self, node) -> set:
        v = self.view(node)
        return {a for a in (v.x, v.weight, v.bias, v.lora_A, v.lora_B, v.magnitude, v.dropout_mask)
                if isinstance(a, torch.fx.Node)}

    def cost(self, node, q: InputQuery) -> NodeCost:
        """``lora_conv``'s convolutions on dy' = dy ⊙ c, plus the norm (module docstring), u recomputed for
        dm under dropout, and the frozen convolution on x − d(x) under dropout."""
        base = super().cost(node, q)
        v = self.view(node)
        ws, as_ = q.shape(v.weight), q.shape(v.lora_A)
        out, r = ws[0], as_[0]
        kk = sympy.Mul(*as_[1:])
        groups = int(v.groups)
        norm = (2 * out * kk * r + 2 * kk * r * r + 2 * out * r * r) if groups == 1 else 2 * (out // groups) * r * kk
        dropout = isinstance(v.dropout_mask, torch.fx.Node)
        fwd, bwd = base.fwd + norm, base.bwd
        if dropout:
            xs = q.shape(v.x)
            outs = q.shape(node)
            if outs is None or len(outs) not in (len(ws), len(ws) - 1):
                outs = C._sym_out_shape(xs, ws, v.stride, v.padding, v.dilation)
            conv_base, fa, fb = C._sym_conv_flops(xs, ws, as_, outs, groups)
            fwd += conv_base
            if q.needs_grad(v.magnitude):
                bwd += conv_base + fa + fb
            bwd += conv_base * (int(q.needs_grad(v.x)) + int(q.needs_grad(v.weight)))
        outn = q.shape(node)
        extra = 2 * sympy.Mul(*outn) if outn is not None else 0  # c ⊙ u, dm's product
        return NodeCost(sympy.sympify(fwd), sympy.sympify(bwd), sympy.sympify(base.other + extra))


class DoraEmbeddingKind(DoraAdapter, E.EmbeddingKind):
    """``lora_dora_embedding``: PEFT's DoRA embedding (module docstring).  Requires a LoraRecord with
    ``magnitude``; merged weight (W + s·(B A)ᵀ) with column j scaled by c_j.  Not scheduled."""

    name = "lora_dora_embedding"
    ops = (EMB_OP,)
    layer = ""  # InsertLoRA builds it on lora_embedding sites (use_dora=True)

    def saved_inputs(self, node) -> set:
        v = self.view(node)
        return {a for a in (v.ids, v.weight, v.lora_A, v.lora_B, v.magnitude) if isinstance(a, torch.fx.Node)}

    def initial_magnitude(self, W: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, transposed=False) -> Tensor:
        """m = n at init (PEFT's), (dim,), float32 or wider."""
        return embedding_dora_norm(W, lora_A, lora_B, scale)

    def build(self, graph, ids, weight, record: LoraRecord, padding_idx: int, *, created_by: str,
              name: Optional[str] = None) -> torch.fx.Node:
        a, b, m = graph.get_attr(record.lora_A), graph.get_attr(record.lora_B), graph.get_attr(record.magnitude)
        node = create(graph, EMB_OP, name=name or safe_name(record.site) + "_dora", ids=ids, weight=weight, lora_A=a,
                      lora_B=b, magnitude=m, scale=record.scale, padding_idx=padding_idx)
        set_record(node, OriginRecord(record.site, "Embedding", created_by=created_by))
        set_record(node, record)
        return node

    def merged_weight(self, root, node) -> Tensor:
        rec = get_record(node, LoraRecord)
        W = get_attr(root, rec.weight)
        acc = _acc(W)
        A, B = get_attr(root, rec.lora_A).detach().to(acc), get_attr(root, rec.lora_B).detach().to(acc)
        V = W.detach().to(acc) + rec.scale * A.t().mm(B.t())
        c = get_attr(root, rec.magnitude).detach().to(acc) / torch.linalg.vector_norm(V, dim=0)
        return (V * c.view(1, -1)).to(W.dtype)

    def cost(self, node, q: InputQuery) -> NodeCost:
        base = super().cost(node, q)
        v = self.view(node)
        w, a = q.shape(v.weight), q.shape(v.lora_A)
        norm = _emb_norm_flops(w[0], w[1], a[0])
        return NodeCost(sympy.sympify(base.fwd + norm), base.bwd, sympy.sympify(2 * base.other))


DORA_CONV = register_kind(DoraConvKind())
DORA_EMBEDDING = register_kind(DoraEmbeddingKind())
