"""The pass protocol and the pipeline that runs passes in a checked order.

A pass is a frozen dataclass whose fields are its options (validated once in
``validate``).  It declares the graph properties it ``requires`` and the ones it
``provides``; calling it on a GraphModule rewrites the graph in place and returns
a ``PassResult(graph_module, modified, info)``.

A ``Pipeline`` is itself a pass.  Built with a wrong order it raises
``PipelineOrderError`` naming the pass and the missing property; it never
reorders.  After every pass it lints the graph and calls its instruments
(print, diff, time, dump).  A failing pass raises ``PassError`` naming the pass
and the passes that ran before it.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, FrozenSet, Iterable, List, Sequence

import torch
import torch.fx

from .meta import LoraRecord, get_record

__all__ = [
    "Pass", "PassResult", "Pipeline", "PassError", "PipelineOrderError", "Instrument",
    "PassReport", "lint_graph", "provided", "CAPTURED",
]

CAPTURED = "captured"
_PROVIDED_KEY = "lorafx_provided"


def provided(gm: torch.fx.GraphModule) -> FrozenSet[str]:
    """The properties that passes run so far have provided on ``gm``."""
    return frozenset(gm.meta.get(_PROVIDED_KEY, {CAPTURED}))


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


@dataclass(frozen=True)
class Pass:
    """Base class: subclass as a frozen dataclass and implement ``run``."""

    requires: ClassVar[FrozenSet[str]] = frozenset({CAPTURED})
    provides: ClassVar[FrozenSet[str]] = frozenset()

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check the options; raise ValueError naming the bad field and the fix."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def run(self, gm: torch.fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"{self.name} does not implement run()")

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        missing = self.requires - provided(gm)
        if missing:
            raise PassError(f"{self.name} requires {sorted(missing)}, which no pass run on this graph provided")
        result = self.run(gm)
        if result.modified:
            result.graph_module.recompile()
        result.graph_module.meta[_PROVIDED_KEY] = set(provided(gm) | self.provides)
        return result


@dataclass
class PassReport:
    """What one pass did: node counts, time and the pass's own info."""

    name: str
    nodes_before: int
    nodes_after: int
    seconds: float
    modified: bool
    info: Dict[str, Any]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Instrument:
    """Hooks called around every pass of a pipeline (all optional)."""

    def before_pipeline(self, gm: torch.fx.GraphModule) -> None: ...

    def before_pass(self, p: Pass, gm: torch.fx.GraphModule) -> None: ...

    def after_pass(self, p: Pass, result: PassResult, report: PassReport) -> None: ...

    def after_pipeline(self, gm: torch.fx.GraphModule, reports: List[PassReport]) -> None: ...


def lint_graph(gm: torch.fx.GraphModule) -> None:
    """fx's own lint plus lorafx invariants: adapter ops carry a LoraRecord and
    every get_attr names an existing attribute."""
    gm.graph.lint()
    lora_op = torch.ops.lorafx.lora_linear.default
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                if not hasattr(obj, part):
                    raise PassError(f"node {node.name} reads missing attribute {node.target!r}")
                obj = getattr(obj, part)
        elif node.op == "call_function" and node.target is lora_op and get_record(node, LoraRecord) is None:
            raise PassError(f"lora_linear node {node.name} has no LoraRecord in node.meta['lorafx']")


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

    @property
    def provides(self) -> FrozenSet[str]:  # type: ignore[override]
        out: set = set()
        for p in self.passes:
            out |= p.provides
        return frozenset(out)

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(repr(p) for p in self.passes)}])"

    def _check_order(self, have: FrozenSet[str]) -> None:
        for i, p in enumerate(self.passes):
            missing = p.requires - have
            if missing:
                later = [q.name for q in self.passes[i + 1:] if q.provides & missing]
                before = ", ".join(q.name for q in self.passes[:i]) or "nothing"
                fix = f"; move {later[0]} before {p.name}" if later else "; add a pass that provides it"
                raise PipelineOrderError(
                    f"{p.name} (position {i}) requires {sorted(missing)}, not provided by the passes "
                    f"before it ({before}){fix}"
                )
            have = have | p.provides

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        reports: List[PassReport] = []
        for inst in self.instruments:
            inst.before_pipeline(gm)
        modified = False
        for p in self.passes:
            for inst in self.instruments:
                inst.before_pass(p, gm)
            before = _count(gm)
            start = time.perf_counter()
            try:
                result = p(gm)
                lint_graph(result.graph_module)
            except Exception as e:
                history = ", ".join(r.name for r in reports) or "none"
                raise pass_error(e, f"pass {p.name} failed (passes run before it: {history}): "
                                    f"{type(e).__name__}: {e}") from e
            seconds = time.perf_counter() - start
            gm = result.graph_module
            modified |= result.modified
            report = PassReport(p.name, before, _count(gm), seconds, result.modified, dict(result.info))
            reports.append(report)
            for inst in self.instruments:
                inst.after_pass(p, result, report)
        for inst in self.instruments:
            inst.after_pipeline(gm, reports)
        return PassResult(gm, modified, {"reports": reports})

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        result = self.run(gm)
        return result
