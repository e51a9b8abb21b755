"""MergeLoRA / UnmergeLoRA: fold adapters into the frozen weights and back.

MergeLoRA requires ``"lora"``; it computes W' = W + scale * B A in float32
(transposed for Conv1D-layout weights), binds W' in place of W and turns each
``lora_linear`` into a plain ``aten.linear``.  The original W is kept as a
non-persistent buffer ``<weight>_lorafx_unmerged`` so that UnmergeLoRA restores it
bit for bit (the caller's model is never written to).  ``unload=True`` also
deletes A, B and the kept weights (merge_and_unload).

Preserves: outputs (merged equals unmerged up to float rounding; dropout is
the identity in eval).

Before::

    %q_lora = call_function[target=lorafx.lora_linear.default](args=(%x, %w, None, %A, %B, 2.0))
After::

    %q_lora = call_function[target=aten.linear.default](args=(%x, %w, None))   # meta: lora(..., merged)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from lorafx.graph_utils import get_attr, owner_and_name, del_attr
from lorafx.meta import LoraRecord, OriginRecord, get_record, set_record
from lorafx.ops_fused import MERGEABLE_LORA_OPS
from lorafx.pipeline import Pass, PassError, PassResult

from .fold_lora import FOLDED_SUFFIX, unfold
from .fuse_siblings import split_siblings
from .insert_lora import replace_with_lora

__all__ = ["MergeLoRA", "UnmergeLoRA", "merged_weight", "unmerge_site_weight", "kept_unmerged_weight"]

_KEPT = "_lorafx_unmerged"


def merged_weight(gm: torch.nn.Module, rec: LoraRecord) -> torch.Tensor:
    """W + scale * B A in the stored layout, computed in float32 (or wider)."""
    W = get_attr(gm, rec.weight)
    acc = torch.promote_types(W.dtype, torch.float32)
    A = get_attr(gm, rec.lora_A).detach().to(acc)
    B = get_attr(gm, rec.lora_B).detach().to(acc)
    delta = rec.scale * (B @ A)
    if rec.weight_transposed:
        delta = delta.t()
    return (W.detach().to(acc) + delta).to(W.dtype)


def _merge_site_weight(gm: torch.nn.Module, rec: LoraRecord) -> None:
    owner, name = owner_and_name(gm, rec.weight)
    if hasattr(owner, name + _KEPT):
        return  # merged already (a module called twice, or a graph sharing modules)
    original = owner._parameters[name]
    merged = torch.nn.Parameter(merged_weight(gm, rec), requires_grad=False)
    owner.register_buffer(name + _KEPT, original.data, persistent=False)
    owner._parameters[name] = merged


def kept_unmerged_weight(gm: torch.nn.Module, rec: LoraRecord):
    """The unmerged weight MergeLoRA kept for ``rec``'s site, or None if it is not merged."""
    owner, name = owner_and_name(gm, rec.weight)
    return getattr(owner, name + _KEPT, None)


def unmerge_site_weight(gm: torch.nn.Module, rec: LoraRecord) -> None:
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

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        xa_op = torch.ops.lorafx.lora_linear_xa.default  # returns (y, xa): its users are getitem(node, 0)
        ops = (*MERGEABLE_LORA_OPS, xa_op)  # + lora_linear_recompute (RecomputeInputs)
        split_siblings(gm)  # FuseSiblings' groups back to one op per adapter
        if unfold(gm.graph):  # FoldLoRAIntoBase's nodes back to lora_linear_xa
            gm.recompile()
        count = 0
        adapters = set()
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in ops:
                continue
            rec = get_record(node, LoraRecord)
            if self.rebind_weights:
                _merge_site_weight(gm, rec)
            x, w, bias = node.args[0], node.args[1], node.args[2]
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.ops.aten.linear.default, (x, w, bias))
            new.meta.update({k: v for k, v in node.meta.items() if k != "lorafx"})
            set_record(new, get_record(node, OriginRecord) or OriginRecord(rec.site))
            if not self.unload:
                set_record(new, LoraRecord(**{**rec.__dict__, "merged": True}))
            if node.target is xa_op:
                for user in list(node.users):
                    if user.args[1] != 0:
                        raise PassError(f"MergeLoRA: {node.name}'s XA output is used by {user.name}")
                    user.replace_all_uses_with(new)
                    gm.graph.erase_node(user)
            else:
                node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            adapters.add((rec.lora_A, rec.lora_B, rec.weight))
            count += 1
        gm.graph.eliminate_dead_code()
        if self.unload:
            for a, b, w in adapters:
                for path in (a, b):
                    if _has_attr(gm, path):
                        del_attr(gm, path)
                owner, name = owner_and_name(gm, w)
                for suffix in (_KEPT, FOLDED_SUFFIX):  # the kept weight; FoldLoRAIntoBase's [W; A] buffer
                    if hasattr(owner, name + suffix):
                        delattr(owner, name + suffix)
        return PassResult(gm, count > 0, {"merged_sites": count})


@dataclass(frozen=True)
class UnmergeLoRA(Pass):
    rebind_weights: bool = True

    requires = frozenset({"lora"})
    provides = frozenset()

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        count = 0
        for node in list(gm.graph.nodes):
            rec = get_record(node, LoraRecord) if node.op == "call_function" else None
            if rec is None or not rec.merged or node.target is not torch.ops.aten.linear.default:
                continue
            if self.rebind_weights:
                unmerge_site_weight(gm, rec)
            x, w, bias = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
            weight_node = w.args[0] if rec.weight_transposed else w
            unmerged = LoraRecord(**{**rec.__dict__, "merged": False})
            origin = get_record(node, OriginRecord)
            replace_with_lora(gm, node, x, weight_node, bias, unmerged,
                                    created_by=origin.created_by if origin else "InsertLoRA")
            count += 1
        gm.graph.eliminate_dead_code()
        return PassResult(gm, count > 0, {"unmerged_sites": count})


def _has_attr(root, path):
    try:
        get_attr(root, path)
        return True
    except AttributeError:
        return False
