"""RunLoRA schedules of ``lorafx.lora_linear``: names, dispatch rules, cost formulas.

A LoRA linear ``y = x Wᵀ + bias + s·(d(x) Aᵀ) Bᵀ`` (W (m, n), A (r, n), B (m, r),
b tokens, d = dropout) can be computed in several orders with different
FLOPs (RunLoRA, arXiv 2312.03415).  A *schedule* names one forward and one
backward order; ``lorafx/dialect/linear.py`` implements each of them as a kernel, and this
module gives their costs as sympy expressions that match the kernels' GEMMs
exactly, in ``torch.utils.flop_counter.FlopCounterMode``'s convention (2 FLOPs
per multiply-add; bias adds, scaling and other elementwise work count 0).

Forward
  ``f1``  y = x Wᵀ + s·(A d(x)ᵀ)ᵀ Bᵀ                      2bnm + 2bnr + 2brm
  ``f2``  W' = W + s·B A;  y = x W'ᵀ                       2nmr + 2bnm
          (needs d(x) = x: with active dropout f2 runs as f1)
Backward (z = s·Bᵀ dyᵀ (r, b); xa = A d(x)ᵀ (r, b); G = dyᵀ d(x) (m, n))
  ``b1``  dX = dy W + zᵀA;  dA = z d(x);  dB = s·(xa dy)ᵀ  2bnm + 6bnr + 4bmr
  ``b5``  dX = dy (W + s·B A);  dA, dB as b1               2bnm + 2nmr + 4bnr + 4bmr
          (with active dropout dX is not dy·W'; b5 runs as b1)
  ``b3``  dX as b1; G;  dA = s·Bᵀ G;  dB = s·(A Gᵀ)ᵀ        4bnm + 2bmr + 2bnr + 4nmr
  ``b4``  dX as b5; G;  dA, dB as b3                       4bnm + 6nmr
          (with active dropout b4 runs as b3)
The backward sums are for x, A and B needing gradients and W frozen; the
formulas below drop the terms a gradient that is not needed does not cost
(without dX, b1 = b5 and b3 = b4), and add 2bmn for dW = dyᵀx if W needs one.

Keeping XA.  A schedule name ending in ``k`` (``f1b1k``, ``f1b5k``, ``f2b1k``,
``f2b5k``) runs on the variant op ``lorafx.lora_linear_xa``, which also returns
xa = A d(x)ᵀ (r, b) as a second output and saves it for backward instead of
recomputing it (b1/b5 then cost 2bnr less; f2 costs 2bnr more, to form it).
b3/b4 never use xa, so they have no ``k`` form.

Dispatch rules.  One graph serves every batch: a node's schedule argument can be
a rule ``"f1b1|1024:f2b1|4096:f2b5"``, read "below 1024 tokens f1b1, from 1024
f2b1, from 4096 f2b5"; the kernel counts tokens as ``x.numel() // n`` at run time.
All pieces of a rule must agree on ``k``.

Bytes.  ``lora_bytes`` is a simple traffic model: each GEMM reads its two
operands (and the accumulator, for addmm) and writes its result once; forming
d(x) reads x and the mask and writes d(x); the bias gradient reads dy.  Sizes
are elements times ``itemsize`` (the mask is one byte per element).
"""
from __future__ import annotations

import functools
import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import sympy

__all__ = [
    "FORWARDS", "BACKWARDS", "SCHEDULES", "KEEP_SCHEDULES", "ALL_SCHEDULES", "DEFAULT_SCHEDULE",
    "DEFAULT_KEEP_XA_SCHEDULE", "Schedule", "Rule", "parse_schedule", "parse_rule", "format_rule", "resolve",
    "effective", "rule_keeps_xa", "piecewise", "step_totals", "Step", "cheapest_rule", "lora_steps",
    "lora_flops", "lora_bytes", "lora_cost", "crossover", "best_rule", "candidates", "min_lora_overhead",
    "b", "n", "m", "r",
]

FORWARDS = ("f1", "f2")
BACKWARDS = ("b1", "b3", "b4", "b5")
SCHEDULES = tuple(f + bw for f in FORWARDS for bw in BACKWARDS)
KEEP_SCHEDULES = tuple(f + bw + "k" for f in FORWARDS for bw in ("b1", "b5"))
ALL_SCHEDULES = SCHEDULES + KEEP_SCHEDULES
DEFAULT_SCHEDULE = "f1b1"
DEFAULT_KEEP_XA_SCHEDULE = "f1b1k"  # the default of the ops that keep XA (lora_linear_xa, lora_linear_folded)

# Symbols for symbolic use: tokens, in, out, rank.
b, n, m, r = sympy.symbols("b n m r", positive=True, integer=True)
# Crossovers are solved over the reals (an integer b has no solution at a fractional crossover).
_b_real = sympy.Symbol("b_real", positive=True)


@dataclass(frozen=True)
class Schedule:
    fwd: str  # "f1" | "f2"
    bwd: str  # "b1" | "b3" | "b4" | "b5"
    keep_xa: bool = False

    @property
    def name(self) -> str:
        return self.fwd + self.bwd + ("k" if self.keep_xa else "")

    def __str__(self) -> str:
        return self.name


@functools.lru_cache(maxsize=None)
def parse_schedule(name: str) -> Schedule:
    """``"f2b5"`` -> Schedule("f2", "b5"); ``"f1b1k"`` keeps XA."""
    s = name.strip()
    keep = s.endswith("k")
    core = s[:-1] if keep else s
    if len(core) != 4 or core[:2] not in FORWARDS or core[2:] not in BACKWARDS or (keep and core[2:] not in ("b1", "b5")):
        raise ValueError(f"unknown LoRA schedule {name!r}; choose one of {', '.join(ALL_SCHEDULES)} "
                         f"or a rule like 'f1b1|4096:f2b5'")
    return Schedule(core[:2], core[2:], keep)


@functools.lru_cache(maxsize=4096)
def _parse_rule(rule: str) -> "Rule":
    if not isinstance(rule, str) or not rule.strip():
        raise ValueError(f"LoRA schedule rule must be a non-empty string, got {rule!r}")
    parts = rule.split("|")
    pieces: List[Tuple[int, Schedule]] = [(0, parse_schedule(parts[0]))]
    for part in parts[1:]:
        thr, sep, name = part.partition(":")
        try:
            t = int(thr)
        except ValueError:
            t = -1
        if not sep or t <= pieces[-1][0]:
            raise ValueError(f"bad LoRA schedule rule {rule!r}: after the first schedule each piece is "
                             f"'TOKENS:SCHEDULE' with increasing TOKENS > 0, e.g. 'f1b1|4096:f2b5'")
        pieces.append((t, parse_schedule(name)))
    if len({s.keep_xa for _, s in pieces}) > 1:
        raise ValueError(f"bad LoRA schedule rule {rule!r}: all pieces must keep XA ('k') or none")
    return Rule(tuple(pieces))


@dataclass(frozen=True)
class Rule:
    """A parsed dispatch rule: ``(first token count, schedule)`` pieces, the first at 0.

    ``Rule.parse("f1b1|4096:f2b5")`` is parsed once (cached); ``str(rule)`` gives the
    text back (adjacent equal pieces merged), ``rule.resolve(tokens)`` the schedule
    that runs at a token count.

    >>> from lorafx.schedules import Rule
    >>> rule = Rule.parse("f1b1|4096:f2b5")
    >>> rule.resolve(100).name, rule.resolve(4096).name, rule.keep_xa, str(rule)
    ('f1b1', 'f2b5', False, 'f1b1|4096:f2b5')
    """

    pieces: Tuple[Tuple[int, Schedule], ...]

    @staticmethod
    def parse(rule: "str | Rule") -> "Rule":
        """The Rule for ``rule`` (a Rule is returned as is); ValueError if it does not parse."""
        return rule if isinstance(rule, Rule) else _parse_rule(rule)

    @property
    def keep_xa(self) -> bool:
        """Whether the rule's schedules keep XA (all pieces agree)."""
        return self.pieces[0][1].keep_xa

    @property
    def schedules(self) -> Tuple[Schedule, ...]:
        return tuple(s for _, s in self.pieces)

    def resolve(self, tokens: int) -> Schedule:
        """The schedule this rule picks for ``tokens`` tokens."""
        chosen = self.pieces[0][1]
        for t, s in self.pieces[1:]:
            if tokens >= t:
                chosen = s
        return chosen

    def map(self, fn: Callable[[Schedule], Optional[Schedule]]) -> Optional["Rule"]:
        """The rule with every piece's schedule replaced by ``fn(schedule)``; None if ``fn``
        returns None for a piece."""
        pieces = []
        for t, s in self.pieces:
            new = fn(s)
            if new is None:
                return None
            pieces.append((t, new))
        return Rule.parse(format_rule(pieces))

    def __str__(self) -> str:
        return format_rule(self.pieces)

    def __repr__(self) -> str:
        return f"Rule({str(self)!r})"


def parse_rule(rule: "str | Rule") -> Tuple[Tuple[int, Schedule], ...]:
    """``"f1b1|4096:f2b5"`` -> ((0, f1b1), (4096, f2b5)): (first token count, schedule) pieces."""
    return Rule.parse(rule).pieces


def format_rule(pieces: Sequence[Tuple[int, Any]]) -> str:
    """Inverse of ``parse_rule`` (merges adjacent equal schedules)."""
    out: List[Tuple[int, str]] = []
    for t, s in pieces:
        name = s.name if isinstance(s, Schedule) else str(s)
        if out and out[-1][1] == name:
            continue
        out.append((int(t), name))
    return "|".join([out[0][1]] + [f"{t}:{s}" for t, s in out[1:]])


def resolve(rule: "str | Rule", tokens: int) -> Schedule:
    """The schedule ``rule`` picks for ``tokens`` tokens."""
    return Rule.parse(rule).resolve(tokens)


def rule_keeps_xa(rule: "str | Rule") -> bool:
    return Rule.parse(rule).keep_xa


def effective(s: Schedule, dropout: bool) -> Schedule:
    """What actually runs: with active dropout f2 -> f1, b5 -> b1, b4 -> b3 (the merged
    weight W + sBA has no place for the mask on the adapter's input)."""
    if not dropout:
        return s
    fwd = "f1" if s.fwd == "f2" else s.fwd
    bwd = {"b5": "b1", "b4": "b3"}.get(s.bwd, s.bwd)
    return Schedule(fwd, bwd, s.keep_xa)


# -- the kernels' steps ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One step of a kernel: a GEMM (rows, inner, cols[, accumulate]) or an elementwise pass."""

    phase: str  # "fwd" | "bwd"
    what: str
    rows: Any = 0
    inner: Any = 0
    cols: Any = 0
    accumulate: bool = False  # addmm: also reads the rows x cols accumulator
    elementwise_bytes: Any = 0  # for non-GEMM steps: bytes read + written

    @property
    def flops(self):
        return 2 * self.rows * self.inner * self.cols

    def nbytes(self, itemsize):
        if self.elementwise_bytes:
            return self.elementwise_bytes
        elems = self.rows * self.inner + self.inner * self.cols + self.rows * self.cols
        if self.accumulate:
            elems += self.rows * self.cols
        return itemsize * elems


def lora_steps(schedule: Schedule | str, b, n, m, r, *, x_requires_grad: bool = True,
               w_requires_grad: bool = False, a_requires_grad: bool = True, b_requires_grad: bool = True,
               bias: bool = False, bias_requires_grad: Optional[bool] = None, dropout: bool = False,
               itemsize: int = 4) -> List[Step]:
    """The GEMMs (and the elementwise passes the byte model counts) of one schedule, in the
    order the kernels in ``lorafx/dialect/linear.py`` run them.  ``schedule`` is a single schedule."""
    s = parse_schedule(schedule) if isinstance(schedule, str) else schedule
    s = effective(s, dropout)
    if bias_requires_grad is None:
        bias_requires_grad = bias
    steps: List[Step] = []
    drop = Step if dropout else None

    def dropped(phase):  # d(x) = x * mask / (1 - p): read x and the mask, write d(x)
        if dropout:
            steps.append(Step(phase, "d(x)", elementwise_bytes=b * n * (2 * itemsize + 1)))

    # forward
    if s.fwd == "f1":
        steps.append(Step("fwd", "x·Wᵀ", b, n, m, accumulate=bias))
        dropped("fwd")
        steps.append(Step("fwd", "A·d(x)ᵀ", r, n, b))
        steps.append(Step("fwd", "+(xa)ᵀ·Bᵀ", b, r, m, accumulate=True))
    else:
        steps.append(Step("fwd", "W+s·B·A", m, r, n, accumulate=True))
        steps.append(Step("fwd", "x·W'ᵀ", b, n, m, accumulate=bias))
        if s.keep_xa:
            steps.append(Step("fwd", "A·xᵀ", r, n, b))
    # backward
    need_x, need_a, need_b = x_requires_grad, a_requires_grad, b_requires_grad
    gram = s.bwd in ("b3", "b4") and (need_a or need_b)
    merged_dx = need_x and s.bwd in ("b4", "b5")
    lowrank_dx = need_x and not merged_dx
    if lowrank_dx or (need_a and not gram):
        steps.append(Step("bwd", "z=s·Bᵀ·dyᵀ", r, m, b))
    if merged_dx:
        steps.append(Step("bwd", "W+s·B·A", m, r, n, accumulate=True))
        steps.append(Step("bwd", "dy·W'", b, m, n))
    elif lowrank_dx:
        steps.append(Step("bwd", "dy·W", b, m, n))
        if dropout:  # zᵀ·A, then masked and added elementwise
            steps.append(Step("bwd", "zᵀ·A", b, r, n))
            steps.append(Step("bwd", "dx+=d(zᵀA)", elementwise_bytes=b * n * (4 * itemsize + 1)))
        else:
            steps.append(Step("bwd", "+zᵀ·A", b, r, n, accumulate=True))
    if need_a or need_b:
        dropped("bwd")
        if gram:
            steps.append(Step("bwd", "G=dyᵀ·d(x)", m, b, n))
            if need_a:
                steps.append(Step("bwd", "dA=s·Bᵀ·G", r, m, n))
            if need_b:
                steps.append(Step("bwd", "dBᵀ=s·A·Gᵀ", r, n, m))
        else:
            if need_a:
                steps.append(Step("bwd", "dA=z·d(x)", r, b, n))
            if need_b:
                if not s.keep_xa:
                    steps.append(Step("bwd", "xa=A·d(x)ᵀ", r, n, b))
                steps.append(Step("bwd", "dBᵀ=s·xa·dy", r, b, m))
    if w_requires_grad:
        steps.append(Step("bwd", "dW=dyᵀ·x", m, b, n))
    if bias and bias_requires_grad:
        steps.append(Step("bwd", "dbias=Σdy", elementwise_bytes=b * m * itemsize + m * itemsize))
    del drop
    return steps


def piecewise(rule: "str | Rule", b, fn: Callable[[Schedule], Tuple[Any, ...]]) -> Tuple[Any, ...]:
    """``fn(schedule)`` (a tuple of amounts) for the schedule ``rule`` picks at ``b`` tokens:
    the value itself for one piece or a concrete ``b``, else ``sympy.Piecewise`` in ``b``."""
    rule = Rule.parse(rule)
    pieces = rule.pieces
    if len(pieces) == 1:
        return fn(pieces[0][1])
    if isinstance(b, (int,)) or (isinstance(b, sympy.Basic) and b.is_number):
        return fn(rule.resolve(int(b)))
    vals = [fn(s) for _, s in pieces]
    out = []
    for k in range(len(vals[0])):
        args = []
        for i, (t, _) in enumerate(pieces):
            cond = sympy.true if i == len(pieces) - 1 else sympy.Lt(b, pieces[i + 1][0])
            args.append((vals[i][k], cond))
        out.append(sympy.Piecewise(*args))
    return tuple(out)


def step_totals(rule: "str | Rule", b, steps_of: Callable[[Schedule], List[Step]],
                measure: Callable[[Step], Any]) -> Tuple[Any, Any]:
    """``(forward, backward)`` sums of ``measure(step)`` over ``steps_of(schedule)`` for the
    schedule ``rule`` picks at ``b`` tokens (``piecewise`` in b for a rule with pieces).  The
    FLOP and byte models of every scheduled kind are built on it."""
    def fn(s):
        steps = steps_of(s)
        fwd = sum((measure(st) for st in steps if st.phase == "fwd"), 0)
        bwd = sum((measure(st) for st in steps if st.phase == "bwd"), 0)
        return _simplify(fwd), _simplify(bwd)
    return piecewise(rule, b, fn)


def lora_flops(schedule: str, b, n, m, r, *, x_requires_grad: bool = True, w_requires_grad: bool = False,
               a_requires_grad: bool = True, b_requires_grad: bool = True, bias: bool = False,
               dropout: bool = False) -> Tuple[Any, Any]:
    """``(forward, backward)`` FLOPs of ``lora_linear`` under ``schedule`` (a schedule name or a
    dispatch rule) for b tokens, n in / m out features and rank r -- ints or sympy expressions.

    Exactly what ``FlopCounterMode`` counts for the op's forward (its registered formula)
    and for its backward (the aten GEMMs the backward kernel runs).  A rule with a symbolic
    ``b`` gives ``sympy.Piecewise`` expressions.  ``bias`` does not change FLOPs (bias adds
    count 0); ``dropout`` (an active mask) makes f2/b5/b4 run as f1/b1/b3.

    >>> from lorafx.schedules import lora_flops, b, n, m, r  # b, n, m, r: sympy symbols
    >>> lora_flops("f1b1", b, n, m, r)
    (2*b*m*n + 2*b*m*r + 2*b*n*r, 2*b*m*n + 4*b*m*r + 6*b*n*r)
    """
    return step_totals(schedule, b, lambda s: lora_steps(
        s, b, n, m, r, x_requires_grad=x_requires_grad, w_requires_grad=w_requires_grad,
        a_requires_grad=a_requires_grad, b_requires_grad=b_requires_grad, bias=bias, dropout=dropout),
        lambda st: st.flops)


def lora_bytes(schedule: str, b, n, m, r, *, itemsize: int = 4, x_requires_grad: bool = True,
               w_requires_grad: bool = False, a_requires_grad: bool = True, b_requires_grad: bool = True,
               bias: bool = False, dropout: bool = False) -> Tuple[Any, Any]:
    """``(forward, backward)`` bytes moved by ``schedule`` under the module's traffic model."""
    return step_totals(schedule, b, lambda s: lora_steps(
        s, b, n, m, r, x_requires_grad=x_requires_grad, w_requires_grad=w_requires_grad,
        a_requires_grad=a_requires_grad, b_requires_grad=b_requires_grad, bias=bias, dropout=dropout,
        itemsize=itemsize), lambda st: st.nbytes(itemsize))


def _simplify(e):
    return sympy.expand(e) if isinstance(e, sympy.Basic) else e


def lora_cost(schedule: str, b, n, m, r, *, flop_weight: float = 1.0, byte_weight: float = 0.0,
              training: bool = True, **flags):
    """Total cost ``flop_weight * FLOPs + byte_weight * bytes`` (forward + backward when
    ``training``).  With ``byte_weight`` = FLOP/s / (byte/s) -- the machine balance -- it is
    time in FLOP units (roofline-style sum, no overlap)."""
    itemsize = flags.pop("itemsize", 4)
    f, bw = lora_flops(schedule, b, n, m, r, **flags)
    total = f + bw if training else f
    cost = flop_weight * total if flop_weight != 1.0 else total
    if byte_weight:
        fb, bb = lora_bytes(schedule, b, n, m, r, itemsize=itemsize, **flags)
        cost = cost + byte_weight * (fb + bb if training else fb)
    return cost


def crossover(s1: str, s2: str, n_, m_, r_, *, training: bool = True, **kw):
    """Token count where ``s1`` and ``s2`` cost the same (sympy; None if never).

    >>> from lorafx.schedules import crossover, n, m, r
    >>> crossover("f1b1", "f2b1", n, m, r)
    m*n/(m + n)
    >>> crossover("f1b1", "f1b5", n, m, r)
    m
    """
    e = lora_cost(s1, _b_real, n_, m_, r_, training=training, **kw) - lora_cost(s2, _b_real, n_, m_, r_,
                                                                                training=training, **kw)
    sols = [s for s in sympy.solve(sympy.Eq(e, 0), _b_real)]
    if not sols:
        return None
    return sympy.simplify(sols[0])


def candidates(*, dropout: bool = False, keep_xa: bool = False) -> Tuple[str, ...]:
    """The schedules SelectSchedule chooses among: with active dropout only f1 and b1/b3
    (f2/b5/b4 would run as those anyway); ``keep_xa`` selects the ``k`` forms."""
    if keep_xa:
        names = KEEP_SCHEDULES
    else:
        names = SCHEDULES
    if dropout:
        names = tuple(s for s in names if effective(parse_schedule(s), True) == parse_schedule(s))
    return names


def best_rule(n_: int, m_: int, r_: int, *, names: Optional[Iterable[str]] = None,
              training: bool = True, max_tokens: Optional[int] = None, **kw) -> str:
    """The cheapest schedule as a function of the token count, as a dispatch rule.

    Every cost is affine in the token count b, so the cheapest schedule is the lower
    envelope of lines; its breakpoints are the crossovers solved with sympy.  At a tie the
    schedule that is cheapest just below keeps the range (a switch needs a strict gain).
    """
    names = tuple(names) if names is not None else candidates()
    costs = {s: lora_cost(s, b, n_, m_, r_, training=training, **kw) for s in names}
    return str(cheapest_rule(costs, max_tokens=max_tokens))


def cheapest_rule(costs: Dict[str, Any], *, max_tokens: Optional[int] = None) -> Rule:
    """The rule that runs, at every token count, the schedule of least cost: ``costs`` maps
    schedule names, in order of preference at a tie, to sympy expressions in ``b`` (the
    token count), affine for the RunLoRA kernels.  The breakpoints are the crossovers solved
    with sympy; at a tie the schedule that is cheapest just below keeps the range (a switch
    needs a strict gain)."""
    names = tuple(costs)
    costs = {s: sympy.expand(sympy.sympify(c)) for s, c in costs.items()}
    points = set()
    for s1, s2 in itertools.combinations(names, 2):
        diff = costs[s1] - costs[s2]
        if diff == 0:
            continue
        for root in sympy.solve(sympy.Eq(diff.subs(b, _b_real), 0), _b_real):
            if root.is_real and root > 0:
                points.add(math.floor(float(root)) + 1)
    bounds = sorted(p for p in points if max_tokens is None or p <= max_tokens)
    order = {s: i for i, s in enumerate(names)}

    def best_at(t, prev=None):
        vals = {s: float(costs[s].subs(b, t)) for s in names}
        lo = min(vals.values())
        tied = [s for s in names if vals[s] <= lo * (1 + 1e-12)]
        if prev in tied:
            return prev
        return min(tied, key=order.get)

    pieces: List[Tuple[int, str]] = []
    cur = best_at(1)
    pieces.append((0, cur))
    for t in bounds:
        nxt = best_at(t, cur)
        if nxt != cur:
            pieces.append((t, nxt))
            cur = nxt
    return Rule.parse(format_rule(pieces))


# -- measuring ---------------------------------------------------------------------------------------

def time_schedules(names: Sequence[str], tokens: int, n_: int, m_: int, r_: int, *, dtype=None,
                   device="cpu", repeats: int = 5, x_requires_grad: bool = True, w_requires_grad: bool = False,
                   bias: bool = False, dropout: float = 0.0, seed: int = 0, clock: str = "wall", stat: str = "median") -> Dict[str, Any]:
    """Median seconds of one forward + backward of ``lora_linear`` under each schedule.

    ``clock="wall"`` (perf_counter) or ``"cpu"`` (process CPU time: with one thread a clean
    work measure on a busy machine, since time spent descheduled does not count).
    ``stat``: "median" (default) or "min" of the rounds, or "raw" for the lists of times.

    Random inputs of the given shape; A and B (and x, W, bias per the flags) need
    gradients.  One untimed warm-up call per schedule, then ``repeats`` rounds, each
    running every schedule once in a fresh random order, so machine noise hits all
    schedules alike and no schedule always follows the same one (what the previous call
    freed -- cache contents, allocator state -- changes the next call's time).  A name may carry a label after ``#`` (``"f1b1#control"``) to
    time one schedule twice, e.g. to measure the noise (an A/A comparison).
    """
    import statistics
    import time

    import torch  # (importing lorafx registers the lorafx ops)

    dtype = dtype or torch.float32
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s, grad=False: (torch.randn(*s, generator=gen) * (1.0 / math.sqrt(s[-1]))).to(
        device=device, dtype=dtype).requires_grad_(grad)
    x = mk(tokens, n_, grad=x_requires_grad)
    W = mk(m_, n_, grad=w_requires_grad)
    A, B = mk(r_, n_, grad=True), mk(m_, r_, grad=True)
    bv = mk(m_, grad=bias) if bias else None
    mask = (torch.rand(tokens, n_, generator=gen) > dropout).to(device) if dropout > 0 else None
    gy = mk(tokens, m_)
    inputs = [t for t in (x, W, A, B, bv) if t is not None and t.requires_grad]

    def run(label):
        name = label.split("#")[0]  # "f1b1#control": the same schedule timed under a second label
        keep = Rule.parse(name).keep_xa
        f = torch.ops.lorafx.lora_linear_xa if keep else torch.ops.lorafx.lora_linear
        y = f(x, W, bv, A, B, 0.5, mask, dropout, name)
        if keep:
            y = y[0]
        torch.autograd.grad(y, inputs, gy)

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    names = list(names)
    now = time.process_time if clock == "cpu" else time.perf_counter
    for name in names:
        run(name)
    times: Dict[str, List[float]] = {s: [] for s in names}
    order_rng = random.Random(seed)
    for i in range(repeats):
        order = list(names)
        order_rng.shuffle(order)
        for name in order:
            sync()
            t0 = now()
            run(name)
            sync()
            times[name].append(now() - t0)
    if stat == "raw":
        return times
    agg = statistics.median if stat == "median" else min
    return {s: agg(v) for s, v in times.items()}


def rule_from_measurements(winners: Sequence[Tuple[int, str]]) -> str:
    """A dispatch rule from the fastest schedule measured at each token count: switch at
    the geometric mean of two neighbouring measured counts whose winners differ."""
    winners = sorted(winners)
    pieces: List[Tuple[int, str]] = [(0, winners[0][1])]
    for (t0, _), (t1, s1) in zip(winners, winners[1:]):
        if s1 != pieces[-1][1]:
            pieces.append((max(int(round(math.sqrt(t0 * t1))), pieces[-1][0] + 1), s1))
    return format_rule(pieces)


# -- the whole-model bound ---------------------------------------------------------------------------

def min_lora_overhead(r_: int = 8, *, hidden: int = 512, intermediate: int = 1376, layers: int = 4,
                      batch: int = 4, seq: int = 256, vocab: int = 8000,
                      names: Sequence[str] = ALL_SCHEDULES) -> Dict[str, Any]:
    """The least FLOP overhead of LoRA (on q, k, v, o, gate, up, down) over the frozen
    floor of a LLaMA-shaped model, from the formulas (defaults: the DESIGN benchmark).

    floor: the frozen model's GEMM FLOPs, forward + dX, no dW; layer 0's q/k/v need no
    dX (their input is the embedding).  ``linear_floor`` counts the 7 projections only;
    ``floor`` adds attention (SDPA forward + backward as FlopCounterMode's formulas count
    it, dense) and the LM head (forward + the dX it feeds).

    ``bound``: the DESIGN's lower bound -- the adapter gradients alone need 4bmr + 2bnr
    per linear (z = dy·B, dA = zᵀ·d(x), dB = xaᵀ·dy, with xa from the forward), taking
    the forward's adapter term and the adapter's share of dX as free.
    ``best``: per linear, the cheapest of ``names`` (forward + backward, as the kernels
    run them) minus the base linear's forward + dX -- what the implemented schedules
    achieve at this token count.

    >>> from lorafx.schedules import min_lora_overhead
    >>> d = min_lora_overhead(8); round(d["bound_over_linear_floor"], 3), round(d["best_over_floor"], 3)
    (0.02, 0.022)
    """
    t = batch * seq
    sites = [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]
    linear_floor = bound = best = 0
    choice: Dict[str, str] = {}
    for layer in range(layers):
        for k, (n_, m_) in enumerate(sites):
            needs_dx = not (layer == 0 and k < 3)
            base = 2 * t * n_ * m_ * (2 if needs_dx else 1)
            linear_floor += base
            bound += 4 * t * m_ * r_ + 2 * t * n_ * r_
            costs = {s: sum(lora_flops(s, t, n_, m_, r_, x_requires_grad=needs_dx)) for s in names}
            s_best = min(costs, key=costs.get)
            choice[f"{n_}x{m_}{'' if needs_dx else ' (no dX)'}"] = s_best
            best += costs[s_best] - base
    head_dim = hidden  # all heads together
    attention = layers * (4 * batch * seq * seq * head_dim + 10 * batch * seq * seq * head_dim)
    lm_head = 2 * 2 * t * hidden * vocab
    floor = linear_floor + attention + lm_head
    return {"r": r_, "tokens": t, "linear_floor_flops": linear_floor, "floor_flops": floor,
            "bound_flops": bound, "best_flops": best, "best_schedules": choice,
            "bound_over_linear_floor": bound / linear_floor, "bound_over_floor": bound / floor,
            "best_over_linear_floor": best / linear_floor, "best_over_floor": best / floor}
