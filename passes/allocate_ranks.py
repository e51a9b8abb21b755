"""AllocateRanks: spend a budget of trainable parameters where zero-cost proxies say it helps.

Requires: a captured graph, before InsertLoRA.  Provides: ``"allocation"``, the graph
record's ``allocation`` ({site: rank}, 0 for no adapter) that InsertLoRA (and
InsertShortcuts) then follow.  Preserves: the graph; it only decides.

The candidates are every linear that ``target_modules`` / ``exclude_modules`` allow (one
per module: a module called twice shares its adapter) and, with ``shortcuts=True``, the
shortcut sites of ``InsertShortcuts``.  ``passes/score_sites.py`` scores them with a
zero-cost proxy (HeteroLoRA, arXiv 2406.14956); then ranks are allocated:

* ``allocation="graded"`` (default): each site's share of the budget is proportional to
  its score.  Rank units are handed out one at a time (an apportionment by highest
  quotient), each to the site with the largest score / ((r + 1) · (in + out)) whose next
  unit still fits the budget and its cap min(in, out) (or ``max_rank``).  Sites end with
  any rank from 0 up; a site with rank 0 gets no adapter.
* ``allocation="topk"``: the paper's on/off rule: the best-scored sites get rank ``r``
  each, in score order, while the budget lasts; the others get none.

``rank_budget`` is an int (trainable parameters) or a float (a multiple of uniform r=8 on
the candidate linears).  The total never exceeds it.  The choice is recorded
(``ctx.decide``), so a new call signature replays it, and reported as PEFT's
``rank_pattern``.

Before (``rank_budget=6144, target_modules=["q_proj", "v_proj"]``, 2 layers)::

    %q_proj = aten.linear(%x, %q_w)          %v_proj = aten.linear(%x, %v_w)   (x2 layers)

After (the graph record; InsertLoRA then adapts only the sites with a rank)::

    allocation = {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.self_attn.v_proj": 10,
                  "model.layers.1.self_attn.q_proj": 0, "model.layers.1.self_attn.v_proj": 4}
"""
from __future__ import annotations

import heapq
import numbers
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.fx

from lorafx import options as O
from lorafx.context import CompileContext
from lorafx.meta import graph_record
from lorafx.options import Option
from lorafx.pipeline import CAPTURED, Pass, PassResult

from .insert_lora import ALL_LINEAR, find_adapter_sites, select_linear_sites
from .score_sites import PROXIES, Candidate, score_sites

__all__ = ["AllocateRanks", "ALLOCATIONS", "REFERENCE_RANK", "allocate", "candidate_sites", "reference_budget"]

ALLOCATIONS = ("graded", "topk")
REFERENCE_RANK = 8  # a float rank_budget is a multiple of uniform rank 8 on the candidate linears


def _check_budget(name: str, value: Any, where: str = "") -> None:
    if value is None:
        return
    fix = f"pass {name}=24576 (trainable parameters) or {name}=1.0 (as many as uniform r=8 on the allowed linears)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}{name} must be an int (parameters) or a float (a multiple of uniform r=8), "
                        f"got {value!r} ({type(value).__name__}); {fix}")
    if not (value == value and abs(value) != float("inf")) or value <= 0:
        raise ValueError(f"{where}{name} must be > 0, got {value!r}; {fix}")


def _check_proxy(name, value, where=""):
    O.check_choice(name, value, PROXIES, where)


def _check_allocation(name, value, where=""):
    O.check_choice(name, value, ALLOCATIONS, where)


def candidate_sites(gm: torch.fx.GraphModule, target_modules=ALL_LINEAR, exclude_modules=None,
                    shortcuts: bool = False) -> List[Candidate]:
    """Every site an adapter may go to, in graph order: the linears ``target_modules``
    allows (one per module), then the shortcut sites when ``shortcuts``."""
    out: Dict[str, Candidate] = {}
    for s in select_linear_sites(gm, find_adapter_sites(gm), target_modules, exclude_modules, "AllocateRanks"):
        if s.kind != "lora_linear" or s.layer == "MultiheadAttention":
            continue  # other layer kinds (and an MHA, whose two projections PEFT ranks as one) get no rank here:
            # InsertLoRA then refuses them, naming them
        out.setdefault(s.module, Candidate(s.module, "linear", s.in_features, s.out_features,
                                           weight=s.weight.target, transposed=s.weight_transposed))
    if shortcuts:
        from .insert_shortcuts import find_shortcut_sites
        for s in find_shortcut_sites(gm):
            out.setdefault(s.name, Candidate(s.name, "shortcut", s.dim, s.dim, src=s.src.name, dst=s.dst.name))
    return list(out.values())


def reference_budget(sites: List[Candidate], multiple: float = 1.0) -> int:
    """``multiple`` × the parameters of uniform rank 8 on the linear candidates."""
    return int(multiple * sum(REFERENCE_RANK * s.params_per_rank for s in sites if s.kind == "linear"))


def allocate(sites: List[Candidate], scores: Mapping[str, float], budget: int, *, allocation: str = "graded",
             rank: int = REFERENCE_RANK, max_rank: Optional[int] = None) -> Dict[str, int]:
    """{site: rank} within ``budget`` parameters (see the module docstring)."""
    ranks = {s.name: 0 for s in sites}
    if allocation == "topk":
        left = budget
        for s in sorted(sites, key=lambda s: (-scores[s.name], sites.index(s))):
            r = min(rank, s.max_rank)
            if r * s.params_per_rank <= left:
                ranks[s.name] = r
                left -= r * s.params_per_rank
        return ranks
    weights = {s.name: max(float(scores[s.name]), 0.0) for s in sites}
    if not any(w > 0 for w in weights.values()):
        weights = {name: 1.0 for name in weights}  # no signal at all: share equally
    caps = {s.name: min(s.max_rank, max_rank or s.max_rank) for s in sites}
    heap = [(-weights[s.name] / s.params_per_rank, i) for i, s in enumerate(sites) if weights[s.name] > 0]
    heapq.heapify(heap)
    left = budget
    while heap:
        _, i = heapq.heappop(heap)
        s = sites[i]
        if s.params_per_rank > left or ranks[s.name] >= caps[s.name]:
            continue  # this site can take no more; others with smaller units still may
        ranks[s.name] += 1
        left -= s.params_per_rank
        heapq.heappush(heap, (-weights[s.name] / ((ranks[s.name] + 1) * s.params_per_rank), i))
    return ranks


@dataclass(frozen=True)
class AllocateRanks(Pass):
    rank_budget: Union[int, float, None] = None
    proxy: str = "snip"
    allocation: str = "graded"
    r: int = REFERENCE_RANK
    max_rank: Optional[int] = None
    target_modules: Union[str, Tuple[str, ...]] = ALL_LINEAR
    exclude_modules: Union[str, Tuple[str, ...], None] = None
    shortcuts: bool = False
    score_batches: int = 4
    score_loss: Optional[Callable[[Any, Dict[str, Any]], torch.Tensor]] = None
    seed: Optional[int] = None

    requires = frozenset({CAPTURED})
    provides = frozenset({"allocation"})
    options = (
        Option("rank_budget", (int, float, type(None)), None,
               "trainable-parameter budget spent by zero-cost proxies (HeteroLoRA): an int (parameters) or a float "
               "(a multiple of uniform r=8 on the allowed linears); None: every site gets rank r",
               check=_check_budget),
        Option("proxy", str, "snip", f"how rank_budget ranks the sites: one of {PROXIES}", check=_check_proxy),
        Option("allocation", str, "graded", "'graded' (ranks in proportion to the scores, 0 included) or 'topk' "
               "(the best sites at rank r while the budget lasts)", check=_check_allocation),
        Option("max_rank", (int, type(None)), None, "the largest rank rank_budget gives a site (default "
               "min(in, out))", check=lambda n, v, w: v is None or O.check_positive_int(n, v, w)),
        Option("score_batches", int, 4, "calibration batches the proxy reads", check=O.check_positive_int),
        Option("score_loss", (type(None), "callable"), None, "loss(outputs, batch) for proxies that need one, "
               "for models whose output has no loss"),
    )

    @classmethod
    def from_options(cls, values: Mapping[str, Any], ctx: CompileContext) -> Optional["AllocateRanks"]:
        """Built only with a ``rank_budget``; it then takes InsertLoRA's ``target_modules``,
        ``exclude_modules`` and ``r`` (the rank of ``allocation="topk"``) and InsertShortcuts'
        ``shortcuts``.  ``rank_budget`` with an explicit ``rank_pattern`` is refused."""
        if values.get("rank_budget") is None:
            for name in ("proxy", "allocation", "max_rank", "score_batches", "score_loss"):
                if name in values:
                    raise ValueError(f"lorafx.compile: {name}={values[name]!r} only applies with rank_budget=...; "
                                     "pass rank_budget (e.g. rank_budget=1.0) or leave it out")
            return None
        if values.get("rank_pattern"):
            raise ValueError(
                "lorafx.compile: rank_budget and rank_pattern both set the ranks; give rank_budget to let the proxy "
                "allocate them, or rank_pattern to set them yourself, not both")
        kwargs = {k: values[k] for k in ("rank_budget", "proxy", "allocation", "max_rank", "score_batches",
                                         "score_loss", "target_modules", "exclude_modules", "r", "shortcuts")
                  if k in values}
        if kwargs.get("target_modules", ALL_LINEAR) is None:  # InsertLoRA's default: all-linear
            kwargs["target_modules"] = ALL_LINEAR
        return cls(**kwargs)

    def __post_init__(self):
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))

    def validate(self) -> None:
        where = "AllocateRanks: "
        if self.rank_budget is None:
            raise ValueError(f"{where}needs a rank_budget: an int (trainable parameters) or a float (a multiple of "
                             "uniform r=8 on the allowed linears), e.g. AllocateRanks(rank_budget=1.0)")
        _check_budget("rank_budget", self.rank_budget, where)
        _check_proxy("proxy", self.proxy, where)
        _check_allocation("allocation", self.allocation, where)
        O.check_positive_int("r", self.r, where)
        if self.max_rank is not None:
            O.check_positive_int("max_rank", self.max_rank, where)
        O.check_positive_int("score_batches", self.score_batches, where)
        O.check_bool("shortcuts", self.shortcuts, where)
        O.check_seed("seed", self.seed, where)
        if self.score_loss is not None and not callable(self.score_loss):
            raise TypeError(f"{where}score_loss must be callable(outputs, batch) -> scalar tensor, "
                            f"got {type(self.score_loss).__name__}")

    def budget_for(self, sites: List[Candidate]) -> int:
        """The budget in parameters for these candidates."""
        if isinstance(self.rank_budget, numbers.Integral):
            return int(self.rank_budget)
        return reference_budget(sites, float(self.rank_budget))

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        sites = candidate_sites(gm, self.target_modules, self.exclude_modules, self.shortcuts)
        budget = self.budget_for(sites)
        smallest = min(sites, key=lambda s: s.params_per_rank)
        if budget < smallest.params_per_rank:
            raise ValueError(
                f"AllocateRanks: rank_budget={self.rank_budget!r} ({budget:,} parameters) cannot pay for a single "
                f"rank-1 adapter: the smallest candidate, {smallest.name}, needs {smallest.params_per_rank:,} "
                f"({smallest.in_features} + {smallest.out_features}); pass rank_budget >= "
                f"{smallest.params_per_rank}")

        def decide():
            seed = self.seed if self.seed is not None else ctx.draw_seed()
            scores = score_sites(gm, ctx, sites, self.proxy, seed=seed, max_batches=self.score_batches,
                                 score_loss=self.score_loss)
            ranks = allocate(sites, scores, budget, allocation=self.allocation, rank=self.r, max_rank=self.max_rank)
            return {"scores": scores, "ranks": ranks}

        start = time.perf_counter()
        replayed = ctx.recorded("allocation")
        decision = ctx.decide("allocation", decide)
        seconds = time.perf_counter() - start
        ranks = {s.name: int(decision["ranks"].get(s.name, 0)) for s in sites}
        record = graph_record(gm)
        record.allocation = ranks
        record.scores = {s.name: float(decision["scores"][s.name]) for s in sites}
        per_rank = {s.name: s.params_per_rank for s in sites}
        used = sum(r * per_rank[name] for name, r in ranks.items())
        info = {
            "proxy": self.proxy,
            "allocation": self.allocation,
            "budget": budget,
            "used": used,
            "sites": len(sites),
            "adapted": sum(1 for r in ranks.values() if r > 0),
            "score_seconds": 0.0 if replayed else round(seconds, 3),
            "scores": dict(decision["scores"]),
            "ranks": ranks,
            "rank_pattern": {re.escape(s.name): ranks[s.name] for s in sites if s.kind == "linear" and ranks[s.name]},
        }
        return PassResult(gm, False, info)

    def summary(self, info: Mapping[str, Any]) -> List[str]:
        ranks, scores = info["ranks"], info["scores"]
        nonzero = [r for r in ranks.values() if r > 0]
        head = (f"proxy={info['proxy']} {info['allocation']}: budget {info['budget']:,}, used {info['used']:,} "
                f"({100.0 * info['used'] / max(info['budget'], 1):.1f}%), {info['adapted']} of {info['sites']} sites "
                f"adapted" + (f", ranks {min(nonzero)}-{max(nonzero)}" if nonzero else ""))
        width = max((len(n) for n in ranks), default=4)
        lines = [head, f"  {'site':<{width}}  {'score':>11}  rank"]
        for name, r in ranks.items():
            lines.append(f"  {name:<{width}}  {scores[name]:11.4g}  {r:>4}" + ("  " + "#" * r if r else ""))
        return lines
