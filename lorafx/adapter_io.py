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

from .graph_utils import get_attr

__all__ = ["save_adapter", "load_adapter", "load_adapter_weights", "read_adapter_config",
           "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "modules_to_save": (None, [], ()),
                "layers_to_transform": (None,), "lora_bias": (False, None), "use_qalora": (False, None)}


def _task_type(model) -> str:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    return None


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


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
    if len(transposed) > 1:
        raise ValueError("cannot save adapters mixing Linear and Conv1D layouts in one PEFT config")
    rslora = {abs(r.scale - r.alpha / r.r ** 0.5) < 1e-9 * max(1.0, r.scale) and r.r != 1 for r in recs}
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(cm._source),
        "base_model_name_or_path": getattr(getattr(cm._source, "config", None), "_name_or_path", None) or None,
        "r": r0,
        "lora_alpha": a0,
        "target_modules": sorted(records),
        "rank_pattern": {re.escape(s): r for s, r in ranks.items() if r != r0},
        "alpha_pattern": {re.escape(s): a for s, a in alphas.items() if a != a0},
        "lora_dropout": recs[0].dropout,
        "use_rslora": rslora == {True},
        "fan_in_fan_out": transposed == {True},
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "revision": None,
        "lorafx": {"version": __import__("lorafx").__version__},
    }
    tensors = {}
    for site, rec in records.items():
        tensors[f"{PREFIX}{site}.lora_A.weight"] = get_attr(cm, rec.lora_A).detach().contiguous().cpu()
        tensors[f"{PREFIX}{site}.lora_B.weight"] = get_attr(cm, rec.lora_B).detach().contiguous().cpu()
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:  # write then rename: never half-written
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
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
    return config


def _read_weights(directory: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        bin_path = os.path.join(directory, "adapter_model.bin")
        if not os.path.exists(bin_path):
            raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor adapter_model.bin")
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
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
    """Copy the adapter tensors in ``directory`` into ``cm``'s adapters (shapes must match)."""
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
    targets = config.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(targets)
    settings = dict(
        r=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        target_modules=targets or "all-linear",
        rank_pattern=config.get("rank_pattern") or {},
        alpha_pattern=config.get("alpha_pattern") or {},
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
    )
    settings.update(options)
    cm = lorafx_compile(model, example_inputs=example_inputs, example_kwargs=example_kwargs, **settings)
    load_adapter_weights(cm, directory)
    return cm
