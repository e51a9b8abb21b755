"""The parts of a composite target: a base whose unset figures come from a published preset.

A ``Part`` is a frozen-dataclass target (``rram``, ``sram``, ``host``) that is not compiled
for on its own (``compilable = False``): the ``cim`` target composes them.  Every figure
left ``None`` is filled from the preset named by ``preset`` in the part's ``table``
(``lorafx.hw_targets.chips``), which also gives the ``source`` the figures come from.
"""
from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, fields
from typing import ClassVar, Dict, Tuple

from .base import Target

__all__ = ["Part", "check_bits", "check_count", "check_figure"]


def check_count(name: str, value, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")


def check_bits(name: str, value, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= 32:
        raise ValueError(f"{owner}: {name} must be an int from 1 to 32 (bits), got {value!r}")


def check_figure(name: str, value, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class Part(Target):
    compilable: ClassVar[bool] = False
    table: ClassVar[Dict[str, dict]] = {}
    from_table: ClassVar[Tuple[str, ...]] = ()  # the fields a preset fills when left None

    preset: str = ""

    def __post_init__(self):
        if self.preset not in self.table:
            close = difflib.get_close_matches(str(self.preset), list(self.table), n=1)
            raise ValueError(f"{self.name}: unknown preset {self.preset!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; presets: {sorted(self.table)}")
        figures = self.table[self.preset]
        names = {f.name for f in fields(self)}
        for key in self.from_table:
            if key in names and getattr(self, key) is None:
                if key not in figures:
                    raise ValueError(f"{self.name}: preset {self.preset!r} has no {key}; give {key}= yourself")
                object.__setattr__(self, key, figures[key])
        self.validate()

    def validate(self) -> None:
        """Check the figures; raise ValueError naming the bad one."""

    @property
    def source(self) -> str:
        """Where the preset's figures come from."""
        return self.table[self.preset].get("source", "")

    def node_cost(self, flops: float, nbytes: float, tiles: int = 0) -> Tuple[float, float]:
        """(joules, seconds) of a node doing ``flops`` FLOPs and moving ``nbytes`` bytes per token."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.preset}; source: {self.source}"
