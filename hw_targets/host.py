"""The digital ``host`` (norms, softmax, attention scores, embeddings) and the digital baseline.

Cost of a node (``node_cost``): energy = FLOPs x ``joules_per_flop``; latency = the larger of
FLOPs / ``flops_per_second`` and bytes / ``bytes_per_second`` (a roofline: one token at a
time is mostly bound by memory traffic).  ``DigitalBaseline`` is the same model for a whole
graph run on a GPU-like processor (``chips.DIGITAL_BASELINES``), the yardstick ``report()``
sets the chip against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Tuple

from . import chips
from .parts import Part, check_figure

__all__ = ["HostTarget", "DigitalBaseline"]


@dataclass(frozen=True)
class HostTarget(Part):
    name: ClassVar[str] = "host"
    description: ClassVar[str] = ("a digital processor for what the crossbars do not compute: norms, softmax, "
                                  "attention scores, embeddings (a part of the 'cim' target)")

    preset: str = chips.DEFAULT_CHIP["host"]
    joules_per_flop: float = None
    flops_per_second: float = None
    bytes_per_second: float = None

    table: ClassVar[dict] = chips.HOST_PRESETS
    from_table: ClassVar[Tuple[str, ...]] = ("joules_per_flop", "flops_per_second", "bytes_per_second")

    def validate(self) -> None:
        for name in self.from_table:
            check_figure(name, getattr(self, name), self.name)

    def supports(self, node) -> bool:
        return True

    def node_cost(self, flops: float, nbytes: float, tiles: int = 0) -> Tuple[float, float]:
        return flops * self.joules_per_flop, max(flops / self.flops_per_second, nbytes / self.bytes_per_second)

    def describe(self) -> str:
        return (f"{self.preset}: {self.flops_per_second / 1e12:.3g} TFLOP/s, {self.bytes_per_second / 1e9:.3g} GB/s, "
                f"{self.joules_per_flop * 1e12:.3g} pJ/FLOP; source: {self.source}")


@dataclass(frozen=True)
class DigitalBaseline(HostTarget):
    name: ClassVar[str] = "digital"
    description: ClassVar[str] = "the whole graph on a GPU-like digital processor (report()'s yardstick)"

    preset: str = chips.DEFAULT_CHIP["baseline"]
    table: ClassVar[dict] = chips.DIGITAL_BASELINES
