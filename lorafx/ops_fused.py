"""LoRA dialect ops made by lorafx's memory passes.

``torch.ops.lorafx.lora_linear_recompute(x, weight, bias, lora_A, lora_B, scale, dropout_mask,
dropout_p, schedule, recipe, sources)``
    Computes exactly what ``lorafx.lora_linear`` computes (same kernels, same
    ``schedule``), but does not save ``x`` for backward.  It saves ``sources``
    instead -- tensors that other autograd nodes save anyway (the inputs of the
    RMSNorm that produced x, the two factors of ``silu(gate) * up``) -- and its
    backward recomputes ``x = recipe(sources)`` before running ``lora_linear``'s
    backward.  ``recipe`` is a small expression over ATen ops naming the sources
    ``s0, s1, ...``, e.g. ``aten.mul.Tensor(s2, aten.to.dtype(aten.mul.Tensor(s0, s1), torch.float32))``;
    only cheap, deterministic ops are allowed (``RECIPE_OPS``), so the recomputed x
    is bit-identical to the forward's.  The op trusts the caller (the
    ``RecomputeInputs`` pass) that ``x == recipe(sources)``; backward checks the
    recomputed shape and dtype.  ``sources`` get no gradient from this op (the
    gradient reaches them through x's own producer, as before).

``torch.ops.lorafx.lora_linear_siblings(x, weights, biases, has_bias, lora_As, lora_Bs, scales, schedules, recipe, sources)``
    k adapted linears that read the same ``x`` (q/k/v, gate/up), adapters without
    dropout.  Returns the k outputs.  Forward: one GEMM ``[A_1; ...; A_k] x^T``
    (the stacked A is built once per call, (sum r_i) x n) instead of k skinny ones;
    backward: the k ``dA_i`` come from one GEMM and the adapter part of dx from one
    GEMM with the stacked A; x is saved once.  Base products stay one GEMM per
    linear (their weights are separate tensors).

All ops have fake kernels (graphs re-export and run on meta tensors), autograd
formulas and FLOP formulas, and pass ``torch.library.opcheck``.
"""
from __future__ import annotations

import ast
import functools
import math
from types import SimpleNamespace
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import ops as _ops
from .schedules import DEFAULT_SCHEDULE, lora_flops, parse_rule, resolve

__all__ = ["lora_linear_recompute", "lora_linear_siblings", "compile_recipe", "run_recipe", "RECIPE_OPS",
           "recipe_op_name", "MERGEABLE_LORA_OPS"]

aten = torch.ops.aten

# Ops a recipe may use: elementwise maps, casts and views whose results depend only on
# their inputs (no RNG, no reductions across tokens), cheap next to a GEMM.
RECIPE_OPS = frozenset({
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.to.dtype, aten._to_copy.default,
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
    aten.rsqrt.default, aten.layer_norm.default, aten.rms_norm.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.t.default, aten.transpose.int, aten.permute.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.view.default, aten.reshape.default,
})
_TORCH_CONSTANTS = {name: getattr(torch, name) for name in (
    "float16", "bfloat16", "float32", "float64", "int32", "int64", "bool",
    "contiguous_format", "preserve_format", "channels_last")}


def recipe_op_name(op: torch._ops.OpOverload) -> str:
    """``aten.mul.Tensor`` for ``torch.ops.aten.mul.Tensor``."""
    return f"{op.namespace}.{op._opname}.{op._overloadname}"


def _resolve_op(node: ast.AST) -> torch._ops.OpOverload:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id != "aten" or len(parts) != 2:
        raise ValueError("a recipe calls ops as aten.<op>.<overload>")
    overload, packet = parts
    op = getattr(getattr(torch.ops.aten, packet), overload)
    if op not in RECIPE_OPS:
        raise ValueError(f"aten.{packet}.{overload} is not allowed in a recipe (see lorafx.ops_fused.RECIPE_OPS)")
    return op


def _compile_node(node: ast.AST) -> Callable[[Sequence[Tensor]], object]:
    if isinstance(node, ast.Call):
        op = _resolve_op(node.func)
        args = [_compile_node(a) for a in node.args]
        kwargs = {k.arg: _compile_node(k.value) for k in node.keywords}
        return lambda s: op(*(a(s) for a in args), **{k: v(s) for k, v in kwargs.items()})
    if isinstance(node, ast.Name):
        if node.id.startswith("s") and node.id[1:].isdigit():
            i = int(node.id[1:])
            return lambda s: s[i]
        raise ValueError(f"unknown name {node.id!r} in a recipe (sources are s0, s1, ...)")
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
        if node.attr not in _TORCH_CONSTANTS:
            raise ValueError(f"torch.{node.attr} is not allowed in a recipe")
        value = _TORCH_CONSTANTS[node.attr]
        return lambda s: value
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float))):
        value = node.value
        return lambda s: value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        value = -node.operand.value
        return lambda s: value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_compile_node(e) for e in node.elts]
        return lambda s: [i(s) for i in items]
    raise ValueError(f"unsupported syntax in a recipe: {ast.dump(node)}")


@functools.lru_cache(maxsize=None)
def compile_recipe(recipe: str) -> Callable[[Sequence[Tensor]], Tensor]:
    """Parse ``recipe`` once; the result maps a sources list to the recomputed tensor.
    Raises ValueError for anything outside the small recipe language."""
    try:
        tree = ast.parse(recipe, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"lorafx recipe {recipe!r} does not parse: {e}") from None
    try:
        return _compile_node(tree.body)
    except (ValueError, AttributeError) as e:
        raise ValueError(f"lorafx recipe {recipe!r}: {e}") from None


def run_recipe(recipe: str, sources: Sequence[Tensor]) -> Tensor:
    """Evaluate ``recipe`` on ``sources`` (no autograd recording)."""
    with torch.no_grad():
        return compile_recipe(recipe)(list(sources))


# ----------------------------------------------------------------------------- lora_linear_recompute
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
    _ops._check_schedule(schedule, False, "lora_linear_recompute")
    compile_recipe(recipe)
    return _ops._forward(x, weight, bias, lora_A, lora_B, scale, dropout_mask, dropout_p, schedule, False)[0]


@lora_linear_recompute.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_mask, dropout_p, schedule, recipe, sources):
    _ops._fake_checks(x, weight, lora_A, lora_B)
    parse_rule(schedule)
    compile_recipe(recipe)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_recompute(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, mask, p, schedule, recipe, sources = inputs
    ctx.scale, ctx.p, ctx.schedule, ctx.recipe = scale, p, schedule, recipe
    ctx.has_bias = bias is not None
    ctx.x_meta = (x.shape, x.dtype)
    ctx.n_sources = len(sources)
    # x is NOT saved: backward rebuilds it from the sources, which other nodes save anyway.
    ctx.save_for_backward(weight, lora_A, lora_B, mask, *sources)


def _backward_recompute(ctx, dy):
    weight, lora_A, lora_B, mask, *sources = ctx.saved_tensors
    need = tuple(ctx.needs_input_grad[:5])
    shape, dtype = ctx.x_meta
    if need[1] or need[3] or need[4]:  # dW, dA or dB read x
        x = run_recipe(ctx.recipe, sources)
        if x.shape != shape or x.dtype != dtype:
            raise RuntimeError(f"lorafx.lora_linear_recompute: recipe {ctx.recipe!r} rebuilt x as "
                               f"{tuple(x.shape)} {x.dtype}, the forward had {tuple(shape)} {dtype}")
    else:  # only dx (and the bias grad) are needed: they do not read x
        x = dy.new_zeros(()).expand(shape)  # a zero-stride stand-in: backward reads only its shape
    inner = SimpleNamespace(saved_tensors=(x, weight, lora_A, lora_B, mask), needs_input_grad=need,
                            scale=ctx.scale, p=ctx.p, has_bias=ctx.has_bias, schedule=ctx.schedule)
    dx, dw, db, da, dbb = _ops._backward_lora_linear(inner, dy)[:5]
    return dx, dw, db, da, dbb, None, None, None, None, None, [None] * ctx.n_sources


lora_linear_recompute.register_autograd(_backward_recompute, setup_context=_setup_recompute)


# Single-output LoRA-dialect ops whose arguments start (x, weight, bias, lora_A, lora_B, scale):
# MergeLoRA turns each of them into aten.linear(x, W + s B A, bias).
MERGEABLE_LORA_OPS = (torch.ops.lorafx.lora_linear.default, torch.ops.lorafx.lora_linear_recompute.default)


@register_flop_formula(torch.ops.lorafx.lora_linear_recompute)
def _recompute_flops(x_shape, w_shape, b_shape, a_shape, bb_shape, scale=1.0, mask_shape=None, p=0.0,
                     schedule=DEFAULT_SCHEDULE, *args, out_shape=None, **kwargs) -> int:
    tokens = math.prod(x_shape[:-1])
    dropout = mask_shape is not None and math.prod(mask_shape) > 0
    return int(lora_flops(schedule, tokens, w_shape[1], w_shape[0], a_shape[0], dropout=dropout)[0])


# ----------------------------------------------------------------------------- lora_linear_siblings
def _rules(schedules: str) -> List[str]:
    """The siblings' schedule rules, joined with ';' in the op's argument."""
    return schedules.split(";")


def _sibling_schedules(schedules: str, tokens: int):
    out = []
    for rule in _rules(schedules):
        s = resolve(rule, tokens)
        if s.bwd in ("b3", "b4") or s.keep_xa:
            raise ValueError(f"lorafx.lora_linear_siblings runs f1/f2 with b1/b5 (no 'k'); rule {rule!r} "
                             f"picks {s.name} at {tokens} tokens")
        out.append(s)
    return out


def _spread(present: Sequence, has: Sequence[bool]) -> list:
    """[b0, b1] with has=[True, False, True] -> [b0, None, b1]."""
    it = iter(present)
    return [next(it) if h else None for h in has]


def _stacked(mats: Sequence[Tensor], chosen: Sequence[bool]):
    """(rows of each chosen matrix in the stack, the stack) -- the chosen matrices one under another."""
    rows, parts, start = [], [], 0
    for m, c in zip(mats, chosen):
        if c:
            rows.append(slice(start, start + m.shape[0]))
            parts.append(m)
            start += m.shape[0]
        else:
            rows.append(None)
    return rows, (torch.cat(parts) if len(parts) > 1 else parts[0]) if parts else None


@torch.library.custom_op("lorafx::lora_linear_siblings", mutates_args=())
def lora_linear_siblings(
    x: Tensor,
    weights: List[Tensor],
    biases: List[Tensor],
    has_bias: List[bool],
    lora_As: List[Tensor],
    lora_Bs: List[Tensor],
    scales: List[float],
    schedules: str,
    recipe: str,
    sources: List[Tensor],
) -> List[Tensor]:
    x2 = _ops._flat(x)
    sched = _sibling_schedules(schedules, x2.shape[0])
    if recipe:
        compile_recipe(recipe)
    biases = _spread(biases, has_bias)
    # one GEMM [A_i; ...] x^T for every sibling that runs f1: (sum r, tokens)
    rows, a_f1 = _stacked(lora_As, [s.fwd == "f1" for s in sched])
    xa_t = _ops._xa_t(x2, a_f1) if a_f1 is not None else None
    outs = []
    for w, b, a, bb, sc, s, rr in zip(weights, biases, lora_As, lora_Bs, scales, sched, rows):
        if s.fwd == "f1":
            y = torch.addmm(b, x2, w.t()) if b is not None else x2.mm(w.t())
            torch.addmm(y, xa_t[rr].t(), bb.t(), alpha=sc, out=y)
        else:  # f2: x (W + s B A)^T
            merged = torch.addmm(w, bb, a, alpha=sc)
            y = torch.addmm(b, x2, merged.t()) if b is not None else x2.mm(merged.t())
            del merged
        outs.append(y.view(*x.shape[:-1], w.shape[0]))
    return outs


@lora_linear_siblings.register_fake
def _(x, weights, biases, has_bias, lora_As, lora_Bs, scales, schedules, recipe, sources):
    torch._check(len(weights) == len(has_bias) == len(lora_As) == len(lora_Bs) == len(scales) == len(_rules(schedules))
                 and len(biases) == sum(has_bias),
                 lambda: "lora_linear_siblings: one weight, has_bias, A, B, scale and schedule per sibling, "
                         "one bias per True in has_bias")
    for w, a, bb in zip(weights, lora_As, lora_Bs):
        _ops._fake_checks(x, w, a, bb)
    for rule in _rules(schedules):
        parse_rule(rule)
    if recipe:
        compile_recipe(recipe)
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


def _setup_siblings(ctx, inputs, output):
    x, weights, biases, has_bias, lora_As, lora_Bs, scales, schedules, recipe, sources = inputs
    k = len(weights)
    ctx.k, ctx.scales, ctx.schedules, ctx.recipe = k, list(scales), schedules, recipe
    ctx.has_bias = list(has_bias)
    ctx.x_meta = (x.shape, x.dtype)
    ctx.n_sources = len(sources)
    kept = list(sources) if recipe else [x]  # x once for all siblings (or the recipe's sources)
    ctx.save_for_backward(*weights, *lora_As, *lora_Bs, *kept)


def _flags(f, n):
    return list(f) if isinstance(f, (list, tuple)) else [f] * n


def _backward_siblings(ctx, dys):
    k = ctx.k
    saved = ctx.saved_tensors
    weights, lora_As, lora_Bs, kept = saved[:k], saved[k:2 * k], saved[2 * k:3 * k], saved[3 * k:]
    need_x, need_w, need_b, _, need_a, need_bb = ctx.needs_input_grad[:6]
    need_w, need_a, need_bb = _flags(need_w, k), _flags(need_a, k), _flags(need_bb, k)
    need_b = _spread(_flags(need_b, sum(ctx.has_bias)), ctx.has_bias)
    shape, dtype = ctx.x_meta
    tokens = math.prod(shape[:-1])
    sched = _sibling_schedules(ctx.schedules, tokens)
    live = [dy is not None for dy in dys]
    reads_x = any(w and l for w, l in zip(need_w, live)) or any(need_a) or any(need_bb)
    if ctx.recipe:
        x = run_recipe(ctx.recipe, kept) if reads_x else None
        if x is not None and (x.shape != shape or x.dtype != dtype):
            raise RuntimeError(f"lorafx.lora_linear_siblings: recipe {ctx.recipe!r} rebuilt x as "
                               f"{tuple(x.shape)} {x.dtype}, the forward had {tuple(shape)} {dtype}")
    else:
        x = kept[0]
    x2 = _ops._flat(x) if x is not None else None
    dy2 = [(_ops._flat(dy) if dy is not None else None) for dy in dys]
    ref = next(d for d in dy2 if d is not None)
    # Z: s_i B_i^T dy_i^T stacked for the siblings with an output gradient, (sum r, tokens)
    rows, a_live = _stacked(lora_As, live)
    z_t = ref.new_empty((a_live.shape[0], tokens))
    for dy, bb, sc, rr in zip(dy2, lora_Bs, ctx.scales, rows):
        if dy is not None:
            torch.mm(bb.t(), dy.t(), out=z_t[rr])
            z_t[rr].mul_(sc)
    dx = None
    if need_x:
        for dy, w, a, bb, sc, s in zip(dy2, weights, lora_As, lora_Bs, ctx.scales, sched):
            if dy is None:
                continue
            wt = torch.addmm(w, bb, a, alpha=sc) if s.bwd == "b5" else w  # b5: through W + s B A
            dx = dy.mm(wt) if dx is None else torch.addmm(dx, dy, wt, out=dx)
        b1 = [l and s.bwd == "b1" for l, s in zip(live, sched)]
        if any(b1):  # the b1 siblings' adapter parts of dx in one GEMM: Z^T [A_i; ...]
            if all(b1[i] == live[i] for i in range(k)):
                torch.addmm(dx, z_t.t(), a_live, out=dx)
            else:
                z_b1 = torch.cat([z_t[rr] for rr, f in zip(rows, b1) if f])
                torch.addmm(dx, z_b1.t(), _stacked(lora_As, b1)[1], out=dx)
        dx = dx.view(shape)
    da_all = z_t.mm(x2) if any(need_a) else None  # every dA_i in one GEMM: (sum r, in)
    xa_t = _ops._xa_t(x2, a_live) if any(need_bb) else None  # every A_i x^T in one GEMM: (sum r, tokens)
    dws, dbs, das, dbbs = [], [], [], []
    for i, (dy, sc, rr) in enumerate(zip(dy2, ctx.scales, rows)):
        dws.append(dy.t().mm(x2) if need_w[i] and dy is not None else None)
        if ctx.has_bias[i]:
            dbs.append(dy.sum(0) if need_b[i] and dy is not None else None)
        das.append(da_all[rr].contiguous() if need_a[i] and dy is not None else None)
        dbbs.append(xa_t[rr].mm(dy).mul_(sc).t().contiguous() if need_bb[i] and dy is not None else None)
    return dx, dws, dbs, None, das, dbbs, None, None, None, [None] * ctx.n_sources


lora_linear_siblings.register_autograd(_backward_siblings, setup_context=_setup_siblings)


@register_flop_formula(torch.ops.lorafx.lora_linear_siblings)
def _siblings_flops(x_shape, w_shapes, b_shapes, has_bias, a_shapes, bb_shapes, scales=None, schedules=None,
                    *args, out_shape=None, **kwargs) -> int:
    tokens = math.prod(x_shape[:-1])
    rules = _rules(schedules) if schedules else [DEFAULT_SCHEDULE] * len(w_shapes)
    return int(sum(lora_flops(rule, tokens, w[1], w[0], a[0])[0] for w, a, rule in zip(w_shapes, a_shapes, rules)))
