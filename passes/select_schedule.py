"""SelectSchedule: choose a RunLoRA schedule for every ``lora_linear`` node.

Requires: ``"lora"``.  Provides: ``"schedule"``.
Preserves: outputs and gradients (every schedule computes the same function; see
``lorafx/schedules.py`` and tests/test_schedules.py).

For each lora node the pass writes a dispatch rule into the node's ``schedule``
argument and a ``ScheduleRecord`` into its metadata::

    %q_lora = lorafx.lora_linear(%x, %w, None, %A, %B, 2.0, None, 0.0, 'f1b1|257:f2b1|513:f2b5')

read "below 257 tokens f1b1, from 257 f2b1, from 513 f2b5"; the kernel applies it to
the actual token count at run time, so one graph is right for short and long batches.

Options
-------
``schedule="auto"``
    choose per node; or a schedule name / rule (``"f2b5"``, ``"f1b1|4096:f2b5"``) to set
    on every node as given (criterion "fixed").
``criterion="flops"`` (default)
    the sympy FLOP formulas of ``lorafx.schedules`` for the node's (n, m, r) and its
    gradient needs (does x need dX? does W need dW?); the thresholds are the crossover
    token counts solved from the expressions (``best_rule``).  ``byte_weight`` > 0 adds
    that many FLOP-equivalents per byte moved (``lora_bytes``; use the machine balance,
    FLOP/s over byte/s) -- a roofline-style correction, 0 by default.
``criterion="time"``
    measure every candidate schedule (forward + backward, interleaved rounds, median;
    ``lorafx.schedules.time_schedules``) on this machine at each token count of
    ``token_counts`` (default: the example input's token count) for every distinct
    (n, m, r, gradient flags, dtype, device, threads), and build the rule from the
    winners, switching at the geometric mean of neighbouring counts.  Results are cached
    in memory and in a JSON file (``cache_path``; default
    ``$LORAFX_CACHE_DIR/schedule_times.json``, ``$LORAFX_CACHE_DIR`` defaulting to
    ``~/.cache/lorafx``; ``cache_path=""`` keeps the cache in memory only), keyed by
    n, m, r, dtype, device, threads, the gradient/bias/dropout flags and the token count,
    so a later compile of the same shapes measures nothing.
``keep_xa=False``
    choose among the ``k`` schedules instead (the node becomes ``lorafx.lora_linear_xa``,
    which saves the small xa = A d(x)ᵀ (r x tokens) instead of recomputing it in backward;
    a ``getitem`` takes its first output).  Costs r x tokens of memory per node.

Nodes with adapter dropout choose among f1 and b1/b3 only (f2/b5/b4 would run as those
while the mask is active).  The pass info lists every node's choice and how many nodes
got each rule.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
import torch.fx

from lorafx import options as O
from lorafx import schedules as S
from lorafx.context import CompileContext
from lorafx.dialect import InputQuery, OpKind, ScheduleFamily, kind_of, owner_of
from lorafx.graph_utils import get_attr
from lorafx.meta import LoraRecord, ScheduleRecord, get_record, set_record
from lorafx.options import Option
from lorafx.pipeline import Pass, PassResult

__all__ = ["SelectSchedule", "lora_nodes", "grad_flags", "CRITERIA"]

CRITERIA = ("flops", "time")

# Process-wide caches: FLOP-criterion rules (sympy solving is slow) and time measurements.
_FLOPS_RULES: Dict[tuple, str] = {}
_TIME_MEMORY: Dict[str, Dict[str, Any]] = {}


def lora_nodes(gm: torch.fx.GraphModule):
    """The nodes SelectSchedule chooses a rule for: those of kinds with a schedule family."""
    return [n for n in gm.graph.nodes if (kind_of(n) is not None and kind_of(n).scheduled)]


def _hint(d) -> Optional[int]:
    if isinstance(d, int):
        return d
    try:
        from torch.fx.experimental.symbolic_shapes import hint_int
        return int(hint_int(d))
    except Exception:
        return None


def grad_flags(gm: torch.fx.GraphModule) -> Dict[torch.fx.Node, bool]:
    """Whether each node's value (may) need a gradient in training: parameters per their
    ``requires_grad``, graph inputs not, float results of ops with such an input do."""
    flags: Dict[torch.fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            flags[node] = False
        elif node.op == "get_attr":
            try:
                v = get_attr(gm, node.target)
            except AttributeError:
                v = None
            flags[node] = bool(isinstance(v, torch.Tensor) and v.requires_grad)
        elif node.op == "output":
            continue
        else:
            if kind_of(node) is None and owner_of(node) is not None:  # a LoRA kind's helper op (dropout mask)
                flags[node] = False
                continue
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and not val.dtype.is_floating_point:
                flags[node] = False
                continue
            ins = node.all_input_nodes
            flags[node] = any(flags.get(a, True) for a in ins)
    return flags


def _cache_file(path: Optional[str]) -> Optional[str]:
    if path == "":
        return None
    if path is not None:
        return path
    root = os.environ.get("LORAFX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lorafx")
    return os.path.join(root, "schedule_times.json")


def _load(path: Optional[str]) -> Dict[str, Any]:
    if path and os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
            if isinstance(data, dict):
                return data
        except (OSError, ValueError):
            pass
    return {}


def _save(path: Optional[str], entries: Dict[str, Any]) -> None:
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        data = _load(path)
        data.update(entries)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


@dataclass(frozen=True)
class SelectSchedule(Pass):
    schedule: str = "auto"
    criterion: str = "flops"
    keep_xa: bool = False
    byte_weight: float = 0.0
    token_counts: Optional[Tuple[int, ...]] = None
    repeats: int = 5
    cache_path: Optional[str] = None

    requires = frozenset({"lora"})
    provides = frozenset({"schedule"})
    invalidates = frozenset({"cost"})
    options = (
        Option("schedule", str, "auto", "'auto' (the cheapest per node and token count) or a schedule / rule "
               "for every node, e.g. 'f1b1' or 'f1b1|4096:f2b5'"),
        Option("schedule_criterion", str, "flops", "'flops' (sympy FLOP formulas) or 'time' (measured on this "
               "machine, cached; the measured choice is recorded and replayed for new call signatures)",
               field="criterion", check=lambda name, value, where: O.check_choice(name, value, CRITERIA, where)),
        Option("schedule_keep_xa", bool, False, "save x A^T (r x tokens) for backward instead of recomputing it",
               field="keep_xa"),
    )

    def __post_init__(self):
        counts = self.token_counts
        if isinstance(counts, Iterable) and not isinstance(counts, str):
            object.__setattr__(self, "token_counts", tuple(counts))
        super().__post_init__()
        if self.token_counts is not None:
            object.__setattr__(self, "token_counts", tuple(int(t) for t in self.token_counts))

    def validate(self) -> None:
        where = "SelectSchedule: "
        if not isinstance(self.schedule, str):
            raise TypeError(f"{where}schedule must be 'auto' or a schedule name/rule (a string), "
                            f"got {self.schedule!r}; pass e.g. schedule='f1b1' or schedule='f1b1|4096:f2b5'")
        if self.schedule != "auto":
            try:
                S.parse_rule(self.schedule)
            except ValueError as e:
                raise ValueError(f"{where}schedule={self.schedule!r} is not 'auto' or a valid schedule: {e}") from None
        O.check_choice("criterion", self.criterion, CRITERIA, where)
        O.check_bool("keep_xa", self.keep_xa, where)
        if isinstance(self.byte_weight, bool) or not isinstance(self.byte_weight, numbers.Real):
            raise TypeError(f"{where}byte_weight must be a number >= 0, got {self.byte_weight!r}")
        if not (math.isfinite(self.byte_weight) and self.byte_weight >= 0):
            raise ValueError(f"{where}byte_weight must be a finite number >= 0, got {self.byte_weight!r}; "
                             "use 0 (FLOPs only) or the machine balance, FLOP/s over byte/s")
        counts = self.token_counts
        if counts is not None and not (isinstance(counts, tuple) and counts and all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) and t > 0 for t in counts)):
            raise ValueError(f"{where}token_counts must be a non-empty list of positive ints or None, "
                             f"got {counts!r}; pass e.g. token_counts=[256, 4096]")
        O.check_positive_int("repeats", self.repeats, where, "5")
        if self.cache_path is not None and not isinstance(self.cache_path, (str, os.PathLike)):
            raise TypeError(f"{where}cache_path must be a path, '' (memory only) or None, got {self.cache_path!r}")

    # -- per node ------------------------------------------------------------------------
    def _flops_rule(self, kind: OpKind, family: ScheduleFamily) -> str:
        key = (kind.name, family.key, self.byte_weight)
        if key not in _FLOPS_RULES:
            costs = {name: family.cost(name, S.b, byte_weight=self.byte_weight) for name in family.candidates}
            _FLOPS_RULES[key] = str(S.cheapest_rule(costs))
        return _FLOPS_RULES[key]

    def _time_rule(self, kind: OpKind, family: ScheduleFamily, tokens: Optional[int], disk,
                   new_entries) -> Tuple[str, dict]:
        counts = self.token_counts or ((tokens,) if tokens else (1024,))
        names = family.candidates
        winners = []
        measured = {}
        for t in sorted(set(counts)):
            key = json.dumps({"kind": kind.name, **dict(family.key), **dict(family.time_key),
                              "threads": torch.get_num_threads(), "tokens": t}, sort_keys=True, default=str)
            entry = _TIME_MEMORY.get(key) or disk.get(key)
            if entry is None or set(entry.get("seconds", {})) != set(names):
                secs = family.time(names, t, self.repeats)
                entry = {"seconds": secs, "best": min(secs, key=secs.get)}
                new_entries[key] = entry
            _TIME_MEMORY[key] = entry
            winners.append((t, entry["best"]))
            measured[t] = entry["best"]
        return S.rule_from_measurements(winners), measured

    # -- the pass ------------------------------------------------------------------------
    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        nodes = lora_nodes(gm)
        flags_of = grad_flags(gm) if nodes else {}
        cache = _cache_file(self.cache_path) if self.criterion == "time" and self.schedule == "auto" else None
        disk = _load(cache) if cache else {}
        new_entries: Dict[str, Any] = {}
        choices: Dict[str, str] = {}
        measured: Dict[str, Any] = {}
        modified = False
        inputs = _Inputs(gm, flags_of)
        for node in nodes:
            kind = kind_of(node)
            family = kind.schedule_family(node, inputs, keep_xa=self.keep_xa)
            crit = self.criterion
            if self.schedule != "auto":
                rule, crit = str(S.Rule.parse(self.schedule)), "fixed"
            elif self.criterion == "time" and family.time is not None:
                tokens = inputs.tokens(kind.input(node))
                rule, seen = ctx.decide(  # a measured choice: recorded, replayed for new call signatures
                    f"rule:{node.name}", lambda: self._time_rule(kind, family, tokens, disk, new_entries))
                measured[node.name] = seen
            else:  # the FLOP formulas (also for a kind whose schedules cannot be timed)
                rule, crit = self._flops_rule(kind, family), "flops"
            modified |= kind.set_rule(gm.graph, node, S.Rule.parse(rule))
            running = kind.rule(node)  # what the node runs (a kind may fit a fixed rule to its schedules)
            rule = str(running) if running is not None else rule
            rec = get_record(node, LoraRecord)
            choices[rec.site if rec is not None else node.name] = rule
            set_record(node, ScheduleRecord(rule, crit))
        if new_entries:
            _save(cache, new_entries)
        info = {"criterion": "fixed" if self.schedule != "auto" else self.criterion, "choices": choices,
                "rules": ", ".join(f"{k} x{v}" for k, v in Counter(choices.values()).most_common())}
        if measured:
            info["measured_best"] = measured
            info["cache"] = cache or "memory"
        return PassResult(gm, modified, info)


class _Inputs(InputQuery):
    """Concrete sizes (the example's hints for dynamic dims) and gradient flags for a kind."""

    def __init__(self, gm: torch.fx.GraphModule, flags: Dict[torch.fx.Node, bool]):
        self.gm, self.flags = gm, flags

    def value(self, arg):
        if not isinstance(arg, torch.fx.Node):
            return arg
        if arg.op == "get_attr":
            try:
                return get_attr(self.gm, arg.target)
            except AttributeError:
                pass
        return arg.meta.get("val")

    def shape(self, arg):
        v = self.value(arg)
        if not isinstance(v, torch.Tensor):
            return None
        dims = tuple(_hint(d) for d in v.shape)
        return dims if all(d is not None for d in dims) else None

    def needs_grad(self, arg) -> bool:
        return isinstance(arg, torch.fx.Node) and bool(self.flags.get(arg, False))

    def tokens(self, arg) -> Optional[int]:
        shape = self.shape(arg)
        return math.prod(shape[:-1]) if shape else None
