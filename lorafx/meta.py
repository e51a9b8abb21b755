"""Typed lorafx metadata on fx nodes and graphs.

Every node record lives under the single key ``node.meta["lorafx"]``, a plain dict
from record kind to a frozen dataclass; each record renders itself (``describe()``).
What lorafx knows about a whole graph (its call signature, dynamic dims, the
properties passes provided, ...) is one ``GraphRecord`` under ``gm.meta["lorafx"]``,
reached through ``graph_record(gm)``.  Records hold names and numbers only (no
references to nodes or modules) so graphs deep-copy and pickle.

    >>> import torch.fx
    >>> from lorafx.meta import LoraRecord, describe, get_record, set_record
    >>> node = torch.fx.Graph().placeholder("x")
    >>> rec = LoraRecord(site="model.layers.0.self_attn.q_proj", weight="...q_proj.weight",
    ...                  lora_A="...q_proj.lora_A", lora_B="...q_proj.lora_B", r=8, alpha=16.0, scale=2.0,
    ...                  in_features=64, out_features=64)
    >>> set_record(node, rec); get_record(node, LoraRecord) is rec
    True
    >>> describe(node)
    'lora(r=8, alpha=16, scale=2)'
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, FrozenSet, List, Optional, Tuple, Type, TypeVar

import torch.fx

META_KEY = "lorafx"
CAPTURED = "captured"  # the graph property every captured graph has

R = TypeVar("R")


@dataclass(frozen=True)
class OriginRecord:
    """Where a node came from: the module that produced it and the pass that made it."""

    module: str  # dotted module name, "" for the root
    module_type: str = ""
    created_by: Optional[str] = None  # name of the pass that inserted the node

    def describe(self) -> str:
        return f"by {self.created_by}" if self.created_by else ""


@dataclass(frozen=True)
class LoraRecord:
    """An adapter on one layer; for a linear ``y = x W^T + b + scale * dropout(x) A^T B^T``.

    ``kind``: the OpKind that computes it (its ``peft_tensors`` name the saved keys);
    ``layer``: the layer type ("Linear", "Embedding", "Conv2d", ...); ``magnitude``: the
    path of DoRA's magnitude vector; ``lora_bias``: the path of B's bias (PEFT's
    ``lora_bias``); ``adapter``: the adapter's name ("default" unless several are added)."""

    site: str  # module name of the adapted linear, e.g. "model.layers.0.self_attn.q_proj"
    weight: str  # attribute path of the frozen weight
    lora_A: str  # attribute path of A, shape (r, in_features)
    lora_B: str  # attribute path of B, shape (out_features, r)
    r: int
    alpha: float
    scale: float
    in_features: int
    out_features: int
    bias: Optional[str] = None
    dropout: float = 0.0
    weight_transposed: bool = False  # True for GPT-2 Conv1D weights stored as (in, out)
    merged: bool = False
    kind: str = "lora_linear"
    layer: str = "Linear"
    magnitude: Optional[str] = None  # DoRA (kind "lora_dora"): attribute path of the magnitude m, (out_features,)
    lora_bias: Optional[str] = None
    adapter: str = "default"
    # PiSSA/OLoRA (a base-changing init): the initial A and B, kept frozen; ``weight`` is then the residual
    # W - scale·B0 A0, and save_adapter writes the plain LoRA [B, -B0]·[A; A0] for the original W
    lora_A0: Optional[str] = None
    lora_B0: Optional[str] = None

    def describe(self) -> str:
        return (f"lora(r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}"
                + (f", dropout={self.dropout:g}" if self.dropout else "")
                + (f", {self.layer}" if self.layer != "Linear" else "")
                + (", dora" if self.magnitude else "")
                + (f", adapter {self.adapter}" if self.adapter != "default" else "")
                + (", merged" if self.merged else "") + ")")


@dataclass(frozen=True)
class DropoutRecord:
    """A dropout whose train/eval behaviour is switched by SetTrainingMode."""

    p: float
    site: str = ""

    def describe(self) -> str:
        return f"dropout(p={self.p:g})"


@dataclass(frozen=True)
class CostRecord:
    """Symbolic cost of one node, attached by the ``AnnotateCost`` pass.

    Every amount is a sympy expression in the graph's dynamic dims (``batch``,
    ``seq``; other unnamed dims keep torch.export's names such as ``s3``).
    ``fwd_flops``/``bwd_flops`` count matrix products (mm, addmm, bmm, linear,
    matmul, SDPA, lora_linear) in ``FlopCounterMode``'s convention (2 per
    multiply-add); ``fwd_other_flops``/``bwd_other_flops`` hold the elementwise,
    softmax, norm and reduction work, which ``FlopCounterMode`` counts as 0.
    Bytes are tensor reads plus writes (see ``passes/cost_model.py``).
    """

    kind: str  # "matmul", "lora", "attention", "elementwise", "norm", "view", ...
    fwd_flops: Any = 0
    bwd_flops: Any = 0
    fwd_other_flops: Any = 0
    bwd_other_flops: Any = 0
    fwd_bytes: Any = 0
    bwd_bytes: Any = 0
    requires_grad: bool = False  # a gradient flows back through this node

    graph_property: ClassVar[str] = "cost"  # the graph property these records make up (see Pass.invalidates)

    def describe(self) -> str:
        if self.kind in ("matmul", "lora", "attention", "subgraph") and self.fwd_flops != 0:
            return f"flops fwd={self.fwd_flops} bwd={self.bwd_flops}"
        return ""


@dataclass(frozen=True)
class ScheduleRecord:
    """The RunLoRA schedule chosen for a lora node by ``SelectSchedule`` (see ``lorafx.schedules``).

    ``rule`` is the node's schedule argument, e.g. ``"f1b1|4096:f2b5"`` (below 4096
    tokens f1b1, from 4096 f2b5); ``criterion`` is how it was chosen ("flops", "time"
    or "fixed").
    """

    rule: str
    criterion: str = "flops"

    graph_property: ClassVar[str] = "schedule"

    def describe(self) -> str:
        return f"schedule={self.rule}"


@dataclass(frozen=True)
class PlacementRecord:
    """Where a node runs on a composite hardware target (``PartitionToTargets``): ``target``
    names the part ("rram", "sram" or "host"); ``tiles`` is how many crossbar tiles a weight
    placed on RRAM occupies (0 elsewhere)."""

    target: str
    tiles: int = 0

    graph_property: ClassVar[str] = "placement"

    def describe(self) -> str:
        return f"@{self.target}" + (f" ({self.tiles} tiles)" if self.tiles else "")


RECORD_TYPES = (OriginRecord, LoraRecord, DropoutRecord, CostRecord, ScheduleRecord, PlacementRecord)


@dataclass(frozen=True)
class SparsityInfo:
    """One pruned weight: its module, how it was pruned, and its zero count."""

    module: str
    pattern: str  # "unstructured" | "N:M" | "keep"
    method: str  # "wanda" | "magnitude" | "keep"
    zeros: int
    numel: int

    @property
    def share(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class DeferredInit:
    """Adapters a pass created on the meta device, to be drawn once real weights exist
    (``lorafx.materialize``).  ``draws`` lists, in the order the pass drew them from one
    ``torch.Generator`` seeded with ``seed``, each A's ``(path, shape, init, r)``; every B is 0."""

    seed: int
    draws: Tuple[Tuple[str, Tuple[int, ...], str, int], ...]


@dataclass
class GraphRecord:
    """What lorafx knows about a whole graph: one per GraphModule, ``gm.meta["lorafx"]``.

    ``capture`` fills the first group; passes update the rest.  Fields whose
    metadata names a graph property (``cost``) are cleared when a pass invalidates it.
    """

    signature: tuple = ((), ())  # the call signature the graph is specialised to (capture.signature_key)
    inputs: Tuple[str, ...] = ()  # keyword inputs, sorted
    nargs: int = 0  # positional inputs (models whose forward takes *args)
    input_ranks: Dict[str, int] = field(default_factory=dict)  # tensor input -> number of dims
    dims: Dict[str, str] = field(default_factory=dict)  # dynamic symbol -> "batch" | "seq"
    output_modules: Tuple[str, ...] = ()  # the model's output layer(s), left alone by "all-linear"
    captured_training: bool = True  # the mode the graph was exported in
    causal_lm: bool = False  # a transformers causal LM: its labels are its input ids (shifted in the loss)
    training: Optional[bool] = None  # the mode SetTrainingMode last set (None: as captured)
    provided: FrozenSet[str] = frozenset({CAPTURED})  # properties the passes run so far provided
    cost: Any = field(default=None, metadata={"graph_property": "cost"})  # the graph's total CostRecord
    # {site: rank} chosen by AllocateRanks for every candidate site (0: no adapter); InsertLoRA and
    # InsertShortcuts take their sites and ranks from it when it is set
    allocation: Optional[Dict[str, int]] = None
    scores: Optional[Dict[str, float]] = None  # {site: proxy score} behind that allocation
    # {weight path: SparsityInfo} of the weights PruneWeights pruned (or kept sparse); ApplySparsity makes
    # their adapters sparse LoRA ops
    sparsity: Optional[Dict[str, "SparsityInfo"]] = None
    # the partition of a compute-in-memory lowering (PartitionToTargets): per target, its parameters,
    # tiles and nodes, and the estimated energy and latency per token (see passes/partition_to_targets.py)
    placement: Any = field(default=None, metadata={"graph_property": "placement"})
    # adapters made on the meta device (one DeferredInit per pass that made some), drawn by lorafx.materialize
    deferred_init: Tuple[DeferredInit, ...] = ()
    # PEFT's modules_to_save (passes/modules_to_save.py): the names given, and the module paths they selected,
    # whose parameters are trainable private copies (freeze_base leaves them, InsertLoRA adapts nothing inside)
    modules_to_save: Tuple[str, ...] = ()
    saved_modules: Tuple[str, ...] = ()

    def forget(self, properties) -> None:
        """Clear the fields that describe any of ``properties``; drop them from ``provided``."""
        for f in dataclasses.fields(self):
            if f.metadata.get("graph_property") in properties:
                setattr(self, f.name, f.default)
        self.provided = frozenset(self.provided) - frozenset(properties)

    def describe(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in sorted(self.dims.items()))
        return (f"graph(inputs={list(self.inputs)}, dims={{{dims}}}, "
                f"provided={sorted(self.provided)}, training={self.training})")


def graph_record(gm) -> GraphRecord:
    """The ``GraphRecord`` of a GraphModule (an empty one is attached if missing)."""
    rec = gm.meta.get(META_KEY)
    if not isinstance(rec, GraphRecord):
        rec = gm.meta[META_KEY] = GraphRecord()
    return rec


def records(node: torch.fx.Node) -> dict:
    """The lorafx record dict of ``node`` (created empty if missing)."""
    return node.meta.setdefault(META_KEY, {})


def get_record(node: torch.fx.Node, kind: Type[R]) -> Optional[R]:
    """The record of type ``kind`` on ``node``, or None."""
    return node.meta.get(META_KEY, {}).get(kind.__name__)


def set_record(node: torch.fx.Node, record) -> None:
    """Attach ``record`` to ``node``, replacing any record of the same type."""
    if not dataclasses.is_dataclass(record):
        raise TypeError(f"lorafx metadata must be a dataclass record, got {type(record).__name__}")
    records(node)[type(record).__name__] = record


def update_record(node: torch.fx.Node, kind: Type[R], **changes) -> R:
    """Replace fields of the existing ``kind`` record on ``node``; returns the new record."""
    old = get_record(node, kind)
    if old is None:
        raise KeyError(f"node {node.name} has no {kind.__name__} record")
    new = dataclasses.replace(old, **changes)
    set_record(node, new)
    return new


def forget_records(node: torch.fx.Node, properties) -> None:
    """Drop ``node``'s records that make up any of the graph ``properties``."""
    recs = node.meta.get(META_KEY)
    if recs:
        for kind, rec in list(recs.items()):
            if getattr(rec, "graph_property", None) in properties:
                del recs[kind]


_DESCRIBERS: List[Callable[[torch.fx.Node], str]] = []


def add_describer(describer: Callable[[torch.fx.Node], str]) -> None:
    """Add a source of notes for ``describe``: ``describer(node)`` returns a short note
    ("" for none), printed before the node's records.  The LoRA dialect adds its kinds'."""
    if describer not in _DESCRIBERS:
        _DESCRIBERS.append(describer)


def describe(node: torch.fx.Node) -> str:
    """A one-line summary of a node's lorafx records, for printing graphs."""
    parts = [note for note in (d(node) for d in _DESCRIBERS) if note]
    for rec in node.meta.get(META_KEY, {}).values():
        if isinstance(rec, LoraRecord):
            parts.append(f"lora(r={rec.r}, alpha={rec.alpha:g}, scale={rec.scale:g}"
                         + (f", dropout={rec.dropout:g}" if rec.dropout else "")
                         + (", merged" if rec.merged else "") + ")")
        elif isinstance(rec, DropoutRecord):
            parts.append(f"dropout(p={rec.p:g})")
        elif isinstance(rec, ScheduleRecord):
            parts.append(f"schedule={rec.rule}")
        elif isinstance(rec, CostRecord):
            if rec.kind in ("matmul", "lora", "attention", "subgraph") and rec.fwd_flops != 0:
                parts.append(f"flops fwd={rec.fwd_flops} bwd={rec.bwd_flops}")
        elif isinstance(rec, OriginRecord):
            if rec.created_by:
                parts.append(f"by {rec.created_by}")
        else:  # a record of a layer above (e.g. the dialect's): it renders itself, or is named
            parts.append(rec.describe() if hasattr(rec, "describe") else type(rec).__name__)
    return "; ".join(p for p in parts if p)
