"""The recipe language: how a recompute node rebuilds its input from saved tensors.

A recipe is a small expression over ATen ops naming the sources ``s0, s1, ...``, e.g.
``aten.mul.Tensor(s2, aten.to.dtype(aten.mul.Tensor(s0, s1), torch.float32))``.  Only
cheap, deterministic ops are allowed (``RECIPE_OPS``), so a recomputed tensor is
bit-identical to the forward's.  ``compile_recipe`` parses a recipe once (cached);
``run_recipe`` evaluates it on a list of source tensors.
"""
from __future__ import annotations

import ast
import functools
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["RECIPE_OPS", "compile_recipe", "run_recipe", "recipe_op_name"]

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
        raise ValueError(f"aten.{packet}.{overload} is not allowed in a recipe (see lorafx.dialect.recipe.RECIPE_OPS)")
    return op


def _compile_node(node: ast.AST) -> Callable[[Sequence[Tensor]], object]:
    if isinstance(node, ast.Call):
        op = _resolve_op(node.func)._op  # the overload's C++ callable (what OpOverload.__call__ calls)
        args = [_compile_node(a) for a in node.args]
        kwargs = {k.arg: _compile_node(k.value) for k in node.keywords}
        if kwargs:
            return lambda s: op(*[a(s) for a in args], **{k: v(s) for k, v in kwargs.items()})
        if len(args) == 1:
            a0, = args
            return lambda s: op(a0(s))
        if len(args) == 2:
            a0, a1 = args
            return lambda s: op(a0(s), a1(s))
        return lambda s: op(*[a(s) for a in args])
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
    if not torch.is_grad_enabled():  # a backward: no grad mode to leave
        return compile_recipe(recipe)(list(sources))
    with torch.no_grad():
        return compile_recipe(recipe)(list(sources))
