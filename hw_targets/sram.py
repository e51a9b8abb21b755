"""The ``sram`` target: exact digital SRAM holding the LoRA adapters (a part of the ``cim`` target).

The adapters are stored at ``adapter_bits`` per parameter and must fit ``capacity_kib``
(None: no limit).  Cost of a node (``node_cost``): energy = MACs x ``joules_per_mac``,
latency = MACs / ``macs_per_second`` (MACs = FLOPs / 2); the figures come from the
published macro of the preset (``lorafx.hw_targets.chips.SRAM_PRESETS``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

from lorafx.dialect import owner_of

from . import chips
from .parts import Part, check_bits, check_figure

__all__ = ["SRAMTarget"]


@dataclass(frozen=True)
class SRAMTarget(Part):
    name: ClassVar[str] = "sram"
    description: ClassVar[str] = "exact digital SRAM for the LoRA adapters (a part of the 'cim' target)"

    preset: str = chips.DEFAULT_CHIP["sram"]
    capacity_kib: Optional[float] = None  # None: the adapters always fit
    adapter_bits: int = 16
    joules_per_mac: Optional[float] = None
    macs_per_second: Optional[float] = None

    table: ClassVar[dict] = chips.SRAM_PRESETS
    from_table: ClassVar[Tuple[str, ...]] = ("joules_per_mac", "macs_per_second")

    def validate(self) -> None:
        check_bits("adapter_bits", self.adapter_bits, self.name)
        check_figure("joules_per_mac", self.joules_per_mac, self.name)
        check_figure("macs_per_second", self.macs_per_second, self.name)
        if self.capacity_kib is not None:
            check_figure("capacity_kib (sram_kib)", self.capacity_kib, self.name)

    @property
    def capacity_bits(self) -> Optional[int]:
        return None if self.capacity_kib is None else int(self.capacity_kib * 8192)

    def supports(self, node) -> bool:
        return node is not None and owner_of(node) is not None

    def node_cost(self, flops: float, nbytes: float, tiles: int = 0) -> Tuple[float, float]:
        macs = flops / 2
        return macs * self.joules_per_mac, macs / self.macs_per_second

    def describe(self) -> str:
        cap = f"{self.capacity_kib:g} KiB" if self.capacity_kib is not None else "no capacity limit"
        return (f"{self.preset}: {self.adapter_bits}-bit adapters, {cap}, {self.joules_per_mac * 1e15:.3g} fJ/MAC; "
                f"source: {self.source}")
