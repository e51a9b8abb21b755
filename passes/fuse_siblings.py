"""FuseSiblings: one op for the adapters that read the same input (q/k/v, gate/up).

Sibling adapters ``y_i = x W_iᵀ + s_i (x A_iᵀ) B_iᵀ`` share x.  Their rank-r
products are skinny GEMMs; ``lora_linear_siblings`` (lorafx/dialect/siblings.py) does
them together: forward ``[A_1; ...; A_k] xᵀ`` in one GEMM, backward every
``dA_i`` in one GEMM (``Z x`` with the stacked ``z_i = s_i B_iᵀ dy_iᵀ``), the
adapters' part of dx in one GEMM (``Zᵀ [A_1; ...; A_k]``) and every
``x A_iᵀ`` for dB in one GEMM; x is saved once (or rebuilt from a recipe, when
RecomputeInputs ran first).  Base products stay one GEMM per linear.

Fused only when the group's adapters have no dropout (PEFT draws an independent
dropout mask per adapter; one shared product of the masked input would change
the semantics), schedule rules that only use f1/f2 with b1/b5 (each sibling keeps
its own rule; the kernel stacks the A's of the siblings that run f1, resp. b1, at
the actual token count; b3/b4 and 'k' schedules are left alone), and all of them are ``lora_linear`` or all ``lora_linear_recompute``
with the same recipe.  ``info["kept"]`` says why a group was not fused.

Measured (tools/bench_train_step.py ``--lorafx-passes "-FuseSiblings;default"``, LLaMA
4 x 512, batch 4 x 256, interleaved in one process, median step over the frozen floor):
at r=8 it went from 1.18x to 1.14x and from 1.19x to 1.12x with 2 threads, and from 1.20x
to 1.09x with 1 thread while another job used the second core (rank-8 GEMMs are
memory-bound and run better stacked to 16-24 rows); at r=64, 2 threads, it was neutral
(1.28x both); an earlier session measured ~1% at 1 thread.  So ``lorafx.compile``
runs it by default with the eager backend; not with torch.compile, whose trace of this
op's backward resolves the rules for one token count and recompiles for every other
range.  MergeLoRA splits fused groups first (``split_siblings``), so merge /
merge_and_unload work with it.  The fused node is named after its adapters
(``..._q_proj_k_proj_v_proj_lora``); each adapter's output keeps its node name.

Requires: ``"lora"``.  Provides: ``"fused_siblings"``.
Preserves: outputs and gradients (up to float rounding: the same sums, grouped
differently by BLAS).

Before::

    %q = call_function[target=lorafx.lora_linear.default](args=(%x, %wq, None, %Aq, %Bq, 2.0, None, 0.0, 'f1b1'))
    %k = call_function[target=lorafx.lora_linear.default](args=(%x, %wk, None, %Ak, %Bk, 2.0, None, 0.0, 'f1b1'))

After::

    %qk = call_function[target=lorafx.lora_linear_siblings.default](
        args=(%x, [%wq, %wk], [], [False, False], [%Aq, %Ak], [%Bq, %Bk], [2.0, 2.0], 'f1b1;f1b1', '', []))
    %q = call_function[target=operator.getitem](args=(%qk, 0))
    %k = call_function[target=operator.getitem](args=(%qk, 1))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.fx

from lorafx.context import CompileContext
from lorafx.dialect import SIBLINGS, kind_of
from lorafx.graph_utils import get_attr, safe_name
from lorafx.meta import LoraRecord, get_record
from lorafx.options import Option
from lorafx.pipeline import Pass, PassResult

__all__ = ["FuseSiblings", "split_siblings"]

def _why_not(members: List[torch.fx.Node]) -> Optional[str]:
    for m in members:
        rec = get_record(m, LoraRecord)
        if rec is not None and rec.merged:
            return "merged"
    return SIBLINGS.why_not(members)  # what the sibling kernel itself cannot run


def _mixed_dtypes(gm: torch.fx.GraphModule, members: List[torch.fx.Node]) -> Optional[str]:
    """Why not, when an adapter's dtype differs from its input's (adapter_dtype=): the sibling
    kernel stacks A's and sums in the input's dtype."""
    for m in members:
        v = kind_of(m).view(m)
        x = v.x.meta.get("val") if isinstance(v.x, torch.fx.Node) else None
        a = get_attr(gm, v.lora_A.target) if isinstance(v.lora_A, torch.fx.Node) and v.lora_A.op == "get_attr" else None
        if isinstance(x, torch.Tensor) and isinstance(a, torch.Tensor) and a.dtype != x.dtype:
            return f"adapters in {a.dtype} on {x.dtype} inputs (adapter_dtype)"
    return None


def _hoist(node: torch.fx.Node, before: torch.fx.Node, order: Dict[torch.fx.Node, int]) -> bool:
    """Move ``node`` (a get_attr, or a call on get_attrs such as t(W)) before ``before`` if it is
    defined after it.  False if it cannot be moved."""
    if order[node] < order[before]:
        return True
    if node.op == "get_attr":
        before.prepend(node)
        order[node] = order[before] - 0.5
        return True
    if node.op == "call_function" and all(a.op == "get_attr" for a in node.all_input_nodes):
        for a in node.all_input_nodes:
            _hoist(a, before, order)
        before.prepend(node)
        order[node] = order[before] - 0.25
        return True
    return False


@dataclass(frozen=True)
class FuseSiblings(Pass):
    min_group: int = 2

    requires = frozenset({"lora"})
    provides = frozenset({"fused_siblings"})
    invalidates = frozenset({"cost"})
    options = (
        Option("fuse_siblings", bool, None, "one op for the adapters that share an input (q/k/v, gate/up), their "
               "rank-r GEMMs stacked (off by default with a torch.compile backend, where its backward would be "
               "specialised, and recompiled, per token-count range)", enables=True,
               default_text="True with backend='eager', else False"),
    )

    @classmethod
    def from_options(cls, values, ctx: CompileContext):
        """On by default with the eager backend only."""
        return cls() if values.get("fuse_siblings", ctx.backend == "eager") else None

    def validate(self) -> None:
        if not isinstance(self.min_group, int) or self.min_group < 2:
            raise ValueError(f"FuseSiblings: min_group must be an int >= 2, got {self.min_group!r}")

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        graph = gm.graph
        groups: Dict[torch.fx.Node, List[torch.fx.Node]] = {}
        for node in graph.nodes:
            if SIBLINGS.joins(node) and isinstance(kind_of(node).input(node), torch.fx.Node):
                groups.setdefault(kind_of(node).input(node), []).append(node)
        fused, kept, made = 0, {}, []
        for x, members in groups.items():
            if len(members) < self.min_group:
                continue
            reason = _why_not(members) or _mixed_dtypes(gm, members)
            if reason is None:
                reason = self._fuse(gm, x, members)
            if reason is not None:
                kept[", ".join(m.name for m in members)] = reason
                continue
            fused += len(members)
            made.append([m for m in members])
        info = {"fused_adapters": fused, "groups": len(made), "kept": kept}
        return PassResult(gm, fused > 0, info)

    def _fuse(self, gm, x, members) -> Optional[str]:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for m in members:
            v = kind_of(m).view(m)
            for arg in (v.weight, v.bias, v.lora_A, v.lora_B):
                if isinstance(arg, torch.fx.Node) and not _hoist(arg, members[0], order):
                    return f"{arg.name} is computed between the siblings"
        recs = [get_record(m, LoraRecord) for m in members]
        parent = recs[0].site.rsplit(".", 1)[0] if "." in recs[0].site else ""
        short = "_".join(r.site.rsplit(".", 1)[-1] for r in recs)
        SIBLINGS.fuse(gm.graph, members, name=safe_name(f"{parent}.{short}" if parent else short) + "_lora")
        return None


def split_siblings(gm: torch.fx.GraphModule) -> int:
    """Undo FuseSiblings: every ``lora_linear_siblings`` node becomes one ``lora_linear`` (or
    ``lora_linear_recompute``, when it carries a recipe) per sibling again, with the records its
    getitem nodes carry (``SIBLINGS.split``).  Returns how many sibling nodes it split."""
    nodes = [n for n in gm.graph.nodes if kind_of(n) is SIBLINGS]
    for node in nodes:
        SIBLINGS.split(gm.graph, node)
    if nodes:
        gm.recompile()
    return len(nodes)
