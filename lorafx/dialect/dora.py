"""The ``lora_dora`` kind: weight-decomposed LoRA (DoRA, Liu et al., arXiv 2402.09353).

``torch.ops.lorafx.lora_dora(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_mask=None, dropout_p=0.)``
    Schema: ``lorafx::lora_dora(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B,
    Tensor magnitude, float scale, Tensor? dropout_mask=None, float dropout_p=0.) -> Tensor``.
    ``weight`` is (out, in), ``lora_A`` (r, in), ``lora_B`` (out, r), ``magnitude`` (out,).
    With V = W + s·B A and n_i = ||V_i|| (the norm of each output row over in_features),
    c = m / n, and d(x) the adapter's dropout (x * mask / (1 - p) for a non-empty mask):

        y = c ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b                         (no dropout, or eval)
        y = (x − d(x)) Wᵀ + c ⊙ (d(x) Wᵀ + s·(d(x) Aᵀ) Bᵀ) + b     (dropout active)

    which is PEFT's ``use_dora=True`` linear: PEFT adds (c − 1) ⊙ d(x) Wᵀ + c ⊙ s·d(x) Aᵀ Bᵀ to the
    frozen layer's x Wᵀ + b, so the bias is never scaled and, under dropout, the frozen product on
    the undropped x stays in the output.  n is a constant for autograd (the paper's §4.3, PEFT's
    ``weight_norm.detach()``): no gradient flows through it to A, B or W.

**The norm without the merged weight.**  Row i of V is W_i + s·B_i A (B_i the i-th row of B), so

    n_i² = ||W_i||² + 2s·⟨W_i, B_i A⟩ + s²·||B_i A||²
         = ||W_i||² + 2s·⟨B_i, (W Aᵀ)_i⟩ + s²·⟨(B G)_i, B_i⟩,   G = A Aᵀ (r × r),

using ⟨W_i, B_i A⟩ = Σ_k B_ik (A W_iᵀ)_k and ||B_i A||² = B_i (A Aᵀ) B_iᵀ.  The kernel forms
W Aᵀ (out × r, 2·out·in·r FLOPs), G (2·r²·in) and B G (2·out·r²), reduces ||W_i|| with
``torch.linalg.vector_norm`` (no W² is materialised) and never forms the out × in V that PEFT
forms every step.  The sum is taken in float32 (or float64 for float64 weights); rounding can
make n_i² slightly negative when V_i ≈ 0, so it is clamped at 0 before the square root.

**What autograd saves**: the inputs x, W, b, A, B, m and the boolean mask, the output y
(which the next op usually saves anyway) and the norm vector n (out_features numbers).  A
``custom_op``'s setup_context sees only inputs and outputs, so the kernel hands n to it
through a per-thread slot tied to the output it returned; where that link is missing (a
traced backward) n is recomputed in backward instead (the cheap form above).  With dy' = dy ⊙ c and
u = x Wᵀ + s·(x Aᵀ) Bᵀ (the un-normalised output, u = (y − b) / c):

    dm_j = Σ_t dy_tj · u_tj / n_j = Σ_t dy_tj · (y_tj − b_j) / m_j
    dx, dA, dB, dW = the LoRA linear's backward on dy' (``lorafx.dialect.linear.backward``),
    db = Σ_t dy_t.

When some m_j is 0 (y holds no trace of u there), or under dropout (y is not c ⊙ u), u is
recomputed in backward (one more GEMM).  Under dropout the frozen term adds g = dy W:
dx = g + D(dx' − g) with dx' the LoRA backward's input gradient on d(x), and dW gains
dyᵀ (x − d(x)) (D is the dropout's backward, mask / (1 − p)).

``torch.ops.lorafx.lora_dora_backward(...)`` is the backward as one op, used when the backward
is traced (torch.compile), as ``lora_linear_backward`` is.

Kind: ``DORA``.  Requires a LoraRecord whose ``magnitude`` names m.  Provides the cost
(``dora_flops``, what FlopCounterMode counts), the merged weight m / ||W + s·B A|| ⊙ (W + s·B A)
(float32 or wider, in the stored layout) and ``unmerge``; not scheduled (one kernel).
Canonical form: itself.  InsertLoRA creates it on linear sites with ``use_dora=True``.
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import List, Optional, Sequence, Tuple

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from lorafx.graph_utils import get_attr, safe_name
from lorafx.meta import LoraRecord, OriginRecord, get_record, set_record
from lorafx.schedules import Rule, lora_flops

from . import linear as L
from .registry import InputQuery, NodeCost, OpKind, args_of, create, register_kind, replace_node

__all__ = ["lora_dora", "lora_dora_backward", "lora_dora_reference", "dora_norm", "dora_forward", "dora_backward",
           "dora_flops", "merged_dora_weight", "DoraKind", "DORA", "MAGNITUDE"]

MAGNITUDE = "lora_magnitude"  # the magnitude's attribute name under the site's module
_F1B1 = Rule.parse("f1b1")


# -- kernels ---------------------------------------------------------------------------------------

def _acc(weight: Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


def dora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, s: float) -> Tensor:
    """n = ||W + s·B A|| row-wise, shape (out,), in float32 (float64 for float64 weights),
    by the expansion in the module docstring: never forms the out × in merged weight."""
    acc = _acc(weight)
    w2 = torch.linalg.vector_norm(weight, dim=1, dtype=acc).square_()
    a_w = lora_A.to(weight.dtype) if lora_A.dtype != weight.dtype else lora_A
    wa = F.linear(a_w, weight).to(acc)  # (r, out) = (W Aᵀ)ᵀ
    A, B = lora_A.to(acc), lora_B.to(acc)
    bg = B.mm(A.mm(A.t()))  # B G, (out, r)
    n2 = w2.add_((wa.t() * B).sum(1), alpha=2 * s).add_((bg * B).sum(1), alpha=s * s)
    return n2.clamp_min_(0).sqrt_()


def _dropout_on(mask: Optional[Tensor]) -> bool:
    return mask is not None and mask.numel() > 0


def _unnormalised(x2: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, s: float) -> Tensor:
    """u = x Wᵀ + s·(x Aᵀ) Bᵀ, (tokens, out) (the accumulating GEMM as ``torch.addmm(out=)``, which
    FlopCounterMode counts when backward recomputes u)."""
    if lora_A.dtype != x2.dtype:  # adapters in their own dtype: the LoRA kernel's mixed-dtype path
        return L.forward(x2, weight, None, lora_A, lora_B, s, None, 0.0, _F1B1)[0]
    u = F.linear(x2, weight)
    return torch.addmm(u, L.xa_t(x2, lora_A).t(), lora_B.t(), alpha=s, out=u)


# The forward kernel's n for the setup_context that follows it: (weakref to the output, n).
_LAST_NORM = threading.local()


def _hand_over(y: Tensor, n: Tensor) -> None:
    _LAST_NORM.value = (weakref.ref(y), n)


def _take_norm(output) -> Optional[Tensor]:
    """The n the forward kernel computed for ``output`` (None if it was not this output's)."""
    last = getattr(_LAST_NORM, "value", None)
    _LAST_NORM.value = None
    return last[1] if last is not None and last[0]() is output else None


def dora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 magnitude: Tensor, s: float, mask: Optional[Tensor], p: float) -> Tensor:
    """The forward kernel (formulas in the module docstring)."""
    x2 = L.flat(x)
    n = dora_norm(weight, lora_A, lora_B, s)
    c = (magnitude.to(n.dtype) / n).to(x.dtype)
    if _dropout_on(mask):
        xd = L.dropped(x2, mask, p)
        u = _unnormalised(xd, weight, lora_A, lora_B, s)
        y = F.linear(x2 - xd, weight, bias)
        y.addcmul_(u, c)
    else:
        y = _unnormalised(x2, weight, lora_A, lora_B, s).mul_(c)
        if bias is not None:
            y.add_(bias)
    y = y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
    _hand_over(y, n)
    return y


def dora_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                  magnitude: Tensor, mask: Optional[Tensor], y: Optional[Tensor], s: float, p: float,
                  needs: Sequence[bool], n: Optional[Tensor] = None):
    """(dx, dW, dbias, dA, dB, dm), None where ``needs`` (the same six flags) says no gradient is
    needed.  ``y``: the forward's output (None: u is recomputed); ``n``: its norm vector (None:
    recomputed)."""
    need_x, need_w, need_b, need_a, need_bb, need_m = needs
    x2, dy2 = L.flat(x), L.flat(dy)
    dropout = _dropout_on(mask)
    if n is None:
        n = dora_norm(weight, lora_A, lora_B, s)
    mag = magnitude.to(n.dtype)
    xd = L.dropped(x2, mask, p) if dropout else x2
    dm = None
    if need_m:
        if dropout or y is None or not bool((mag != 0).all()):
            u = _unnormalised(xd, weight, lora_A, lora_B, s)
            dm = (dy2 * u).sum(0, dtype=n.dtype).div_(n)
        else:
            y2 = L.flat(y)
            yb = y2 - bias if bias is not None else y2
            dm = (dy2 * yb).sum(0, dtype=n.dtype).div_(mag)
        dm = dm.to(magnitude.dtype)
    dx = dw = db = da = dbb = None
    if need_x or need_w or need_a or need_bb:
        dyc = dy2 * (mag / n).to(dy.dtype)  # dy' = dy ⊙ c
        dx, dw, _, da, dbb = L.backward(dyc, xd, weight, lora_A, lora_B, None, None, s, 0.0, _F1B1,
                                        (need_x, need_w, False, need_a, need_bb))
        if dropout:  # the frozen term (x − d(x)) Wᵀ
            if need_x:
                g = dy2.mm(weight)
                dx = L.dropped(dx.sub_(g), mask, p).add_(g)
            if need_w:
                dw.add_(dy2.t().mm(x2 - xd))
        if dx is not None and x.dim() != 2:
            dx = dx.view(x.shape)
    if need_b:
        db = dy2.sum(0)
    return dx, dw, db, da, dbb, dm


def _run_backward(dy, x, weight, bias, lora_A, lora_B, magnitude, mask, y, n, s, p, needs):
    if L._traced(dy, x):
        grads = torch.ops.lorafx.lora_dora_backward(dy, x, weight, bias, lora_A, lora_B, magnitude, mask, y, n, s,
                                                    p, list(needs))
        return tuple(g if need else None for g, need in zip(grads, needs))
    return dora_backward(dy, x, weight, bias, lora_A, lora_B, magnitude, mask, y, s, p, needs, n)


# -- ops -------------------------------------------------------------------------------------------

def _fake_checks(x, weight, lora_A, lora_B, magnitude) -> None:
    L.fake_checks(x, weight, lora_A, lora_B, "lora_dora")
    torch._check(magnitude.dim() == 1 and magnitude.shape[0] == weight.shape[0],
                 lambda: "lora_dora: magnitude must be (out_features,)")


@torch.library.custom_op("lorafx::lora_dora", mutates_args=())
def lora_dora(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scale: float,
    dropout_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    return dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_mask, dropout_p)


@lora_dora.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_mask=None, dropout_p=0.0):
    _fake_checks(x, weight, lora_A, lora_B, magnitude)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, scale, mask, p = inputs
    ctx.scale, ctx.p, ctx.has_bias = scale, p, bias is not None
    # The inputs, y (u = (y − b) / c; under dropout y does not give u, so it is not kept) and n.
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, magnitude, mask,
                          None if _dropout_on(mask) else output, _take_norm(output))


def _backward(ctx, dy):
    x, weight, bias, lora_A, lora_B, magnitude, mask, y, n = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb, need_m = ctx.needs_input_grad[:6]
    needs = (need_x, need_w, need_b and ctx.has_bias, need_a, need_bb, need_m)
    grads = _run_backward(dy, x, weight, bias, lora_A, lora_B, magnitude, mask, y, n, ctx.scale, ctx.p, needs)
    return (*grads, None, None, None)


lora_dora.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("lorafx::lora_dora_backward", mutates_args=())
def lora_dora_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    dropout_mask: Optional[Tensor],
    y: Optional[Tensor],
    norm: Optional[Tensor],
    scale: float,
    dropout_p: float,
    needs: List[bool],
) -> List[Tensor]:
    """The backward of lora_dora as one opaque op (for traced backwards): (dx, dW, dbias, dA,
    dB, dm), an empty tensor for each gradient not in ``needs``."""
    grads = dora_backward(dy, x, weight, bias, lora_A, lora_B, magnitude, dropout_mask, y, scale, dropout_p,
                          tuple(needs), norm)
    return [g if g is not None else dy.new_empty((0,)) for g in grads]


@lora_dora_backward.register_fake
def _(dy, x, weight, bias, lora_A, lora_B, magnitude, dropout_mask, y, norm, scale, dropout_p, needs):
    likes = (x, weight, weight.new_empty((weight.shape[0],)), lora_A, lora_B, magnitude)
    return [t.new_empty(t.shape) if need else dy.new_empty((0,)) for t, need in zip(likes, needs)]


def lora_dora_reference(x, weight, bias, lora_A, lora_B, magnitude, scale, dropout_mask=None, dropout_p=0.0):
    """Plain-autograd definition, PEFT's formula (forms W + s·B A; n detached).  For tests."""
    merged = weight + scale * (lora_B @ lora_A).detach()
    n = torch.linalg.norm(merged, dim=1).detach()
    c = magnitude / n
    xd = x
    if dropout_mask is not None and dropout_mask.numel() > 0:
        xd = x * dropout_mask / (1.0 - dropout_p)
    base = F.linear(x, weight, bias)
    return base + (c - 1) * F.linear(xd, weight) + c * scale * F.linear(F.linear(xd, lora_A), lora_B)


# -- cost ------------------------------------------------------------------------------------------

def dora_flops(b, n, m, r, *, x_requires_grad: bool = True, w_requires_grad: bool = False,
               a_requires_grad: bool = True, b_requires_grad: bool = True, m_requires_grad: bool = True,
               dropout: bool = False, norm_saved: bool = True) -> Tuple:
    """``(forward, backward)`` matrix-product FLOPs of ``lora_dora`` for b tokens, in features n,
    out features m, rank r: what FlopCounterMode counts (the forward formula registered below,
    the backward's aten GEMMs), when no magnitude entry is 0.  ``norm_saved=False``: the
    backward recomputes the norms (a traced backward).

    >>> from lorafx.dialect.dora import dora_flops
    >>> from lorafx.schedules import b, n, m, r
    >>> dora_flops(b, n, m, r)[0]
    2*b*m*n + 2*b*m*r + 2*b*n*r + 2*m*n*r + 2*m*r**2 + 2*n*r**2
    """
    norm = 2 * m * n * r + 2 * n * r * r + 2 * m * r * r  # W Aᵀ, G = A Aᵀ, B G
    fwd = norm + 2 * b * n * m + 2 * b * n * r + 2 * b * r * m + (2 * b * n * m if dropout else 0)
    grads = x_requires_grad or w_requires_grad or a_requires_grad or b_requires_grad
    bwd = 0
    if (grads or m_requires_grad) and not norm_saved:
        bwd += norm
    if m_requires_grad and dropout:
        bwd += 2 * b * n * m + 2 * b * n * r + 2 * b * r * m  # u recomputed
    if grads:
        bwd += lora_flops("f1b1", b, n, m, r, x_requires_grad=x_requires_grad, w_requires_grad=w_requires_grad,
                          a_requires_grad=a_requires_grad, b_requires_grad=b_requires_grad)[1]
        if dropout:
            bwd += (2 * b * m * n if x_requires_grad else 0) + (2 * b * m * n if w_requires_grad else 0)
    return fwd, bwd


@register_flop_formula(torch.ops.lorafx.lora_dora)
def _forward_flops(x_shape, w_shape, b_shape, a_shape, bb_shape, m_shape, scale=1.0, mask_shape=None, p=0.0,
                   *args, out_shape=None, **kwargs) -> int:
    if mask_shape is None:
        mask_shape = kwargs.get("dropout_mask")
    dropout = mask_shape is not None and math.prod(mask_shape) > 0
    return int(dora_flops(math.prod(x_shape[:-1]), w_shape[1], w_shape[0], a_shape[0], dropout=dropout)[0])


@register_flop_formula(torch.ops.lorafx.lora_dora_backward)
def _backward_flops(dy_shape, x_shape, w_shape, bias_shape, a_shape, bb_shape, m_shape, mask_shape, y_shape,
                    norm_shape, scale, p, needs, *args, out_shape=None, **kwargs) -> int:
    dropout = mask_shape is not None and math.prod(mask_shape) > 0
    return int(dora_flops(math.prod(x_shape[:-1]), w_shape[1], w_shape[0], a_shape[0], x_requires_grad=needs[0],
                          w_requires_grad=needs[1], a_requires_grad=needs[3], b_requires_grad=needs[4],
                          m_requires_grad=needs[5], dropout=dropout, norm_saved=norm_shape is not None)[1])


# -- merging ---------------------------------------------------------------------------------------

def merged_dora_weight(W: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scale: float,
                       transposed: bool = False) -> Tensor:
    """m / ||W + s·B A|| ⊙ (W + s·B A) (rows scaled), computed in float32 or wider, returned in
    W's dtype and stored layout (``transposed``: W is stored (in, out), as transformers' Conv1D)."""
    acc = _acc(W)
    Wd = W.detach().to(acc)
    V = (Wd.t() if transposed else Wd) + scale * (lora_B.detach().to(acc) @ lora_A.detach().to(acc))
    V = V * (magnitude.detach().to(acc) / torch.linalg.vector_norm(V, dim=1)).unsqueeze(1)
    return (V.t() if transposed else V).to(W.dtype)


# -- the kind --------------------------------------------------------------------------------------

OP = torch.ops.lorafx.lora_dora.default
BACKWARD_OP = torch.ops.lorafx.lora_dora_backward.default


MAGNITUDE_KEY = "lora_magnitude_vector"  # PEFT's state-dict key of the magnitude under the site (no ".weight")


class DoraAdapter:
    """What every DoRA kind adds to its LoRA kind (mixed in before it): the record names a
    magnitude, which is one more adapter tensor and one more PEFT key."""

    def check(self, node) -> Optional[str]:
        problem = super().check(node)
        if problem is None and not get_record(node, LoraRecord).magnitude:
            return f"{self.name} node {node.name}'s LoraRecord names no magnitude (LoraRecord.magnitude)"
        return problem

    def describe(self, node) -> str:
        return "dora"

    def adapter_tensors(self, node) -> List[str]:
        return [path for rec in self.adapters(node) for path in (rec.lora_A, rec.lora_B, rec.magnitude)]

    def peft_tensors(self, record: LoraRecord) -> dict:
        return {**super().peft_tensors(record), f"{record.site}.{MAGNITUDE_KEY}": record.magnitude}


class DoraKind(DoraAdapter, OpKind):
    """``lora_dora``: y = m / ||W + s·B A|| ⊙ (x Wᵀ + s·(d(x) Aᵀ) Bᵀ) + b (PEFT's DoRA linear).

    Requires a LoraRecord with ``magnitude`` set.  Provides its cost, merged weight and
    unmerge; the adapter tensors are A, B and the magnitude.  Not scheduled, canonical as is.
    """

    name = "lora_dora"
    ops = (OP,)
    helper_ops = (BACKWARD_OP,)
    layer = ""  # InsertLoRA creates it on linear sites (use_dora=True), never finds sites of its own

    def initial_magnitude(self, W: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                          transposed: bool = False) -> Tensor:
        """m = ||W + s·B A|| row-wise at init (PEFT's), (out,), float32 or wider (``transposed``: W is (in, out))."""
        return dora_norm(W.t() if transposed else W, lora_A, lora_B, scale)

    def saved_inputs(self, node) -> set:
        v = self.view(node)
        return {a for a in (v.x, v.weight, v.bias, v.lora_A, v.lora_B, v.magnitude, v.dropout_mask)
                if isinstance(a, torch.fx.Node)}

    def dropout_active(self, node, q: InputQuery) -> bool:
        return L.LINEAR.dropout_active(node, q)

    def cost(self, node, q: InputQuery) -> NodeCost:
        v = self.view(node)
        rec = get_record(node, LoraRecord)
        w, a = q.shape(v.weight), q.shape(v.lora_A)
        m, n = (w[0], w[1]) if w is not None else (rec.out_features, rec.in_features)
        r = a[0] if a is not None else rec.r
        tokens = q.tokens(v.x)
        dropout = self.dropout_active(node, q)
        fwd, bwd = dora_flops(tokens, n, m, r, x_requires_grad=q.needs_grad(v.x),
                              w_requires_grad=q.needs_grad(v.weight), a_requires_grad=q.needs_grad(v.lora_A),
                              b_requires_grad=q.needs_grad(v.lora_B), m_requires_grad=q.needs_grad(v.magnitude),
                              dropout=dropout)
        other = 2 * m * n + tokens * m  # ||W_i||² and c ⊙ u
        if v.bias is not None:
            other += tokens * m
        if dropout:
            other += 3 * tokens * n + tokens * m  # d(x), x − d(x), the extra sum
        return NodeCost(sympy.sympify(fwd), sympy.sympify(bwd), sympy.sympify(other))

    # merging ---------------------------------------------------------------------------------
    def merged_weight(self, root, node) -> Tensor:
        rec = get_record(node, LoraRecord)
        return merged_dora_weight(get_attr(root, rec.weight), get_attr(root, rec.lora_A), get_attr(root, rec.lora_B),
                                  get_attr(root, rec.magnitude), rec.scale, rec.weight_transposed)

    def base_op(self, graph, node) -> torch.fx.Node:
        v = self.view(node)
        return graph.call_function(torch.ops.aten.linear.default, (v.x, v.weight, v.bias))

    # building -------------------------------------------------------------------------------
    def build(self, graph, x, weight, bias, record: LoraRecord, *, train: bool, created_by: str,
              name: Optional[str] = None) -> torch.fx.Node:
        """A new ``lora_dora`` node for ``record`` (before the insertion point): get_attrs for A,
        B and the magnitude, a dropout mask when ``record.dropout`` > 0, the Origin and Lora
        records.  ``weight`` is the stored weight's node (transposed here for a Conv1D layout)."""
        w = graph.call_function(torch.ops.aten.t.default, (weight,)) if record.weight_transposed else weight
        a, b, mag = graph.get_attr(record.lora_A), graph.get_attr(record.lora_B), graph.get_attr(record.magnitude)
        mask = None
        if record.dropout > 0:
            mask = create(graph, L.MASK_OP, x=x, p=record.dropout, train=train)
            set_record(mask, OriginRecord(record.site, created_by=created_by))
        new = create(graph, OP, name=name or safe_name(record.site) + "_dora", x=x, weight=w, bias=bias, lora_A=a,
                     lora_B=b, magnitude=mag, scale=record.scale, dropout_mask=mask, dropout_p=record.dropout)
        set_record(new, OriginRecord(record.site, "Linear", created_by=created_by))
        set_record(new, record)
        return new

    def insert(self, gm, site, record: LoraRecord, x, *, train: bool, created_by: str) -> torch.fx.Node:
        g = gm.graph
        with g.inserting_before(site.node):
            new = self.build(g, x, site.weight, site.bias, record, train=train, created_by=created_by)
        replace_node(g, site.node, new)  # its users, provenance and value
        return new

    def unmerge(self, graph, linear, record: LoraRecord, *, train: bool, created_by: str):
        v = args_of(linear)
        weight = args_of(v.weight).self if record.weight_transposed else v.weight  # t(W) -> W
        return self.build(graph, v.input, weight, v.bias, record, train=train, created_by=created_by)


DORA = register_kind(DoraKind())
