"""MergeLoRA / UnmergeLoRA: fold adapters into the frozen weights and back.

MergeLoRA requires ``"lora"``.  It first rewrites every LoRA op into its kind's
canonical, single-adapter form (``lorafx.dialect.canonicalize``: sibling groups split,
folded and recompute nodes back to ``lora_linear``), then asks each node's kind for its
merged weight (W + scale * B A by default, in float32, in the stored layout), binds it
in place of W and turns the node into its kind's plain op (``OpKind.base_op``: ``aten.linear``
for a linear, the embedding lookup or convolution for those kinds).  The original W is kept
as a non-persistent buffer ``<weight>_lorafx_unmerged`` so that UnmergeLoRA restores it
bit for bit (the caller's model is never written to); UnmergeLoRA asks the kind the
node was merged from (its ``MergedFrom`` record) to rebuild it.  ``unload=True`` also
deletes the adapters' tensors and the kept weights (merge_and_unload).

PEFT's ``lora_bias`` (B's bias b, which every kind receives added into its bias argument,
``lorafx.dialect.linear.with_lora_bias``) is folded into the layer's bias as bias + s·b; a
layer without bias gets one (``<site>.bias``), which unmerge removes again.

Kinds that cannot be folded into a weight (``mergeable = False``: the shortcut
connections of ``lora_shortcut``), and nodes whose kind names a ``merge_problem`` (a grouped
convolution's adapter, whose update is no grouped weight), are left running by MergeLoRA; ``unload=True`` turns
them into plain aten ops with their A and B kept as frozen tensors (``lower_unmergeable``).

Preserves: outputs (merged equals unmerged up to float rounding; dropout is
the identity in eval).

Before::

    %q_lora = call_function[target=lorafx.lora_linear.default](args=(%x, %w, None, %A, %B, 2.0))
After::

    %q_lora = call_function[target=aten.linear.default](args=(%x, %w, None))   # meta: lora(..., merged)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.fx

from lorafx.context import CompileContext
from lorafx.dialect import LINEAR, MergedFrom, canonicalize, kind_named, kind_of
from lorafx.graph_utils import get_attr, owner_and_name, del_attr
from lorafx.meta import LoraRecord, OriginRecord, get_record, graph_record, set_record
from lorafx.pipeline import Pass, PassResult

from .fold_lora import FOLDED_SUFFIX
from .trainable_tokens import merge_tokens, merged_token_weights, unmerge_tokens

__all__ = ["MergeLoRA", "UnmergeLoRA", "merged_weights", "unmerge_site_weight", "kept_unmerged_weight",
           "mergeable", "unmergeable_nodes", "lower_unmergeable", "merged_bias_path", "merged_bias"]

_KEPT = "_lorafx_unmerged"


def mergeable(kind, node=None) -> bool:
    """Whether an op kind's adapters fold into a frozen weight (``OpKind.mergeable``); with ``node``,
    whether that node's does (its kind's ``merge_problem``: a grouped convolution's does not)."""
    return kind.mergeable and (node is None or kind.merge_problem(node) is None)


def unmergeable_nodes(graph: torch.fx.Graph) -> List[torch.fx.Node]:
    """The adapter nodes that cannot be merged into a weight (shortcut connections, grouped convolutions)."""
    return [n for n in graph.nodes if kind_of(n) is not None and not mergeable(kind_of(n), n)]


def lower_unmergeable(gm: torch.fx.GraphModule) -> int:
    """Rewrite every unmergeable adapter node into plain aten ops (its kind's ``lower``) and
    freeze its tensors (new frozen Parameters in ``gm``'s own modules, sharing storage).
    Returns how many nodes it rewrote; the caller recompiles."""
    count = 0
    for node in unmergeable_nodes(gm.graph):
        kind = kind_of(node)
        for path in kind.adapter_tensors(node):
            owner, name = owner_and_name(gm, path)
            tensor = owner._parameters.get(name)
            if tensor is not None and tensor.requires_grad:
                owner._parameters[name] = torch.nn.Parameter(tensor.detach(), requires_grad=False)
        kind.lower(gm.graph, node)
        count += 1
    return count


def merged_weights(gm: torch.fx.GraphModule) -> Dict[str, torch.Tensor]:
    """{weight path: merged weight} for every adapter of ``gm``, from each kind's
    ``merged_weight`` on a canonical copy of the graph (``gm`` itself is not changed)."""
    graph = copy.deepcopy(gm.graph)
    out = {}
    for node in canonicalize(graph):
        rec = get_record(node, LoraRecord)
        if rec is not None and not rec.merged:
            out.setdefault(rec.weight, kind_of(node).merged_weight(gm, node))
            if rec.lora_bias is not None:
                out.setdefault(merged_bias_path(rec), merged_bias(gm, rec))
    out.update(merged_token_weights(gm, aliases=True))  # trainable_token_indices: W with its rows written
    return out


def merged_bias_path(rec: LoraRecord) -> str:
    """Where the merged bias of a ``lora_bias`` adapter goes: the layer's bias, or a new
    ``<site>.bias`` for a layer without one."""
    return rec.bias if rec.bias is not None else f"{rec.site}.bias"


def merged_bias(gm: torch.nn.Module, rec: LoraRecord) -> torch.Tensor:
    """The layer's bias (0 without one) + s·b, b being B's bias (PEFT's lora_bias merge), in the weight's dtype
    (computed in float32 or wider)."""
    dtype = get_attr(gm, rec.weight).dtype
    acc = torch.promote_types(dtype, torch.float32)
    base = get_attr(gm, rec.bias).detach().to(acc) if rec.bias is not None else 0.0
    return (base + rec.scale * get_attr(gm, rec.lora_bias).detach().to(acc)).to(dtype)


def _merge_site_bias(gm: torch.nn.Module, rec: LoraRecord) -> None:
    owner, name = owner_and_name(gm, merged_bias_path(rec))
    if hasattr(owner, name + _KEPT):
        return  # merged already
    value = merged_bias(gm, rec)
    # the layer's own bias is kept; None marks a layer that had none (unmerge removes the new one)
    owner.register_buffer(name + _KEPT, owner._parameters[name].data if rec.bias is not None else None,
                          persistent=False)
    owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)


def _unmerge_site_bias(gm: torch.nn.Module, rec: LoraRecord) -> None:
    owner, name = owner_and_name(gm, merged_bias_path(rec))
    if not hasattr(owner, name + _KEPT):
        return
    kept = getattr(owner, name + _KEPT)
    if kept is None:
        del owner._parameters[name]
    else:
        owner._parameters[name] = torch.nn.Parameter(kept, requires_grad=False)
    delattr(owner, name + _KEPT)


def _merge_site_weight(gm: torch.nn.Module, rec: LoraRecord, merged: Callable[[], torch.Tensor]) -> None:
    owner, name = owner_and_name(gm, rec.weight)
    if hasattr(owner, name + _KEPT):
        return  # merged already (a module called twice, or a graph sharing modules)
    original = owner._parameters[name]
    owner.register_buffer(name + _KEPT, original.data, persistent=False)
    owner._parameters[name] = torch.nn.Parameter(merged(), requires_grad=False)


def kept_unmerged_weight(gm: torch.nn.Module, rec: LoraRecord, path: Optional[str] = None):
    """The unmerged weight (or the tensor at ``path``, e.g. a bias) MergeLoRA kept for ``rec``'s
    site, or None if it is not merged."""
    owner, name = owner_and_name(gm, path or rec.weight)
    return getattr(owner, name + _KEPT, None)


def unmerge_site_weight(gm: torch.nn.Module, rec: LoraRecord) -> None:
    if rec.lora_bias is not None:
        _unmerge_site_bias(gm, rec)
    owner, name = owner_and_name(gm, rec.weight)
    if not hasattr(owner, name + _KEPT):
        return
    kept = getattr(owner, name + _KEPT)
    owner._parameters[name] = torch.nn.Parameter(kept, requires_grad=False)
    delattr(owner, name + _KEPT)


@dataclass(frozen=True)
class MergeLoRA(Pass):
    unload: bool = False
    rebind_weights: bool = True  # False: rewrite the graph only (weights merged through another graph)

    requires = frozenset({"lora"})
    provides = frozenset({"merged"})

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        count = 0
        unloaded = set()
        for node in canonicalize(gm.graph):  # one single-adapter node per adapter
            kind, rec = kind_of(node), get_record(node, LoraRecord)
            if not mergeable(kind, node):
                continue  # no weight to fold it into: it keeps running (lowered below when unloading)
            merged_bias = None
            if rec.lora_bias is not None:  # PEFT's lora_bias: s·b folded into the layer's bias
                if self.rebind_weights:
                    _merge_site_bias(gm, rec)
                with gm.graph.inserting_before(node):
                    merged_bias = gm.graph.get_attr(merged_bias_path(rec))
            if self.rebind_weights:
                _merge_site_weight(gm, rec, lambda: kind.merged_weight(gm, node))
            with gm.graph.inserting_before(node):
                new = kind.base_op(gm.graph, node)  # aten.linear for a linear's adapter
                if merged_bias is not None:  # the merged bias in place of the layer's bias + s·b
                    new.replace_input_with(kind.view(node).bias, merged_bias)
            new.meta.update({k: val for k, val in node.meta.items() if k != "lorafx"})
            set_record(new, get_record(node, OriginRecord) or OriginRecord(rec.site))
            if not self.unload:
                set_record(new, LoraRecord(**{**rec.__dict__, "merged": True}))
                set_record(new, MergedFrom(kind.name))
                for record in kind.kept_records(node):
                    set_record(new, record)
            unloaded.update((path, rec.weight) for path in kind.adapter_tensors(node))
            unloaded.update((path, rec.weight) for path in (rec.lora_A0, rec.lora_B0) if path is not None)
            if rec.lora_bias is not None:  # and the layer's kept bias
                unloaded.add((rec.lora_bias, merged_bias_path(rec)))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
        lowered = lower_unmergeable(gm) if self.unload else 0
        tokens = merge_tokens(gm, unload=self.unload, rebind=self.rebind_weights)  # trainable_token_indices
        gm.graph.eliminate_dead_code()
        if self.unload:
            for path, weight in unloaded:
                if _has_attr(gm, path):
                    del_attr(gm, path)
                owner, name = owner_and_name(gm, weight)
                for suffix in (_KEPT, FOLDED_SUFFIX):  # the kept weight; FoldLoRAIntoBase's [W; A] buffer
                    if hasattr(owner, name + suffix):
                        delattr(owner, name + suffix)
        info = {"merged_sites": count, **({"merged_token_layers": tokens} if tokens else {})}
        if lowered:
            info["lowered_nodes"] = lowered  # unmergeable adapters (shortcuts) as aten ops
        return PassResult(gm, count + lowered + tokens > 0, info)


@dataclass(frozen=True)
class UnmergeLoRA(Pass):
    rebind_weights: bool = True

    requires = frozenset({"lora"})
    provides = frozenset()

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        count = 0
        for node in list(gm.graph.nodes):
            rec = get_record(node, LoraRecord) if node.op == "call_function" else None
            if rec is None or not rec.merged or kind_of(node) is not None:
                continue
            if get_record(node, MergedFrom) is None and node.target is not torch.ops.aten.linear.default:
                continue
            if self.rebind_weights:
                unmerge_site_weight(gm, rec)
            merged_from = get_record(node, MergedFrom)
            kind = kind_named(merged_from.kind) if merged_from is not None else LINEAR
            origin = get_record(node, OriginRecord)
            with gm.graph.inserting_before(node):
                new = kind.unmerge(gm.graph, node, LoraRecord(**{**rec.__dict__, "merged": False}),
                                   train=graph_record(gm).training is not False,
                                   created_by=origin.created_by if origin else "InsertLoRA")
            for key in ("nn_module_stack", "stack_trace", "val"):
                if key in node.meta:
                    new.meta[key] = node.meta[key]
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
        count += unmerge_tokens(gm, rebind=self.rebind_weights)  # trainable_token_indices
        gm.graph.eliminate_dead_code()
        return PassResult(gm, count > 0, {"unmerged_sites": count})


def _has_attr(root, path):
    try:
        get_attr(root, path)
        return True
    except AttributeError:
        return False
