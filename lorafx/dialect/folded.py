"""The ``lora_linear_folded`` kind: LoRA with A folded into the base GEMM (made by FoldLoRAIntoBase).

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
    always the folded f1; the backward is b1 or b5 at the run-time token count,
    ``lorafx.dialect.linear.backward`` with W = ``weight_ext[:m]``.  No adapter dropout: A
    multiplies the same x as W (``dropout_mask`` must be None or empty).

The op computes with W = ``weight_ext[:m]`` and A = ``lora_A``; when ``lora_A`` is not
the same memory as ``weight_ext[m:]`` (a clone: ``copy.deepcopy``, opcheck) it copies
them into one buffer per call and counts ``("fwd", "fold-copy")`` in
``lorafx.dialect.linear.schedule_counts`` instead of ``("fwd", "fold")``.  FLOPs equal those of
``lora_linear_xa`` with the same rule (``2 t n (m + r) + 2 t r m`` forward), so the cost model
and FlopCounterMode count it so.

Kind: ``FOLDED``.  Requires a LoraRecord on the node (and on its ``getitem(node, 0)``).
Saves x, the buffer, A, B and xa.  Provides ``fold`` (FoldLoRAIntoBase) and the
canonical form: the ``lora_linear`` it computes, reading W by its own name.
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from lorafx.meta import LoraRecord, ScheduleRecord, get_record, records, set_record
from lorafx.schedules import DEFAULT_KEEP_XA_SCHEDULE, Rule, Schedule, lora_flops

from . import linear as L
from .registry import InputQuery, args_of, copy_meta, create, getitem_users, register_kind, write

__all__ = ["lora_linear_folded", "check_folded_rule", "folded_rule", "FoldedKind", "FOLDED"]


def check_folded_rule(schedule: "str | Rule") -> Rule:
    """The parsed rule; ValueError unless every piece is ``f1b1k`` or ``f1b5k``."""
    rule = Rule.parse(schedule)
    for s in rule.schedules:
        if not (s.fwd == "f1" and s.bwd in ("b1", "b5") and s.keep_xa):
            raise ValueError(f"lorafx.lora_linear_folded runs the folded f1 forward with b1 or b5 and keeps XA: "
                             f"its rule must use f1b1k / f1b5k only, got {str(schedule)!r} (piece {s.name})")
    return rule


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
    schedule: str = DEFAULT_KEEP_XA_SCHEDULE,
) -> Tuple[Tensor, Tensor]:
    check_folded_rule(schedule)
    _no_dropout(dropout_mask, dropout_p)
    r = lora_A.shape[0]
    m = weight_ext.shape[0] - r
    x2 = L.flat(x)
    if lora_A.data_ptr() == weight_ext[m:].data_ptr() and lora_A.stride() == weight_ext[m:].stride():
        L.schedule_counts[("fwd", "fold")] += 1
    else:  # not folded in memory (a clone, e.g. opcheck or a deep copy): same numbers, one copy
        L.schedule_counts[("fwd", "fold-copy")] += 1
        weight_ext = torch.cat([weight_ext[:m], lora_A])
    full = torch.nn.functional.linear(x2, weight_ext)  # (tokens, m + r) = [x W^T | x A^T]
    xa_t = full[:, m:].t().contiguous()  # (r, tokens)
    y = full[:, :m]
    if bias is not None:
        y.add_(bias)
    y.addmm_(xa_t.t(), lora_B.t(), alpha=scale)
    return y.view(*x.shape[:-1], m), xa_t


@lora_linear_folded.register_fake
def _(x, weight_ext, bias, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.0,
      schedule=DEFAULT_KEEP_XA_SCHEDULE):
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
    x, weight_ext, bias, lora_A, lora_B, scale, mask, p, schedule = inputs
    ctx.rule, ctx.scale, ctx.has_bias = Rule.parse(schedule), scale, bias is not None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight_ext, lora_A, lora_B, output[1])


def _backward(ctx, dy, *ignored):
    x, weight_ext, lora_A, lora_B, xa = ctx.saved_tensors
    need_x, _, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    needs = (need_x, False, need_b and ctx.has_bias, need_a, need_bb)  # W (in the buffer) is frozen
    m = weight_ext.shape[0] - lora_A.shape[0]
    dx, _, db, da, dbb = L.run_backward(dy, x, weight_ext[:m], lora_A, lora_B, None, xa, ctx.scale, 0.0, ctx.rule,
                                        needs)
    return dx, None, db, da, dbb, None, None, None, None


lora_linear_folded.register_autograd(_backward, setup_context=_setup)


@register_flop_formula(torch.ops.lorafx.lora_linear_folded)
def _flops(x_shape, w_shape, b_shape, a_shape, bb_shape, scale=1.0, mask_shape=None, p=0.0,
           schedule=DEFAULT_KEEP_XA_SCHEDULE, *args, out_shape=None, **kwargs) -> int:
    tokens = math.prod(x_shape[:-1])
    r = a_shape[0]
    return int(lora_flops(kwargs.get("schedule", schedule), tokens, w_shape[1], w_shape[0] - r, r)[0])


def folded_rule(rule: "str | Rule") -> Optional[Rule]:
    """The folded op's rule for an adapter's rule (every forward becomes the folded f1, XA
    kept), or None if a piece uses a backward the folded op does not run (b3/b4)."""
    return Rule.parse(rule).map(lambda s: Schedule("f1", s.bwd, True) if s.bwd in ("b1", "b5") else None)


OP = torch.ops.lorafx.lora_linear_folded.default


class FoldedKind(L.AdapterKind):
    """``lora_linear_folded``: y and xa from one GEMM with ``[W; A]``, xa kept for backward.

    Requires a LoraRecord.  Provides ``fold`` (lora_linear[_xa] -> this) and the canonical
    form (this -> lora_linear on W by name).  Preserves outputs and gradients.
    """

    name = "lora_linear_folded"
    ops = (OP,)

    def weight(self, node):
        return self.view(node).weight_ext

    def dims(self, node, q: InputQuery):
        n, m, r = super().dims(node, q)
        if q.shape(self.weight(node)) is not None:
            m = m - r  # the (m + r, n) buffer [W; A]
        return n, m, r

    def grad_outputs(self, node):
        return (True, False)

    def saved_inputs(self, node) -> set:
        v = self.view(node)
        return {a for a in (v.x, v.weight_ext, v.lora_A, v.lora_B) if isinstance(a, torch.fx.Node)}

    def describe(self, node) -> str:
        return "A folded into the weight's buffer"

    def fold(self, graph: torch.fx.Graph, node: torch.fx.Node, weight_ext: torch.fx.Node, rule: Rule,
             name: str) -> torch.fx.Node:
        """Replace the adapter ``node`` (lora_linear or lora_linear_xa reading W and A by
        name) by a folded node on the buffer node ``weight_ext`` running ``rule``, plus its
        ``getitem(., 0)`` that takes the users of node's y.  Records are copied to both.
        Returns the getitem node."""
        v = args_of(node)
        with graph.inserting_before(node):
            new = create(graph, OP, name=name, x=v.x, weight_ext=weight_ext, bias=v.bias, lora_A=v.lora_A,
                         lora_B=v.lora_B, scale=float(v.scale), dropout_mask=None, dropout_p=0.0,
                         schedule=str(rule))
            out = graph.call_function(operator.getitem, (new, 0))
        val = node.meta.get("val")
        y_val = val[0] if isinstance(val, (tuple, list)) else val
        copy_meta(node, new, out)
        if isinstance(y_val, torch.Tensor):
            out.meta["val"] = y_val
            tokens = y_val.numel() // y_val.shape[-1] if y_val.shape[-1] else 0
            new.meta["val"] = (y_val, y_val.new_empty((get_record(node, LoraRecord).r, tokens)))
        for n in (new, out):
            for kept in records(node).values():
                set_record(n, kept)
            set_record(n, ScheduleRecord(str(rule), "folded"))
        if node.target is L.XA_OP:  # its users are getitem(node, 0)
            for user in list(node.users):
                user.replace_all_uses_with(out)
                graph.erase_node(user)
        else:
            node.replace_all_uses_with(out)
        graph.erase_node(node)
        return out

    def canonical(self, graph, node):
        """The ``lora_linear`` the node computes, reading W by the record's name: its
        ``getitem(., 0)`` becomes that node (keeping its name, users and records)."""
        rec = get_record(node, LoraRecord)
        v = self.view(node)
        out = getitem_users(node).get(0)
        made = []
        if out is not None:
            with graph.inserting_before(node):
                w = graph.get_attr(rec.weight)
            rule = self.rule(node).map(lambda s: Schedule(s.fwd, s.bwd, False))
            write(out, {**v.as_dict(), "weight": w, "schedule": str(rule)}, L.OP)
            made.append(out)
        for user in list(node.users):
            graph.erase_node(user)  # getitems of xa (unused by construction)
        graph.erase_node(node)
        ext = v.weight_ext
        if isinstance(ext, torch.fx.Node) and ext.op == "get_attr" and not ext.users:
            graph.erase_node(ext)
        return made


FOLDED = register_kind(FoldedKind())
