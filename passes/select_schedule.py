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
import operator
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
import torch.fx

from lorafx import options as O
from lorafx import schedules as S
from lorafx.graph_utils import get_attr
from lorafx.meta import LoraRecord, ScheduleRecord, get_record, set_record
from lorafx.pipeline import Pass, PassResult

__all__ = ["SelectSchedule", "lora_nodes", "grad_flags", "CRITERIA"]

CRITERIA = ("flops", "time")
LORA_OPS = (torch.ops.lorafx.lora_linear.default, torch.ops.lorafx.lora_linear_xa.default)

# Process-wide caches: FLOP-criterion rules (sympy solving is slow) and time measurements.
_FLOPS_RULES: Dict[tuple, str] = {}
_TIME_MEMORY: Dict[str, Dict[str, Any]] = {}


def lora_nodes(gm: torch.fx.GraphModule):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LORA_OPS]


def _hint(d) -> Optional[int]:
    if isinstance(d, int):
        return d
    try:
        from torch.fx.experimental.symbolic_shapes import hint_int
        return int(hint_int(d))
    except Exception:
        return None


_NO_GRAD_OPS = {torch.ops.lorafx.dropout_mask.default}


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
            if node.target in _NO_GRAD_OPS:
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
    def _shape(self, gm, node):
        args = list(node.args) + [None] * (9 - len(node.args))
        x, w, bias, a, bb, _, mask = args[:7]
        rec = get_record(node, LoraRecord)
        wv = w.meta.get("val") if isinstance(w, torch.fx.Node) else None
        av = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
        if isinstance(a, torch.fx.Node) and a.op == "get_attr" and av is None:
            av = get_attr(gm, a.target)
        m = _hint(wv.shape[0]) if wv is not None else rec.out_features
        n = _hint(wv.shape[1]) if wv is not None else rec.in_features
        r = _hint(av.shape[0]) if av is not None else rec.r
        xv = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        tokens = None
        dtype, device = torch.float32, "cpu"
        if isinstance(xv, torch.Tensor):
            dims = [_hint(d) for d in xv.shape[:-1]]
            if all(d is not None for d in dims):
                tokens = 1
                for d in dims:
                    tokens *= d
            dtype, device = xv.dtype, str(xv.device)
        if device == "meta" and isinstance(a, torch.fx.Node) and a.op == "get_attr":
            device = str(get_attr(gm, a.target).device)
        return n, m, r, tokens, dtype, device, bias is not None, isinstance(mask, torch.fx.Node)

    def _flops_rule(self, n, m, r, flags) -> str:
        key = (n, m, r, self.keep_xa, self.byte_weight, tuple(sorted(flags.items())))
        if key not in _FLOPS_RULES:
            names = S.candidates(dropout=flags["dropout"], keep_xa=self.keep_xa)
            _FLOPS_RULES[key] = S.best_rule(n, m, r, names=names, byte_weight=self.byte_weight, **flags)
        return _FLOPS_RULES[key]

    def _time_rule(self, n, m, r, tokens, dtype, device, flags, p, disk, new_entries) -> Tuple[str, dict]:
        counts = self.token_counts or ((tokens,) if tokens else (1024,))
        names = S.candidates(dropout=flags["dropout"], keep_xa=self.keep_xa)
        winners = []
        measured = {}
        for t in sorted(set(counts)):
            key = json.dumps({"n": n, "m": m, "r": r, "dtype": str(dtype), "device": device,
                              "threads": torch.get_num_threads(), "tokens": t, "keep_xa": self.keep_xa,
                              **{k: bool(v) for k, v in flags.items()}}, sort_keys=True)
            entry = _TIME_MEMORY.get(key) or disk.get(key)
            if entry is None or set(entry.get("seconds", {})) != set(names):
                secs = S.time_schedules(names, t, n, m, r, dtype=dtype, device=device, repeats=self.repeats,
                                        x_requires_grad=flags["x_requires_grad"],
                                        w_requires_grad=flags["w_requires_grad"], bias=flags["bias"],
                                        dropout=p if flags["dropout"] else 0.0)
                entry = {"seconds": secs, "best": min(secs, key=secs.get)}
                new_entries[key] = entry
            _TIME_MEMORY[key] = entry
            winners.append((t, entry["best"]))
            measured[t] = entry["best"]
        return S.rule_from_measurements(winners), measured

    # -- the pass ------------------------------------------------------------------------
    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        nodes = lora_nodes(gm)
        flags_of = grad_flags(gm) if nodes else {}
        cache = _cache_file(self.cache_path) if self.criterion == "time" and self.schedule == "auto" else None
        disk = _load(cache) if cache else {}
        new_entries: Dict[str, Any] = {}
        choices: Dict[str, str] = {}
        measured: Dict[str, Any] = {}
        modified = False
        for node in nodes:
            n, m, r, tokens, dtype, device, has_bias, has_mask = self._shape(gm, node)
            args = list(node.args[:8])  # (x, W, bias, A, B, scale, dropout_mask, dropout_p)
            for i, (key, default) in enumerate((("dropout_mask", None), ("dropout_p", 0.0)), start=6):
                if len(args) == i:
                    args.append(node.kwargs.get(key, default))
            x, w, bias, a, bb = node.args[:5]
            flags = {"x_requires_grad": flags_of.get(x, True), "w_requires_grad": flags_of.get(w, False),
                     "a_requires_grad": flags_of.get(a, True), "b_requires_grad": flags_of.get(bb, True),
                     "bias": has_bias, "dropout": has_mask}
            crit = self.criterion
            if self.schedule != "auto":
                rule, crit = self.schedule, "fixed"
            elif self.criterion == "flops":
                rule = self._flops_rule(n, m, r, flags)
            else:
                rule, seen = self._time_rule(n, m, r, tokens, dtype, device, flags, float(args[7] or 0.0), disk,
                                             new_entries)
                measured[node.name] = seen
            modified |= self._rewrite(gm, node, args, rule)
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

    def _rewrite(self, gm, node, args, rule) -> bool:
        """Set the node's schedule argument, switching between lora_linear and lora_linear_xa
        as the rule needs."""
        keep = S.rule_keeps_xa(rule)
        want = torch.ops.lorafx.lora_linear_xa.default if keep else torch.ops.lorafx.lora_linear.default
        new_args = tuple(args) + (rule,)
        if node.target is want:
            if tuple(node.args) == new_args:
                return False
            node.args = new_args
            node.kwargs = {}
            return True
        g = gm.graph
        if keep:  # lora_linear -> lora_linear_xa + getitem(., 0)
            val = node.meta.get("val")
            with g.inserting_after(node):
                first = g.call_function(operator.getitem, (node, 0))
            node.replace_all_uses_with(first, delete_user_cb=lambda u: u is not first)
            node.target, node.args, node.kwargs = want, new_args, {}
            if isinstance(val, torch.Tensor):
                first.meta["val"] = val
                try:
                    tokens = val.numel() // val.shape[-1] if val.shape[-1] else 0
                    node.meta["val"] = (val, val.new_empty((args[3].meta["val"].shape[0], tokens)))
                except Exception:
                    node.meta["val"] = (val, None)
            for key in ("nn_module_stack", "stack_trace"):
                if key in node.meta:
                    first.meta[key] = node.meta[key]
        else:  # lora_linear_xa -> lora_linear: drop the getitem(., 0) users
            for user in list(node.users):
                if user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(node)
                    g.erase_node(user)
                else:
                    raise ValueError(f"SelectSchedule: {node.name}'s XA output is used by {user.name}; "
                                     "it cannot become a lora_linear without XA")
            val = node.meta.get("val")
            if isinstance(val, (tuple, list)):
                node.meta["val"] = val[0]
            node.target, node.args, node.kwargs = want, new_args, {}
        return True
