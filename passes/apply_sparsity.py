"""ApplySparsity: LoRA ops on pruned weights become sparse LoRA ops (LoRS).

Requires: ``"lora"`` and ``"sparsity"`` (PruneWeights' record of the pruned weights).
Provides: ``"lora"`` (the adapters, now partly sparse).
Preserves: the weights' zero pattern through training and merge, and the outputs at
B = 0 (the sparse op then computes x Wᵀ + bias, as the dense one did).

Every ``lora_linear`` whose weight PruneWeights pruned becomes a ``lora_linear_sparse``
(``lorafx/dialect/sparse.py``): y = x ((W + s·B A) ⊙ M)ᵀ + bias with M = 1[W ≠ 0] rebuilt
from W's zeros, never stored.  ``sparse_grad`` picks the adapter gradient: ``"exact"``
(s·Bᵀ(M ⊙ G) and s·(M ⊙ G)Aᵀ, G = dyᵀx formed per step) or ``"surrogate"`` (LoRS's
straight-through s·(dy B)ᵀx and s·dyᵀ(x Aᵀ), rank-r products only).  The node then
carries a SparseRecord; SelectSchedule picks among the kind's own schedules.

Before::

    %q_lora = call_function[target=lorafx.lora_linear.default](args=(%x, %w, None, %A, %B, 2.0))
After::

    %q_lora = call_function[target=lorafx.lora_linear_sparse.default](
        args=(%x, %w, None, %A, %B, 2.0, None, 0.0, 'f2b4', 'exact'))
                                          # meta: sparse(unstructured 50%, wanda, exact grad)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from lorafx import options as O
from lorafx.context import CompileContext
from lorafx.dialect import DORA, LINEAR, kind_of
from lorafx.dialect.sparse import GRAD_MODES, SPARSE, SparseRecord
from lorafx.graph_utils import get_attr
from lorafx.meta import LoraRecord, get_record, graph_record
from lorafx.options import Option
from lorafx.pipeline import Pass, PassResult

__all__ = ["ApplySparsity"]


@dataclass(frozen=True)
class ApplySparsity(Pass):
    grad: str = "exact"

    requires = frozenset({"lora", "sparsity"})
    provides = frozenset({"lora"})
    invalidates = frozenset({"cost", "schedule"})
    options = (
        Option("sparse_grad", str, "exact", "adapter gradient on a pruned weight: 'exact' (the masked gradient; "
               "forms dyᵀx per step) or 'surrogate' (LoRS's straight-through form, rank-r products only, faster)",
               field="grad", check=lambda name, value, where: O.check_choice(name, value, GRAD_MODES, where)),
    )

    @classmethod
    def from_options(cls, values, ctx: CompileContext) -> Optional["ApplySparsity"]:
        """Built with ``sparsity=`` (PruneWeights refuses ``sparse_grad`` without it)."""
        if values.get("sparsity") is None:
            return None
        return cls(**({"grad": values["sparse_grad"]} if "sparse_grad" in values else {}))

    def validate(self) -> None:
        O.check_choice("grad", self.grad, GRAD_MODES, "ApplySparsity: ")

    def summary(self, info) -> List[str]:
        return [f"{info['sparse_adapters']} sparse adapters ({self.grad} grad)"]

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        pruned = graph_record(gm).sparsity or {}
        count = 0
        for node in list(gm.graph.nodes):
            kind = kind_of(node)
            if kind is None or kind is SPARSE:
                continue
            on_pruned = [r.site for r in kind.adapters(node) if r.weight in pruned]
            if kind is DORA and on_pruned:
                raise ValueError(
                    f"ApplySparsity: use_dora=True and sparsity= cannot be combined yet: the DoRA adapter of "
                    f"{on_pruned[0]} rescales the dense W + s·B·A, which would fill the pruned zeros (lorafx has no "
                    "sparse DoRA op). Compile with use_dora=False for sparse adapters (LoRS), or without sparsity=")
            if kind is not LINEAR and on_pruned:
                raise ValueError(
                    f"ApplySparsity: the {kind.name} node {node.name} runs a dense adapter on the pruned weight of "
                    f"{on_pruned[0]}, which would not stay sparse; run ApplySparsity right after InsertLoRA, before "
                    "the passes that rewrite lora_linear (RecomputeInputs, FoldLoRAIntoBase, FuseSiblings)")
            if not on_pruned:
                continue
            rec = get_record(node, LoraRecord)
            a_dtype, w_dtype = get_attr(gm, rec.lora_A).dtype, get_attr(gm, rec.weight).dtype
            if a_dtype != w_dtype:
                raise ValueError(
                    f"ApplySparsity: {rec.site}'s adapters are {a_dtype} on a {w_dtype} pruned weight (adapter_dtype= "
                    "or autocast_adapter_dtype=True); the sparse kernel forms (W + s B A) * mask in one dtype: compile "
                    "sparse models with adapters in the weight's dtype (leave adapter_dtype unset)")
            if LINEAR.keeps_xa(node):
                LINEAR.canonical(gm.graph, node)
            info = pruned[rec.weight]
            SPARSE.adopt(node, SparseRecord(info.pattern, info.method, self.grad, info.zeros, info.numel))
            count += 1
        return PassResult(gm, count > 0, {"sparse_adapters": count, "grad": self.grad})
