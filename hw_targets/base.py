"""The target protocol and registry (re-exported by ``lorafx.hw_targets``).

A target is a frozen dataclass whose fields are the compile options it declares
(``options``, like a pass's); ``lorafx.compile(model, target="cpu", **options)``
builds it with ``get_target(name, **its_options)``.  It says which graph nodes it
supports (``supports(node)``) and names the passes that lower a LoRA graph onto it
(``passes(options)``, run after the LoRA rewrites and before ``AnnotateCost``).
Passes see the target of a compile through ``ctx.target``; they never import it.

``"cpu"`` runs the graph as captured; ``"cim"`` lowers it onto a hybrid compute-in-memory
chip (``lorafx.hw_targets.cim``), whose parts ``"rram"``, ``"sram"`` and ``"host"`` are
targets too, but not ones to compile for on their own (``compilable = False``).

    >>> from lorafx.hw_targets import get_target
    >>> get_target("cpu").supports(None), get_target("cpu").passes()
    (True, [])
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Type

import torch.fx

from lorafx.options import Option, check_options
from lorafx.pipeline import Pass

__all__ = ["Target", "CPUTarget", "get_target", "available_targets", "register_target", "target_class"]


@dataclass(frozen=True)
class Target:
    """Base class: subclass as a frozen dataclass; its fields are its options.

    Class attributes: ``name``, ``description`` and ``options`` (the compile options
    it declares, each setting the field of the same name unless ``field`` says otherwise).
    """

    name: ClassVar[str] = "target"
    description: ClassVar[str] = ""
    options: ClassVar[Tuple[Option, ...]] = ()
    compilable: ClassVar[bool] = True  # lorafx.compile(target=name) (False: a part of a composite target)
    mode_dependent: ClassVar[bool] = False  # train and eval graphs differ: captured and lowered once per mode

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
    if isinstance(name, str) and name in TARGETS:
        return TARGETS[name]
    close = difflib.get_close_matches(str(name), list(TARGETS), n=1)
    raise ValueError(f"unknown target {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                     + f"; available targets: {available_targets()}")


def get_target(name, **options) -> Target:
    """The target ``name`` (a name, a Target class or instance) configured by ``options``,
    which must be options it declares."""
    cls = target_class(name)
    check_options(options, [(f"target {cls.name!r}", cls.options)], where=f"target {cls.name!r}")
    if isinstance(name, Target):
        return replace(name, **{o.target_field: options[o.name] for o in cls.options if o.name in options})
    return cls.from_options(options)
