"""AnnotateCost: symbolic FLOPs and bytes of every node, forward and backward.

Requires: a captured graph.  Provides: ``"cost"``.
Preserves: the graph (nothing is rewritten; only ``node.meta["lorafx"]`` changes).

Each call_function node gets a ``CostRecord`` (``lorafx.meta``) whose amounts are
sympy expressions in the graph's dynamic dims.  torch.export's symbols are renamed
through the graph record's ``dims`` (``lorafx.meta.graph_record``): ``s72`` becomes ``batch`` and ``s70`` ``seq``
(other dynamic dims keep their export names).  The info of the pass, and
``graph_cost(gm)``, give the whole-graph totals; ``evaluate(expr, batch=.., seq=..)``
turns an expression (or its string) into a number.

Before::

    %linear: float32[s72,s70,96] = aten.linear(%mul_20, %lm_head_weight)

After::

    %linear: float32[s72,s70,96] = aten.linear(%mul_20, %lm_head_weight)  # flops fwd=6144*batch*seq bwd=6144*batch*seq

The model
---------
**Matmul FLOPs** (``fwd_flops``, ``bwd_flops``) follow ``torch.utils.flop_counter.
FlopCounterMode`` exactly, 2 FLOPs per multiply-add:

* ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``linear``, ``matmul``: 2·(output
  elements)·K, i.e. 2MKN (times the batch); bias adds are not counted here.
  Backward: one product of the same size for each of the two matrix operands
  that needs a gradient (dA = dY·Bᵀ, dB = Aᵀ·dY).
* ``scaled_dot_product_attention`` (and the flash/efficient variants): FlopCounterMode's
  ``sdpa_flop_count`` (q·kᵀ and p·v, 4·B·H·L·S·E for E = Ev) and, when a gradient
  flows through it, ``sdpa_backward_flop_count`` (scores recomputed, then dP, dV, dQ,
  dK: 2·B·H·L·S·(3E + 2Ev)).  Causal masks are not discounted (neither does FlopCounterMode).
* LoRA ops (every kind registered in ``lorafx.dialect``): the kind's own formulas
  (``OpKind.cost``).  ``lora_linear`` and its variants count the GEMMs their kernels run
  for the node's schedule argument (``lorafx.schedules.lora_flops``; default f1b1:
  RunLoRA's f1 forward, b1 backward with xAᵀ recomputed), with the token count symbolic;
  ``lora_linear_siblings`` (FuseSiblings) the sum over its adapters, each with its own rule
  (stacking the rank-r GEMMs changes their shapes, not their FLOPs).  A kind's helper ops
  (``dropout_mask``) create tensors and carry no gradient.
* Matrix-vector products (``mv``, ``dot``, and the ``matmul`` cases that ATen runs
  as one: see ``_matmul_runs_mv``), which FlopCounterMode does not count, go to the
  other FLOPs.

**Other FLOPs** (``fwd_other_flops``, ``bwd_other_flops``), which FlopCounterMode counts
as 0: per output element 1 for elementwise ops (add, mul, silu, rsqrt, pow, ...; the
RMS norms of LLaMA-like models are such chains), 5 for softmax (max, subtract, exp,
sum, divide), 8 for layer/group/batch norm, 5 for rms_norm; 1 per input element for
reductions (sum, mean, ...); 2·M·K for matrix-vector products.  Backward: twice the
forward amount when a gradient flows through the node.

**Bytes** (``fwd_bytes``, ``bwd_bytes``), at the tensors' itemsize: forward reads every
tensor input once and writes every output once; an embedding reads only the gathered
rows.  Backward, only when a gradient flows through the node: reads the output
gradient and every tensor input (saved activations and weights) and writes a gradient
for every input that needs one.  View and shape ops (view, reshape, transpose, slice,
expand, getitem, ``to`` without a dtype change, ...) cost 0 FLOPs and 0 bytes; no
cache or fusion is modelled.

**Gradients.** A node has a backward when one of its tensor inputs needs a gradient:
a parameter (get_attr) with ``requires_grad``, a placeholder only if ``grad_inputs``
says so (True for every floating-point input, or a tuple of placeholder names), and
the outputs of nodes that have a backward.  Integer/bool outputs, tensor factories
(zeros, arange, ...), ``detach`` and regions under ``torch.no_grad`` (the
``wrap_with_set_grad_enabled`` higher-order op, whose subgraph is costed too, or
between ``torch._C._set_grad_enabled(False)``/``(True)`` calls) stop gradients.  The backward of every such node is assumed to run (all graph outputs
feed the loss).
"""
from __future__ import annotations

import collections
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import sympy
import torch
import torch.fx

from lorafx.context import CompileContext
from lorafx.meta import CostRecord, get_record, graph_record, set_record
from lorafx.pipeline import CAPTURED, Pass, PassResult
from lorafx.dialect import InputQuery, kind_of, owner_of
from lorafx.schedules import DEFAULT_SCHEDULE, lora_flops

__all__ = ["annotate", "AnnotateCost", "BATCH", "SEQ", "COST_FIELDS", "evaluate", "graph_cost", "lora_linear_flops",
           "cost_summary"]

BATCH = sympy.Symbol("batch", positive=True, integer=True)
SEQ = sympy.Symbol("seq", positive=True, integer=True)
_NAMED = {"batch": BATCH, "seq": SEQ}
_ZERO = sympy.Integer(0)
_TWO = sympy.Integer(2)

COST_FIELDS = ("fwd_flops", "bwd_flops", "fwd_other_flops", "bwd_other_flops", "fwd_bytes", "bwd_bytes")
# Names of the totals in the pass info / CompileReport, per CostRecord field.
_INFO_NAMES = dict(zip(COST_FIELDS, ("forward_flops", "backward_flops", "forward_other_flops",
                                     "backward_other_flops", "forward_bytes", "backward_bytes")))


# -- the LoRA op --------------------------------------------------------------------------


def lora_linear_flops(b, n, m, r, *, schedule: str = DEFAULT_SCHEDULE, need_x: bool = True,
                      need_w: bool = False, need_a: bool = True, need_b: bool = True,
                      dropout: bool = False) -> Tuple[Any, Any]:
    """``(forward, backward)`` FLOPs of a ``lorafx.lora_linear``/``lora_linear_xa`` node:
    ``lorafx.schedules.lora_flops`` for its schedule (a name or a dispatch rule; a rule
    with a symbolic token count b gives ``sympy.Piecewise``), b tokens, n in, m out
    features, rank r.  The default ``f1b1`` is RunLoRA's f1 forward, 2bnm + 2bnr + 2brm,
    and b1 backward with xAᵀ recomputed, 2bnm + 6bnr + 4bmr when x, A and B need grads.
    """
    return lora_flops(schedule, b, n, m, r, x_requires_grad=need_x, w_requires_grad=need_w,
                      a_requires_grad=need_a, b_requires_grad=need_b, dropout=dropout)


# -- op tables ------------------------------------------------------------------------------

_VIEW = {
    "view", "_unsafe_view", "reshape", "transpose", "t", "permute", "unsqueeze", "squeeze", "expand",
    "expand_as", "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "narrow", "alias",
    "detach", "as_strided", "unflatten", "flatten", "view_as", "movedim", "diagonal", "unfold", "real",
    "imag", "view_as_real", "view_as_complex", "_assert_tensor_metadata", "_assert_scalar", "_assert_async",
    "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "sym_constrain_range_for_size",
    "lift_fresh", "_reshape_alias",
}
_TO = {"to", "_to_copy", "type_as", "_to_dtype"}
_COPY = {
    "contiguous", "clone", "cat", "concat", "stack", "index", "index_select", "gather", "repeat",
    "repeat_interleave", "copy", "pad", "constant_pad_nd", "roll", "flip", "scatter", "index_put",
    "masked_scatter", "masked_select", "take", "lift_fresh_copy", "select_scatter", "slice_scatter",
}
_CREATE = {
    "arange", "zeros", "ones", "full", "empty", "empty_like", "zeros_like", "ones_like", "full_like",
    "rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "new_ones", "new_zeros",
    "new_full", "new_empty", "new_empty_strided", "empty_strided", "scalar_tensor", "eye", "linspace",
    "tensor", "bernoulli", "_local_scalar_dense",
}
_ELEMENTWISE = {
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "neg", "abs",
    "sign", "reciprocal", "rsqrt", "sqrt", "pow", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p",
    "sin", "cos", "tan", "tanh", "sigmoid", "silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "selu",
    "celu", "hardtanh", "hardswish", "hardsigmoid", "softplus", "mish", "erf", "erfc", "erfinv", "clamp",
    "clamp_min", "clamp_max", "clip", "minimum", "maximum", "fmin", "fmax", "where", "masked_fill", "lerp",
    "addcmul", "addcdiv", "square", "round", "floor", "ceil", "trunc", "frac", "logical_not",
    "logical_and", "logical_or", "logical_xor", "bitwise_not", "bitwise_and", "bitwise_or", "bitwise_xor",
    "__and__", "__or__", "__xor__", "__invert__", "__lshift__", "__rshift__", "eq", "ne", "lt", "le", "gt",
    "ge", "isnan", "isinf", "isfinite", "nan_to_num", "tril", "triu", "dropout", "native_dropout",
    "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "fill", "diff", "atan", "asin", "acos",
    "sinh", "cosh", "atan2", "hypot", "xlogy", "logit", "glu", "prelu", "threshold", "polar", "angle",
    "conj", "conj_physical", "resolve_conj", "resolve_neg", "positive",
}
_REDUCTION = {
    "sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "var_mean", "std_mean", "norm",
    "linalg_vector_norm", "logsumexp", "cumsum", "cumprod", "argmax", "argmin", "all", "any",
    "count_nonzero", "aminmax", "cummax", "cummin", "nansum", "nanmean", "median", "topk", "sort",
}
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"}
_NORMS = {  # per-element FLOPs
    "layer_norm": 8, "native_layer_norm": 8, "group_norm": 8, "native_group_norm": 8, "batch_norm": 8,
    "native_batch_norm": 8, "_native_batch_norm_legit": 8, "_native_batch_norm_legit_functional": 8,
    "_native_batch_norm_legit_no_training": 8, "instance_norm": 8, "rms_norm": 5, "_fused_rms_norm": 5,
}
_MATMUL = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2), "linear": (0, 1),
           "matmul": (0, 1), "mv": (0, 1), "dot": (0, 1), "vdot": (0, 1), "addmv": (1, 2)}
_ATTENTION = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_cudnn_attention"}
_NO_GRAD = _CREATE | {"detach"}  # (integer and bool outputs never need a gradient either)

_PER_ELEMENT_SOFTMAX = 5
_BACKWARD_FACTOR = 2  # other-FLOPs of a backward, relative to the forward


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        name = target._opname
    else:
        name = getattr(target, "__name__", str(target))
    if name.endswith("_") and not name.startswith("__") and name not in _VIEW and name not in _SOFTMAX:
        base = name[:-1]  # in-place variant (add_, mul_, copy_)
        if base in _ELEMENTWISE or base in _COPY or base in _MATMUL or base in _REDUCTION:
            return base
    return name


def _is_float_tensor(v) -> bool:
    return isinstance(v, torch.Tensor) and (v.dtype.is_floating_point or v.dtype.is_complex)


def _fetch(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _sum(exprs) -> Any:
    exprs = [e for e in exprs if e != 0]
    if not exprs:
        return _ZERO
    return exprs[0] if len(exprs) == 1 else sympy.Add(*exprs)


def _total(records, kind: str, requires_grad: bool = False, expand: bool = False) -> CostRecord:
    fields = {}
    for f in COST_FIELDS:
        e = _sum(getattr(r, f) for r in records)
        fields[f] = sympy.expand(e) if expand else e
    return CostRecord(kind=kind, requires_grad=requires_grad, **fields)


# -- the annotator ------------------------------------------------------------------------------


class _Annotator:
    def __init__(self, gm: torch.fx.GraphModule, grad_inputs):
        self.dims: Dict[str, str] = dict(graph_record(gm).dims)
        self.grad_inputs = grad_inputs
        self.exprs: Dict[Any, Any] = {}  # export expression -> readable expression
        self.symbols: Dict[Any, Any] = {}  # export symbol -> readable symbol
        self.example: Dict[str, int] = {}
        self.uncovered: collections.Counter = collections.Counter()
        self.nodes = 0

    # sizes --------------------------------------------------------------------
    def size(self, d) -> Any:
        if isinstance(d, int):
            return sympy.Integer(d)
        if isinstance(d, torch.SymInt):
            node = d.node
            e = node.expr
            out = self.exprs.get(e)
            if out is None:
                out = e.xreplace({s: self._symbol(s, node) for s in e.free_symbols}) if e.free_symbols else e
                out = sympy.sympify(out)
                self.exprs[e] = out
            return out
        return sympy.Integer(int(d))

    def _symbol(self, s, symnode):
        out = self.symbols.get(s)
        if out is None:
            role = self.dims.get(s.name)
            out = _NAMED[role] if role in _NAMED else sympy.Symbol(s.name, positive=True, integer=True)
            self.symbols[s] = out
            env = getattr(symnode, "shape_env", None)
            table = getattr(env, "backed_var_to_val", None)
            if table is None:
                table = getattr(env, "var_to_val", {})
            value = table.get(s)
            if value is not None:
                try:
                    self.example[out.name] = int(value)
                except (TypeError, ValueError):
                    pass
        return out

    def numel(self, v) -> Any:
        if not isinstance(v, torch.Tensor):
            return _ZERO
        return sympy.Mul(*[self.size(d) for d in v.shape]) if v.dim() else sympy.Integer(1)

    def nbytes(self, v) -> Any:
        if isinstance(v, torch.Tensor):
            return self.numel(v) * v.dtype.itemsize
        if isinstance(v, (tuple, list)):
            return _sum(self.nbytes(x) for x in v)
        return _ZERO

    # graph walk ---------------------------------------------------------------------
    def run_graph(self, gm: torch.fx.GraphModule, in_flags: Optional[List[bool]] = None,
                  grad_enabled: bool = True) -> Tuple[List[CostRecord], tuple]:
        flags: Dict[torch.fx.Node, Any] = {}
        vals: Dict[torch.fx.Node, Any] = {}
        records: List[CostRecord] = []
        out_flags: tuple = ()
        placeholder_index = 0
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                if in_flags is not None:
                    flag = in_flags[placeholder_index] if placeholder_index < len(in_flags) else False
                else:
                    flag = self._placeholder_grad(node)
                placeholder_index += 1
                flags[node] = bool(flag) and grad_enabled
            elif node.op == "get_attr":
                obj = _fetch(gm, node.target)
                vals[node] = obj
                flags[node] = grad_enabled and isinstance(obj, torch.Tensor) and obj.requires_grad
            elif node.op == "call_function" and node.target is torch._C._set_grad_enabled:
                grad_enabled = bool(node.args[0])  # a grad-mode region inlined into the graph
                flags[node] = False
            elif node.op == "call_function":
                rec, flag = self._cost(gm, node, flags, vals, grad_enabled)
                flags[node] = flag
                if rec is not None:
                    set_record(node, rec)
                    records.append(rec)
                    self.nodes += 1
            elif node.op == "output":
                outs = torch.fx.node.map_aggregate(node.args[0], lambda a: a)
                leaves = torch.utils._pytree.tree_leaves(outs)
                out_flags = tuple(bool(flags.get(a)) if isinstance(a, torch.fx.Node) else False for a in leaves)
            elif isinstance(node.meta.get("val"), torch.Tensor):  # call_module / call_method
                self.uncovered[f"{node.op}:{node.target}"] += 1  # (torch.export makes none but _guards_fn)
        return records, out_flags

    def _placeholder_grad(self, node) -> bool:
        v = node.meta.get("val")
        if not _is_float_tensor(v):
            return False
        if self.grad_inputs is True:
            return True
        if self.grad_inputs:
            return node.target in self.grad_inputs or node.name in self.grad_inputs
        return False

    def _val(self, node, vals):
        """A node's value for shapes: meta["val"], the tensor of a get_attr, or (for
        nodes a pass added without a val, like aten.t of a weight) the op run on meta
        tensors when its inputs are real tensors."""
        if not isinstance(node, torch.fx.Node):
            return node
        if node in vals:
            return vals[node]
        v = node.meta.get("val")
        if v is None and node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            ins = [self._val(a, vals) for a in node.all_input_nodes]
            if all(isinstance(x, torch.Tensor) and not isinstance(x, torch._subclasses.FakeTensor) for x in ins):
                to_meta = lambda a: (self._val(a, vals).to("meta") if isinstance(a, torch.fx.Node) else a)
                try:
                    v = node.target(*torch.fx.node.map_arg(node.args, to_meta),
                                    **torch.fx.node.map_arg(node.kwargs, to_meta))
                except Exception:
                    v = None
        vals[node] = v
        return v

    # per node -----------------------------------------------------------------------------
    def _cost(self, gm, node, flags, vals, grad_enabled) -> Tuple[Optional[CostRecord], Any]:
        target = node.target
        if isinstance(target, torch._ops.HigherOrderOperator):
            return self._hop(gm, node, flags, grad_enabled)
        out = self._val(node, vals)
        if target is operator.getitem:
            src = flags.get(node.args[0], False) if isinstance(node.args[0], torch.fx.Node) else False
            if isinstance(src, tuple):
                i = node.args[1]
                flag = bool(src[i]) if isinstance(i, int) and -len(src) <= i < len(src) else any(src)
            else:
                flag = bool(src) and _is_float_tensor(out)
            return CostRecord("view", requires_grad=flag), flag
        name = _op_name(target)
        lora_kind = kind_of(node)
        helper = lora_kind is None and owner_of(node) is not None
        ins = [a for a in node.all_input_nodes if isinstance(self._val(a, vals), torch.Tensor)]
        grad = lambda a: isinstance(a, torch.fx.Node) and bool(flags.get(a))
        in_grad = any(grad(a) for a in ins) and not helper  # a LoRA kind's helper ops carry no gradient
        if isinstance(out, (tuple, list)):
            out_flag: Any = tuple(in_grad and grad_enabled and name not in _NO_GRAD and _is_float_tensor(o)
                                  for o in out)
            needs_bwd = any(out_flag)
            differentiable = lora_kind.grad_outputs(node) if lora_kind is not None else None
            if differentiable is not None:  # e.g. a kept xa is not differentiable
                out_flag = tuple(f and d for f, d in zip(out_flag, differentiable))
        else:
            out_flag = in_grad and grad_enabled and name not in _NO_GRAD and _is_float_tensor(out)
            needs_bwd = out_flag
        if not isinstance(target, torch._ops.OpOverload) and not isinstance(out, (torch.Tensor, tuple, list)):
            return CostRecord("shape"), False  # Python arithmetic on sizes, torch._check, ...

        kind, fwd, bwd, other = "other", _ZERO, _ZERO, _ZERO
        fwd_bytes = bwd_bytes = None
        if name in _VIEW or (name in _TO and self._same_dtype(node, out, vals)):
            return CostRecord("view", requires_grad=bool(needs_bwd)), out_flag
        if lora_kind is not None:  # the kind's own formulas (lorafx.dialect)
            cost = lora_kind.cost(node, _Inputs(self, vals, flags))
            kind, fwd, bwd, other = "lora", sympy.sympify(cost.fwd), sympy.sympify(cost.bwd), sympy.sympify(cost.other)
        elif helper:
            kind = "create"
        elif name in _MATMUL:
            kind, fwd, bwd, other = self._matmul(node, name, out, vals, grad, needs_bwd)
        elif name in _ATTENTION:
            kind, fwd, bwd, other = self._attention(node, vals, needs_bwd)
        elif name == "embedding":
            kind = "embedding"
            weight, indices = node.args[0], node.args[1]
            fwd_bytes = 2 * self.nbytes(out) + self.nbytes(self._val(indices, vals))
            if grad(weight):
                bwd_bytes = self.nbytes(out) + self.nbytes(self._val(indices, vals)) + \
                    self.nbytes(self._val(weight, vals))
                other = self.numel(out)  # scatter-add into the weight gradient
            else:
                bwd_bytes = _ZERO
        elif name in _SOFTMAX:
            kind, other = "softmax", _PER_ELEMENT_SOFTMAX * self.numel(out)
        elif name in _NORMS:
            first = out[0] if isinstance(out, (tuple, list)) else out
            kind, other = "norm", _NORMS[name] * self.numel(first)
        elif name in _ELEMENTWISE:
            first = out[0] if isinstance(out, (tuple, list)) else out
            kind, other = "elementwise", self.numel(first)
        elif name in _REDUCTION:
            src = self._val(node.args[0], vals) if node.args else None
            kind, other = "reduction", self.numel(src)
        elif name in _COPY or name in _TO:
            kind = "copy"
        elif name in _CREATE:
            kind = "create"
        else:
            self.uncovered[name] += 1

        if fwd_bytes is None:
            read = _sum(self.nbytes(self._val(a, vals)) for a in ins)
            written = self.nbytes(out)
            fwd_bytes = read + written
            if needs_bwd:
                bwd_bytes = written + read + _sum(self.nbytes(self._val(a, vals)) for a in ins if grad(a))
            else:
                bwd_bytes = _ZERO
        rec = CostRecord(kind, fwd_flops=fwd, bwd_flops=bwd if needs_bwd else _ZERO, fwd_other_flops=other,
                         bwd_other_flops=_BACKWARD_FACTOR * other if needs_bwd else _ZERO,
                         fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes, requires_grad=bool(needs_bwd))
        return rec, out_flag

    def _same_dtype(self, node, out, vals) -> bool:
        src = self._val(node.args[0], vals) if node.args else None
        if not isinstance(out, torch.Tensor) or not isinstance(src, torch.Tensor):
            return True
        return out.dtype == src.dtype and out.device == src.device

    def _matmul(self, node, name, out, vals, grad, needs_bwd):
        ia, ib = _MATMUL[name]
        a, b = node.args[ia], node.args[ib]
        av, bv = self._val(a, vals), self._val(b, vals)
        k = self.size(av.shape[-1])
        prod = _TWO * self.numel(out) * k
        n_grads = int(grad(a)) + int(grad(b))
        matvec = name in ("mv", "dot", "vdot", "addmv") or (
            name == "matmul" and self._matmul_runs_mv(av, bv, grad(a), grad(b)))
        bias = name in ("addmm", "addmv") or (name == "linear" and len(node.args) > 2 and node.args[2] is not None)
        extra = self.numel(out) if bias else _ZERO  # the bias add
        if matvec:
            return "matvec", _ZERO, _ZERO, prod + extra
        bwd = prod * n_grads if needs_bwd else _ZERO
        return "matmul", prod, bwd, extra

    def _matmul_runs_mv(self, av, bv, ga: bool, gb: bool) -> bool:
        """Whether torch.matmul computes this product as a matrix-vector product
        (dot/mv, which FlopCounterMode does not count), following ATen's
        ``_matmul_impl``/``should_fold``: a 1-d operand against a batch of matrices
        is folded into one mv when the vector needs a gradient or the batch folds
        without a copy, and otherwise runs as a bmm."""
        if bv.dim() == 1:
            if av.dim() <= 2:
                return True
            return gb or self._folds(av.shape, av.stride())
        if av.dim() == 1 and bv.dim() > 2:
            shape = (*bv.shape[:-2], bv.shape[-1], bv.shape[-2])  # b.mT
            stride = (*bv.stride()[:-2], bv.stride()[-1], bv.stride()[-2])
            return ga or self._folds(shape, stride)
        return False

    def _folds(self, shape, stride) -> bool:
        """t.view(-1, t.size(-1)) needs no copy (ATen's should_fold contiguity test)."""
        sizes = [self.size(d) for d in shape]
        strides = [self.size(d) for d in stride]
        if any(s == 0 for s in sizes):
            return True
        return all(sympy.expand(strides[i] - strides[i + 1] * sizes[i + 1]) == 0 for i in range(len(sizes) - 2))

    def _attention(self, node, vals, needs_bwd):
        q, k, v = (self._val(a, vals) for a in node.args[:3])
        bh = sympy.Mul(*[self.size(d) for d in q.shape[:-2]])  # batch x query heads
        L, E = self.size(q.shape[-2]), self.size(q.shape[-1])
        S, Ev = self.size(k.shape[-2]), self.size(v.shape[-1])
        fwd = _TWO * bh * L * E * S + _TWO * bh * L * S * Ev  # sdpa_flop_count
        # sdpa_backward_flop_count: recompute q.k^T, dP = dO.v^T, dV = P^T.dO, dQ = dS.k, dK = dS^T.q
        bwd = _TWO * bh * L * S * (3 * E + 2 * Ev) if needs_bwd else _ZERO
        other = (_PER_ELEMENT_SOFTMAX + 1) * bh * L * S  # scale + softmax of the scores
        return "attention", fwd, bwd, other

    def _hop(self, gm, node, flags, grad_enabled):
        """A higher-order op (torch.no_grad / autocast regions): cost its subgraph."""
        args = list(node.args)
        idx = next((i for i, a in enumerate(args) if isinstance(a, torch.fx.Node) and a.op == "get_attr"
                    and isinstance(_fetch(gm, a.target), torch.fx.GraphModule)), None)
        if idx is None:
            self.uncovered[str(node.target)] += 1
            return CostRecord("other"), False
        sub = _fetch(gm, args[idx].target)
        enabled = grad_enabled
        if node.target is getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None):
            enabled = bool(args[0])
        in_flags = [isinstance(a, torch.fx.Node) and bool(flags.get(a)) for a in args[idx + 1:]]
        records, out_flags = self.run_graph(sub, in_flags, grad_enabled=enabled)
        rec = _total(records, "subgraph", requires_grad=any(out_flags))
        return rec, out_flags


class _Inputs(InputQuery):
    """The annotator's answers to a LoRA kind: symbolic sizes and gradient flags."""

    def __init__(self, ann: _Annotator, vals, flags):
        self.ann, self.vals, self.flags = ann, vals, flags

    def value(self, arg):
        return self.ann._val(arg, self.vals)

    def shape(self, arg):
        v = self.value(arg)
        return tuple(self.ann.size(d) for d in v.shape) if isinstance(v, torch.Tensor) else None

    def needs_grad(self, arg) -> bool:
        return isinstance(arg, torch.fx.Node) and bool(self.flags.get(arg))

    def tokens(self, arg):
        shape = self.shape(arg)
        return sympy.Mul(*shape[:-1]) if shape else sympy.Integer(1)


# -- the pass ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotateCost(Pass):
    """Attach a symbolic ``CostRecord`` to every node (see the module docstring).

    ``grad_inputs``: which graph inputs need gradients -- False (default: only
    parameters do, as in LoRA fine-tuning), True (every floating-point input) or a
    tuple of placeholder names.
    """

    grad_inputs: Union[bool, Tuple[str, ...]] = False

    requires = frozenset({CAPTURED})
    provides = frozenset({"cost"})

    def __post_init__(self):
        if isinstance(self.grad_inputs, (list, set, frozenset)):
            object.__setattr__(self, "grad_inputs", tuple(self.grad_inputs))
        super().__post_init__()

    def validate(self) -> None:
        ok = isinstance(self.grad_inputs, bool) or (
            isinstance(self.grad_inputs, tuple) and all(isinstance(s, str) for s in self.grad_inputs))
        if not ok:
            raise ValueError(f"AnnotateCost: grad_inputs must be a bool or a tuple of input names, "
                             f"got {self.grad_inputs!r}")

    def summary(self, info) -> List[str]:
        """The scalar info, then the FLOP and byte totals (``cost_summary``)."""
        return super().summary(info) + cost_summary(info)

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        records, ann = _annotate(gm, self.grad_inputs)
        total = _total(records, "graph", expand=True)
        graph_record(gm).cost = total
        info: Dict[str, Any] = {
            "forward_flops": str(total.fwd_flops),
            "backward_flops": str(total.bwd_flops),
            "nodes": ann.nodes,
            "totals": {_INFO_NAMES[f]: str(getattr(total, f)) for f in COST_FIELDS},
            "example": dict(sorted(ann.example.items())),
        }
        try:
            info["at_example"] = {_INFO_NAMES[f]: evaluate(getattr(total, f), **ann.example) for f in COST_FIELDS}
        except ValueError:  # a dim without an example value
            pass
        if ann.uncovered:
            info["uncovered"] = dict(ann.uncovered)
        return PassResult(gm, False, info)


# -- helpers ----------------------------------------------------------------------------------

def _annotate(gm: torch.fx.GraphModule, grad_inputs=False):
    ann = _Annotator(gm, grad_inputs)
    records, _ = ann.run_graph(gm)
    return records, ann


def annotate(gm: torch.fx.GraphModule, grad_inputs=False) -> Dict[str, int]:
    """Attach every node's CostRecord (as AnnotateCost does, without a pass run); returns the
    example values of the graph's dims ({"batch": 2, "seq": 16}), for ``evaluate``."""
    return dict(_annotate(gm, grad_inputs)[1].example)


def graph_cost(gm: torch.fx.GraphModule) -> CostRecord:
    """The whole graph's cost: the sum of the top-level nodes' CostRecords (the
    subgraphs of higher-order ops are in their node's record), expanded."""
    records = [r for r in (get_record(n, CostRecord) for n in gm.graph.nodes) if r is not None]
    return _total(records, "graph", expand=True)


def evaluate(expr, batch: Optional[int] = None, seq: Optional[int] = None, **dims: int) -> int:
    """The value of a cost expression (a sympy expression, its string, or a number)
    at concrete dims: ``evaluate("4096*batch*seq", batch=2, seq=16) == 131072``.
    Other dynamic dims are given by name (``s3=5``)."""
    if isinstance(expr, str):
        e = sympy.sympify(expr, locals=dict(_NAMED))
    else:
        e = sympy.sympify(expr)
    values = dict(dims)
    if batch is not None:
        values["batch"] = batch
    if seq is not None:
        values["seq"] = seq
    missing = sorted(s.name for s in e.free_symbols if s.name not in values)
    if missing:
        raise ValueError(f"evaluate: no value for {missing} in {e}; pass them by name, "
                         f"e.g. evaluate(expr, batch=2, seq=16)")
    result = e.xreplace({s: sympy.Integer(values[s.name]) for s in e.free_symbols})
    return int(result)


def cost_summary(info: Dict[str, Any]) -> List[str]:
    """Report lines for AnnotateCost's info (used by ``CompileReport``).  Costs that are
    piecewise in the token count (per-node schedule rules) are summarised by their
    breakpoints; the full expressions are in the info (and the JSON report)."""
    totals = info.get("totals", {})

    def show(key):
        text = totals.get(key, info.get(key, ""))
        try:
            e = sympy.sympify(text, locals=dict(_NAMED))
        except (sympy.SympifyError, TypeError, SyntaxError):
            return text
        pieces = e.atoms(sympy.Piecewise)
        if not pieces:
            return text
        cuts = sorted({int(rel.rhs) for p in pieces for rel in p.atoms(sympy.StrictLessThan)
                       if rel.rhs.is_number})
        return (f"piecewise in {' x '.join(sorted(str(s) for s in e.free_symbols))} "
                f"(schedules switch at {', '.join(map(str, cuts))} tokens)")

    lines = [f"flops    forward {show('forward_flops')}   backward {show('backward_flops')}   "
             f"(matmul FLOPs, FlopCounterMode's convention)"]
    if "forward_other_flops" in totals:
        lines.append(f"         other flops forward {show('forward_other_flops')}   "
                     f"backward {show('backward_other_flops')}   (elementwise, softmax, norms)")
        lines.append(f"bytes    forward {show('forward_bytes')}   backward {show('backward_bytes')}")
    at, example = info.get("at_example"), info.get("example")
    if at:
        where = ", ".join(f"{k}={v}" for k, v in example.items()) if example else "the captured shapes"
        lines.append(f"         at {where}: forward {_fmt(at['forward_flops'])}FLOP, backward "
                     f"{_fmt(at['backward_flops'])}FLOP (+ {_fmt(at['forward_other_flops'] + at['backward_other_flops'])}"
                     f"FLOP other), {_fmt(at['forward_bytes'] + at['backward_bytes'])}B moved")
    return lines


def _fmt(x: int) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {suffix}"
    return f"{x} "
