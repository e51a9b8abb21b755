"""Adapters in PEFT's on-disk format.

``adapter_config.json`` holds PEFT LoraConfig fields (r, lora_alpha, target_modules,
rank_pattern, alpha_pattern, lora_dropout, use_rslora, fan_in_fan_out, ...);
``adapter_model.safetensors`` holds ``base_model.model.<site>.lora_A.weight`` (r, in)
and ``base_model.model.<site>.lora_B.weight`` (out, r).  PEFT's
``PeftModel.from_pretrained(base, dir)`` loads what ``save_adapter`` writes, and
``load_adapter`` reads what PEFT's ``save_pretrained`` writes.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from typing import Dict, Tuple

import torch

from .graph_utils import get_attr, pattern_value

__all__ = ["save_adapter", "load_adapter", "load_adapter_weights", "read_adapter_config",
           "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# LoraConfig fields whose non-default values change what the adapter computes (or which
# weights it has): lorafx refuses such adapters instead of silently computing something else.
_UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "modules_to_save": (None, [], ()),
                "layers_to_transform": (None,), "lora_bias": (False, None), "use_qalora": (False, None),
                "trainable_token_indices": (None,), "alora_invocation_tokens": (None,),
                "layer_replication": (None,), "target_parameters": (None, [], ()), "use_bdlora": (None, False),
                "arrow_config": (None,), "kasa_config": (None,), "monteclora_config": (None,)}
# init_lora_weights values with which PEFT rewrites the base weights when it loads the adapter.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq")
_SCALE_KEYS = ("r", "alpha", "rank_pattern", "alpha_pattern", "use_rslora")


def _task_type(model) -> str:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    return None


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def _rslora_flag(records) -> bool:
    """PEFT's use_rslora for these records; a rank-1 site fits both scalings."""
    standard = [s for s, r in records.items() if not _close(r.scale, r.alpha / r.r)]
    rs = [s for s, r in records.items() if not _close(r.scale, r.alpha / r.r ** 0.5)]
    if not standard:
        return False
    if not rs:
        return True
    raise ValueError(f"cannot save adapters in PEFT's format: the scales of {standard[0]} and {rs[0]} are not "
                     "all alpha/r nor all alpha/sqrt(r)")


def _pattern(values: dict, default) -> dict:
    """A PEFT rank/alpha_pattern giving every site its value.

    PEFT matches a key against the end of a module name (key "x.y" also matches
    "a.x.y") and takes the first key that matches.  So the pattern names the sites
    whose value is not the default plus every site that one of those keys would also
    match, longest names first (a key cannot match a name shorter than itself).
    """
    keep = {s for s, v in values.items() if v != default}
    keep |= {s for s in values for k in list(keep) if s.endswith("." + k)}
    return {re.escape(s): values[s] for s in sorted(keep, key=lambda s: (-len(s), s))}


def _targets(model, sites):
    """PEFT target_modules naming exactly ``sites``: a list, unless a module left out
    ends with "." + a site (a list item also matches such names); then a regex."""
    names = {n for n, _ in model.named_modules()} - set(sites)
    if any(n.endswith("." + s) for n in names for s in sites):
        return "|".join(re.escape(s) for s in sorted(sites))  # PEFT and lorafx: re.fullmatch
    return sorted(sites)


def _expected_scale(config: dict, site: str) -> float:
    """The scale PEFT gives ``site`` under ``config``."""
    r = int(pattern_value(site, config.get("rank_pattern") or {}, config.get("r", 8)))
    alpha = float(pattern_value(site, config.get("alpha_pattern") or {}, config.get("lora_alpha", 8)))
    return alpha / r ** 0.5 if config.get("use_rslora") else alpha / r


def save_adapter(cm, directory: str) -> None:
    """Write ``cm``'s adapters to ``directory`` in PEFT's format (atomically)."""
    from safetensors.torch import save_file

    records = cm.lora_records()
    if not records:
        raise ValueError("this model has no LoRA adapters to save")
    ranks = {s: r.r for s, r in records.items()}
    alphas = {s: r.alpha for s, r in records.items()}
    r0, a0 = _most_common(ranks.values()), _most_common(alphas.values())
    recs = list(records.values())
    transposed = {r.weight_transposed for r in recs}
    use_rslora = _rslora_flag(records)
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(cm._source),
        "base_model_name_or_path": getattr(getattr(cm._source, "config", None), "_name_or_path", None) or None,
        "r": r0,
        "lora_alpha": a0,
        "target_modules": _targets(cm._source, records),
        "rank_pattern": _pattern(ranks, r0),
        "alpha_pattern": _pattern(alphas, a0),
        "lora_dropout": recs[0].dropout,
        "use_rslora": use_rslora,
        # PEFT picks the layout per layer (Conv1D -> fan_in_fan_out) and the saved A/B
        # are (r, in) / (out, r) either way, so a mixed model round-trips too.
        "fan_in_fan_out": transposed == {True},
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "revision": None,
    }
    tensors = {}
    for site, rec in records.items():
        tensors[f"{PREFIX}{site}.lora_A.weight"] = get_attr(cm, rec.lora_A).detach().contiguous().cpu()
        tensors[f"{PREFIX}{site}.lora_B.weight"] = get_attr(cm, rec.lora_B).detach().contiguous().cpu()
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:  # write then rename: never half-written
        # lorafx's version goes in the weights' metadata: PEFT warns about unknown config keys
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME),
                  metadata={"format": "pt", "lorafx_version": __import__("lorafx").__version__})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))


def read_adapter_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: not a PEFT/lorafx adapter directory")
    with open(path) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory}: peft_type {config.get('peft_type')!r} is not supported; lorafx loads LORA adapters")
    for key, allowed in _UNSUPPORTED.items():
        if key in config and config[key] not in allowed and not (isinstance(config[key], list) and not config[key]):
            raise ValueError(f"{directory}: {key}={config[key]!r} is not supported by lorafx (only {allowed[0]!r})")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"{directory}: init_lora_weights={init!r} changes the base weights, which lorafx does not "
                         "do; convert it to a plain LoRA adapter first (PEFT's "
                         "save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    return config


def _weights_file(directory: str) -> str:
    for name in (WEIGHTS_NAME, "adapter_model.bin"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor adapter_model.bin")


def _read_weights(directory: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    path = _weights_file(directory)
    if path.endswith(".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = load_file(path)
    sites: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} (lorafx loads lora_A/lora_B weights only)")
        sites.setdefault(m.group(1), {})[m.group(2)] = value
    return {s: (ab["A"], ab["B"]) for s, ab in sites.items()}


def load_adapter_weights(cm, directory: str) -> None:
    """Copy the adapter in ``directory`` into ``cm``'s adapters.

    The adapter must be one lorafx supports, target the same sites with the same
    shapes, and give every site the scale (alpha / r, or alpha / sqrt(r)) ``cm``
    was compiled with: otherwise the outputs would silently differ from PEFT's.
    Nothing is copied unless all of that holds.
    """
    _copy_weights(cm, directory, read_adapter_config(directory))


def _copy_weights(cm, directory: str, config=None) -> None:
    """Copy the adapter tensors in ``directory`` into ``cm``'s adapters (shapes, and
    the scales when ``config`` is given, must match)."""
    weights = _read_weights(directory)
    records = cm.lora_records()
    missing = sorted(set(records) - set(weights))
    extra = sorted(set(weights) - set(records))
    if missing or extra:
        raise ValueError(f"adapter in {directory} does not fit this model: "
                         f"sites without weights {missing[:10]}, weights without a site {extra[:10]}")
    for site, rec in records.items():
        A, B = weights[site]
        pa, pb = get_attr(cm, rec.lora_A), get_attr(cm, rec.lora_B)
        if A.shape != pa.shape or B.shape != pb.shape:
            raise ValueError(f"{site}: adapter shapes A{tuple(A.shape)} B{tuple(B.shape)} do not match "
                             f"this model's A{tuple(pa.shape)} B{tuple(pb.shape)}")
        if config is not None and not _close(rec.scale, _expected_scale(config, site)):
            raise ValueError(f"{site}: the adapter in {directory} gives this site scale "
                             f"{_expected_scale(config, site):g} (from r, lora_alpha, rank/alpha_pattern, "
                             f"use_rslora) but this model was compiled with scale {rec.scale:g}; compile with "
                             "the adapter's settings or use lorafx.load_adapter(model, directory)")
    was_merged = cm.merged
    cm.unmerge()
    with torch.no_grad():
        for site, rec in records.items():
            A, B = weights[site]
            get_attr(cm, rec.lora_A).copy_(A)
            get_attr(cm, rec.lora_B).copy_(B)
    if was_merged:
        cm.merge()


def load_adapter(model, directory: str, *, example_inputs=None, example_kwargs=None, **options):
    """Compile ``model`` with the adapter configuration in ``directory`` and load its weights.

    ``model`` may also be a CompiledModel, whose adapters then receive the weights.
    """
    from .compiled import CompiledModel
    from .compiler import compile as lorafx_compile

    if isinstance(model, CompiledModel):
        load_adapter_weights(model, directory)
        return model
    config = read_adapter_config(directory)
    _weights_file(directory)  # fail before the (slow) compile
    targets = config.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(targets)
    exclude = config.get("exclude_modules")
    settings = dict(
        r=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        target_modules=targets or "all-linear",
        rank_pattern=config.get("rank_pattern") or {},
        alpha_pattern=config.get("alpha_pattern") or {},
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        exclude_modules=tuple(exclude) if isinstance(exclude, list) else exclude,
    )
    settings.update(options)
    cm = lorafx_compile(model, example_inputs=example_inputs, example_kwargs=example_kwargs, **settings)
    # Options that change the scales were chosen on purpose: check the scales only otherwise.
    _copy_weights(cm, directory, None if any(k in options for k in _SCALE_KEYS) else config)
    return cm
