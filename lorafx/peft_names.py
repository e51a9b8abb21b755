"""PEFT's ``LoraConfig`` field names as ``lorafx.compile`` options.

``lorafx.compile(model, **fields)`` takes a LoraConfig's fields as they are
(``lorafx.compile(model, **lorafx.peft_options(lora_config))`` for a LoraConfig
object).  ``resolve_peft_names`` turns them into lorafx options before they are
checked:

- a field with its own lorafx name (``ALIASES``: ``lora_alpha`` -> ``alpha``,
  ``lora_dropout`` -> ``dropout``, ``init_lora_weights`` -> ``init``) is renamed, its
  value converted (``init_lora_weights=True`` is ``init="kaiming"``); giving both
  names is a TypeError naming both;
- a field some pass declares under PEFT's own name (``r``, ``target_modules``,
  ``layers_to_transform``, ``lora_bias``, ``use_dora``, ...) passes through;
- any other LoraConfig field (``PEFT_FIELDS``) is dropped at PEFT's default value, so a
  default LoraConfig passes through, and is a NotImplementedError naming it at any other
  value: lorafx does not implement it.  Bookkeeping fields (``task_type``,
  ``inference_mode``, ...: ``IGNORED``) are always dropped.

The table is in one place (here): ``lorafx.options.options_table`` shows each alias next
to its lorafx option, and ``lorafx.adapter_io`` writes PEFT's names in adapter configs.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

__all__ = ["ALIASES", "PEFT_FIELDS", "IGNORED", "peft_name", "resolve_peft_names", "peft_options",
           "init_from_peft"]


def init_from_peft(value: Any) -> Any:
    """lorafx's ``init`` for PEFT's ``init_lora_weights`` value (True is "kaiming"; False,
    "gaussian", "pissa", "pissa_niter_N", "olora" keep their names; a value lorafx does not
    implement, such as "loftq" or "eva", is refused)."""
    if value is True:
        return "kaiming"
    if value is False or value in ("gaussian", "pissa", "olora") or (
            isinstance(value, str) and value.startswith("pissa_niter_")):
        return value
    if isinstance(value, str) and value.lower() == "olora":
        return "olora"
    raise NotImplementedError(
        f"lorafx does not implement init_lora_weights={value!r}; it implements True (kaiming A, B = 0), "
        "'gaussian', False (A and B both random, for tests), 'pissa', 'pissa_niter_N' and 'olora' "
        "(and lorafx's own init='lors')")


# PEFT name -> (lorafx option, converter of the value)
ALIASES: Dict[str, Tuple[str, Callable[[Any], Any]]] = {
    "lora_alpha": ("alpha", lambda v: v),
    "lora_dropout": ("dropout", lambda v: v),
    "init_lora_weights": ("init", init_from_peft),
}

# Every LoraConfig field with PEFT's default: one a pass declares (r, use_dora, modules_to_save, ...)
# passes through; the others are dropped at that value and refused at any other.
PEFT_FIELDS: Dict[str, Any] = {
    "r": 8, "target_modules": None, "exclude_modules": None, "lora_alpha": 8, "lora_dropout": 0.0,
    "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "modules_to_save": None,
    "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
    "alpha_pattern": {}, "megatron_config": None, "megatron_core": "megatron.core",
    "trainable_token_indices": None, "loftq_config": {}, "eva_config": None, "corda_config": None,
    "lora_ga_config": None, "use_dora": False, "velora_config": None, "alora_invocation_tokens": None,
    "use_qalora": False, "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None,
    "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
    "kasa_config": None, "ensure_weight_tying": False,
}
# LoraConfig bookkeeping that does not change what is adapted or computed: always dropped
# (inference_mode: lorafx's adapters train until frozen with requires_grad_(False)).
IGNORED = frozenset({"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                     "revision", "inference_mode", "runtime_config"})
# lorafx options whose PEFT field has another name (for the options table)
_PEFT_NAME = {lorafx: peft for peft, (lorafx, _) in ALIASES.items()}


def peft_name(option: str) -> Optional[str]:
    """PEFT's name for a lorafx option that has another one (``"alpha"`` -> ``"lora_alpha"``), else None."""
    return _PEFT_NAME.get(option)


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple, set, frozenset, dict)) and not value)


def _is_default(name: str, value: Any) -> bool:
    """Whether ``value`` is PEFT's default for field ``name`` (None, [] and {} alike for an empty default)."""
    default = PEFT_FIELDS[name]
    if _empty(default):
        return _empty(value) or value is False
    if isinstance(default, bool):
        return value is default
    return not isinstance(value, bool) and value == default


def resolve_peft_names(options: Mapping[str, Any], declared: Iterable[str],
                       where: str = "lorafx.compile") -> Dict[str, Any]:
    """``options`` with PEFT's LoraConfig names resolved: aliases renamed (both names given
    is a TypeError), fields no pass declares dropped at PEFT's default value and refused at
    another (NotImplementedError), bookkeeping fields dropped.  Other names are kept as
    given (``check_options`` then judges them)."""
    declared = set(declared)
    out = dict(options)
    for peft, (mine, convert) in ALIASES.items():
        if peft not in out or peft in declared:
            continue
        if mine in out:
            raise TypeError(f"{where} got both {mine}={out[mine]!r} and {peft}={out[peft]!r}, which are the same "
                            f"option ({peft} is PEFT's name for lorafx's {mine}); pass one of them")
        out[mine] = convert(out.pop(peft))
    for name in list(out):
        if name in declared or name in ALIASES:
            continue
        if name in IGNORED:
            del out[name]
        elif name in PEFT_FIELDS:
            value = out.pop(name)
            if not _is_default(name, value):
                raise NotImplementedError(
                    f"{where}: lorafx does not implement PEFT's LoraConfig field {name}={value!r}; "
                    f"remove it (or give PEFT's default, {PEFT_FIELDS[name]!r}). PEFT fields lorafx implements: "
                    f"{', '.join(sorted(n for n in PEFT_FIELDS if n in declared or n in ALIASES))}")
    return out


def peft_options(config: Any) -> Dict[str, Any]:
    """The ``lorafx.compile`` options of a PEFT ``LoraConfig`` (or a dict of its fields), under
    PEFT's names: ``lorafx.compile(model, **lorafx.peft_options(config))``.  Bookkeeping fields
    are left out; sets (LoraConfig stores target_modules as one) become sorted lists.  A
    config without target_modules is refused: PEFT then picks modules by model type."""
    if isinstance(config, Mapping):
        fields = dict(config)
    else:
        import dataclasses
        if not dataclasses.is_dataclass(config):
            raise TypeError(f"peft_options needs a peft.LoraConfig (or a dict of its fields), got "
                            f"{type(config).__name__}")
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    peft_type = fields.get("peft_type")
    if peft_type is not None and str(getattr(peft_type, "value", peft_type)) != "LORA":
        raise ValueError(f"peft_options: peft_type {peft_type!r} is not LoRA; lorafx compiles LoRA configs")
    out = {}
    for name, value in fields.items():
        if name in IGNORED:
            continue
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        out[name] = value
    if out.get("target_modules") is None and not out.get("target_parameters"):
        raise ValueError("peft_options: the LoraConfig has target_modules=None, with which PEFT picks the "
                         "modules from the model type; name them (LoraConfig(target_modules=['q_proj', "
                         "'v_proj'], ...) or 'all-linear')")
    return out
