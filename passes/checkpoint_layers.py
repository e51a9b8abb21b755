"""CheckpointLayers: each repeated block runs under activation checkpointing.

Every decoder layer (every module path ``<prefix>.<N>``, such as ``model.layers.3``
or ``transformer.h.3``; ``layers=`` takes another regex) becomes one *region*: its
nodes move into a GraphModule of their own, called through
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.  Autograd then keeps
only a region's inputs (the hidden state, the rotary tables, the mask; the weights
are alive anyway) and runs the region again in backward to rebuild what its backward
reads.  Dropout masks come out the same (checkpoint restores the RNG state), and
the lorafx ops inside keep their eager fast path (``lorafx.eager``) and run under
``torch.compile`` (dynamo turns the call into its checkpoint higher-order op).

Recomputation happens once.  ``RecomputeInputs`` (and FuseSiblings' recipes) make an
adapter save the tensors its input is rebuilt from instead of the input itself, and
rebuild it in backward; inside a checkpointed region nothing is kept across the
region anyway -- the region's second forward has just computed that input, alive until
the region's backward ends -- so a rebuild there would recompute it a second time.
The pass turns those adapters back into their plain form (``lora_linear_recompute`` ->
``lora_linear``, a sibling group's recipe dropped): in a checkpointed layer every
value is recomputed exactly once, by the region's second forward.

A node belongs to the region of the first numbered module on its module path; a node
with no module path of its own (``getitem``, ``sym_size``) to the region of its inputs
when they all lie in one.  A region is outlined only when it is convex (no path leaves
it and comes back); ``info["kept"]`` names the ones left alone and why.
``every_n_layers=n`` checkpoints regions 0, n, 2n, ... (transformers' meaning).

``lorafx.CompiledModel.activation_checkpointing_enable()`` (and the Trainer's
``gradient_checkpointing=True``) runs this pass on a copy of each captured graph that
shares its parameters (``checkpointed``), so the compiled model's own graphs stay
flat for ``merge``, ``train``/``eval``, ``save_adapter`` and inspection, and
switching checkpointing on or off never captures the model again.

Requires: a captured graph (adapters optional).  Provides: ``"checkpointed"``.
Invalidates ``"cost"`` (the nodes moved into the regions' graphs).
Preserves: outputs and gradients (the same kernels on the same values, run twice).

Before::

    %mul_4 = call_function[target=aten.mul.Tensor](args=(%norm_w, %to_7))          # model.layers.0...
    %q_lora = call_function[target=lorafx.lora_linear_recompute.default](args=(%mul_4, ..., %recipe, [%h, %rsqrt]))
    ...
    %add_9 = call_function[target=aten.add.Tensor](args=(%add_6, %down_lora))        # model.layers.0
    %mul_20 = call_function[target=aten.mul.Tensor](args=(...))                      # model.layers.1...

After::

    %checkpoint_region_0 = get_attr[target=checkpoint_region_0]
    %checkpoint = call_function[target=torch.utils.checkpoint.checkpoint](
        args=(%checkpoint_region_0, %embedding, %cos, %sin, %q_w, %q_A, %q_B, ...), kwargs={use_reentrant: False})
    %add_9 = call_function[target=operator.getitem](args=(%checkpoint, 0))
    ...
    # checkpoint_region_0.graph_module: placeholders for the inputs, the layer's nodes with
    # %q_lora = lorafx.lora_linear.default(%mul_4, ...)  (the recipe dropped), output (%add_9,)
"""
from __future__ import annotations

import copy
import heapq
import operator
import re
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx
import torch.utils.checkpoint

from lorafx import eager
from lorafx.context import CompileContext
from lorafx.dialect import RECOMPUTE, args_of, kind_of, set_args
from lorafx.graph_utils import node_module
from lorafx.options import check_positive_int, regex_error
from lorafx.pipeline import CAPTURED, Pass, PassResult

__all__ = ["CheckpointLayers", "checkpointed", "Region", "REGION_PREFIX"]

REGION_PREFIX = "checkpoint_region_"
_NUMBERED = re.compile(r"^(.*?\.\d+)(?:\.|$)")  # the first numbered module on a path: model.layers.3
# checkpoint() keywords lorafx passes through; use_reentrant is always False (see validate)
_CHECKPOINT_KWARGS = ("preserve_rng_state", "determinism_check", "debug", "use_reentrant")


class Region(torch.nn.Module):
    """One checkpointed region: runs its graph module (with the lorafx ops' fast eager path)."""

    def __init__(self, graph_module: torch.fx.GraphModule, module: str):
        super().__init__()
        self.graph_module = graph_module
        self.module = module

    def forward(self, *args):
        return eager.run(self.graph_module, args, {})

    def extra_repr(self) -> str:
        return f"{self.module!r}, nodes={len(self.graph_module.graph.nodes)}"


@dataclass(frozen=True)
class CheckpointLayers(Pass):
    layers: Optional[str] = None  # regex on module paths naming the regions (default: numbered blocks)
    every_n_layers: int = 1
    checkpoint_kwargs: Tuple[Tuple[str, Any], ...] = ()  # further torch.utils.checkpoint.checkpoint keywords

    requires = frozenset({CAPTURED})
    provides = frozenset({"checkpointed"})
    invalidates = frozenset({"cost"})

    def validate(self) -> None:
        where = "CheckpointLayers: "
        check_positive_int("every_n_layers", self.every_n_layers, where, "2")
        if self.layers is not None:
            err = regex_error(self.layers) if isinstance(self.layers, str) else "not a string"
            if err:
                raise ValueError(f"{where}layers={self.layers!r} is not a valid regex ({err}); pass a regex "
                                 r"matching module paths, e.g. layers=r'model\.layers\.\d+'")
        kwargs = dict(self.checkpoint_kwargs)
        unknown = sorted(set(kwargs) - set(_CHECKPOINT_KWARGS))
        if unknown:
            raise ValueError(f"{where}torch.utils.checkpoint.checkpoint keyword(s) {unknown} are not supported; "
                             f"lorafx passes on {list(_CHECKPOINT_KWARGS)}")
        if kwargs.get("use_reentrant", False) is not False:
            raise ValueError(f"{where}use_reentrant={kwargs['use_reentrant']!r}: lorafx checkpoints with "
                             "use_reentrant=False only (reentrant checkpointing gives the adapters inside a layer no "
                             "gradient when no input of the layer requires one, and cannot run the custom lorafx ops' "
                             "saved-tensor logic); pass gradient_checkpointing_kwargs={'use_reentrant': False} or none")

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        regions = self._regions(gm.graph)
        kept: Dict[str, str] = {}
        outlined, dropped = [], 0
        names = iter(range(10 ** 9))
        for index, (module, nodes) in enumerate(regions.items()):
            if index % self.every_n_layers:
                kept[module] = f"every_n_layers={self.every_n_layers}"
                continue
            reason = _not_convex(nodes)
            if reason:
                kept[module] = reason
                continue
            name = next(f"{REGION_PREFIX}{i}" for i in names if not hasattr(gm, f"{REGION_PREFIX}{i}"))
            dropped += _outline(gm, name, module, nodes, dict(self.checkpoint_kwargs))
            outlined.append(module)
        if outlined:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
        return PassResult(gm, bool(outlined), {"regions": len(outlined), "recomputes_dropped": dropped,
                                                "checkpointed": outlined, "kept": kept})

    def _regions(self, graph: torch.fx.Graph) -> Dict[str, List[torch.fx.Node]]:
        """{region module: its nodes in graph order}."""
        pattern = re.compile(self.layers) if self.layers is not None else None
        region_of: Dict[torch.fx.Node, str] = {}
        out: Dict[str, List[torch.fx.Node]] = {}
        for node in graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue  # (an exported graph's _guards_fn call stays in the root graph)
            region = self._region_of_module(node_module(node), pattern)
            if region is None and not node_module(node):
                inner = {region_of.get(a) for a in node.all_input_nodes if a.op not in ("get_attr", "placeholder")}
                region = inner.pop() if len(inner) == 1 else None
            if region is not None:
                region_of[node] = region
                out.setdefault(region, []).append(node)
        return out

    @staticmethod
    def _region_of_module(module: str, pattern) -> Optional[str]:
        if not module:
            return None
        if pattern is None:
            m = _NUMBERED.match(module)
            return m.group(1) if m else None
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if pattern.fullmatch(prefix):
                return prefix
        return None


def _not_convex(nodes: Sequence[torch.fx.Node]) -> Optional[str]:
    """Why the region cannot be one call (a path leaves it and re-enters), or None."""
    inside = set(nodes)
    outside_after: Set[torch.fx.Node] = set()  # outside nodes depending on the region
    stack = [u for n in nodes for u in n.users if u not in inside]
    while stack:
        n = stack.pop()
        if n in outside_after:
            continue
        outside_after.add(n)
        for u in n.users:
            if u in inside:
                return f"not convex: {nodes[0].name}... feed {n.name}, which feeds {u.name} back in the region"
            stack.append(u)
    return None


def _drop_recompute(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    """Make an adapter that rebuilds its input in backward keep its input instead (inside a
    checkpointed region the input was just recomputed).  Returns whether it changed."""
    kind = kind_of(node)
    if kind is None:
        return False
    if kind is RECOMPUTE:
        kind.canonical(graph, node)
        return True
    view = args_of(node)
    names = {a.name for a in node.target._schema.arguments}
    if {"recipe", "sources"} <= names and view.recipe:
        return set_args(node, recipe="", sources=[])
    return False


def _outline(gm: torch.fx.GraphModule, name: str, module: str, nodes: List[torch.fx.Node],
             kwargs: Dict[str, Any]) -> int:
    """Move ``nodes`` into a Region registered on ``gm`` as ``name``, called through
    ``checkpoint`` where they were; returns how many recomputing adapters became plain."""
    graph = gm.graph
    inside = set(nodes)
    inputs: Dict[torch.fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                inputs.setdefault(a, None)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    sub = torch.fx.Graph()
    env: Dict[torch.fx.Node, torch.fx.Node] = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        if "val" in a.meta:
            env[a].meta["val"] = a.meta["val"]
    for n in nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[o] for o in outputs))
    dropped = sum(_drop_recompute(sub, n) for n in list(sub.nodes))
    sub.lint()
    region = Region(torch.fx.GraphModule(torch.nn.Module(), sub), module)
    gm.add_submodule(name, region)
    order = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_before(nodes[0]):
        fn = graph.get_attr(name)
        call = graph.call_function(torch.utils.checkpoint.checkpoint, (fn, *inputs),
                                   {**kwargs, "use_reentrant": False})
        outs = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for o, new in zip(outputs, outs):
        new.meta.update({k: v for k, v in o.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        o.replace_all_uses_with(new, delete_user_cb=lambda u: u not in inside)
    for n in reversed(nodes):
        graph.erase_node(n)
    _topological_sort(graph, {**order, fn: order[nodes[0]], call: order[nodes[0]],
                              **{o: order[nodes[0]] for o in outs}})
    return dropped


def _topological_sort(graph: torch.fx.Graph, rank: Dict[torch.fx.Node, int]) -> None:
    """Reorder ``graph`` so every node follows its inputs, otherwise keeping ``rank``'s order
    (the region's call may need inputs made after its first node)."""
    nodes = list(graph.nodes)
    position = {n: (rank.get(n, i), i) for i, n in enumerate(nodes)}
    waiting = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(position[n], id(n), n) for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, n = heapq.heappop(ready)
        order.append(n)
        for u in n.users:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (position[u], id(u), u))
    if len(order) != len(nodes):
        raise RuntimeError("CheckpointLayers: the graph has a cycle after outlining a region")
    # placeholders first and the output last stay where they are (their ranks put them there)
    anchor = order[0]
    for n in order[1:]:
        anchor.append(n)
        anchor = n


# -- the checkpointed copy a CompiledModel runs --------------------------------------------------------

# gm -> {(gm's code, the pass): the checkpointed copy}; rebuilt when gm is recompiled (train/eval)
_COPIES: "weakref.WeakKeyDictionary[torch.fx.GraphModule, dict]" = weakref.WeakKeyDictionary()


def checkpointed(gm: torch.fx.GraphModule, config: CheckpointLayers) -> torch.fx.GraphModule:
    """A copy of ``gm`` with ``config`` applied, sharing ``gm``'s parameter and buffer tables
    and submodules (so a parameter rebound on ``gm``, a copy-on-write load, is seen), cached
    per graph code.  ``gm`` itself is not changed."""
    key = (gm.__dict__.get("_code"), config)
    cache = _COPIES.get(gm)
    if cache is None:
        cache = _COPIES[gm] = {}
    hit = cache.get(key)
    if hit is not None:
        return hit
    copy_gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    for attr in ("_parameters", "_buffers", "_non_persistent_buffers_set"):
        object.__setattr__(copy_gm, attr, getattr(gm, attr))
    object.__setattr__(copy_gm, "_modules", dict(gm._modules))  # its own table: the regions go in it
    copy_gm.meta = copy.deepcopy(gm.meta)  # (the pass updates the graph record: gm's stays as it is)
    copy_gm.graph = copy.deepcopy(gm.graph)  # (the codegen too: an exported module's pytree in/out specs)
    config(copy_gm, CompileContext())
    cache.clear()  # one copy per graph: the previous code's is stale
    cache[key] = copy_gm
    return copy_gm
