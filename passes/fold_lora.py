"""FoldLoRAIntoBase: put A into the frozen weight's buffer, so one GEMM computes x Wᵀ and x Aᵀ.

An adapter's forward ``y = x Wᵀ + s (x Aᵀ) Bᵀ`` reads x twice: once in the base GEMM
and once in the skinny ``x Aᵀ``.  This pass stores A as r extra rows under W in one
(m + r, n) buffer, ``<weight>_lorafx_folded``, and rebinds both W and ``lora_A`` as
views of it: nothing is copied per step (an optimizer step on A writes the buffer's
rows), and the base GEMM becomes ``x [W; A]ᵀ = [x Wᵀ | x Aᵀ]``.  The node becomes
``lorafx.lora_linear_folded`` (lorafx/dialect/folded.py), which also keeps that x Aᵀ for
backward instead of recomputing it.  Its backward is unchanged (b1 or b5 at the
run-time token count): every f1/f2 piece of the node's rule becomes the folded
forward, ``f1b1|689:f2b5`` -> ``f1b1k|689:f1b5k``.

Cost: the adapted frozen weights are copied once, at compile time, into the folded
buffers (the source model keeps its own tensors, so while it is alive those weights
exist twice).  Left alone, with the reason in ``info["kept"]``: adapters with dropout
(A multiplies a masked x, W the plain one), Conv1D-layout (transposed) weights, b3/b4
schedules, merged adapters, and nodes RecomputeInputs or FuseSiblings already
rewrote.  Not in ``lorafx.compile``'s default pipeline; ``fold_a=True`` adds it after
RecomputeInputs, so it folds the adapters whose input is not recomputed.

Requires: ``"lora"``, ``"schedule"``.  Provides: ``"folded"``.
Preserves: outputs and gradients (the same products; BLAS may sum in another order),
parameter names and the state dict (the buffer is not persistent; W and A keep their
names and values).

Before::

    %o_proj_lora = call_function[target=lorafx.lora_linear.default](
        args=(%x, %o_proj_weight, None, %o_proj_lora_A, %o_proj_lora_B, 2.0, None, 0.0, 'f1b1|689:f2b5'))

After::

    %o_proj_weight_lorafx_folded = get_attr[target=...o_proj.weight_lorafx_folded]
    %o_proj_lora_fold = call_function[target=lorafx.lora_linear_folded.default](
        args=(%x, %o_proj_weight_lorafx_folded, None, %o_proj_lora_A, %o_proj_lora_B, 2.0, None, 0.0,
              'f1b1k|689:f1b5k'))
    %o_proj_lora = call_function[target=operator.getitem](args=(%o_proj_lora_fold, 0))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.fx

from lorafx.context import CompileContext
from lorafx.dialect import FOLDED, LINEAR, kind_of
from lorafx.dialect.registry import getitem_index
from lorafx.dialect.folded import folded_rule
from lorafx.graph_utils import get_attr, owner_and_name, safe_name
from lorafx.meta import LoraRecord, get_record
from lorafx.options import Option
from lorafx.pipeline import Pass, PassResult

__all__ = ["FoldLoRAIntoBase", "FOLDED_SUFFIX"]

FOLDED_SUFFIX = "_lorafx_folded"


@dataclass(frozen=True)
class FoldLoRAIntoBase(Pass):
    requires = frozenset({"lora", "schedule"})
    provides = frozenset({"folded"})
    invalidates = frozenset({"cost"})
    options = (
        Option("fold_a", bool, False, "store A as r extra rows of the frozen weight's buffer, so one GEMM gives "
               "x W^T and x A^T; copies each adapted weight once at compile time (see Performance)", enables=True),
    )

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        folded, kept = 0, {}
        buffers: Dict[str, int] = {}
        for node in list(gm.graph.nodes):
            if kind_of(node) is not LINEAR:
                continue
            reason = self._why_not(gm, node)
            if reason is None:
                reason = self._fold(gm, node, buffers)
            if reason is not None:
                kept[node.name] = reason
            else:
                folded += 1
        if folded:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        info = {"folded_adapters": folded, "folded_buffers": len(buffers),
                "copied_bytes": sum(buffers.values()), "kept": kept}
        return PassResult(gm, folded > 0, info)

    @staticmethod
    def _why_not(gm, node) -> Optional[str]:
        rec = get_record(node, LoraRecord)
        if rec is None:
            return "no LoraRecord"
        if rec.merged:
            return "merged"
        if rec.weight_transposed:
            return "Conv1D-layout weight (stored transposed)"
        v = LINEAR.view(node)
        if v.dropout_mask is not None or rec.dropout > 0:
            return "adapter dropout (A multiplies the masked x, W the plain one)"
        w, a = v.weight, v.lora_A
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr" and w.target == rec.weight
                and isinstance(a, torch.fx.Node) and a.op == "get_attr" and a.target == rec.lora_A):
            return "weight or lora_A is not read straight from the module"
        if LINEAR.keeps_xa(node) and any(getitem_index(u) != 0 for u in node.users):
            return "its XA output is used in the graph"
        if folded_rule(LINEAR.rule(node)) is None:
            return f"schedule {str(LINEAR.rule(node))!r} uses b3/b4 (the folded op runs b1/b5)"
        W, A = get_attr(gm, rec.weight), get_attr(gm, rec.lora_A)
        if W.dtype != A.dtype or W.device != A.device:
            return "weight and lora_A differ in dtype or device"
        return None

    @staticmethod
    def _fold(gm, node, buffers: Dict[str, int]) -> Optional[str]:
        rec = get_record(node, LoraRecord)
        owner, name = owner_and_name(gm, rec.weight)
        a_owner, a_name = owner_and_name(gm, rec.lora_A)
        W, A = owner._parameters[name], a_owner._parameters[a_name]
        m, r = W.shape[0], A.shape[0]
        ext_path = rec.weight + FOLDED_SUFFIX
        ext = owner._buffers.get(name + FOLDED_SUFFIX)
        if ext is None:  # fold: one buffer [W; A], W and A rebound as views of it
            ext = torch.empty((m + r, W.shape[1]), dtype=W.dtype, device=W.device)
            with torch.no_grad():
                ext[:m].copy_(W)
                ext[m:].copy_(A)
            owner.register_buffer(name + FOLDED_SUFFIX, ext, persistent=False)
            owner._parameters[name] = torch.nn.Parameter(ext[:m], requires_grad=False)
            a_owner._parameters[a_name] = torch.nn.Parameter(ext[m:], requires_grad=A.requires_grad)
            buffers[ext_path] = ext.numel() * ext.element_size()
        elif ext.shape != (m + r, W.shape[1]) or A.data_ptr() != ext[m:].data_ptr():
            return f"{ext_path} exists but does not hold this adapter's A"  # folded for another adapter
        with gm.graph.inserting_before(node):
            ext_node = gm.graph.get_attr(ext_path)
        FOLDED.fold(gm.graph, node, ext_node, folded_rule(LINEAR.rule(node)), name=safe_name(rec.site) + "_lora_fold")
        return None
