"""The ``rram`` target: frozen weights in resistive-RAM crossbars (a part of the ``cim`` target).

A crossbar tile of ``tile_rows`` x ``tile_cols`` RRAM cells computes a matrix-vector
product in one analog step: the input drives the rows through DACs of ``dac_bits``, each
column sums its currents, and ADCs of ``adc_bits`` read the columns.  A weight of
``weight_bits`` is stored over ⌈weight_bits / bits_per_cell⌉ cells (bit slicing), twice
for a differential pair (G+ for the positive part, G− for the negative), so a weight
with n inputs and m outputs takes ⌈n / tile_rows⌉·⌈m·cells_per_weight / tile_cols⌉ tiles.
Programmed conductances are noisy (``noise``: a ``lorafx.hw_targets.noise`` model:
programming and read noise, drift, stuck-at faults).

Cost of a node (``node_cost``): energy = MACs x ``joules_per_mac`` (MACs = FLOPs / 2); latency
= one tile read (``seconds_per_read``: every tile of a weight works in parallel, one input
vector per read) per token.  The figures of each preset come from the published macro named
in ``lorafx.hw_targets.chips`` (never invented; the README lists them).

    >>> from lorafx.hw_targets import get_target
    >>> rram = get_target("rram")
    >>> rram.tiles_for(512, 512) == 4 * -(-512 * rram.cells_per_weight // rram.tile_cols)
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Tuple

from lorafx.dialect import RRAM, owner_of

from . import chips
from .parts import Part, check_bits, check_count

__all__ = ["RRAMTarget"]


@dataclass(frozen=True)
class RRAMTarget(Part):
    name: ClassVar[str] = "rram"
    description: ClassVar[str] = ("frozen weights in noisy RRAM crossbars (a part of the 'cim' target: "
                                  "compile with target='cim')")

    preset: str = chips.DEFAULT_CHIP["rram"]
    tile_rows: Optional[int] = None  # None: the preset's
    tile_cols: Optional[int] = None
    bits_per_cell: Optional[int] = None
    weight_bits: int = 8
    differential: bool = True
    adc_bits: Optional[int] = None
    dac_bits: Optional[int] = None
    tiles: Optional[int] = None  # the chip's tile count (None: as many as the model needs)
    joules_per_mac: Optional[float] = None
    seconds_per_read: Optional[float] = None
    noise: Any = None  # a lorafx.hw_targets.noise.NoiseModel (None: ideal conductances)

    table: ClassVar[dict] = chips.RRAM_PRESETS
    from_table: ClassVar[Tuple[str, ...]] = ("tile_rows", "tile_cols", "bits_per_cell", "adc_bits", "dac_bits",
                                             "joules_per_mac", "seconds_per_read")

    def validate(self) -> None:
        check_count("tile_rows", self.tile_rows, self.name)
        check_count("tile_cols", self.tile_cols, self.name)
        check_count("bits_per_cell", self.bits_per_cell, self.name)
        check_count("weight_bits", self.weight_bits, self.name)
        check_bits("adc_bits", self.adc_bits, self.name)
        check_bits("dac_bits", self.dac_bits, self.name)
        if self.tiles is not None:
            check_count("tiles", self.tiles, self.name)

    @property
    def cells_per_weight(self) -> int:
        """Cells (crossbar columns) per weight: bit slices, times two for a differential pair."""
        return math.ceil(self.weight_bits / self.bits_per_cell) * (2 if self.differential else 1)

    def tiles_for(self, n_in: int, m_out: int) -> int:
        """Tiles of a weight with ``n_in`` inputs (rows) and ``m_out`` outputs."""
        return math.ceil(n_in / self.tile_rows) * math.ceil(m_out * self.cells_per_weight / self.tile_cols)

    def supports(self, node) -> bool:
        return node is not None and owner_of(node) is RRAM

    def node_cost(self, flops: float, nbytes: float, tiles: int = 0) -> Tuple[float, float]:
        return flops / 2 * self.joules_per_mac, (self.seconds_per_read if flops else 0.0)

    def describe(self) -> str:
        cap = f"{self.tiles} tiles" if self.tiles else "tiles as needed"
        return (f"{self.preset}: {self.tile_rows}x{self.tile_cols} crossbars, {self.bits_per_cell} bit/cell, "
                f"{self.weight_bits}-bit weights over {self.cells_per_weight} cells, ADC {self.adc_bits} b, "
                f"DAC {self.dac_bits} b, {self.joules_per_mac * 1e15:.3g} fJ/MAC, {cap}; "
                f"source: {self.source}")
