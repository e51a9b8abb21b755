"""Hardware targets lorafx lowers onto.

A target names the passes that run after LoRA insertion.  ``"cpu"`` runs the
graph as captured.  The compute-in-memory targets (frozen weights on noisy RRAM,
adapters on exact SRAM) are planned and refused with a clear error until built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

__all__ = ["Target", "CPUTarget", "get_target", "available_targets", "PLANNED_TARGETS"]


@dataclass(frozen=True)
class Target:
    name: str
    description: str

    def passes(self) -> List:
        """Passes that lower a LoRA graph onto this target (run after InsertLoRA)."""
        return []


@dataclass(frozen=True)
class CPUTarget(Target):
    name: str = "cpu"
    description: str = "run the rewritten graph with PyTorch's CPU (or the tensors' own device) kernels"


TARGETS: Dict[str, Target] = {"cpu": CPUTarget()}
PLANNED_TARGETS: Dict[str, str] = {
    "cim": "hybrid compute-in-memory: frozen weights on noisy RRAM, adapters on exact SRAM (HaLoRA)",
    "rram": "all weights on noisy RRAM crossbars",
    "sram": "all weights on exact SRAM",
}


def available_targets() -> List[str]:
    return sorted(TARGETS)


def get_target(name) -> Target:
    if isinstance(name, Target):
        return name
    if name in TARGETS:
        return TARGETS[name]
    if name in PLANNED_TARGETS:
        raise NotImplementedError(
            f"target {name!r} ({PLANNED_TARGETS[name]}) is not built yet; available targets: {available_targets()}"
        )
    raise ValueError(f"unknown target {name!r}; available targets: {available_targets()} "
                     f"(planned: {sorted(PLANNED_TARGETS)})")
