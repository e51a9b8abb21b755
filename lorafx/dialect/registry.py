"""The op-kind registry: what every pass asks about a LoRA op node.

A *kind* is one family of LoRA ops (``lora_linear`` and its keep-XA variant, the
recompute op, the sibling group, the folded op, or a user's own).  It is an
``OpKind`` registered with ``register_kind``; ``kind_of(node)`` finds the kind of a
node (None for every other node).  Passes never name an op or read
``node.args[i]``: they read a node's arguments by name (``args_of(node).lora_A``),
rewrite them by name (``set_args(node, schedule="f2b5")``) and ask its kind for the
rest -- what it saves for backward, its FLOPs, its schedule family, its canonical
form, its merged weight.

    >>> import torch, lorafx
    >>> from lorafx.dialect import args_of, kind_of
    >>> g = torch.fx.Graph()
    >>> x, w, a, b = (g.placeholder(n) for n in ("x", "w", "a", "b"))
    >>> node = g.call_function(torch.ops.lorafx.lora_linear.default, (x, w, None, a, b, 2.0))
    >>> view = args_of(node)
    >>> view.lora_A.name, view.scale, view.schedule, kind_of(node).name
    ('a', 2.0, 'f1b1', 'lora_linear')
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx

from lorafx.graph_utils import Site, get_attr
from lorafx.meta import LoraRecord, add_describer, get_record
from lorafx.pipeline import add_graph_check
from lorafx.schedules import Rule

__all__ = [
    "ArgView", "args_of", "set_args", "write", "create", "OpKind", "ScheduleFamily", "NodeCost", "InputQuery",
    "MergedFrom", "register_kind", "kind_of", "kind_named", "owner_of", "kinds", "lora_nodes", "canonicalize", "lint",
    "getitem_index", "getitem_users", "copy_meta", "replace_node",
]

OpOverload = torch._ops.OpOverload


# -- named argument views ------------------------------------------------------------------------

class ArgView:
    """The arguments of one call of ``op``, by name, in schema order, defaults filled.

    Read-only; ``replace(**changes)`` gives a new view, ``positional()`` the
    ``(args, kwargs)`` of a call (every argument positional except keyword-only ones).
    """

    __slots__ = ("op", "_values")

    def __init__(self, op: OpOverload, values: Dict[str, Any]):
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{_op_name(self.op)} has no argument {name!r}; "
                                 f"its arguments: {', '.join(self._values)}") from None

    def __setattr__(self, name, value):
        raise AttributeError("an ArgView is read-only; use view.replace(name=value)")

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __contains__(self, name) -> bool:
        return name in self._values

    def __eq__(self, other) -> bool:
        return isinstance(other, ArgView) and other.op == self.op and other._values == self._values

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"{_op_name(self.op)}({inner})"

    def as_dict(self) -> Dict[str, Any]:
        return dict(self._values)

    def replace(self, **changes) -> "ArgView":
        unknown = sorted(set(changes) - set(self._values))
        if unknown:
            raise TypeError(f"{_op_name(self.op)} has no argument(s) {unknown}; "
                            f"its arguments: {', '.join(self._values)}")
        return ArgView(self.op, {**self._values, **changes})

    def positional(self) -> Tuple[tuple, Dict[str, Any]]:
        args, kwargs = [], {}
        for a in self.op._schema.arguments:
            if a.kwarg_only:
                kwargs[a.name] = self._values[a.name]
            else:
                args.append(self._values[a.name])
        return tuple(args), kwargs


def _op_name(op) -> str:
    if isinstance(op, OpOverload):
        return f"{op.namespace}.{op._opname}"
    return getattr(op, "__name__", str(op))


def _bind(op: OpOverload, args: Sequence, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    values: Dict[str, Any] = {}
    positional = list(args)
    for i, a in enumerate(op._schema.arguments):
        if not a.kwarg_only and i < len(positional):
            values[a.name] = positional[i]
        elif a.name in kwargs:
            values[a.name] = kwargs[a.name]
        elif a.has_default_value():
            values[a.name] = a.default_value
        else:
            raise TypeError(f"{_op_name(op)}: missing argument {a.name!r}")
    return values


def args_of(node: torch.fx.Node) -> ArgView:
    """The named arguments of an op node (``node.target`` an OpOverload), defaults filled."""
    op = node.target
    if not isinstance(op, OpOverload):
        raise TypeError(f"args_of: node {node.name} calls {_op_name(op)}, not a torch op with a schema")
    return ArgView(op, _bind(op, node.args, node.kwargs))


def write(node: torch.fx.Node, values: "ArgView | Dict[str, Any]", target: Optional[OpOverload] = None) -> bool:
    """Set ``node``'s target and arguments from named ``values`` (an ArgView or a dict), in
    positional form.  ``target`` defaults to the view's op (or the node's own for a dict);
    with another op, values are matched by name: those it does not take are dropped, the
    ones it takes and ``values`` lacks get its defaults.  Returns whether the node changed."""
    op = target if target is not None else (values.op if isinstance(values, ArgView) else node.target)
    given = values.as_dict() if isinstance(values, ArgView) else dict(values)
    taken = {a.name for a in op._schema.arguments}
    args, kwargs = ArgView(op, _bind(op, (), {k: v for k, v in given.items() if k in taken})).positional()
    if node.target is op and tuple(node.args) == args and dict(node.kwargs) == kwargs:
        return False
    node.target, node.args, node.kwargs = op, args, kwargs
    return True


def set_args(node: torch.fx.Node, target: Optional[OpOverload] = None, **changes) -> bool:
    """Change an op node's arguments by name, keeping the positional form; with ``target``
    the node also becomes a call of that op (see ``write``).  Returns whether it changed."""
    view = args_of(node)
    if target is None:
        return write(node, view.replace(**changes))
    return write(node, {**view.as_dict(), **changes}, target)


def create(graph: torch.fx.Graph, op: OpOverload, name: Optional[str] = None, **arguments) -> torch.fx.Node:
    """A new ``call_function`` node of ``op`` from named arguments (defaults filled)."""
    args, kwargs = ArgView(op, _bind(op, (), arguments)).positional()
    return graph.create_node("call_function", op, args, kwargs, name=name)


# -- what a kind answers ----------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeCost:
    """FLOPs of one LoRA node: matrix products forward and backward (FlopCounterMode's
    convention), and the other (elementwise) FLOPs of the forward."""

    fwd: Any
    bwd: Any
    other: Any = 0


class InputQuery:
    """What a kind may ask a pass about a node's inputs (``OpKind.cost``,
    ``OpKind.schedule_family``).  The cost model answers with sympy sizes, SelectSchedule
    with concrete ones."""

    def shape(self, arg) -> Optional[Tuple[Any, ...]]:
        """The sizes of ``arg``'s value, or None if it is no tensor (or unknown)."""
        raise NotImplementedError

    def needs_grad(self, arg) -> bool:
        """Whether a gradient flows into ``arg`` (False for constants)."""
        raise NotImplementedError

    def value(self, arg) -> Any:
        """``arg``'s value (a fake or real tensor), or None if unknown."""
        raise NotImplementedError

    def tokens(self, arg) -> Any:
        """The product of every size of ``arg`` but the last (the token count of an input x)."""
        shape = self.shape(arg)
        if not shape:
            return 1
        out = 1
        for d in shape[:-1]:
            out = out * d
        return out


@dataclass(frozen=True)
class ScheduleFamily:
    """The schedules one node may run, and what each costs there.

    ``candidates``: schedule names, in order of preference at equal cost.  ``flops(name,
    b)`` and ``bytes(name, b)``: (forward, backward) amounts for b tokens (sympy).
    ``time(names, tokens, repeats)``: measured seconds per name (None: not measurable).
    ``key``: ``(name, value)`` pairs, equal for nodes whose costs are equal (SelectSchedule
    caches rules on it); ``time_key``: the pairs that also decide a measurement (dtype, device).
    """

    candidates: Tuple[str, ...]
    key: Tuple[Tuple[str, Any], ...]
    flops: Callable[[str, Any], Tuple[Any, Any]]
    bytes: Optional[Callable[[str, Any], Tuple[Any, Any]]] = None
    time: Optional[Callable[[Sequence[str], int, int], Dict[str, float]]] = None
    time_key: Tuple[Tuple[str, Any], ...] = ()

    def cost(self, name: str, b, *, byte_weight: float = 0.0, training: bool = True):
        """FLOPs (forward + backward when ``training``) plus ``byte_weight`` per byte moved."""
        f, bw = self.flops(name, b)
        total = f + bw if training else f
        if byte_weight and self.bytes is not None:
            fb, bb = self.bytes(name, b)
            total = total + byte_weight * (fb + bb if training else fb)
        return total


@dataclass(frozen=True)
class MergedFrom:
    """On a linear MergeLoRA made: the kind of the adapter node it replaced (UnmergeLoRA
    asks that kind to rebuild it)."""

    kind: str

    def describe(self) -> str:
        return ""  # the merged LoraRecord already says "merged"


class OpKind:
    """One kind of LoRA op.  Subclass, set ``name`` and ``ops``, override what differs.

    ``ops``: the adapter ops this kind owns (``kind_of`` finds them); ``helper_ops``:
    the kind's other ops (a dropout mask, a traced backward), which carry no gradient.
    Defaults describe a single-adapter op whose arguments are named like
    ``lora_linear``'s (``x``, ``weight``, ``bias``, ``lora_A``, ``lora_B``, ``scale``)
    and whose node carries the adapter's ``LoraRecord``.
    """

    name: str = ""
    ops: Tuple[OpOverload, ...] = ()
    helper_ops: Tuple[OpOverload, ...] = ()
    scheduled: bool = False  # SelectSchedule chooses its nodes' rules (from ``schedule_family``)
    # several active adapters at one site run as one node of this kind, A and scale·B stacked (lorafx/adapters.py)
    combinable: bool = False
    supports_lora_bias: bool = False  # PEFT's lora_bias: its build adds B's bias into the bias argument
    mergeable: bool = True  # MergeLoRA folds its adapters into a frozen weight (else they keep running)

    # arguments -------------------------------------------------------------------------
    def view(self, node: torch.fx.Node) -> ArgView:
        """The node's named arguments."""
        return args_of(node)

    def input(self, node: torch.fx.Node) -> Any:
        """The adapter's input x (the node siblings share)."""
        return self.view(node).x

    def rule(self, node: torch.fx.Node) -> Optional[Rule]:
        """The node's schedule rule, parsed; None for kinds without schedules."""
        view = self.view(node)
        return Rule.parse(view.schedule) if "schedule" in view else None

    # adapters --------------------------------------------------------------------------
    def adapters(self, node: torch.fx.Node) -> List[LoraRecord]:
        """The adapters the node computes (one record each)."""
        rec = get_record(node, LoraRecord)
        return [rec] if rec is not None else []

    def adapter_tensors(self, node: torch.fx.Node) -> List[str]:
        """Attribute paths of the trainable tensors of the node's adapters (what
        ``merge_and_unload`` deletes): A and B (and B's bias, ``lora_bias``) by default."""
        return [path for rec in self.adapters(node)
                for path in (rec.lora_A, rec.lora_B, rec.lora_bias) if path is not None]

    own_records: bool = False  # its nodes' LoraRecords name this kind (not a linear's, as a fused group's do)

    def check(self, node: torch.fx.Node) -> Optional[str]:
        """Why the node is malformed (the graph lint), or None."""
        rec = get_record(node, LoraRecord)
        if rec is None:
            return f"{self.name} node {node.name} has no LoraRecord in node.meta['lorafx']"
        if self.own_records and rec.kind != self.name:
            return f"{self.name} node {node.name} carries a LoraRecord of kind {rec.kind!r}"
        return None

    def describe(self, node: torch.fx.Node) -> str:
        """A short note for printed graphs, beside the node's records ("" for none)."""
        return ""

    def grad_outputs(self, node: torch.fx.Node) -> Optional[Tuple[bool, ...]]:
        """For a tuple-valued op, which outputs are differentiable (None: the op has one output)."""
        return None

    # memory and cost ---------------------------------------------------------------------
    def saved_inputs(self, node: torch.fx.Node) -> set:
        """The input nodes the op's autograd saves for backward (when it has one)."""
        view = self.view(node)
        return {v for v in (view.x, view.weight, view.lora_A, view.lora_B) if isinstance(v, torch.fx.Node)}

    def cost(self, node: torch.fx.Node, q: InputQuery) -> NodeCost:
        """Matrix-product FLOPs forward and backward (backward for the inputs ``q`` says
        need a gradient), and other forward FLOPs, as sympy expressions."""
        raise NotImplementedError(f"op kind {self.name!r} does not define its cost")

    # schedules ---------------------------------------------------------------------------
    def schedule_family(self, node: torch.fx.Node, q: InputQuery, *,
                        keep_xa: bool = False) -> Optional[ScheduleFamily]:
        """The schedules SelectSchedule may choose for the node (None: it is not scheduled);
        ``q`` answers with concrete sizes; ``keep_xa``: choose among schedules that keep XA."""
        return None

    def set_rule(self, graph: torch.fx.Graph, node: torch.fx.Node, rule: Rule) -> bool:
        """Make the node run ``rule``; returns whether the graph changed."""
        return set_args(node, schedule=str(rule))

    # canonical form and merging ------------------------------------------------------------------
    def canonical(self, graph: torch.fx.Graph, node: torch.fx.Node) -> List[torch.fx.Node]:
        """Rewrite the node into single-adapter nodes that compute the same outputs and whose
        kind merges them (``lora_linear``, or this kind's own); returns those nodes."""
        return [node]

    def merge_problem(self, node: torch.fx.Node) -> Optional[str]:
        """Why this (mergeable) kind's node cannot be folded into its weight, or None.  MergeLoRA
        leaves such a node running, as it leaves an unmergeable kind's (and ``merge_and_unload``
        rewrites it with ``lower``); ``merged_weight`` refuses it."""
        return None

    def kept_records(self, node: torch.fx.Node) -> list:
        """Records MergeLoRA keeps on the merged linear, for ``unmerge`` to read back (the
        LoraRecord and MergedFrom are kept for every kind)."""
        return []

    def merged_weight(self, root: torch.nn.Module, node: torch.fx.Node) -> torch.Tensor:
        """W + scale·B·A for a canonical node, in the stored layout and dtype, computed in
        float32 or wider."""
        rec = get_record(node, LoraRecord)
        W = get_attr(root, rec.weight)
        acc = torch.promote_types(W.dtype, torch.float32)
        delta = rec.scale * (get_attr(root, rec.lora_B).detach().to(acc) @ get_attr(root, rec.lora_A).detach().to(acc))
        return _stored(W, delta, rec)

    def unmerge(self, graph: torch.fx.Graph, linear: torch.fx.Node, record: LoraRecord, *, train: bool,
                created_by: str) -> torch.fx.Node:
        """Rebuild the canonical node that MergeLoRA replaced by ``linear`` (its
        ``aten.linear(x, W, bias)``), carrying ``record``, at the graph's insertion point
        (UnmergeLoRA sets it before ``linear``, and moves the users over); returns it.
        ``train``: the graph's training mode (for dropout masks)."""
        raise NotImplementedError(f"op kind {self.name!r} cannot rebuild a merged adapter")

    def lower(self, graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
        """For a kind that is not ``mergeable``: replace the node by plain aten ops computing
        the same output (``merge_and_unload``); returns the node that replaces it."""
        raise NotImplementedError(f"op kind {self.name!r} is mergeable; it has no lowering to aten ops")

    # creating adapters (the kinds InsertLoRA builds: ``layer`` set) -----------------------------
    layer: str = ""  # the layer type InsertLoRA adapts with this kind ("Linear", "Embedding", ...); "" for none

    def find_sites(self, gm: torch.fx.GraphModule) -> List[Site]:
        """The sites of this kind's layer type in a captured graph, in graph order."""
        return []

    def adapter_init(self, site: Site, r: int, init: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        """The adapter tensors to create for ``site`` at rank ``r``: ``{attribute name under the
        site's module: (shape, draw rule)}`` in the order they are drawn (the rules of
        ``lorafx.passes.insert_lora.draw_A``; ``init`` is the user's rule for A)."""
        return {"lora_A": ((r, site.in_features), init), "lora_B": ((site.out_features, r), "zeros")}

    def insert(self, gm: torch.fx.GraphModule, site: Site, record: LoraRecord, x: Any, *, train: bool,
               created_by: str) -> torch.fx.Node:
        """Build the adapter node of ``record`` before ``site.node``, reading ``x``; give it the
        site node's users and provenance and erase the site node; returns the new node."""
        raise NotImplementedError(f"op kind {self.name!r} does not build adapters on layers")

    def base_op(self, graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
        """MergeLoRA: a plain op, inserted at the graph's insertion point, computing the frozen
        layer from the node's weight and bias arguments (``aten.linear`` by default)."""
        v = self.view(node)
        return graph.call_function(torch.ops.aten.linear.default, (v.x, v.weight, v.bias))

    def peft_tensors(self, record: LoraRecord) -> Dict[str, str]:
        """``{PEFT state-dict key (without "base_model.model." and the adapter name): attribute
        path}`` for one adapter: what ``save_adapter`` writes and ``load_adapter`` reads."""
        out = {f"{record.site}.lora_A.weight": record.lora_A, f"{record.site}.lora_B.weight": record.lora_B}
        if record.lora_bias is not None:  # PEFT's lora_bias: lora_B is an nn.Linear with a bias
            out[f"{record.site}.lora_B.bias"] = record.lora_bias
        return out

    # training mode ------------------------------------------------------------------------------
    def set_training(self, node: torch.fx.Node, train: bool) -> bool:
        """Switch a node of this kind (adapter or helper op) to train or eval behaviour;
        returns whether it changed."""
        return False

    def __repr__(self) -> str:
        return f"<op kind {self.name}: {', '.join(_op_name(o) for o in self.ops)}>"


def _stored(W: torch.Tensor, delta: torch.Tensor, rec: LoraRecord) -> torch.Tensor:
    """W + delta (delta in (out, in) layout), in W's stored layout and dtype."""
    if rec.weight_transposed:
        delta = delta.t()
    return (W.detach().to(delta.dtype) + delta).to(W.dtype)


# -- the registry ----------------------------------------------------------------------------------

_KINDS: Dict[str, OpKind] = {}
_BY_OP: Dict[Any, OpKind] = {}
_HELPERS: Dict[Any, OpKind] = {}


def register_kind(kind: OpKind) -> OpKind:
    """Register ``kind`` (an OpKind instance); its ops then belong to it.  Registering a kind
    of the same name again replaces it.  Returns the kind."""
    if not isinstance(kind, OpKind):
        raise TypeError(f"register_kind needs an OpKind instance, got {type(kind).__name__}")
    if not kind.name or not kind.ops:
        raise ValueError(f"an op kind needs a name and at least one op, got {kind!r}")
    old = _KINDS.pop(kind.name, None)
    if old is not None:
        for table in (_BY_OP, _HELPERS):
            for op in [o for o, k in table.items() if k is old]:
                del table[op]
    for op in kind.ops + kind.helper_ops:
        other = _BY_OP.get(op) or _HELPERS.get(op)
        if other is not None:
            raise ValueError(f"{_op_name(op)} already belongs to op kind {other.name!r}")
    _KINDS[kind.name] = kind
    for op in kind.ops:
        add_autocast_rule(op)
    _BY_OP.update({op: kind for op in kind.ops})
    _HELPERS.update({op: kind for op in kind.helper_ops})
    return kind


_AUTOCAST_RULES: set = set()
_LOWER = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (float64 stays)


def add_autocast_rule(op: OpOverload, keep: Sequence[str] = ("sources",)) -> None:
    """Run ``op`` under ``torch.autocast`` as autocast runs a linear: its floating tensor
    arguments (but those named in ``keep``: a recipe's ``sources``, from which backward rebuilds
    the input and casts it the same way) are cast to the autocast dtype, and the op runs with
    autocast off, so every product inside it is in that dtype and so is its output.  Without
    such a rule a custom op sees autocast only in its inner calls (mixed dtypes, a wrong output
    dtype).  For ``torch.library.custom_op`` ops, on every device type that has autocast."""
    from torch._library.custom_ops import OPDEFS
    opdef = OPDEFS.get(f"{op.namespace}::{op._opname}")
    if opdef is None or op in _AUTOCAST_RULES:
        return
    names = [a.name for a in op._schema.arguments]
    for device in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device)
        key = getattr(torch._C.DispatchKey, key_name, None)
        if key is None or not torch._C._is_autocast_available(device):
            continue

        def kernel(_keyset, *args, _device=device, _key=key):
            dtype = torch.get_autocast_dtype(_device)

            def cast(v):
                if isinstance(v, torch.Tensor) and v.dtype in _LOWER and v.device.type == _device:
                    return v.to(dtype)
                return [cast(t) for t in v] if isinstance(v, (list, tuple)) else v

            args = tuple(a if name in keep else cast(a) for name, a in zip(names, args))
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*args)

        opdef._lib.impl(opdef._name, kernel, key_name, with_keyset=True)
    _AUTOCAST_RULES.add(op)


def kinds() -> Tuple[OpKind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_KINDS.values())


def kind_named(name: str) -> OpKind:
    return _KINDS[name]


def kind_of(node: torch.fx.Node) -> Optional[OpKind]:
    """The kind of an adapter op node; None for every other node (helper ops included)."""
    if node.op != "call_function":
        return None
    return _BY_OP.get(node.target)


def owner_of(node: torch.fx.Node) -> Optional[OpKind]:
    """The kind owning the node's op, adapter or helper; None for other nodes."""
    if node.op != "call_function":
        return None
    return _BY_OP.get(node.target) or _HELPERS.get(node.target)


def lora_nodes(graph: torch.fx.Graph) -> List[torch.fx.Node]:
    """Every adapter op node of the graph, in order."""
    return [n for n in graph.nodes if kind_of(n) is not None]


def canonicalize(graph: torch.fx.Graph) -> List[torch.fx.Node]:
    """Rewrite every adapter node into its canonical, single-adapter form (undoing fuse,
    fold, recompute, keep-XA); returns the canonical nodes.  The caller recompiles."""
    out: Dict[torch.fx.Node, None] = {}
    for node in list(graph.nodes):
        kind = None if node._erased else kind_of(node)  # (an earlier node's rewrite may have erased it)
        if kind is not None:
            out.update(dict.fromkeys(kind.canonical(graph, node)))
    return [n for n in out if not n._erased]


def lint(graph: torch.fx.Graph) -> Optional[str]:
    """The first malformed adapter node's problem (see ``OpKind.check``), or None."""
    for node in graph.nodes:
        kind = kind_of(node)
        if kind is not None:
            problem = kind.check(node)
            if problem:
                return problem
    return None


def _describe(node: torch.fx.Node) -> str:
    kind = kind_of(node)
    return kind.describe(node) if kind is not None else ""


add_graph_check(lint)  # lorafx.lint_graph: every adapter node is well formed
add_describer(_describe)  # lorafx.meta.describe (printed graphs): the kind's note


def getitem_index(node: torch.fx.Node) -> Optional[int]:
    """``i`` for a ``getitem(tuple_node, i)`` node, else None."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        return node.args[1]
    return None


def getitem_users(node: torch.fx.Node) -> Dict[int, torch.fx.Node]:
    """{index: getitem node} for the users of a tuple-valued node."""
    return {getitem_index(u): u for u in node.users if getitem_index(u) is not None}


def replace_node(graph: torch.fx.Graph, node: torch.fx.Node, out: torch.fx.Node, *made: torch.fx.Node) -> None:
    """Make ``out`` stand for ``node`` (its users, its ``val``) and erase ``node``; ``made`` are the
    other nodes built for it, which get its provenance like ``out``."""
    copy_meta(node, *made, out)
    if "val" in node.meta:
        out.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def copy_meta(src: torch.fx.Node, *dst: torch.fx.Node, keys=("nn_module_stack", "stack_trace")) -> None:
    """Copy the provenance entries of ``src.meta`` to ``dst``."""
    for key in keys:
        if key in src.meta:
            for d in dst:
                d.meta[key] = src.meta[key]

