"""The ``cim`` target: a hybrid compute-in-memory chip (HaLoRA, arXiv 2502.19747).

Frozen pretrained weights and their matmuls go to noisy RRAM crossbars (``rram``), the
LoRA adapters to exact SRAM (``sram``), everything else to a digital ``host``.  Its
passes, after the LoRA rewrites:

1. ``PartitionToTargets``: split each adapted linear into ``rram_linear`` + ``lora_sram``,
   place and tile every node, check the capacities, estimate energy and latency per token
   against a digital baseline;
2. ``ProgramChip``: sample the chip's noise once (``noise``, ``noise_sigma``, ``noise_seed``)
   and make inference graphs read it, with the ADC/DAC quantisation when asked;
3. ``HaLoRA`` (``halora=``): in training graphs, the noise-robust objective.

Training graphs read the ideal weights (the adapters are trained digitally) and
inference graphs the programmed chip, so the two modes are captured and lowered
separately (``mode_dependent``).  ``noise=None`` or ``noise_sigma=0`` (and no ADC/DAC bits)
give the exact noise-free lowering.

    >>> from lorafx.hw_targets import get_target
    >>> cim = get_target("cim", noise="additive", noise_sigma=0.1)
    >>> [p.name for p in cim.passes()]
    ['PartitionToTargets', 'ProgramChip', 'HaLoRA']
    >>> cim.noise_model().describe()[:19]
    'additive Gaussian, '
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

from lorafx import options as O
from lorafx.options import Option
from lorafx.passes.halora import MODES, HaLoRA, check_settings
from lorafx.passes.partition_to_targets import PartitionToTargets
from lorafx.passes.program_chip import ProgramChip

from . import chips
from .base import Target
from .host import DigitalBaseline, HostTarget
from .noise import NOISE_MODELS, NOISE_PRESETS, NoiseModel, noise_model, sample_chip
from .rram import RRAMTarget
from .sram import SRAMTarget

__all__ = ["CIMTarget", "HALORA_DEFAULTS"]

# HaLoRA's settings when halora=True; "dual" measured best on the evaluation suite (README, tools/cim_table.py)
HALORA_DEFAULTS: Dict[str, Any] = {"mode": "dual", "noise_weight": 0.5, "mu": 1e-3}


def _check_noise(name, value, where) -> None:
    if value is None or isinstance(value, NoiseModel):
        return
    if not isinstance(value, str):
        raise TypeError(f"{where}{name} must be a noise model name, a preset name, a NoiseModel or None, "
                        f"got {value!r}")
    noise_model(value)  # raises for an unknown name, naming the models and presets


def _check_sigma(name, value, where) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}{name} must be a number >= 0 (the noise level; 0: no noise), got {value!r}")


def _check_bits(name, value, where) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= 32:
        raise ValueError(f"{where}{name} must be an int from 1 to 32, or None for an exact (unquantised) "
                         f"converter, got {value!r}")


def halora_settings(value) -> Optional[Dict[str, Any]]:
    """HaLoRA's settings for ``halora=`` (True, False/None, or a dict of mode/noise_weight/mu)."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(HALORA_DEFAULTS)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(HALORA_DEFAULTS))
        if unknown:
            raise ValueError(f"halora got unknown setting(s) {unknown}; its settings: {sorted(HALORA_DEFAULTS)} "
                             f"(mode one of {list(MODES)})")
        return {**HALORA_DEFAULTS, **value}
    raise TypeError(f"halora must be True, False or a dict of settings {sorted(HALORA_DEFAULTS)}, got {value!r}")


def _check_halora(name, value, where) -> None:
    settings = halora_settings(value)
    if settings is not None:
        check_settings(**settings, where=f"{where}halora: ")


@dataclass(frozen=True)
class CIMTarget(Target):
    name: ClassVar[str] = "cim"
    description: ClassVar[str] = ("hybrid compute-in-memory: frozen weights on noisy RRAM crossbars, adapters on "
                                  "exact SRAM, the rest on a digital host; HaLoRA training")
    mode_dependent: ClassVar[bool] = True
    options: ClassVar[Tuple[Option, ...]] = (
        Option("chip", str, "default", "cim: the hardware preset of the RRAM, SRAM, host and digital baseline "
               f"({', '.join(sorted(chips.CHIP_PRESETS))}; figures and sources in lorafx.hw_targets.chips)",
               check=lambda n, v, w: O.check_choice(n, v, sorted(chips.CHIP_PRESETS), w)),
        Option("noise", (str, NoiseModel, type(None)), "additive", "cim: the RRAM noise model: a model "
               f"({', '.join(sorted(NOISE_MODELS))}), a preset ({', '.join(sorted(NOISE_PRESETS))}), a "
               "NoiseModel, or None for ideal weights", check=_check_noise),
        Option("noise_sigma", (float, type(None)), None, "cim: the noise model's level (additive: σ relative to "
               "max|W|); 0 means no noise", check=_check_sigma, default_text="the model's (0.02 for additive)"),
        Option("noise_seed", int, 0, "cim: the seed of the programmed chip (cm.reprogram(seed) samples another)",
               check=O.check_seed),
        Option("halora", (bool, dict), True, "cim: HaLoRA's noise-robust training (True, False or a dict of "
               f"mode {list(MODES)}, noise_weight, mu); only training graphs with a loss change",
               check=_check_halora),
        Option("adc_bits", (int, type(None)), None, "cim: quantise each crossbar output to this many bits "
               "(None: exact)", check=_check_bits),
        Option("dac_bits", (int, type(None)), None, "cim: quantise each crossbar input to this many bits "
               "(None: exact)", check=_check_bits),
        Option("rram_tiles", (int, type(None)), None, "cim: the chip's crossbar tiles (None: as many as the "
               "model needs); a model that needs more is refused", check=lambda n, v, w: v is None or
               O.check_positive_int(n, v, w, "1024")),
        Option("sram_kib", (float, type(None)), None, "cim: the SRAM capacity for the adapters in KiB (None: "
               "no limit)", check=lambda n, v, w: v is None or O.check_positive_real(n, v, w)),
    )

    chip: str = "default"
    noise: Any = "additive"
    noise_sigma: Optional[float] = None
    noise_seed: int = 0
    halora: Any = True
    adc_bits: Optional[int] = None
    dac_bits: Optional[int] = None
    rram_tiles: Optional[int] = None
    sram_kib: Optional[float] = None

    def __post_init__(self):
        for o in self.options:  # a target made directly (get_target, CIMTarget(...)) is checked too
            o.validate(getattr(self, o.target_field), "cim target: ")

    def noise_model(self) -> Optional[NoiseModel]:
        """The chip's noise model (None: ideal)."""
        return noise_model(self.noise, self.noise_sigma)

    def parts(self) -> Tuple[RRAMTarget, SRAMTarget, HostTarget, DigitalBaseline]:
        preset = chips.CHIP_PRESETS[self.chip]
        rram = RRAMTarget(preset=preset["rram"], tiles=self.rram_tiles, adc_bits=self.adc_bits,
                          dac_bits=self.dac_bits, noise=self.noise_model())
        return (rram, SRAMTarget(preset=preset["sram"], capacity_kib=self.sram_kib),
                HostTarget(preset=preset["host"]), DigitalBaseline(preset=preset["baseline"]))

    def passes(self, options: Optional[Mapping[str, Any]] = None) -> List:
        if options and options.get("sparsity") is not None:
            raise ValueError("sparsity= has no compute-in-memory lowering: a sparse adapter keeps its weight's zeros "
                             "by masking W + s·BA, which RRAM crossbars cannot do. Compile for target='cim' without "
                             "sparsity=, or prune first (lorafx.prune) and program the pruned weights as they are")
        rram, sram, host, baseline = self.parts()
        noise = rram.noise
        dac, adc = self.dac_bits or 0, self.adc_bits or 0
        out = [PartitionToTargets(rram=rram, sram=sram, host=host, baseline=baseline),
               ProgramChip(noise=noise, seed=self.noise_seed, dac_bits=dac, adc_bits=adc, sample=sample_chip)]
        settings = halora_settings(self.halora)
        noiseless = noise is None or noise.is_noiseless()
        if settings is not None and not (noiseless and self.halora is True):  # nothing to be robust to
            out.append(HaLoRA(noise=noise, dac_bits=dac, adc_bits=adc, **settings))
        return out
