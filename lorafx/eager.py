"""Fast eager execution of lorafx graphs.

A LoRA-dialect node's target stays its ``torch.ops.lorafx.*`` op: that is what
export, ``torch.compile``, fake tensors and ``FlopCounterMode`` see.  Called
eagerly, though, a ``torch.library.custom_op`` pays for its generic machinery on
every call -- the dispatcher, ``fill_defaults``, a pytree flatten of list
arguments, a generated ``autograd.Function`` that redispatches below autograd, a
dynamo-disable wrapper -- about 0.1 ms per call on a CPU, as much as a small
adapter's arithmetic.

``run(gm, args, kwargs)`` runs a GraphModule with a second copy of its code
(``fast_forward``) that computes the same thing with less host work:

* each lorafx op is called through ``fast_op(op)``: a plain ``torch.autograd.Function``
  around the functions the op registered (its kernel, ``setup_context`` and backward),
  so outputs and gradients are the same bits;
* other op overloads are called through their Python binding (``_NATIVE``: the same
  overload, arguments parsed several times faster) or their C++ callable, without
  ``OpOverload.__call__``;
* parameter reads walk the submodule dicts instead of ``nn.Module.__getattr__``.

The copy runs through ``nn.Module.__call__`` on an alias of ``gm`` (same
``__dict__``), so ``gm``'s hooks, parameters and submodules are the ones used; it is
rebuilt when ``gm`` is recompiled.  ``run`` calls ``gm`` itself while dynamo traces
or under a torch-function mode, and each fast op calls the op itself under a
dispatch mode (FlopCounterMode, fake tensors, tracing), autocast or a functorch
transform, and for inputs that are not plain tensors.
"""
from __future__ import annotations

import copy
import weakref
from typing import Any, Callable, Dict, Optional

import torch
import torch.fx
from torch._library.custom_ops import OPDEFS

__all__ = ["run", "fast_op", "fast_forward"]

_TENSOR, _TENSOR_LIST = 1, 2
_REQUIRED = object()
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_autocast = torch._C._is_any_autocast_enabled
_functorch = torch._C._functorch.peek_interpreter_stack
_grad_enabled = torch.is_grad_enabled
_any_requires_grad = torch._C._any_requires_grad
_function_modes = torch._C._is_torch_function_mode_enabled


def _kind(arg_type) -> int:
    t = arg_type.getElementType() if isinstance(arg_type, torch.OptionalType) else arg_type
    if isinstance(t, torch.TensorType):
        return _TENSOR
    if isinstance(t, torch.ListType) and isinstance(t.getElementType(), (torch.TensorType, torch.OptionalType)):
        return _TENSOR_LIST
    return 0


def _c_apply(cls):
    """``cls.apply`` without autograd.Function's Python wrapper (functorch's unwrapping,
    which ``FastOp`` never needs: it runs the op itself under a functorch transform)."""
    return torch._C._FunctionBase.__dict__["apply"].__get__(None, cls)


def _function(fast: "FastOp") -> type:
    """The op's registered kernel, setup_context and backward as one autograd.Function.

    Ops without a tensor-list argument take their arguments as they are, so
    ``needs_input_grad`` and the backward's results line up with them.  Ops with one
    take ``(args, lens, *tensors)``: the tensors of ``args`` with the lists flattened
    (their lengths in ``lens``), and see ``needs_input_grad`` per argument as the
    custom op gives it (a list of flags for a tensor list)."""
    impl, setup, backward = fast.impl, fast.setup, fast.backward
    if not fast.has_lists:
        def forward(ctx, *args):
            out = impl(*args)
            setup(ctx=ctx, inputs=args, output=out)
            return out

        return type(f"Fast_{fast.__name__}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def forward_lists(ctx, args, lens, *tensors):
        out = impl(*args)
        setup(ctx=ctx, inputs=args, output=out)
        ctx._lorafx_lens = lens  # never the inputs: an op may save fewer than it reads
        return tuple(out) if fast.returns_list else out

    def backward_lists(ctx, *grads):
        lens = ctx._lorafx_lens
        flat_needs = ctx.needs_input_grad
        ctx.needs_input_grad = fast.structured_needs(flat_needs[2:], lens)
        try:
            result = backward(ctx, list(grads)) if fast.returns_list else backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = flat_needs
        if not isinstance(result, tuple):
            result = (result,)
        return (None, None, *fast.flat_grads(result, lens))

    return type(f"Fast_{fast.__name__}", (torch.autograd.Function,),
                {"forward": staticmethod(forward_lists), "backward": staticmethod(backward_lists)})


class FastOp:
    """Calls a lorafx custom op's Python functions directly (see the module docstring).

    Same signature and results as the op; falls back to the op where the op's own
    dispatch would do something else (modes, autocast, functorch, tensor subclasses)."""

    def __init__(self, op: torch._ops.OpOverload, opdef):
        schema = op._schema
        self.op = op
        self.impl = opdef._init_fn
        self.setup = opdef._setup_context_fn
        self.backward = opdef._backward_fn
        self.names = [a.name for a in schema.arguments]
        self.nargs = len(self.names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.defaults = [a.default_value if a.has_default_value() else _REQUIRED for a in schema.arguments]
        self.kinds = [_kind(a.type) for a in schema.arguments]
        self.tensor_args = [(i, k) for i, k in enumerate(self.kinds) if k]
        self.has_lists = any(k == _TENSOR_LIST for k in self.kinds)
        self.returns_list = len(schema.returns) == 1 and isinstance(schema.returns[0].type, torch.ListType)
        self.__name__ = f"fast_{op._opname}"  # how generated code names it
        self.__qualname__ = self.__name__
        self.apply = None
        if self.backward is not None and self.setup is not None:
            self.function = _function(self)
            self.apply = _c_apply(self.function)

    def __repr__(self) -> str:
        return f"lorafx.eager.fast_op({self.op})"

    def __deepcopy__(self, memo):
        return self

    def _bind(self, args: tuple, kwargs: dict) -> tuple:
        full = list(args) + [_REQUIRED] * (self.nargs - len(args))
        for name, value in kwargs.items():
            if name not in self.index:
                raise TypeError(f"{self.op}: unexpected keyword argument {name!r}")
            full[self.index[name]] = value
        for i, value in enumerate(full):
            if value is _REQUIRED:
                full[i] = self.defaults[i]
                if full[i] is _REQUIRED:
                    raise TypeError(f"{self.op}: missing argument {self.names[i]!r}")
        return tuple(full)

    def __call__(self, *args, **kwargs):
        if kwargs or len(args) != self.nargs:
            args = self._bind(args, kwargs)
        if _dispatch_modes() or _autocast() or _functorch() is not None or type(args[0]) not in _PLAIN:
            return self.op(*args)
        if not (_grad_enabled() and _any_requires_grad(*args)):
            return self.impl(*args)
        if self.apply is None:
            return self.op(*args)  # no autograd formula: the op's own error
        if not self.has_lists:
            return self.apply(*args)
        tensors, lens = [], []
        for i, kind in self.tensor_args:
            if kind == _TENSOR:
                tensors.append(args[i])
            else:
                tensors.extend(args[i])
                lens.append(len(args[i]))
        out = self.apply(args, lens, *tensors)
        return list(out) if self.returns_list else out

    def structured_needs(self, flat: tuple, lens: list) -> tuple:
        """``needs_input_grad`` per argument, as the custom op gives it: a list of flags
        for a tensor-list argument, False for non-tensors."""
        out, k, li = [], 0, 0
        for kind in self.kinds:
            if kind == _TENSOR:
                out.append(flat[k])
                k += 1
            elif kind == _TENSOR_LIST:
                n = lens[li]
                out.append(list(flat[k:k + n]))
                k, li = k + n, li + 1
            else:
                out.append(False)
        return tuple(out)

    def flat_grads(self, result: tuple, lens: list) -> list:
        """The backward's per-argument gradients, flattened like ``apply``'s tensors."""
        out, li = [], 0
        for (i, kind) in self.tensor_args:
            g = result[i] if i < len(result) else None
            if kind == _TENSOR:
                out.append(g)
            else:
                n = lens[li]
                li += 1
                out.extend(g if g is not None else [None] * n)
        return out


_FAST: Dict[Any, Optional[FastOp]] = {}


def fast_op(op) -> Optional[FastOp]:
    """The fast eager callable for a Python ``torch.library.custom_op`` overload, or None."""
    if op not in _FAST:
        fast = None
        if isinstance(op, torch._ops.OpOverload):
            opdef = OPDEFS.get(f"{op.namespace}::{op._opname}")
            if (opdef is not None and op._overloadname == "default" and opdef._init_fn is not None
                    and not any(a.kwarg_only for a in op._schema.arguments)):
                fast = FastOp(op, opdef)
        _FAST[op] = fast
    return _FAST[op]


# Overloads whose Python binding (generated from the same schema) takes the node's
# arguments and dispatches to the same overload, with at most this many positional
# arguments: called through the binding, which parses arguments several times faster
# than the boxed ``OpOverload`` call (up to 5 us for ``_assert_tensor_metadata``).
_aten = torch.ops.aten
_T = torch.Tensor
_NATIVE = {
    _aten.mul.Tensor: (torch.mul, 2), _aten.add.Tensor: (torch.add, 2), _aten.sub.Tensor: (torch.sub, 2),
    _aten.div.Tensor: (torch.div, 2), _aten.neg.default: (torch.neg, 1), _aten.rsqrt.default: (torch.rsqrt, 1),
    _aten.pow.Tensor_Scalar: (torch.pow, 2), _aten.mean.dim: (torch.mean, 3), _aten.cos.default: (torch.cos, 1),
    _aten.sin.default: (torch.sin, 1), _aten.silu.default: (torch._C._nn.silu, 1),
    _aten.view.default: (_T.view, 2), _aten.reshape.default: (torch.reshape, 2),
    _aten.transpose.int: (torch.transpose, 3), _aten.unsqueeze.default: (torch.unsqueeze, 2),
    _aten.t.default: (torch.t, 1), _aten.permute.default: (torch.permute, 2), _aten.cat.default: (torch.cat, 2),
    _aten.contiguous.default: (_T.contiguous, 1), _aten.to.dtype: (_T.to, 4), _aten.to.device: (_T.to, 5),
    _aten.sym_size.int: (_T.size, 2), _aten._assert_tensor_metadata.default: (torch._assert_tensor_metadata, 4),
    _aten.mm.default: (torch.mm, 2), _aten.addmm.default: (torch.addmm, 3), _aten.linear.default: (torch._C._nn.linear, 3),
    _aten.embedding.default: (torch.embedding, 5),
    _aten.scaled_dot_product_attention.default: (torch._C._nn.scaled_dot_product_attention, 6),
}


class _Raw:
    """Stands for an OpOverload in generated code; replaced in the code's globals by the
    overload's Python binding (``_NATIVE``) or its C++ callable (``op._op``, what
    ``OpOverload.__call__`` calls)."""

    def __init__(self, op: torch._ops.OpOverload, native: Optional[Callable] = None):
        self.op = op
        self.callable = native if native is not None else op._op
        self.__name__ = f"{op.namespace}_{op._opname}_{op._overloadname}" + ("_native" if native else "")

    def __call__(self, *args, **kwargs):  # (never called: codegen wants a callable)
        return self.op(*args, **kwargs)


def _target(node: torch.fx.Node) -> "_Raw":
    native, positional = _NATIVE.get(node.target, (None, 0))
    if native is not None and len(node.args) > positional:
        native = None
    return _Raw(node.target, native)


def fast_forward(gm: torch.fx.GraphModule) -> Optional[Callable]:
    """``gm``'s forward with every lorafx op called through ``fast_op`` and every other op
    overload called without its Python ``__call__``; None when the graph has no lorafx op
    (or its code is out of date with its graph)."""
    graph = copy.deepcopy(gm.graph)
    swapped = 0
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        fast = fast_op(node.target) if node.target.namespace == "lorafx" else None
        if fast is not None:
            node.target = fast
            swapped += 1
        else:
            node.target = _target(node)
    if not swapped or gm.graph.python_code(root_module="self").src != gm.code:
        return None
    co_fields = getattr(graph, "_co_fields", None) or {}
    code = graph.python_code(root_module="self")
    scope = {k: (v.callable if isinstance(v, _Raw) else v) for k, v in code.globals.items()}
    src = _direct_attributes(code.src, graph, gm)
    return torch.fx.graph_module._forward_from_src(src, scope, co_fields)


def _direct_attributes(src: str, graph: torch.fx.Graph, gm: torch.fx.GraphModule) -> str:
    """``src`` with each parameter read ``self.a.b.c.weight`` written
    ``self._modules['a']._modules['b']._modules['c'].weight``: the submodule hops as the dict
    lookups ``nn.Module.__getattr__`` makes, without its Python frames (the last hop still
    goes through ``getattr``, which finds a parameter, a buffer or a plain attribute)."""
    from torch.fx.graph import _format_target
    for node in graph.find_nodes(op="get_attr"):
        *hops, name = node.target.split(".")
        module = gm
        for hop in hops:
            module = module._modules.get(hop) if isinstance(module, torch.nn.Module) else None
        if not hops or not isinstance(module, torch.nn.Module):
            continue
        fast = "self" + "".join(f"._modules[{hop!r}]" for hop in hops)
        fast = f"{fast}.{name}" if name.isidentifier() else f"getattr({fast}, {name!r})"
        line = f"    {node.name} = {_format_target('self', node.target)}"
        for end in ("\n", ";"):
            if src.count(line + end) == 1:
                src = src.replace(line + end, f"    {node.name} = {fast}{end}")
                break
    return src


# gm -> {(gm's code, inputs_checked): the class running its fast forward, or None}; a few
# codes per graph module (train / eval recompiles), rebuilt when gm is recompiled
_CLASSES: "weakref.WeakKeyDictionary[torch.fx.GraphModule, dict]" = weakref.WeakKeyDictionary()
_CODES_PER_GRAPH = 4


def run(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, *, inputs_checked: bool = False):
    """``gm(*args, **kwargs)``, with lorafx ops called through their fast eager path.

    ``inputs_checked``: the caller has checked the inputs' structure against the graph's
    (a CompiledModel picks the graph by call signature and checks input ranks), so the
    per-call re-check of a ``torch.export`` module's pre-hook (``validate_inputs``, a
    pytree flatten of every call's inputs) is skipped; the graph's own guards still run."""
    if torch.compiler.is_compiling() or _function_modes():  # (bindings would see a torch-function mode)
        return gm(*args, **kwargs)
    key = (gm.__dict__.get("_code"), inputs_checked)
    classes = _CLASSES.get(gm)
    if classes is None:
        classes = _CLASSES[gm] = {}
    cls = classes.get(key, _REQUIRED)
    if cls is _REQUIRED:
        forward = fast_forward(gm)
        cls = None
        if forward is not None:  # gm's class (its hooks, __call__), with the fast forward
            body = {"forward": forward, "__module__": __name__}
            if inputs_checked and "validate_inputs" in gm.__dict__:
                body["validate_inputs"] = property(lambda self: False)  # (a data descriptor wins)
            cls = type(f"Eager{type(gm).__name__}", (type(gm),), body)
        if len(classes) >= _CODES_PER_GRAPH:
            classes.pop(next(iter(classes)))
        classes[key] = cls
    if cls is None:
        return gm(*args, **kwargs)
    alias = object.__new__(cls)
    object.__setattr__(alias, "__dict__", gm.__dict__)  # the same module: parameters, hooks, submodules
    return alias(*args, **kwargs)
