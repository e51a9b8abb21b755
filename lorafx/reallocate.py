"""Dynamic HeteroLoRA rank allocation: move rank between adapter sites while training.

    cm = lorafx.compile(model, rank_budget=1.0, proxy="snip", seed=0)
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    realloc = lorafx.ReallocateRanks(cm, opt, every=100, seed=0)
    for batch in data:
        cm(**batch).loss.backward(); opt.step(); opt.zero_grad()
        realloc.step()          # every 100th call: {site: (old rank, new rank)}; else None

or, with the transformers ``Trainer``, ``callbacks=[lorafx.ReallocateRanksCallback(every=100)]``
(its ``on_step_end`` takes the model and optimizer from the Trainer).  The model must be
compiled with ``rank_budget=`` (``passes/allocate_ranks.py``): the same budget, proxy and
allocation rule are used again.  What happens at a reallocation:

**Re-scoring.**  ``cm.merge_and_unload()`` gives a plain graph running the *current*
effective weights W + s·BA; ``score_sites`` (``passes/score_sites.py``) scores every linear
candidate of the compile on it, through the virtual weight gradient ∂L/∂W at those
weights, with the compile's proxy (or ``proxy=``), on the compile's calibration batches
(or ``calibration=``; else its example inputs), in eval mode (no dropout).  The compiled
model is never run: no ``.grad``, hook or weight change is left on it, and the caller's
random state is restored afterwards.

**Allocation.**  ``allocate`` with the compile's budget and rule (graded or topk, ``r``,
``max_rank``), with one change: a site that has an adapter keeps at least rank 1 (its
learned update would otherwise be lost: lorafx never writes the frozen weights).  Sites
the rule would drop get rank 1 and the rule shares what is left of the budget among the
others; sites with rank 0 may gain rank.  Shortcut adapters (``shortcuts=True``) keep
their ranks: the budget moved is the budget minus the parameters they hold.  The total
never exceeds the budget.

**Moving rank.**  Each site keeps its scale s: its record's alpha becomes s·r' (s·√r'
with ``use_rslora``; the nearest float where no float alpha gives s exactly, one ulp off),
so a saved adapter's alpha_pattern / rank_pattern still give s in PEFT.

* growth r → r': A keeps its r rows and B its r columns; the new rows of A are
  kaiming-uniform (seeded), the new columns of B zero, so s·B'A' = s·BA exactly and the
  model's function is unchanged (the outputs up to BLAS rounding: a GEMM over r' terms may
  round differently from one over r, ~1e-7 in float32).  The optimizer state is carried:
  tensors shaped like the parameter (Adam's exp_avg, exp_avg_sq) padded with zeros, the
  rest (step) kept.  (So, with Adam at a large step count, the first update of a new
  entry is up to (1 - β1)/√(1 - β2) ≈ 3× the learning rate.)
* shrink r → r': s·BA is replaced by its best rank-r' approximation (truncated SVD
  U Σ Vᵀ of s·BA in float64, split evenly: B' = U√(Σ/s), A' = √(Σ/s)Vᵀ).  That site's
  optimizer state is reset: the rows of A' span a new basis, so moments kept per old row
  or column no longer describe them.
* a new site 0 → r': A kaiming-uniform (seeded), B zero (function unchanged), with the
  scale the compile's options give it (alpha / r').

**Graphs and optimizer.**  The graphs are rebuilt for the new ranks
(``CompiledModel._rebuild_graphs``: the primary signature is captured again and the
pipeline replayed with the new ranks recorded as the AllocateRanks decision; the other
signatures are captured again on first use).  Unchanged sites keep their Parameter
objects, optimizer state and ``.grad``; changed and new sites get new Parameters, which
take the old ones' places in the optimizer's param groups (same group, same
hyperparameters; a new site's A and B join the group of the first adapter the optimizer
holds).  Call ``step()`` after ``optimizer.step()`` and ``zero_grad()``: a replaced
parameter's ``.grad`` is dropped.  A merged model (``cm.merge()``) is refused.

Each reallocation is kept in ``ReallocateRanks.history`` and logged in one line (logger
``"lorafx"``, INFO).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import torch

from lorafx.passes import AllocateRanks, InsertLoRA
from lorafx.passes.allocate_ranks import allocate, candidate_sites
from lorafx.passes.score_sites import PROXIES, Candidate, score_sites

from .compiled import CompiledModel
from .graph_utils import get_attr
from .options import check_seed
from .pipeline import Pipeline

__all__ = ["ReallocateRanks", "ReallocateRanksCallback", "Reallocation", "grow_adapter", "shrink_adapter",
           "new_adapter"]

logger = logging.getLogger("lorafx")
Move = Tuple[int, int]  # (old rank, new rank)


# -- moving one adapter ---------------------------------------------------------------------------

def _kaiming_rows(r: int, in_features: int, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``r`` rows of InsertLoRA's A init (kaiming-uniform, bound 1/√in), drawn in float32."""
    bound = 1.0 / math.sqrt(in_features)
    rows = torch.rand(r, in_features, generator=gen, dtype=torch.float32) * (2 * bound) - bound
    return rows.to(dtype=like.dtype, device=like.device)


def new_adapter(in_features: int, out_features: int, r: int, like: torch.Tensor,
                gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a new rank-``r`` adapter: A kaiming-uniform, B zero."""
    return (_kaiming_rows(r, in_features, like, gen),
            torch.zeros(out_features, r, dtype=like.dtype, device=like.device))


def grow_adapter(A: torch.Tensor, B: torch.Tensor, r: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank ``r``: A's rows and B's columns kept, new rows of A kaiming-uniform,
    new columns of B zero (so B'A' = BA exactly)."""
    old = A.shape[0]
    A2 = torch.cat([A.detach(), _kaiming_rows(r - old, A.shape[1], A, gen)], dim=0)
    B2 = torch.cat([B.detach(), B.new_zeros(B.shape[0], r - old)], dim=1)
    return A2, B2


def shrink_adapter(A: torch.Tensor, B: torch.Tensor, scale: float, r: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank ``r`` with s·B'A' the best rank-``r`` approximation of s·BA
    (truncated SVD U Σ Vᵀ of s·BA in float64; B' = U√(Σ/s), A' = √(Σ/s)Vᵀ)."""
    qb, rb = torch.linalg.qr(B.detach().double())  # BA = qb (rb raᵀ) qaᵀ: an r × r SVD, not out × in
    qa, ra = torch.linalg.qr(A.detach().double().t())
    u, sv, vh = torch.linalg.svd(rb @ ra.t())  # sv = Σ / s: the singular values of BA
    root = sv[:r].sqrt()
    B2 = (qb @ u[:, :r]) * root
    A2 = root[:, None] * (vh[:r] @ qa.t())
    return A2.to(A.dtype), B2.to(B.dtype)


def _alpha_for(scale: float, r: int, rslora: bool) -> float:
    """The alpha whose scale at rank ``r`` (alpha / r, or alpha / √r) is ``scale``: exactly
    where a float alpha allows it, else the nearest (one ulp off)."""
    div = math.sqrt(r) if rslora else r
    near = [scale * div]
    for direction in (math.inf, -math.inf):
        alpha = near[0]
        for _ in range(2):
            alpha = math.nextafter(alpha, direction)
            near.append(alpha)
    return min(near, key=lambda a: abs(a / div - scale))


def _padded_state(state: Mapping[str, Any], old: torch.Tensor, new: torch.Tensor) -> Dict[str, Any]:
    """Optimizer state for ``new`` (grown from ``old``): tensors shaped like ``old`` padded
    with zeros, anything else (step) kept."""
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == old.shape:
            padded = value.new_zeros(new.shape)
            padded[tuple(slice(0, n) for n in old.shape)] = value
            value = padded
        out[key] = value
    return out


# -- allocation -----------------------------------------------------------------------------------

def _allocate_keeping(sites: List[Candidate], scores: Mapping[str, float], budget: int, keep: Set[str],
                      rule: AllocateRanks) -> Dict[str, int]:
    """``allocate`` with ``rule``'s settings, except that every site in ``keep`` gets at
    least rank 1: sites the rule would drop get 1, and the rule shares the rest of the
    budget among the others (repeated until no kept site is dropped)."""
    floor: Set[str] = set()
    while True:
        rest = [s for s in sites if s.name not in floor]
        spare = budget - sum(s.params_per_rank for s in sites if s.name in floor)
        ranks = allocate(rest, scores, spare, allocation=rule.allocation, rank=rule.r, max_rank=rule.max_rank)
        dropped = {name for name in keep - floor if ranks.get(name, 0) == 0}
        if not dropped:
            return {s.name: 1 if s.name in floor else ranks[s.name] for s in sites}
        floor |= dropped


# -- the pipeline ---------------------------------------------------------------------------------

def _passes(pipeline: Pipeline):
    for p in pipeline.passes:
        yield from _passes(p) if isinstance(p, Pipeline) else (p,)


def _with_alphas(pipeline: Pipeline, alphas: Mapping[str, float]) -> Pipeline:
    """``pipeline`` with every InsertLoRA giving these sites these alphas (ahead of its own
    alpha_pattern, whose first matching key wins)."""
    keys = {re.escape(site): alpha for site, alpha in alphas.items()}
    passes = []
    for p in pipeline.passes:
        if isinstance(p, Pipeline):
            p = _with_alphas(p, alphas)
        elif isinstance(p, InsertLoRA):
            p = dataclasses.replace(p, alpha_pattern={**keys, **{k: v for k, v in p.alpha_pattern.items()
                                                                 if k not in keys}})
        passes.append(p)
    return Pipeline(passes, instruments=pipeline.instruments)


def _allocation_key(cm: CompiledModel) -> str:
    keys = [k for k in cm._context.decisions if re.search(r"(^|/)AllocateRanks#\d+:allocation$", k)]
    if len(keys) != 1:
        raise ValueError(
            "lorafx.ReallocateRanks needs a model compiled with a rank budget, and this one was compiled "
            f"{'without rank_budget=' if not keys else 'with several AllocateRanks passes'}: compile it with "
            "lorafx.compile(model, rank_budget=1.0, ...) (a budget of trainable parameters: an int, or a float "
            "multiple of uniform r=8) and the proxy then decides the ranks that ReallocateRanks moves")
    return keys[0]


def _unwrap(optimizer):
    """The torch optimizer inside a wrapper (accelerate's AcceleratedOptimizer), or None."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def _check_every(every) -> int:
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"every must be a positive int (the optimizer steps between two reallocations), "
                         f"got {every!r}; e.g. every=100")
    return int(every)


def _refuse_merged(cm: CompiledModel) -> None:
    if cm.merged:
        raise RuntimeError("cannot reallocate ranks of a merged model (cm.merge()): its adapters are folded into "
                           "the weights; call cm.unmerge() first")


# -- the reallocator --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reallocation:
    """One reallocation: at ``step`` (calls of ``ReallocateRanks.step``), ``moves`` {site:
    (old rank, new rank)}, the ``ranks`` and proxy ``scores`` of every linear candidate,
    the parameters ``used`` of the linear sites' ``budget``, and the ``seconds`` it took."""

    step: int
    moves: Dict[str, Move]
    ranks: Dict[str, int]
    scores: Dict[str, float]
    used: int
    budget: int
    seconds: float


class ReallocateRanks:
    """Every ``every`` calls of ``step()``, re-score the linear adapter sites of ``cm`` (a
    model compiled with ``rank_budget=``) at its current weights W + s·BA and move rank
    between them under the compile's budget and allocation rule; sites with an adapter
    keep rank >= 1, shortcut adapters keep theirs, every site keeps its scale s.

    Optimizer state across a move: a site that grows keeps its Parameters' state for the
    kept rows of A / columns of B (exp_avg, exp_avg_sq padded with zeros, step kept); a
    site that shrinks (truncated SVD of s·BA) has its state reset (its basis changed); a
    new site starts without state.  The new Parameters take the old ones' places in
    ``optimizer``'s param groups (a new site joins the group of the first adapter);
    unchanged sites keep their Parameter objects, state and ``.grad``.  (The module
    docstring gives every rule.)

    ``optimizer``: the optimizer training ``cm`` (None: none to update).  ``proxy``
    (default: the compile's), ``calibration`` (re-iterable batches; default: the compile's,
    else its example inputs), ``seed`` (new rows of A and the ``random`` proxy;
    reallocation k uses seed + k; None draws from torch's generator).  ``history`` lists
    every ``Reallocation``; ``trainer_callback()`` drives this object from a transformers
    ``Trainer``.
    """

    def __init__(self, cm: CompiledModel, optimizer: Optional[torch.optim.Optimizer] = None, every: int = 100,
                 proxy: Optional[str] = None, calibration: Optional[Iterable[Any]] = None,
                 seed: Optional[int] = None):
        if not isinstance(cm, CompiledModel):
            raise TypeError(f"lorafx.ReallocateRanks needs a model compiled by lorafx.compile(..., rank_budget=...), "
                            f"got {type(cm).__name__}")
        self.every = _check_every(every)
        self._key = _allocation_key(cm)
        _refuse_merged(cm)
        dora = next((site for site, rec in cm.lora_records().items() if rec.magnitude), None)
        if dora is not None:
            raise ValueError(f"lorafx.ReallocateRanks does not support DoRA adapters yet (use_dora=True, e.g. {dora}): "
                             "moving rank rebuilds the adapters, and their learned magnitudes would restart at "
                             "||W + s·B·A||; compile with use_dora=False to reallocate ranks while training")
        self.rule = next(p for p in _passes(cm._pipeline) if isinstance(p, AllocateRanks))
        self.proxy = self.rule.proxy if proxy is None else proxy
        if self.proxy not in PROXIES:
            raise ValueError(f"unknown proxy {self.proxy!r}; choose one of {PROXIES}")
        check_seed("seed", seed, "lorafx.ReallocateRanks: ")
        self.model, self.optimizer, self.calibration, self.seed = cm, optimizer, calibration, seed
        self.steps = 0
        self.history: List[Reallocation] = []

    def step(self) -> Optional[Dict[str, Move]]:
        """Count an optimizer step; every ``every``-th, reallocate and return the moves
        ({} if the ranks stay); otherwise None."""
        self.steps += 1
        return self.reallocate() if self.steps % self.every == 0 else None

    def trainer_callback(self):
        """A transformers ``TrainerCallback`` calling ``step()`` at every ``on_step_end``
        (the optimizer is taken from the Trainer)."""
        return _callback_class()(reallocator=self)

    # -- one reallocation ----------------------------------------------------------------------
    def reallocate(self) -> Dict[str, Move]:
        """Re-score, re-allocate and move now; returns {site: (old rank, new rank)}."""
        cm = self.model
        _refuse_merged(cm)
        start = time.perf_counter()
        seed = self.seed + len(self.history) if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        with torch.random.fork_rng(devices=[]):
            records = cm.lora_records()
            plain = cm.merge_and_unload()
            sites = self._candidates(plain, records)
            ctx = cm._context if self.calibration is None else dataclasses.replace(cm._context,
                                                                                 calibration=self.calibration)
            scores = score_sites(plain, ctx, sites, self.proxy, seed=seed, max_batches=self.rule.score_batches,
                                 score_loss=self.rule.score_loss)
            del plain
            old = {s.name: records[s.name].r if s.name in records else 0 for s in sites}
            budget = self._linear_budget(sites, records)
            ranks = _allocate_keeping(sites, scores, budget, {n for n, r in old.items() if r > 0}, self.rule)
            moves = {n: (old[n], ranks[n]) for n in old if ranks[n] != old[n]}
            if moves:
                self._move(moves, sites, records, scores, ranks, torch.Generator().manual_seed(seed))
        used = sum(ranks[s.name] * s.params_per_rank for s in sites)
        self.history.append(Reallocation(self.steps, moves, ranks, scores, used, budget,
                                         time.perf_counter() - start))
        shown = ", ".join(f"{n} {a}->{b}" for n, (a, b) in moves.items())
        logger.info("lorafx: ranks reallocated at step %d (%s): %d moved%s; %d of %d parameters",
                    self.steps, self.proxy, len(moves), f" ({shown})" if moves else "", used, budget)
        return moves

    def _candidates(self, plain: torch.fx.GraphModule, records) -> List[Candidate]:
        """The compile's linear candidates, found on the plain graph (its weight paths are
        the compiled model's)."""
        decided = self.model._context.decisions[self._key]["ranks"]
        adapters = {n for n, p in self.model.named_parameters() if p.requires_grad}
        sites = [s for s in candidate_sites(plain, self.rule.target_modules, self.rule.exclude_modules)
                 if s.name in decided and s.weight not in adapters]
        found = {s.name: s for s in sites}
        for name, rec in records.items():
            if name not in found or found[name].weight != rec.weight:
                raise RuntimeError(f"ReallocateRanks: the plain graph of cm.merge_and_unload() does not hold the "
                                   f"adapted linear {name} with its weight {rec.weight} (found "
                                   f"{found[name].weight if name in found else 'no such site'})")
        return sites

    def _linear_budget(self, sites: List[Candidate], records) -> int:
        """The compile's budget less the parameters the other adapters (shortcuts) hold."""
        linear = sum(rec.r * (rec.in_features + rec.out_features) for rec in records.values())
        others = sum(p.numel() for p in self.model.parameters() if p.requires_grad) - linear
        return self.rule.budget_for(sites) - others

    def _move(self, moves: Dict[str, Move], sites: List[Candidate], records, scores, ranks,
              gen: torch.Generator) -> None:
        """Prepare each moved site's (A, B), record the new ranks and alphas, rebuild the
        graphs, copy the prepared values in and update the optimizer."""
        cm = self.model
        like = next(p for p in cm.parameters() if p.is_floating_point())
        rslora = any(p.use_rslora for p in _passes(cm._pipeline) if isinstance(p, InsertLoRA))
        values, alphas = {}, {}
        for s in sites:  # graph order: the same draws for the same moves
            if s.name not in moves:
                continue
            before, after = moves[s.name]
            if before == 0:
                values[s.name] = new_adapter(s.in_features, s.out_features, after, like, gen)
                continue
            rec = records[s.name]
            A, B = get_attr(cm, rec.lora_A), get_attr(cm, rec.lora_B)
            values[s.name] = grow_adapter(A, B, after, gen) if after > before else shrink_adapter(A, B, rec.scale,
                                                                                                  after)
            alphas[s.name] = _alpha_for(rec.scale, after, rslora)
        old = dict(cm.named_parameters())
        decisions = cm._context.decisions
        saved_decision, saved_pipeline = decisions[self._key], cm._pipeline
        decisions[self._key] = {"scores": {**saved_decision["scores"], **scores},
                                "ranks": {**saved_decision["ranks"], **ranks}}
        cm.__dict__["_pipeline"] = _with_alphas(saved_pipeline, alphas)
        try:
            cm._rebuild_graphs()
        except BaseException:
            decisions[self._key], cm.__dict__["_pipeline"] = saved_decision, saved_pipeline
            raise
        new_records = cm.lora_records()
        with torch.no_grad():
            for site, (A, B) in values.items():
                rec = new_records[site]
                if site in records and not math.isclose(rec.scale, records[site].scale, rel_tol=1e-12):
                    raise RuntimeError(f"ReallocateRanks: {site}'s scale changed ({records[site].scale!r} -> "
                                       f"{rec.scale!r})")
                for path, value in ((rec.lora_A, A), (rec.lora_B, B)):
                    p = get_attr(cm, path)
                    p.copy_(value)  # into the new graph's own Parameter (a folded A is a view of its buffer)
                    if path in old:
                        p.requires_grad_(old[path].requires_grad)
        self._update_optimizer(old, dict(cm.named_parameters()), records)

    def _update_optimizer(self, old: Dict[str, torch.nn.Parameter], new: Dict[str, torch.nn.Parameter],
                          records) -> None:
        """Every Parameter replaced at a path is replaced in the optimizer, with its state
        (padded with zeros where it grew, dropped where it shrank) and without its grad; new
        adapters join the group of the first adapter the optimizer holds."""
        opt = _unwrap(self.optimizer)
        where = {} if opt is None else {id(p): (g, i) for g in opt.param_groups for i, p in enumerate(g["params"])}
        for path, before in old.items():
            after = new.get(path)
            if after is None or after is before:
                continue
            before.grad = None
            if id(before) not in where:
                continue
            group, i = where[id(before)]
            group["params"][i] = after
            state = opt.state.pop(before, None)
            if state and all(n >= o for n, o in zip(after.shape, before.shape)):  # grown (or the same shape)
                opt.state[after] = _padded_state(state, before, after)
        added = [p for path, p in new.items() if path not in old and p.requires_grad]
        first = (old.get(path) for rec in records.values() for path in (rec.lora_A, rec.lora_B))
        home = next((where[id(p)][0] for p in first if id(p) in where), None)
        if added and home is not None:
            home["params"].extend(added)


def _callback_class():
    """``ReallocateRanksCallback``, built on first use (importing transformers' Trainer
    takes seconds)."""
    cls = globals().get("ReallocateRanksCallback")
    if cls is not None:
        return cls
    from transformers import TrainerCallback

    class ReallocateRanksCallback(TrainerCallback):
        """A transformers ``TrainerCallback`` reallocating ranks every ``every`` optimizer
        steps (``lorafx.ReallocateRanks``, built at the first ``on_step_end`` with the
        Trainer's model and optimizer), or driving ``reallocator`` when one is given."""

        def __init__(self, every: int = 100, proxy: Optional[str] = None,
                     calibration: Optional[Iterable[Any]] = None, seed: Optional[int] = None, *,
                     reallocator: Optional[ReallocateRanks] = None):
            self.options = {"every": _check_every(every), "proxy": proxy, "calibration": calibration, "seed": seed}
            self.reallocator = reallocator

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if self.reallocator is None:
                self.reallocator = ReallocateRanks(model, optimizer, **self.options)
            elif optimizer is not None:
                self.reallocator.optimizer = optimizer
            self.reallocator.step()
            return control

    ReallocateRanksCallback.__module__ = __name__
    globals()["ReallocateRanksCallback"] = ReallocateRanksCallback
    return ReallocateRanksCallback


def __getattr__(name: str):
    if name == "ReallocateRanksCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
