"""The ``lora_shortcut`` kind: a LoRA-adapted shortcut connection (HeteroLoRA, arXiv 2406.14956).

``torch.ops.lorafx.lora_shortcut(h, y, lora_A, lora_B, scale)``
    Schema: ``lorafx::lora_shortcut(Tensor h, Tensor y, Tensor lora_A, Tensor lora_B,
    float scale) -> Tensor``.
    out = y + scale * (h A^T) B^T, shaped like ``y``.  ``h`` is the hidden state the
    adapter reads, ``y`` the residual sum it adds to; both hold the same tokens with the
    same last dim ``dim`` (their leading dims may differ, as in OPT, whose FFN runs on
    (tokens, dim) rows while attention runs on (batch, seq, dim)).  ``lora_A`` is
    (r, dim), ``lora_B`` (dim, r).  Backward saves h, A and B only (h A^T is recomputed)
    and returns gradients for y (dy itself), h, A and B.

The op has a fake kernel, an autograd formula and a FLOP formula for
``FlopCounterMode`` (forward 4·T·dim·r for T tokens; the backward's GEMMs are
counted as they run).  Like every lorafx op it runs through ``lorafx.eager``'s fast
path, which calls the same kernel, setup and backward functions.

Kind: ``SHORTCUT`` owns ``lora_shortcut``.  Each node carries a ``ShortcutRecord``
(not a ``LoraRecord``: a shortcut adapts no linear layer, so ``adapters(node)`` is
empty, ``CompiledModel.lora_records()`` and the PEFT files never see it).  It cannot
be folded into a weight (``mergeable = False``): MergeLoRA leaves it running, and
``merge_and_unload`` turns it into plain aten ops (``lower``).  It has no schedules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from lorafx.meta import OriginRecord, get_record, set_record

from .linear import dyb_t, flat, xa_t
from .registry import InputQuery, NodeCost, OpKind, create, register_kind, replace_node

__all__ = ["lora_shortcut", "lora_shortcut_reference", "ShortcutRecord", "ShortcutKind", "SHORTCUT", "LINKS"]

# The links of HeteroLoRA's shortcut connections, per layer (see lorafx.passes.insert_shortcuts).
LINKS = ("attn_skip", "ffn_skip", "input_to_ffn", "prev_ffn_to_attn")


# -- the op ----------------------------------------------------------------------------------------

def _check(h, y, lora_A, lora_B) -> None:
    torch._check(h.shape[-1] == y.shape[-1], lambda: "lora_shortcut: h and y must have the same last dim")
    torch._check(h.numel() == y.numel(), lambda: "lora_shortcut: h and y must hold the same number of tokens")
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == h.shape[-1], lambda: "lora_shortcut: lora_A must be (r, dim)")
    torch._check(lora_B.dim() == 2 and lora_B.shape[0] == y.shape[-1], lambda: "lora_shortcut: lora_B must be (dim, r)")
    torch._check(lora_A.shape[0] == lora_B.shape[1], lambda: "lora_shortcut: lora_A and lora_B disagree on r")


@torch.library.custom_op("lorafx::lora_shortcut", mutates_args=())
def lora_shortcut(h: Tensor, y: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    _check(h, y, lora_A, lora_B)
    xa = xa_t(flat(h), lora_A)  # (h A^T)^T, (r, tokens)
    out = torch.addmm(flat(y), xa.t(), lora_B.t(), alpha=scale)  # y + s (h A^T) B^T
    return out.view(y.shape)


@lora_shortcut.register_fake
def _(h, y, lora_A, lora_B, scale):
    _check(h, y, lora_A, lora_B)
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    h, y, lora_A, lora_B, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(h, lora_A, lora_B)  # never y, never h A^T


def _backward(ctx, dy):
    h, lora_A, lora_B = ctx.saved_tensors
    need_h, need_y, need_a, need_b = ctx.needs_input_grad[:4]
    s = ctx.scale
    h2, dy2 = flat(h), flat(dy)
    dh = da = db = None
    if need_h or need_a:
        z_t = dyb_t(dy2, lora_B).mul_(s)  # s (dy B)^T, (r, tokens)
        if need_a:
            da = z_t.mm(h2)  # s (dy B)^T h, (r, dim)
        if need_h:
            dh = z_t.t().mm(lora_A).view(h.shape)  # s (dy B) A
    if need_b:
        db = xa_t(h2, lora_A).mm(dy2).mul_(s).t().contiguous()  # s dy^T (h A^T), formed as (r, dim)
    return dh, (dy if need_y else None), da, db, None


lora_shortcut.register_autograd(_backward, setup_context=_setup)


def shortcut_flops(tokens, dim, r, *, need_h: bool = True, need_a: bool = True, need_b: bool = True):
    """(forward, backward) matrix-product FLOPs of ``lora_shortcut`` (FlopCounterMode's
    convention, 2 per multiply-add): forward h A^T and (.) B^T, 2·T·dim·r each; backward
    dy B when h or A needs a gradient, then dA and dh, and for dB h A^T recomputed and
    dy^T (h A^T), 2·T·dim·r each."""
    unit = 2 * tokens * dim * r
    bwd = 0
    if need_h or need_a:
        bwd = bwd + unit + (unit if need_a else 0) + (unit if need_h else 0)
    if need_b:
        bwd = bwd + 2 * unit
    return 2 * unit, bwd


@register_flop_formula(torch.ops.lorafx.lora_shortcut)
def _forward_flops(h_shape, y_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return int(shortcut_flops(math.prod(h_shape[:-1]), h_shape[-1], a_shape[0])[0])


def lora_shortcut_reference(h, y, lora_A, lora_B, scale):
    """Plain-autograd definition of ``lora_shortcut``, for tests (and what ``lower`` builds)."""
    return y + scale * F.linear(F.linear(h, lora_A), lora_B).reshape(y.shape)


# -- the record and the kind ------------------------------------------------------------------------

@dataclass(frozen=True)
class ShortcutRecord:
    """A LoRA-adapted shortcut: ``out = dst + scale * (src A^T) B^T``."""

    site: str  # stable name, "shortcuts.<layer>.<link>"
    link: str  # one of LINKS
    src: str  # name of the captured node the adapter reads (the skip operand of a residual add)
    dst: str  # name of the residual add it adds to
    lora_A: str  # attribute path of A, (r, dim)
    lora_B: str  # attribute path of B, (dim, r)
    r: int
    alpha: float
    scale: float
    dim: int

    def describe(self) -> str:
        return f"shortcut({self.link}, r={self.r}, scale={self.scale:g})"


OP = torch.ops.lorafx.lora_shortcut.default


class ShortcutKind(OpKind):
    """``lora_shortcut``: y + s·(h Aᵀ) Bᵀ.  Requires a ShortcutRecord on each node.

    Not a linear adapter (``adapters`` is empty), not mergeable into a weight, no
    schedules.  ``build`` makes a node (for InsertShortcuts); ``lower`` rewrites one into
    plain aten ops (for ``merge_and_unload``).
    """

    name = "lora_shortcut"
    ops = (OP,)
    mergeable = False  # MergeLoRA leaves these nodes running (there is no weight to fold them into)

    def record(self, node) -> Optional[ShortcutRecord]:
        return get_record(node, ShortcutRecord)

    def input(self, node):
        return self.view(node).h

    def adapters(self, node) -> List:
        return []

    def adapter_tensors(self, node) -> List[str]:
        rec = self.record(node)
        return [rec.lora_A, rec.lora_B] if rec is not None else []

    def check(self, node) -> Optional[str]:
        if self.record(node) is None:
            return f"{self.name} node {node.name} has no ShortcutRecord in node.meta['lorafx']"
        return None

    def describe(self, node) -> str:
        rec = self.record(node)
        return rec.site if rec is not None else ""

    def saved_inputs(self, node) -> set:
        v = self.view(node)
        return {a for a in (v.h, v.lora_A, v.lora_B) if isinstance(a, torch.fx.Node)}

    def cost(self, node, q: InputQuery) -> NodeCost:
        v = self.view(node)
        rec = self.record(node)
        h, a = q.shape(v.h), q.shape(v.lora_A)
        dim = h[-1] if h else rec.dim
        r = a[0] if a else rec.r
        tokens = q.tokens(v.h)
        fwd, bwd = shortcut_flops(tokens, dim, r, need_h=q.needs_grad(v.h), need_a=q.needs_grad(v.lora_A),
                                  need_b=q.needs_grad(v.lora_B))
        return NodeCost(sympy.sympify(fwd), sympy.sympify(bwd), sympy.sympify(2 * tokens * dim))  # scale, add

    def build(self, graph: torch.fx.Graph, h, y, record: ShortcutRecord, *, created_by: str,
              name: Optional[str] = None) -> torch.fx.Node:
        """A new ``lora_shortcut`` node for ``record`` (before the insertion point), with its
        A/B get_attrs and its Origin and Shortcut records (InsertShortcuts' rewrite)."""
        a, b = graph.get_attr(record.lora_A), graph.get_attr(record.lora_B)
        node = create(graph, OP, name=name, h=h, y=y, lora_A=a, lora_B=b, scale=record.scale)
        set_record(node, OriginRecord(record.site, "Shortcut", created_by=created_by))
        set_record(node, record)
        return node

    def lower(self, graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
        """Replace ``node`` by ``y + scale * reshape(linear(linear(h, A), B), y's shape)`` in
        plain aten ops (before it); returns the final add.  A and B stay as the node's
        get_attr inputs (the caller decides whether they are frozen)."""
        aten = torch.ops.aten
        v = self.view(node)
        with graph.inserting_before(node):
            xa = graph.call_function(aten.linear.default, (v.h, v.lora_A))
            delta = graph.call_function(aten.linear.default, (xa, v.lora_B))
            if not _same_shape(v.h, v.y):  # OPT's FFN runs on (tokens, dim) rows: back to y's shape
                delta = graph.call_function(aten.view_as.default, (delta, v.y))
            scaled = graph.call_function(aten.mul.Tensor, (delta, v.scale))
            out = graph.call_function(aten.add.Tensor, (v.y, scaled))
        rec = self.record(node)
        if rec is not None:
            for n in (xa, delta, scaled, out):
                set_record(n, OriginRecord(rec.site, "Shortcut", created_by="merge_and_unload"))
        replace_node(graph, node, out, xa, delta, scaled)
        return out


def _same_shape(a, b) -> bool:
    va = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
    vb = b.meta.get("val") if isinstance(b, torch.fx.Node) else None
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor):
        return False
    return va.dim() == vb.dim() and all(x is y or str(x) == str(y) for x, y in zip(va.shape, vb.shape))


SHORTCUT = register_kind(ShortcutKind())
