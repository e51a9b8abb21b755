"""ModulesToSave: train whole modules (a classifier head) next to the adapters, as PEFT's ``modules_to_save``.

Requires: a captured graph.  Provides: ``"modules_to_save"``.  Runs before InsertLoRA.
Preserves: every output (the graph is not rewritten; the named modules' parameters
become trainable private copies with the same values).

PEFT's rules, kept here:

* a name selects every module whose dotted path ends with it (``"classifier"`` selects
  ``classifier``; ``"score"`` selects ``score``);
* every parameter of a selected module (and of its submodules) trains; the source
  model's tensors are never written: each becomes a clone, a trainable Parameter the
  compiled model owns (``freeze_base`` leaves them alone);
* a LoRA site inside a selected module, or one whose path has a component PEFT's
  regex ``(^|.*\\.)NAME($|\\..*)`` matches, gets no adapter (modules_to_save wins);
* saved in PEFT's format as ``base_model.model.<module>.<param>`` (``saved_tensors``),
  with the names in ``adapter_config.json``'s ``modules_to_save``.

The selected module paths are recorded in the graph record (``modules_to_save``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.fx

from lorafx.context import CompileContext
from lorafx.meta import graph_record
from lorafx.options import Option
from lorafx.pipeline import CAPTURED, Pass, PassResult

__all__ = ["ModulesToSave", "selected_modules", "is_saved_module", "saved_tensors", "check_modules_to_save"]


def check_modules_to_save(name, value, where: str = "") -> None:
    """None, or a non-empty list of module names (PEFT's modules_to_save)."""
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{where}{name} must be a list of module names, got {value!r}; pass e.g. "
                        f"{name}=['classifier'] (or ['score'] for a LLaMA-style classifier)")
    if not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}{name} must hold module names (non-empty strings), got {value!r}; pass e.g. "
                         f"{name}=['classifier']")


def selected_modules(gm: torch.nn.Module, names) -> Dict[str, Tuple[str, ...]]:
    """{name: the module paths of ``gm`` holding parameters that it selects} (PEFT: the path
    ends with the name), outermost first."""
    holding = [path for path, m in gm.named_modules() if path and any(True for _ in m.parameters())]
    out = {}
    for name in names:
        found = [p for p in holding if p.endswith(name)]
        out[name] = tuple(p for p in found if not any(p.startswith(q + ".") for q in found))
    return out


def is_saved_module(gm: torch.fx.GraphModule, module: str) -> bool:
    """Whether ``module`` is (inside) a module ``ModulesToSave`` made trainable, or matches
    PEFT's rule for excluding adapters from modules_to_save: then it gets no LoRA adapter."""
    rec = graph_record(gm)
    names, paths = getattr(rec, "modules_to_save", ()) or (), getattr(rec, "saved_modules", ()) or ()
    if any(module == p or module.startswith(p + ".") for p in paths):
        return True
    return any(re.match(rf"(^|.*\.){re.escape(n)}($|\..*)", module) for n in names)


def saved_tensors(gm: torch.nn.Module) -> Dict[str, str]:
    """{parameter path: parameter path} of every tensor modules_to_save trains (the PEFT key
    is ``base_model.model.`` + the path)."""
    rec = graph_record(gm.graph_module if hasattr(gm, "graph_module") else gm)
    out = {}
    for path in getattr(rec, "saved_modules", ()) or ():
        module = gm.get_submodule(path)
        for name, _ in module.named_parameters():
            out[f"{path}.{name}"] = f"{path}.{name}"
    return out


@dataclass(frozen=True)
class ModulesToSave(Pass):
    modules_to_save: Optional[Tuple[str, ...]] = None

    requires = frozenset({CAPTURED})
    provides = frozenset({"modules_to_save"})
    options = (
        Option("modules_to_save", (list, type(None)), None,
               "PEFT's modules_to_save: modules trained in full next to the adapters (a classifier head: "
               "['classifier'] or ['score']); private trainable copies, saved in PEFT's format; LoRA skips them",
               check=check_modules_to_save),
    )

    @classmethod
    def from_options(cls, values, ctx: CompileContext) -> Optional["ModulesToSave"]:
        value = values.get("modules_to_save")
        return None if value is None else cls(modules_to_save=value)

    def __post_init__(self):
        super().__post_init__()
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))

    def validate(self) -> None:
        check_modules_to_save("modules_to_save", self.modules_to_save, "ModulesToSave: ")

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        names = tuple(self.modules_to_save or ())
        found = selected_modules(gm, names)
        missing = [n for n, paths in found.items() if not paths]
        if missing:
            holding = [p for p, m in gm.named_modules() if p and any(True for _ in m.parameters(recurse=False))]
            raise ValueError(
                f"ModulesToSave: modules_to_save names {missing} but no module with parameters in this model has a "
                f"name ending with {missing[0]!r}; modules with parameters: {', '.join(holding[:30])}"
                f"{', ...' if len(holding) > 30 else ''}. Name one of them (e.g. the classifier head)")
        paths = tuple(dict.fromkeys(p for ps in found.values() for p in ps))
        inside = {id(p) for path in paths for p in gm.get_submodule(path).parameters()}
        for name, p in gm.named_parameters(remove_duplicate=False):
            if id(p) in inside and not any(name.startswith(path + ".") for path in paths):
                owner = next(path for path in paths
                             if any(q is p for q in gm.get_submodule(path).parameters()))
                raise ValueError(
                    f"ModulesToSave: {owner} (modules_to_save) shares a parameter with {name}, which is not saved "
                    "(tied weights): training it would change that module too. Leave it out of modules_to_save, or "
                    "untie the weights first (e.g. config.tie_word_embeddings=False)")
        cloned: Dict[int, torch.nn.Parameter] = {}
        count = 0
        for path in paths:
            for module in gm.get_submodule(path).modules():
                for pname, p in list(module._parameters.items()):
                    if p is None:
                        continue
                    if id(p) not in cloned:
                        cloned[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=True)
                        count += p.numel()
                    module._parameters[pname] = cloned[id(p)]
        rec = graph_record(gm)
        rec.modules_to_save = names
        rec.saved_modules = paths
        return PassResult(gm, False, {"saved_modules": len(paths), "trainable_params": count})

    def summary(self, info) -> list:
        return [f"{info['saved_modules']} module(s) trained in full, {info['trainable_params']:,} params"]
