"""CausalMaskToIsCausal: feed SDPA ``is_causal=True`` instead of a mask that is provably causal.

transformers builds an explicit boolean mask (batch x 1 x seq x seq) from
``arange`` comparisons when a model is exported, where eager code passes
``is_causal=True``.  The CPU attention kernel turns that mask into a float copy
and saves it for backward in every layer (1 MiB per layer at batch 4 x seq
256, growing with seq²).  This pass proves that a mask is the plain causal
mask, for every batch size and sequence length, and then drops it.

The proof is an abstract interpretation of the mask's producers: every tensor
in the mask's cone is represented by a sympy expression in its own index
variables ``I0, I1, ...`` (``arange(n)`` is ``I0``, ``unsqueeze``/``expand``/
``slice``/``index`` re-index, comparisons become relations, ``diff`` a
piecewise, ``cumsum`` of a constant a linear function).  The mask is accepted
only when its expression simplifies to ``I3 <= I2`` (key index <= query index:
SDPA's ``is_causal`` lower-triangular mask, also for Lq != Lk), so the
rewrite holds for all shapes.  A cone that reads any input tensor
(``attention_mask``, ``position_ids``, padding) other than through its shape,
any parameter or buffer, or any op outside the small set modelled here, is not
proven, and its SDPA is left alone (``info["kept"]`` says why).  Sliding-window
masks (Mistral with a window) are not the causal mask and are kept.

Requires: a captured graph.  Provides: ``"causal_sdpa"``.
Preserves: outputs and gradients (exactly: the SDPA kernels compute the same
attention; the float mask copy and its memory go away).

Before::

    %arange = call_function[target=aten.arange.default](args=(%seq,))
    ...
    %le = call_function[target=aten.le.Tensor](args=(%kv_idx, %q_idx))
    %mask = call_function[target=aten.expand.default](args=(%and, [%batch, -1, %seq, %seq]))
    %sdpa = call_function[target=aten.scaled_dot_product_attention.default](args=(%q, %k, %v, %mask), kwargs={scale: 0.35})

After::

    %sdpa = call_function[target=aten.scaled_dot_product_attention.default](
        args=(%q, %k, %v, None, 0.0, True), kwargs={scale: 0.35})
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, List, Optional

import sympy
import torch
import torch.fx

from lorafx.context import CompileContext
from lorafx.dialect import args_of
from lorafx.pipeline import CAPTURED, Pass, PassResult

__all__ = ["CausalMaskToIsCausal", "prove_causal_mask", "mask_expression", "NotProven"]

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default


class NotProven(Exception):
    """The abstract interpreter cannot model a node (the message says which and why)."""


def _var(i: int) -> sympy.Symbol:
    return sympy.Symbol(f"I{i}", integer=True, nonnegative=True)


@dataclass(frozen=True)
class _Val:
    """A tensor as ``expr(I0, ..., I{ndim-1})``; ``expr`` is a sympy number or boolean."""

    expr: object
    ndim: int


def _shape(node) -> tuple:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise NotProven(f"{getattr(node, 'name', node)}: no tensor metadata")
    return tuple(val.shape)


def _sym(v):
    """A python/Sym int or float (or a node holding one) as a sympy expression."""
    if isinstance(v, torch.fx.Node):
        val = v.meta.get("val")
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return sympy.sympify(val.node.expr)
        if isinstance(val, (int, float, bool)):
            return sympy.sympify(val)
        raise NotProven(f"{v.name}: a tensor where a scalar was expected")
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        return sympy.sympify(v.node.expr)
    if isinstance(v, bool):
        return sympy.true if v else sympy.false
    if isinstance(v, (int, float)):
        return sympy.sympify(v)
    raise NotProven(f"unsupported scalar {v!r}")


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _reindex(expr, mapping: Dict[int, object]):
    """Substitute index variables simultaneously (``{old index: new expression}``)."""
    if not mapping:
        return expr
    tmp = {i: sympy.Dummy(f"t{i}", integer=True) for i in mapping}
    expr = expr.xreplace({_var(i): tmp[i] for i in mapping}) if hasattr(expr, "xreplace") else expr
    return expr.xreplace({tmp[i]: e for i, e in mapping.items()}) if hasattr(expr, "xreplace") else expr


def _broadcast_to(v: _Val, node, out_shape: tuple):
    """``v`` (the value of tensor ``node``) as an expression over ``out_shape``'s index variables."""
    in_shape = _shape(node)
    offset = len(out_shape) - len(in_shape)
    if offset < 0:
        raise NotProven(f"{node.name}: cannot broadcast rank {len(in_shape)} to {len(out_shape)}")
    mapping = {}
    for d, size in enumerate(in_shape):
        mapping[d] = sympy.Integer(0) if _is_one(size) else _var(d + offset)
    return _reindex(v.expr, mapping)


_RELATIONS = {
    "eq": sympy.Eq, "ne": sympy.Ne, "le": sympy.Le, "lt": sympy.Lt, "ge": sympy.Ge, "gt": sympy.Gt,
}
_ARITH = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}
_LOGIC = {"__and__": sympy.And, "bitwise_and": sympy.And, "logical_and": sympy.And,
          "__or__": sympy.Or, "bitwise_or": sympy.Or, "logical_or": sympy.Or}


def _as_bool(e):
    if e in (sympy.true, sympy.false) or isinstance(e, (sympy.logic.boolalg.Boolean, sympy.core.relational.Relational)):
        return e
    if e == 0:
        return sympy.false
    if e == 1:
        return sympy.true
    raise NotProven(f"non-boolean value {e} in a logical op")


class _Interpreter:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.cache: Dict[torch.fx.Node, object] = {}

    def value(self, node) -> _Val:
        if not isinstance(node, torch.fx.Node):
            e = _sym(node)
            return _Val(e, 0)
        if node in self.cache:
            got = self.cache[node]
            if isinstance(got, NotProven):
                raise got
            return got
        try:
            out = self._eval(node)
            shape = _shape(node)
            ones = {d: sympy.Integer(0) for d, s in enumerate(shape) if _is_one(s)}
            out = _Val(_reindex(out.expr, ones), len(shape))
        except NotProven as e:
            self.cache[node] = e
            raise
        self.cache[node] = out
        return out

    def _operand(self, arg, out_shape):
        if isinstance(arg, torch.fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor):
            return _broadcast_to(self.value(arg), arg, out_shape)
        return _sym(arg)

    def _eval(self, node: torch.fx.Node) -> _Val:
        if node.op != "call_function":
            raise NotProven(f"{node.name}: depends on {node.op} {node.target} (an input, parameter or buffer)")
        t = node.target
        if not isinstance(t, torch._ops.OpOverload):
            raise NotProven(f"{node.name}: {t} is not an aten op")
        name, overload = t._schema.name.split("::")[-1], t._overloadname
        args, kw = node.args, node.kwargs
        out_shape = _shape(node)
        ndim = len(out_shape)
        val = node.meta["val"]

        if t is aten.arange.default:
            return _Val(_var(0), 1)
        if t is aten.arange.start:
            return _Val(_sym(args[0]) + _var(0), 1)
        if t is aten.arange.start_step:
            return _Val(_sym(args[0]) + _sym(args[2]) * _var(0), 1)
        if name in ("new_ones", "new_zeros", "ones", "zeros", "full", "new_full", "scalar_tensor"):
            if name in ("new_ones", "ones"):
                c = 1
            elif name in ("new_zeros", "zeros"):
                c = 0
            elif name == "scalar_tensor":
                c = args[0]
            else:
                c = args[-1] if name == "full" else args[2]
            c = _sym(c)
            if val.dtype == torch.bool:
                c = _as_bool(c)
            return _Val(c, ndim)
        if name in _ARITH:
            alpha = kw.get("alpha", 1)
            a, b = self._operand(args[0], out_shape), self._operand(args[1], out_shape)
            if name in ("add", "sub") and alpha != 1:
                b = b * _sym(alpha)
            return _Val(_ARITH[name](a, b), ndim)
        if name in _RELATIONS:
            a, b = self._operand(args[0], out_shape), self._operand(args[1], out_shape)
            return _Val(_RELATIONS[name](a, b), ndim)
        if name in _LOGIC:
            a, b = self._operand(args[0], out_shape), self._operand(args[1], out_shape)
            return _Val(_LOGIC[name](_as_bool(a), _as_bool(b)), ndim)
        if name in ("logical_not", "bitwise_not") and val.dtype == torch.bool:
            return _Val(sympy.Not(_as_bool(self._operand(args[0], out_shape))), ndim)
        if t is aten.where.self:
            c, a, b = (self._operand(x, out_shape) for x in args[:3])
            return _Val(sympy.Piecewise((a, _as_bool(c)), (b, True)), ndim)
        if name in ("to", "_to_copy", "alias", "clone", "contiguous", "lift_fresh_copy", "detach"):
            src = args[0]
            src_dtype = _tensor_dtype(src)
            if src_dtype != val.dtype and not (_is_int(src_dtype) and _is_int(val.dtype)):
                raise NotProven(f"{node.name}: dtype change {src_dtype} -> {val.dtype}")
            return _Val(self.value(src).expr, ndim)
        if t is aten.unsqueeze.default:
            src = self.value(args[0])
            d = args[1] % (src.ndim + 1)
            return _Val(_reindex(src.expr, {i: _var(i + 1) for i in range(d, src.ndim)}), ndim)
        if t is aten.expand.default:
            return _Val(_broadcast_to(self.value(args[0]), args[0], out_shape), ndim)
        if t is aten.slice.Tensor:
            src = self.value(args[0])
            in_shape = _shape(args[0])
            dim = (args[1] if len(args) > 1 else kw.get("dim", 0)) % src.ndim
            start = args[2] if len(args) > 2 else kw.get("start")
            end = args[3] if len(args) > 3 else kw.get("end")
            step = args[4] if len(args) > 4 else kw.get("step", 1)
            start = 0 if start is None else start
            if not isinstance(start, int) or start < 0 or not isinstance(step, int) or step < 1:
                raise NotProven(f"{node.name}: slice start/step {start}/{step}")
            # ``end`` only bounds the output size, which the index variable already ranges over
            return _Val(_reindex(src.expr, {dim: start + step * _var(dim)}), ndim)
        if t in (aten.transpose.int, aten.permute.default):
            src = self.value(args[0])
            if t is aten.transpose.int:
                d0, d1 = args[1] % src.ndim, args[2] % src.ndim
                perm = list(range(src.ndim))
                perm[d0], perm[d1] = perm[d1], perm[d0]
            else:
                perm = [p % src.ndim for p in args[1]]
            # out[..., i_k, ...] = src[... index perm[k] = i_k ...]
            return _Val(_reindex(src.expr, {perm[k]: _var(k) for k in range(src.ndim)}), ndim)
        if t is aten.diff.default:
            return self._diff(node)
        if t is aten.cumsum.default:
            src = self.value(args[0])
            dim = args[1] % src.ndim
            e = src.expr
            if e in (sympy.false, 0):
                return _Val(sympy.Integer(0), ndim)
            if e == sympy.true:
                e = sympy.Integer(1)
            if getattr(e, "free_symbols", None) or not getattr(e, "is_number", False):
                raise NotProven(f"{node.name}: cumsum of a non-constant")
            return _Val(e * (_var(dim) + 1), ndim)
        if t is aten.index.Tensor:
            return self._index(node)
        raise NotProven(f"{node.name}: {t} is not modelled")

    def _diff(self, node) -> _Val:
        args, kw = node.args, node.kwargs
        x = args[0]
        n = args[1] if len(args) > 1 else kw.get("n", 1)
        dim = args[2] if len(args) > 2 else kw.get("dim", -1)
        prepend = args[3] if len(args) > 3 else kw.get("prepend")
        append = args[4] if len(args) > 4 else kw.get("append")
        src = self.value(x)
        dim %= src.ndim
        if n != 1 or append is not None:
            raise NotProven(f"{node.name}: diff with n={n} or append")
        j = _var(dim)
        shifted = _reindex(src.expr, {dim: j - 1})
        if prepend is None:  # out[j] = x[j + 1] - x[j]
            return _Val(sympy.simplify(_reindex(src.expr, {dim: j + 1}) - src.expr), src.ndim)
        pshape = _shape(prepend)
        if not _is_one(pshape[dim]):
            raise NotProven(f"{node.name}: diff prepend of size {pshape[dim]}")
        first = _reindex(src.expr, {dim: sympy.Integer(0)}) - _reindex(self.value(prepend).expr, {dim: sympy.Integer(0)})
        e = sympy.Piecewise((first, sympy.Eq(j, 0)), (src.expr - shifted, True))
        return _Val(sympy.simplify(sympy.piecewise_fold(e)), src.ndim)

    def _index(self, node) -> _Val:
        src_node, indices = node.args[0], node.args[1]
        src = self.value(src_node)
        k = len(indices)
        if any(i is None for i in indices):
            raise NotProven(f"{node.name}: index with None (non-leading indices)")
        out_shape = _shape(node)
        bshape = out_shape[:len(out_shape) - (src.ndim - k)]
        nb = len(bshape)
        mapping = {}
        for d, idx in enumerate(indices):
            if _tensor_dtype(idx) == torch.bool:
                raise NotProven(f"{node.name}: boolean index")
            mapping[d] = _broadcast_to(self.value(idx), idx, bshape)
        for d in range(k, src.ndim):
            mapping[d] = _var(nb + d - k)
        return _Val(_reindex(src.expr, mapping), len(out_shape))


def _tensor_dtype(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _is_int(dtype) -> bool:
    return dtype is not None and not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def mask_expression(gm: torch.fx.GraphModule, mask: torch.fx.Node, _interp: Optional[_Interpreter] = None):
    """The sympy expression of ``mask`` in its index variables (raises NotProven)."""
    return (_interp or _Interpreter(gm)).value(mask).expr


def _is_causal_expr(expr, q_dim: int, k_dim: int) -> bool:
    """``expr`` is ``I{k_dim} <= I{q_dim}`` (in any form that is equal over the integers)."""
    expr = sympy.simplify(expr)
    if not isinstance(expr, sympy.core.relational.Relational):
        return False
    q, k = _var(q_dim), _var(k_dim)
    lhs, rhs = expr.lhs, expr.rhs
    if isinstance(expr, (sympy.Ge, sympy.Gt)):
        lhs, rhs = rhs, lhs
    if isinstance(expr, (sympy.Le, sympy.Ge)):
        diff = lhs - rhs  # diff <= 0
    elif isinstance(expr, (sympy.Lt, sympy.Gt)):
        diff = lhs - rhs + 1  # integer: lhs < rhs  <=>  lhs - rhs + 1 <= 0
    else:
        return False
    return sympy.simplify(diff - (k - q)) == 0


def prove_causal_mask(gm: torch.fx.GraphModule, sdpa: torch.fx.Node, _interp: Optional[_Interpreter] = None) -> Optional[str]:
    """None if ``sdpa``'s mask is provably the plain causal mask, else the reason it is not."""
    mask = _mask_arg(sdpa)
    if not isinstance(mask, torch.fx.Node):
        return "no mask"
    val = mask.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != torch.bool:
        return f"mask {mask.name} is not a boolean tensor"
    if val.dim() < 2:
        return f"mask {mask.name} has rank {val.dim()}"
    try:
        expr = mask_expression(gm, mask, _interp)
    except NotProven as e:
        return str(e)
    nd = val.dim()
    if not _is_causal_expr(expr, nd - 2, nd - 1):
        return f"mask {mask.name} is {expr}, not the causal mask I{nd - 1} <= I{nd - 2}"
    return None


def _mask_arg(node):
    return args_of(node).attn_mask


def _is_causal_arg(node):
    return args_of(node).is_causal


@dataclass(frozen=True)
class CausalMaskToIsCausal(Pass):
    requires = frozenset({CAPTURED})
    provides = frozenset({"causal_sdpa"})
    invalidates = frozenset({"cost"})

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        interp = _Interpreter(gm)
        rewritten, kept = 0, {}
        dropped: List[torch.fx.Node] = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not _SDPA:
                continue
            mask = _mask_arg(node)
            if mask is None or _is_causal_arg(node):
                continue
            reason = prove_causal_mask(gm, node, interp)
            if reason is not None:
                kept[node.name] = reason
                continue
            dropout_p = args_of(node).dropout_p
            kwargs = {k: v for k, v in node.kwargs.items() if k not in ("attn_mask", "dropout_p", "is_causal")}
            node.args = (*node.args[:3], None, dropout_p, True)
            node.kwargs = kwargs
            dropped.append(mask)
            rewritten += 1
        removed = _remove_dead(gm, dropped)
        return PassResult(gm, rewritten > 0, {"rewritten": rewritten, "kept": kept, "nodes_removed": removed})


_CHECKS = {aten._assert_tensor_metadata.default}


def _remove_dead(gm: torch.fx.GraphModule, roots: List[torch.fx.Node]) -> int:
    """Erase the nodes of the dropped masks' cones that no longer feed anything but
    metadata asserts (the asserts on them go too)."""
    cone, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        if n in cone:
            continue
        cone.add(n)
        stack.extend(n.all_input_nodes)
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node not in cone or node.op != "call_function" or not _pure(node):
            continue
        if not all(u.op == "call_function" and u.target in _CHECKS for u in node.users):
            continue
        for u in list(node.users):
            gm.graph.erase_node(u)
            removed += 1
        gm.graph.erase_node(node)
        removed += 1
    return removed


def _pure(node: torch.fx.Node) -> bool:
    t = node.target
    if not isinstance(t, torch._ops.OpOverload) or t in _CHECKS or t._schema.is_mutable:
        return False
    return t.namespace == "aten" and not node.is_impure()
