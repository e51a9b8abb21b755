"""Hardware targets lorafx lowers onto.

A target is a frozen dataclass whose fields are the compile options it declares
(``options``, like a pass's); ``lorafx.compile(model, target="cpu", **options)``
builds it with ``get_target(name, **its_options)``.  It says which graph nodes it
supports (``supports(node)``) and names the passes that lower a LoRA graph onto it
(``passes(options)``, run after the LoRA rewrites and before ``AnnotateCost``).
Passes see the target of a compile through ``ctx.target``; they never import it.

``"cpu"`` runs the graph as captured.  The compute-in-memory targets (frozen weights
on noisy RRAM, adapters on exact SRAM) are planned and refused with a clear error
until built.

    >>> from lorafx.hw_targets import get_target
    >>> get_target("cpu").supports(None), get_target("cpu").passes()
    (True, [])
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Type

import torch.fx

from lorafx.options import Option, check_options
from lorafx.pipeline import Pass

__all__ = ["Target", "CPUTarget", "get_target", "available_targets", "register_target", "PLANNED_TARGETS"]


@dataclass(frozen=True)
class Target:
    """Base class: subclass as a frozen dataclass; its fields are its options.

    Class attributes: ``name``, ``description`` and ``options`` (the compile options
    it declares, each setting the field of the same name unless ``field`` says otherwise).
    """

    name: ClassVar[str] = "target"
    description: ClassVar[str] = ""
    options: ClassVar[Tuple[Option, ...]] = ()

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> "Target":
        """This target configured by the compile options in ``values`` that it declares."""
        return cls(**{o.target_field: values[o.name] for o in cls.options if o.name in values})

    def supports(self, node: Optional[torch.fx.Node]) -> bool:
        """Whether this target runs ``node`` as it is (no lowering needed)."""
        return True

    def passes(self, options: Optional[Mapping[str, Any]] = None) -> List[Pass]:
        """Passes that lower a LoRA graph onto this target, configured by the compile
        ``options`` (all of them, so a target can configure its passes from pass options)."""
        return []


@dataclass(frozen=True)
class CPUTarget(Target):
    name: ClassVar[str] = "cpu"
    description: ClassVar[str] = "run the rewritten graph with PyTorch's CPU (or the tensors' own device) kernels"


TARGETS: Dict[str, Type[Target]] = {"cpu": CPUTarget}
PLANNED_TARGETS: Dict[str, str] = {
    "cim": "hybrid compute-in-memory: frozen weights on noisy RRAM, adapters on exact SRAM (HaLoRA)",
    "rram": "all weights on noisy RRAM crossbars",
    "sram": "all weights on exact SRAM",
}


def available_targets() -> List[str]:
    return sorted(TARGETS)


def register_target(cls: Type[Target]) -> Type[Target]:
    """Make ``cls`` available by its ``name`` (usable as a class decorator)."""
    TARGETS[cls.name] = cls
    return cls


def target_class(name) -> Type[Target]:
    """The Target class named ``name`` (or the class of a Target instance)."""
    if isinstance(name, Target):
        return type(name)
    if isinstance(name, type) and issubclass(name, Target):
        return name
    if name in TARGETS:
        return TARGETS[name]
    if name in PLANNED_TARGETS:
        raise NotImplementedError(
            f"target {name!r} ({PLANNED_TARGETS[name]}) is not built yet; available targets: {available_targets()}"
        )
    raise ValueError(f"unknown target {name!r}; available targets: {available_targets()} "
                     f"(planned: {sorted(PLANNED_TARGETS)})")


def get_target(name, **options) -> Target:
    """The target ``name`` (a name, a Target class or instance) configured by ``options``,
    which must be options it declares."""
    cls = target_class(name)
    check_options(options, [(f"target {cls.name!r}", cls.options)], where=f"target {cls.name!r}")
    if isinstance(name, Target):
        return replace(name, **{o.target_field: options[o.name] for o in cls.options if o.name in options})
    return cls.from_options(options)
