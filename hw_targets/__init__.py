"""Hardware targets lorafx lowers onto (``lorafx.compile(model, target=...)``).

* ``base``   the ``Target`` protocol (a frozen dataclass of the options it declares, its
  supported nodes and its lowering passes), the registry and ``"cpu"`` (the graph as captured);
* ``cim``    the hybrid compute-in-memory chip: ``rram`` crossbars (``rram``), exact
  ``sram`` (``sram``) and a digital ``host`` (``host``), each a target of its own that
  declares its supported ops, capacity, precision and cost function;
* ``noise``  the RRAM noise models and presets; ``chips`` the published hardware figures.

    >>> from lorafx.hw_targets import get_target, available_targets
    >>> get_target("cpu").supports(None), get_target("cpu").passes()
    (True, [])
    >>> available_targets()
    ['cim', 'cpu', 'host', 'rram', 'sram']
"""
from __future__ import annotations

import functools

import torch

from lorafx.dialect.cim import set_noise_sampler

from .base import TARGETS, CPUTarget, Target, available_targets, get_target, register_target, target_class
from .noise import NoiseModel, noise_model, parse_noise, sample_chip
from .rram import RRAMTarget
from .sram import SRAMTarget
from .host import DigitalBaseline, HostTarget
from .cim import CIMTarget

__all__ = ["Target", "CPUTarget", "CIMTarget", "RRAMTarget", "SRAMTarget", "HostTarget", "DigitalBaseline",
           "NoiseModel", "get_target", "available_targets", "register_target", "target_class", "noise_model",
           "parse_noise", "sample_chip", "TARGETS"]

for _cls in (RRAMTarget, SRAMTarget, HostTarget, CIMTarget):
    register_target(_cls)


@functools.lru_cache(maxsize=64)
def _parsed(spec: str) -> NoiseModel:
    return parse_noise(spec)


def _fresh_sample(spec: str, weight: torch.Tensor) -> torch.Tensor:
    """A new sample of the noise ``spec`` on ``weight`` from torch's default generator of its device
    (``lorafx.rram_program``: HaLoRA's noisy path)."""
    if weight.device.type == "cuda":
        generator = torch.cuda.default_generators[weight.device.index or 0]
    else:
        generator = torch.default_generator
    return _parsed(spec).sample(weight, generator)


set_noise_sampler(_fresh_sample)
