"""The ``lora_linear_recompute`` kind: an adapter that rebuilds its input in backward.

``torch.ops.lorafx.lora_linear_recompute(x, weight, bias, lora_A, lora_B, scale, dropout_mask,
dropout_p, schedule, recipe, sources)``
    Computes exactly what ``lorafx.lora_linear`` computes (same kernels, same
    ``schedule``), but does not save ``x`` for backward.  It saves ``sources``
    instead -- tensors that other autograd nodes save anyway (the inputs of the
    RMSNorm that produced x, the two factors of ``silu(gate) * up``) -- and its
    backward rebuilds ``x = recipe(sources)`` (``lorafx.dialect.recipe``) before
    running ``lora_linear``'s backward kernels.  The op trusts the caller (the
    ``RecomputeInputs`` pass) that ``x == recipe(sources)``; backward checks the
    recomputed shape and dtype.  ``sources`` get no gradient from this op (the
    gradient reaches them through x's own producer, as before).

Kind: ``RECOMPUTE``.  Requires a LoraRecord on the node.  Saves W, A, B, the mask and
the sources.  Costs what ``lora_linear`` costs under its rule; it has no schedule family
of its own (its rule was chosen before the rewrite).  Canonical form: the
``lora_linear`` it was made from.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from lorafx.schedules import Rule, lora_flops

from . import linear as L
from .recipe import compile_recipe, run_recipe
from .registry import register_kind, set_args

__all__ = ["lora_linear_recompute", "rebuild_input", "RecomputeKind", "RECOMPUTE"]


def rebuild_input(recipe: str, sources: Sequence[Tensor], shape, dtype, op: str) -> Tensor:
    """``recipe(sources)``, checked against the forward input's shape and dtype (cast to that
    dtype when it is another floating one: an input autocast cast, its sources left as they were)."""
    x = run_recipe(recipe, sources)
    if x.dtype != dtype and x.is_floating_point() and dtype.is_floating_point:
        x = x.to(dtype)
    if x.shape != shape or x.dtype != dtype:
        raise RuntimeError(f"lorafx.{op}: recipe {recipe!r} rebuilt x as {tuple(x.shape)} {x.dtype}, "
                           f"the forward had {tuple(shape)} {dtype}")
    return x


@torch.library.custom_op("lorafx::lora_linear_recompute", mutates_args=())
def lora_linear_recompute(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_mask: Optional[Tensor],
    dropout_p: float,
    schedule: str,
    recipe: str,
    sources: List[Tensor],
) -> Tensor:
    rule = Rule.parse(schedule)
    L.check_rule(rule, False, "lora_linear_recompute")
    compile_recipe(recipe)
    return L.forward(x, weight, bias, lora_A, lora_B, scale, dropout_mask, dropout_p, rule)[0]


@lora_linear_recompute.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_mask, dropout_p, schedule, recipe, sources):
    L.fake_checks(x, weight, lora_A, lora_B, "lora_linear_recompute")
    Rule.parse(schedule)
    compile_recipe(recipe)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, mask, p, schedule, recipe, sources = inputs
    ctx.scale, ctx.p, ctx.rule, ctx.recipe = scale, p, Rule.parse(schedule), recipe
    ctx.has_bias = bias is not None
    ctx.x_meta = (x.shape, x.dtype)
    ctx.n_sources = len(sources)
    # x is NOT saved: backward rebuilds it from the sources, which other nodes save anyway.
    ctx.save_for_backward(weight, lora_A, lora_B, mask, *sources)


def _backward(ctx, dy):
    weight, lora_A, lora_B, mask, *sources = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    needs = (need_x, need_w, need_b and ctx.has_bias, need_a, need_bb)
    shape, dtype = ctx.x_meta
    if need_w or need_a or need_bb:  # dW, dA or dB read x
        x = rebuild_input(ctx.recipe, sources, shape, dtype, "lora_linear_recompute")
    else:  # only dx (and the bias grad) are needed: they do not read x
        x = dy.new_zeros(()).expand(shape)  # a zero-stride stand-in: backward reads only its shape
    grads = L.run_backward(dy, x, weight, lora_A, lora_B, mask, None, ctx.scale, ctx.p, ctx.rule, needs)
    return (*grads, None, None, None, None, None, [None] * ctx.n_sources)


lora_linear_recompute.register_autograd(_backward, setup_context=_setup)


@register_flop_formula(torch.ops.lorafx.lora_linear_recompute)
def _flops(x_shape, w_shape, b_shape, a_shape, bb_shape, scale=1.0, mask_shape=None, p=0.0,
           schedule="f1b1", *args, out_shape=None, **kwargs) -> int:
    tokens = math.prod(x_shape[:-1])
    dropout = mask_shape is not None and math.prod(mask_shape) > 0
    return int(lora_flops(schedule, tokens, w_shape[1], w_shape[0], a_shape[0], dropout=dropout)[0])


_OP = torch.ops.lorafx.lora_linear_recompute.default


class RecomputeKind(L.AdapterKind):
    """``lora_linear_recompute``: ``lora_linear`` that saves ``sources`` instead of x.

    Requires a LoraRecord.  Provides ``adopt`` (RecomputeInputs: lora_linear -> this) and
    the canonical form (this -> lora_linear).  Preserves outputs and gradients bit for bit.
    """

    name = "lora_linear_recompute"
    ops = (_OP,)
    helper_ops = ()

    def describe(self, node) -> str:
        return f"x recomputed from {len(self.view(node).sources)} saved tensors"

    def saved_inputs(self, node) -> set:
        v = self.view(node)
        kept = (v.weight, v.lora_A, v.lora_B, v.dropout_mask, *v.sources)
        return {a for a in kept if isinstance(a, torch.fx.Node)}

    def adopt(self, node: torch.fx.Node, recipe: str, sources: Sequence[torch.fx.Node]) -> None:
        """Make the ``lora_linear`` ``node`` rebuild its input from ``sources`` by ``recipe``."""
        set_args(node, _OP, recipe=recipe, sources=list(sources))

    def canonical(self, graph, node):
        set_args(node, L.OP)
        return [node]


RECOMPUTE = register_kind(RecomputeKind())
