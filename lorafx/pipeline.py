"""The pass protocol and the pipeline that runs passes in a checked order.

A pass is a frozen dataclass whose fields are its options (validated once in
``validate``).  It declares the graph properties it ``requires``, the ones it
``provides`` and the ones it ``invalidates`` (a rewrite after ``AnnotateCost`` makes
the ``"cost"`` records stale: they are dropped), and the ``lorafx.compile`` options
it takes (``options``, see ``lorafx.options.Option``; ``from_options`` builds the
pass from them).  Calling it on a GraphModule, with a ``CompileContext``, rewrites the
graph in place and returns a ``PassResult(graph_module, modified, info)``;
``summary(info)`` gives the pass's own lines for ``report()`` and the CLI.

A ``Pipeline`` is itself a pass.  Built with a wrong order it raises
``PipelineOrderError`` naming the pass and the missing property; it never
reorders.  After every pass it lints the graph and calls its instruments
(print, diff, time, dump).  A failing pass raises ``PassError`` naming the pass
and the passes that ran before it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx

from .context import CompileContext
from .meta import CAPTURED, forget_records, graph_record
from .options import Option

__all__ = [
    "Pass", "PassResult", "Pipeline", "PassError", "PipelineOrderError", "Instrument",
    "PassReport", "lint_graph", "add_graph_check", "provided", "CAPTURED", "CompileContext",
]


def provided(gm: torch.fx.GraphModule) -> FrozenSet[str]:
    """The properties that passes run so far have provided on ``gm``."""
    return frozenset(graph_record(gm).provided)


class PassError(RuntimeError):
    """A pass failed; the message names it and the passes that ran before it."""


_ERROR_TYPES: Dict[type, type] = {}


def pass_error(cause: BaseException, message: str) -> PassError:
    """A PassError that is also an instance of ``cause``'s type, so that
    ``except ValueError`` still catches a pass's bad-option error."""
    kind = type(cause)
    if kind not in _ERROR_TYPES:
        try:
            _ERROR_TYPES[kind] = type("PassError", (PassError, kind), {"__module__": __name__})
        except TypeError:  # incompatible exception layouts
            _ERROR_TYPES[kind] = PassError
    try:
        return _ERROR_TYPES[kind](message)
    except Exception:
        return PassError(message)


class PipelineOrderError(ValueError):
    """A pipeline's passes are in an order that leaves a requirement unmet."""


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    info: Dict[str, Any] = field(default_factory=dict)


_TAKES_CONTEXT: Dict[type, bool] = {}


def _takes_context(cls: type) -> bool:
    """Whether ``cls.run`` takes the context: ``run(self, gm, ctx)``, or ``run(self, gm)``
    for a pass that needs none."""
    if cls not in _TAKES_CONTEXT:
        params = list(inspect.signature(cls.run).parameters.values())
        _TAKES_CONTEXT[cls] = len(params) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params)
    return _TAKES_CONTEXT[cls]


def _scalar_note(info: Mapping[str, Any]) -> str:
    """``k=v`` for the short scalar entries of a pass's info."""
    return ", ".join(f"{k}={v}" if len(str(v)) <= 90 else f"{k}={str(v)[:87]}..."
                     for k, v in info.items() if not isinstance(v, (dict, list, tuple, set)))


@dataclass(frozen=True)
class Pass:
    """Base class: subclass as a frozen dataclass and implement ``run(gm, ctx)``.

    Class attributes (assign them without a type annotation, so they stay off the
    dataclass fields): ``requires``, ``provides`` and ``invalidates`` (graph properties)
    and ``options`` (the compile options the pass declares).
    """

    requires: ClassVar[FrozenSet[str]] = frozenset({CAPTURED})
    provides: ClassVar[FrozenSet[str]] = frozenset()
    invalidates: ClassVar[FrozenSet[str]] = frozenset()
    options: ClassVar[Tuple[Option, ...]] = ()

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check the options; raise ValueError naming the bad field and the fix."""

    @property
    def name(self) -> str:
        return type(self).__name__

    @classmethod
    def from_options(cls, values: Mapping[str, Any], ctx: CompileContext) -> Optional["Pass"]:
        """This pass configured by the compile options in ``values`` (the declared ones
        given; the others keep the field defaults), or None when an ``enables`` option
        switches it off."""
        kwargs = {}
        for opt in cls.options:
            if opt.enables:
                if not values.get(opt.name, opt.default):
                    return None
            elif opt.name in values:
                kwargs[opt.target_field] = values[opt.name]
        return cls(**kwargs)

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"{self.name} does not implement run()")

    def summary(self, info: Mapping[str, Any]) -> List[str]:
        """Lines for ``report()`` and the CLI: the first goes in the report table's info
        column, any others below the table.  Default: the short scalar entries of ``info``."""
        return [_scalar_note(info)]

    def __call__(self, gm: torch.fx.GraphModule, ctx: Optional[CompileContext] = None) -> PassResult:
        ctx = ctx if ctx is not None else CompileContext()
        have = provided(gm)
        missing = self.requires - have
        if missing:
            raise PassError(f"{self.name} requires {sorted(missing)}, which no pass run on this graph provided")
        with (ctx.scope(self.name) if not ctx._scope else contextlib.nullcontext()):
            result = self.run(gm, ctx) if _takes_context(type(self)) else self.run(gm)
        out = result.graph_module
        if result.modified:
            out.recompile()
        stale = (self.invalidates - self.provides) & have
        if stale:
            for node in out.graph.nodes:
                forget_records(node, stale)
        record = graph_record(out)
        record.forget(self.invalidates - self.provides)
        record.provided = (have - self.invalidates) | self.provides
        return result


@dataclass
class PassReport:
    """What one pass did: node counts, time, the pass's info and its summary lines."""

    name: str
    nodes_before: int
    nodes_after: int
    seconds: float
    modified: bool
    info: Dict[str, Any]
    summary: List[str] = field(default_factory=list)
    provides: FrozenSet[str] = frozenset()

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["provides"] = sorted(self.provides)
        return out


class Instrument:
    """Hooks called around every pass of a pipeline (all optional)."""

    def before_pipeline(self, gm: torch.fx.GraphModule) -> None: ...

    def before_pass(self, p: Pass, gm: torch.fx.GraphModule) -> None: ...

    def after_pass(self, p: Pass, result: PassResult, report: PassReport) -> None: ...

    def after_pipeline(self, gm: torch.fx.GraphModule, reports: List[PassReport]) -> None: ...


_GRAPH_CHECKS: List[Callable[[torch.fx.Graph], Optional[str]]] = []


def add_graph_check(check: Callable[[torch.fx.Graph], Optional[str]]) -> None:
    """Add an invariant to ``lint_graph``: ``check(graph)`` returns a problem or None.
    Layers above the spine (the LoRA dialect) add theirs here."""
    if check not in _GRAPH_CHECKS:
        _GRAPH_CHECKS.append(check)


def lint_graph(gm: torch.fx.GraphModule) -> None:
    """fx's own lint plus lorafx invariants: every get_attr names an existing attribute,
    and the added checks hold (the dialect's: every LoRA op node carries its LoraRecord)."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                if not hasattr(obj, part):
                    raise PassError(f"node {node.name} reads missing attribute {node.target!r}")
                obj = getattr(obj, part)
    for check in _GRAPH_CHECKS:
        problem = check(gm.graph)
        if problem:
            raise PassError(problem)


def _count(gm: torch.fx.GraphModule) -> int:
    return len(gm.graph.nodes)


class Pipeline(Pass):
    """An ordered sequence of passes, itself a pass.

    >>> import torch, lorafx
    >>> from lorafx.passes import InsertLoRA, SetTrainingMode
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> gm = lorafx.capture(model, (torch.randn(2, 8),))
    >>> result = lorafx.Pipeline([InsertLoRA(r=2), SetTrainingMode(train=False)])(gm)
    >>> [(report.name, report.modified) for report in result.info["reports"]]
    [('InsertLoRA', True), ('SetTrainingMode', False)]
    """

    def __init__(self, passes: Sequence[Pass], instruments: Iterable[Instrument] = (),
                 initial: Iterable[str] = (CAPTURED,)):
        self.passes = tuple(passes)
        self.instruments = tuple(instruments)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"Pipeline items must be lorafx passes, got {type(p).__name__}")
        self._check_order(frozenset(initial))

    @property
    def requires(self) -> FrozenSet[str]:  # type: ignore[override]
        return frozenset({CAPTURED})

    def _effect(self) -> Tuple[FrozenSet[str], FrozenSet[str]]:
        """(provided, invalidated) by running the passes in order on any graph."""
        gained: FrozenSet[str] = frozenset()
        lost: FrozenSet[str] = frozenset()
        for p in self.passes:
            gained = (gained - p.invalidates) | p.provides
            lost = (lost | p.invalidates) - p.provides
        return gained, lost

    @property
    def provides(self) -> FrozenSet[str]:  # type: ignore[override]
        return self._effect()[0]

    @property
    def invalidates(self) -> FrozenSet[str]:  # type: ignore[override]
        return self._effect()[1]

    @property
    def options(self) -> Tuple[Option, ...]:  # type: ignore[override]
        return tuple(o for p in self.passes for o in p.options)

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(repr(p) for p in self.passes)}])"

    def _check_order(self, have: FrozenSet[str]) -> None:
        for i, p in enumerate(self.passes):
            missing = p.requires - have
            if missing:
                later = [q.name for q in self.passes[i + 1:] if q.provides & missing]
                before = ", ".join(q.name for q in self.passes[:i]) or "nothing"
                lost = [q.name for q in self.passes[:i] if q.invalidates & missing]
                fix = (f"; move {later[0]} before {p.name}" if later else
                       f"; {lost[-1]} invalidates it: run a pass that provides it again after {lost[-1]}" if lost else
                       "; add a pass that provides it")
                raise PipelineOrderError(
                    f"{p.name} (position {i}) requires {sorted(missing)}, not provided by the passes "
                    f"before it ({before}){fix}"
                )
            have = (have - p.invalidates) | p.provides

    def _scopes(self) -> List[str]:
        """Each pass's decision scope: its name and how many passes of that name precede it."""
        seen: Dict[str, int] = {}
        out = []
        for p in self.passes:
            out.append(f"{p.name}#{seen.get(p.name, 0)}")
            seen[p.name] = seen.get(p.name, 0) + 1
        return out

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        reports: List[PassReport] = []
        for inst in self.instruments:
            inst.before_pipeline(gm)
        modified = False
        for p, scope in zip(self.passes, self._scopes()):
            for inst in self.instruments:
                inst.before_pass(p, gm)
            before = _count(gm)
            start = time.perf_counter()
            try:
                with ctx.scope(scope):
                    result = p(gm, ctx)
                lint_graph(result.graph_module)
            except Exception as e:
                history = ", ".join(r.name for r in reports) or "none"
                raise pass_error(e, f"pass {p.name} failed (passes run before it: {history}): "
                                    f"{type(e).__name__}: {e}") from e
            seconds = time.perf_counter() - start
            gm = result.graph_module
            modified |= result.modified
            info = dict(result.info)
            report = PassReport(p.name, before, _count(gm), seconds, result.modified, info,
                                list(p.summary(info)), frozenset(p.provides))
            reports.append(report)
            for inst in self.instruments:
                inst.after_pass(p, result, report)
        for inst in self.instruments:
            inst.after_pipeline(gm, reports)
        return PassResult(gm, modified, {"reports": reports})

    def summary(self, info: Mapping[str, Any]) -> List[str]:
        return [f"{len(info.get('reports', []))} passes"]

    def __call__(self, gm: torch.fx.GraphModule, ctx: Optional[CompileContext] = None) -> PassResult:
        return self.run(gm, ctx if ctx is not None else CompileContext())
