"""PartitionToTargets: place a LoRA graph on a hybrid compute-in-memory chip.

Requires: a captured graph (with its LoRA adapters, if any).  Provides: ``"placement"``
-- a ``PlacementRecord`` on every node and the graph record's ``placement`` summary.
Preserves: the outputs (the split computes x Wᵀ + b + s·(d(x) Aᵀ) Bᵀ as before; no noise
yet, ``ProgramChip`` adds it).

Following HaLoRA's hybrid chip (arXiv 2502.19747):

* every adapter node is first put back in its canonical form (``lora_linear``; fusing,
  folding and recompute are undone: they would put adapter rows into the frozen weight);
  each then becomes ``rram_linear`` (x Wᵀ + b on RRAM crossbars) plus ``lora_sram`` (the
  adapter, in exact SRAM), and every other frozen linear becomes an ``rram_linear``;
* placement: ``rram_linear`` nodes and the frozen weights and biases they read go to
  ``rram``; adapters (``lora_sram``, shortcut adapters, their A/B and dropout masks) to
  ``sram``; every other node (inputs, embeddings, norms, attention scores, softmax) to
  the digital ``host``.  Each node is placed exactly once;
* tiling: a weight with n inputs and m outputs occupies ⌈n / tile_rows⌉ ·
  ⌈m·c / tile_cols⌉ crossbar tiles, c = the RRAM's cells per weight (bit slices times
  two for a differential pair).  The tiles must fit the RRAM's tile count and the adapters
  (at the SRAM's adapter precision) its capacity, else a ValueError says by how much and
  what to change, before anything is rewritten;
* cost: every node's forward FLOPs and bytes per token (``AnnotateCost``'s records at one
  sequence of the example's length, divided by its tokens) go through its part's cost
  function (``node_cost(flops, bytes, tiles) -> (joules, seconds)``), and the whole graph
  through the digital baseline's, for ``report()``.

The parts (``rram``, ``sram``, ``host``, ``baseline``) are the cim target's (``lorafx.hw_targets``).

Before::

    %q = lorafx.lora_linear(%x, %w, None, %A, %B, 2.0)
    %lm = aten.linear(%h, %lm_head_weight)
After::

    %q_rram = lorafx.rram_linear(%x, %w, None)          # @rram (1 tiles)
    %q = lorafx.lora_sram(%x, %q_rram, %A, %B, 2.0)     # @sram
    %lm = lorafx.rram_linear(%h, %lm_head_weight, None)  # @rram (4 tiles)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List

import torch
import torch.fx

from lorafx.context import CompileContext
from lorafx.dialect import (DORA, LINEAR, RRAM, SHORTCUT, SRAM_ADAPTER, args_of, canonicalize, kind_of, owner_of,
                            replace_node)
from lorafx.dialect.cim import mask_of
from lorafx.graph_utils import find_linear_sites, get_attr
from lorafx.meta import CostRecord, LoraRecord, PlacementRecord, get_record, graph_record, set_record
from lorafx.pipeline import CAPTURED, Pass, PassResult

from .cost_model import annotate, evaluate

__all__ = ["PartitionToTargets", "PARTS", "tiles_for"]

PARTS = ("rram", "sram", "host")


def tiles_for(rram, n_in: int, m_out: int) -> int:
    """Crossbar tiles of a weight with ``n_in`` inputs (rows) and ``m_out`` outputs (columns)."""
    return math.ceil(n_in / rram.tile_rows) * math.ceil(m_out * rram.cells_per_weight / rram.tile_cols)


@dataclass(frozen=True)
class PartitionToTargets(Pass):
    rram: Any = None
    sram: Any = None
    host: Any = None
    baseline: Any = None

    requires = frozenset({CAPTURED})
    provides = frozenset({"placement"})
    invalidates = frozenset({"cost", "schedule"})

    def validate(self) -> None:
        for part in ("rram", "sram", "host"):
            if getattr(self, part) is None:
                raise ValueError(f"PartitionToTargets: {part}= is required (the cim target's parts: "
                                 "lorafx.hw_targets.get_target('cim').passes() builds this pass)")

    def summary(self, info) -> List[str]:
        first = (f"rram {info['rram']['tiles']} tiles ({info['rram']['params']:,} weights), "
                 f"sram {info['sram']['params']:,} adapter params, host {info['host']['params']:,} params")
        return [first] + partition_table(info)

    # -- rewriting ---------------------------------------------------------------------------------
    def _split_adapters(self, gm: torch.fx.GraphModule) -> int:
        graph, count = gm.graph, 0
        for node in canonicalize(graph):
            kind = kind_of(node)
            if kind is SHORTCUT:
                continue  # an adapter between two points of the residual stream: all in SRAM
            if kind is DORA:
                raise ValueError(
                    f"PartitionToTargets: use_dora=True is not supported with target='cim' yet: the DoRA adapter "
                    f"{node.name} rescales every output row of its layer by m / ||W + s·B·A||, which neither the RRAM "
                    "crossbars nor the SRAM adapter path computes. Compile with use_dora=False for target='cim'")
            if kind is not LINEAR:
                raise ValueError(
                    f"PartitionToTargets: the {kind.name} adapter {node.name} has no compute-in-memory lowering: only "
                    "lora_linear and shortcut adapters can be placed on the chip (a sparse adapter masks W + s·BA, "
                    "which RRAM crossbars cannot do)")
            rec = get_record(node, LoraRecord)
            v = args_of(node)
            with graph.inserting_before(node):
                w = graph.get_attr(rec.weight)
                base = RRAM.build(graph, v.x, w, v.bias, transposed=rec.weight_transposed, site=rec.site,
                                  created_by=self.name, name=node.name + "_rram")
                new = SRAM_ADAPTER.build(graph, v.x, base, mask_of(node), rec, created_by=self.name,
                                         name=node.name + "_sram")
            if "val" in node.meta:
                base.meta["val"] = node.meta["val"]
            w.meta["val"] = get_attr(gm, rec.weight)
            replace_node(graph, node, new, base)
            count += 1
        return count

    def _lower_frozen_linears(self, gm: torch.fx.GraphModule) -> int:
        graph, count = gm.graph, 0
        for site in find_linear_sites(gm):
            if get_attr(gm, site.weight.target).requires_grad:
                continue  # a trained weight stays digital
            node = site.node
            with graph.inserting_before(node):
                new = RRAM.build(graph, site.x, site.weight, site.bias, transposed=site.weight_transposed,
                                 site=site.module, created_by=self.name, name=node.name + "_rram")
            replace_node(graph, node, new)
            count += 1
        return count

    # -- placement -----------------------------------------------------------------------------------
    def _place(self, gm: torch.fx.GraphModule) -> Dict[torch.fx.Node, str]:
        where: Dict[torch.fx.Node, str] = {}
        for node in gm.graph.nodes:
            owner = owner_of(node)
            if owner is RRAM:
                where[node] = "rram"
            elif owner is not None:  # adapters and their helpers (dropout masks)
                where[node] = "sram"
            else:
                where[node] = "host"
        for node in gm.graph.nodes:  # a tensor goes where all its readers are (frozen weights, A/B)
            if node.op == "get_attr":
                parts = {where[u] for u in node.users}
                where[node] = parts.pop() if len(parts) == 1 else "host"
        return where

    def _tiles(self, gm, where) -> Dict[str, int]:
        """{weight path: tiles} for every weight read on RRAM (once per weight)."""
        out: Dict[str, int] = {}
        for node in gm.graph.nodes:
            if where[node] != "rram" or kind_of(node) is not RRAM:
                continue
            v = args_of(node)
            if v.weight.target in out:
                continue
            w = get_attr(gm, v.weight.target)
            n, m = (w.shape[0], w.shape[1]) if v.transposed else (w.shape[1], w.shape[0])
            out[v.weight.target] = tiles_for(self.rram, int(n), int(m))
        return out

    def _check_capacity(self, tiles: Dict[str, int], adapter_params: int) -> None:
        used, have = sum(tiles.values()), getattr(self.rram, "tiles", None)
        if have is not None and used > have:
            raise ValueError(
                f"PartitionToTargets: the frozen weights need {used:,} RRAM tiles of {self.rram.tile_rows}x"
                f"{self.rram.tile_cols} cells, but the chip has {have:,}: {used - have:,} tiles "
                f"({100.0 * (used - have) / have:.0f}%) over. Give the chip more tiles (rram_tiles={used}), larger "
                f"tiles (rram_tile_rows=, rram_tile_cols=), or fewer cells per weight (rram_bits_per_cell=)")
        cap = getattr(self.sram, "capacity_bits", None)
        need = adapter_params * self.sram.adapter_bits
        if cap is not None and need > cap:
            raise ValueError(
                f"PartitionToTargets: the adapters need {need / 8192:,.1f} KiB of SRAM ({adapter_params:,} parameters "
                f"at {self.sram.adapter_bits} bits), but the chip has {cap / 8192:,.1f} KiB: "
                f"{(need - cap) / 8192:,.1f} KiB ({100.0 * (need - cap) / cap:.0f}%) over. Lower the rank (r=), adapt "
                f"fewer modules (target_modules=), or give the chip more SRAM (sram_kib={math.ceil(need / 8192)})")

    # -- cost -----------------------------------------------------------------------------------------
    def _estimate(self, gm, where, tiles) -> Dict[str, Any]:
        example = annotate(gm)
        seq = int(example.get("seq", 1))
        dims = {**example, "batch": 1}
        per_part = {p: {"joules": 0.0, "seconds": 0.0, "flops": 0.0} for p in PARTS}
        total_flops = total_bytes = 0.0
        base_j = base_s = 0.0
        tiles_of_node = {}
        for node in gm.graph.nodes:
            if kind_of(node) is RRAM:
                tiles_of_node[node] = tiles.get(args_of(node).weight.target, 0)
        try:
            for node in gm.graph.nodes:
                rec = get_record(node, CostRecord)
                if rec is None:
                    continue
                flops = evaluate(rec.fwd_flops + rec.fwd_other_flops, **dims) / seq
                nbytes = evaluate(rec.fwd_bytes, **dims) / seq
                part = where[node]
                joules, seconds = getattr(self, part).node_cost(flops, nbytes, tiles_of_node.get(node, 0))
                per_part[part]["joules"] += joules
                per_part[part]["seconds"] += seconds
                per_part[part]["flops"] += flops
                total_flops, total_bytes = total_flops + flops, total_bytes + nbytes
                if self.baseline is not None:
                    j, s = self.baseline.node_cost(flops, nbytes, 0)
                    base_j, base_s = base_j + j, base_s + s
        except ValueError:  # a dim without an example value: no estimate
            return {"seq": None}
        out = {"seq": seq, "parts": per_part, "flops": total_flops, "bytes": total_bytes,
               "joules": sum(p["joules"] for p in per_part.values()),
               "seconds": sum(p["seconds"] for p in per_part.values())}
        if self.baseline is not None:
            out["baseline"] = {"name": getattr(self.baseline, "preset", None) or self.baseline.name, "joules": base_j,
                               "seconds": base_s}
        return out

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        split = self._split_adapters(gm)
        lowered = self._lower_frozen_linears(gm)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        where = self._place(gm)
        tiles = self._tiles(gm, where)
        params = {p: 0 for p in PARTS}
        seen = set()
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target not in seen:
                seen.add(node.target)
                t = get_attr(gm, node.target)
                if isinstance(t, torch.Tensor):
                    params[where[node]] += t.numel()
        self._check_capacity(tiles, params["sram"])
        for node, part in where.items():
            set_record(node, PlacementRecord(part, tiles.get(node.target, 0) if node.op == "get_attr" else 0))
        gm.recompile()
        estimate = self._estimate(gm, where, tiles)
        nodes = {p: sum(1 for v in where.values() if v == p) for p in PARTS}
        info: Dict[str, Any] = {
            p: {"params": params[p], "nodes": nodes[p], "describe": getattr(self, p).describe()} for p in PARTS}
        info["rram"].update(tiles=sum(tiles.values()), tiles_available=getattr(self.rram, "tiles", None),
                            weights=len(tiles))
        info["sram"].update(bits=params["sram"] * self.sram.adapter_bits,
                            capacity_bits=getattr(self.sram, "capacity_bits", None))
        info.update(split_adapters=split, rram_linears=split + lowered, estimate=estimate)
        graph_record(gm).placement = info
        return PassResult(gm, True, info)


def _fmt_j(j: float) -> str:
    for unit, f in (("J", 1.0), ("mJ", 1e-3), ("µJ", 1e-6), ("nJ", 1e-9), ("pJ", 1e-12)):
        if j >= f:
            return f"{j / f:.3g} {unit}"
    return f"{j:.3g} J"


def _fmt_s(s: float) -> str:
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s:.3g} s"


def partition_table(info: Dict[str, Any]) -> List[str]:
    """The partition report: per part its parameters, tiles and estimated energy and latency
    per token, then the chip's total against the digital baseline."""
    est = info.get("estimate") or {}
    parts = est.get("parts")
    rows = [("part", "params", "tiles", "nodes", "energy/token", "latency/token")]
    for p in PARTS:
        tiles = f"{info[p].get('tiles', '-')}" + (f"/{info[p]['tiles_available']}" if info[p].get("tiles_available")
                                                   else "")
        e = parts[p] if parts else None
        rows.append((p, f"{info[p]['params']:,}", tiles if p == "rram" else "-", str(info[p]["nodes"]),
                     _fmt_j(e["joules"]) if e else "?", _fmt_s(e["seconds"]) if e else "?"))
    if parts:
        rows.append(("chip", "", "", "", _fmt_j(est["joules"]), _fmt_s(est["seconds"])))
        base = est.get("baseline")
        if base:
            rows.append((f"digital ({base['name']})", "", "", "", _fmt_j(base["joules"]), _fmt_s(base["seconds"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["compute-in-memory partition" + (f" (per token, at seq={est['seq']})" if parts else
                                                " (no estimate: a dim has no example value)")]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if parts and est.get("baseline") and est["joules"] > 0:
        base = est["baseline"]
        lines.append(f"  chip / digital: energy {est['joules'] / base['joules']:.3g}x, "
                     f"latency {est['seconds'] / base['seconds']:.3g}x")
    for p in PARTS:
        lines.append(f"  {p}: {info[p]['describe']}")
    return lines

