"""The compile context: what the passes of one compile see besides the graph.

``Pass.run(gm, ctx)`` receives a ``CompileContext`` explicitly (never through a
global).  It holds the example inputs the graph was captured with, an optional
``calibration`` iterable of batches (``lorafx.compile(..., calibration=...)``), the
seed, the hardware target and the compile settings a pass may depend on.

A decision a pass takes from data or from randomness (a rank allocation, a mask,
sampled hardware noise, a measured schedule, an init seed) goes through
``ctx.decide(key, compute)``: the first compile records it, and when the compiled
model captures a new call signature it runs the pipeline again with a context that
shares those records (``for_capture``), so the decision is replayed, never recomputed.

    >>> from lorafx.context import CompileContext
    >>> ctx = CompileContext(seed=0)
    >>> with ctx.scope("MyPass#0"):
    ...     ctx.decide("threshold", lambda: 0.5)
    0.5
    >>> ctx.decisions
    {'MyPass#0:threshold': 0.5}
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

import torch

__all__ = ["CompileContext"]

T = TypeVar("T")


@dataclass
class CompileContext:
    """What every pass of one compile sees: inputs, calibration data, seed, target, decisions.

    ``target`` is a ``lorafx.hw_targets.Target`` (typed loosely: targets sit above
    the spine).  ``training`` and ``backend`` are the compile's settings.  ``replay``
    is True while the pipeline runs again for a new call signature.  ``bind(args,
    kwargs)`` binds a batch to the model's keyword inputs (``lorafx.capture.bind_inputs``).
    """

    example_args: tuple = ()
    example_kwargs: Dict[str, Any] = field(default_factory=dict)
    calibration: Optional[Iterable[Any]] = None
    seed: Optional[int] = None
    target: Any = None
    backend: str = "eager"
    training: bool = True
    decisions: Dict[str, Any] = field(default_factory=dict)
    replay: bool = False
    bind: Optional[Callable[[tuple, Dict[str, Any]], Tuple[tuple, Dict[str, Any]]]] = field(default=None, repr=False)
    _scope: List[str] = field(default_factory=list, repr=False, compare=False)

    # -- data ---------------------------------------------------------------------------
    def batches(self) -> Iterator[Tuple[tuple, Dict[str, Any]]]:
        """The calibration batches as ``(args, kwargs)`` to call the captured graph with
        (``gm(*args, **kwargs)``), or the example inputs once when there is no calibration
        data.  A batch is a dict (keyword inputs), a tuple or list (positional inputs) or a
        single tensor.  Each call iterates ``calibration`` again, so pass a re-iterable (a
        list, a DataLoader) to passes that read it twice."""
        if self.calibration is None:
            yield tuple(self.example_args), dict(self.example_kwargs)
            return
        for batch in self.calibration:
            if isinstance(batch, dict):
                args, kwargs = (), dict(batch)
            elif isinstance(batch, (tuple, list)):
                args, kwargs = tuple(batch), {}
            elif isinstance(batch, torch.Tensor):
                args, kwargs = (batch,), {}
            else:
                raise TypeError(f"calibration batches must be dicts of inputs, tuples or tensors, "
                                f"got {type(batch).__name__}")
            yield self.bind(args, kwargs) if self.bind is not None else (args, kwargs)

    # -- decisions ----------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str):
        """Record the decisions taken inside under ``name`` (the pipeline scopes each pass)."""
        self._scope.append(name)
        try:
            yield self
        finally:
            self._scope.pop()

    def _key(self, key: str) -> str:
        return f"{'/'.join(self._scope)}:{key}"

    def decide(self, key: str, compute: Callable[[], T]) -> T:
        """The decision recorded under ``key`` for the running pass, or ``compute()``,
        recorded now.  Keys must name the same thing in every capture (a site, a node
        name), not something that depends on the call signature."""
        full = self._key(key)
        if full not in self.decisions:
            self.decisions[full] = compute()
        return self.decisions[full]

    def draw_seed(self) -> int:
        """The compile's seed, or, without one, a fresh seed from torch's global generator
        (record it: ``ctx.decide("seed", ctx.draw_seed)``)."""
        return self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())

    def recorded(self, key: str) -> bool:
        """Whether the running pass has a decision recorded under ``key``."""
        return self._key(key) in self.decisions

    # -- capture --------------------------------------------------------------------------
    def for_capture(self, args: tuple, kwargs: Dict[str, Any], *, training: Optional[bool] = None) -> "CompileContext":
        """The context for a new capture of the same model: its example inputs, the same
        calibration, seed and target, and the same decision records (shared, so the
        passes replay them)."""
        return replace(self, example_args=tuple(args), example_kwargs=dict(kwargs), replay=True, _scope=[],
                       training=self.training if training is None else training)

    def __deepcopy__(self, memo):
        # the calibration data and the target are read-only inputs: shared, not copied
        new = copy.copy(self)
        memo[id(self)] = new
        for name in ("example_args", "example_kwargs", "decisions"):
            setattr(new, name, copy.deepcopy(getattr(self, name), memo))
        new._scope = []
        return new
