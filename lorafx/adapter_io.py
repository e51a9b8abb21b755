"""Adapters in PEFT's on-disk format.

``adapter_config.json`` holds PEFT LoraConfig fields (r, lora_alpha, target_modules,
rank_pattern, alpha_pattern, lora_dropout, use_rslora, fan_in_fan_out, ...);
``adapter_model.safetensors`` holds ``base_model.model.<site>.lora_A.weight`` (r, in)
and ``base_model.model.<site>.lora_B.weight`` (out, r).  PEFT's
``PeftModel.from_pretrained(base, dir)`` loads what ``save_adapter`` writes, and
``load_adapter`` reads what PEFT's ``save_pretrained`` writes.

Compiling a model with an adapter's configuration and loading its weights
(``lorafx.load_adapter``) is the driver's ``lorafx.compiler.load_adapter``, built on
``read_adapter``, ``compile_settings`` and ``copy_adapter_weights`` here.

``save_adapter`` never leaves a half-written adapter: the weights' metadata records
the sha256 of the config saved with them, so a mix left by a crash is refused on load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections import Counter
from typing import Dict, Tuple

import torch

from ._version import __version__
from .graph_utils import get_attr, pattern_value

__all__ = ["save_adapter", "load_adapter_weights", "read_adapter_config", "read_adapter", "compile_settings",
           "copy_adapter_weights", "SCALE_OPTIONS", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
STAGING_PREFIX = ".lorafx-save-"  # the hidden folder a save stages its files in
# safetensors metadata key: the sha256 of the config bytes saved with these weights
PAIRING_KEY = "lorafx_config_sha256"
logger = logging.getLogger("lorafx")
# LoraConfig fields whose non-default values change what the adapter computes (or which
# weights it has): lorafx refuses such adapters instead of silently computing something else.
_UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "modules_to_save": (None, [], ()),
                "layers_to_transform": (None,), "lora_bias": (False, None), "use_qalora": (False, None),
                "trainable_token_indices": (None,), "alora_invocation_tokens": (None,),
                "layer_replication": (None,), "target_parameters": (None, [], ()), "use_bdlora": (None, False),
                "arrow_config": (None,), "kasa_config": (None,), "monteclora_config": (None,)}
# init_lora_weights values with which PEFT rewrites the base weights when it loads the adapter.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq")
SCALE_OPTIONS = ("r", "alpha", "rank_pattern", "alpha_pattern", "use_rslora")  # compile options that set scales


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


def _peft_config(cm, records) -> dict:
    """The PEFT LoraConfig fields describing ``cm``'s adapters."""
    ranks = {s: r.r for s, r in records.items()}
    alphas = {s: r.alpha for s, r in records.items()}
    r0, a0 = _most_common(ranks.values()), _most_common(alphas.values())
    recs = list(records.values())
    transposed = {r.weight_transposed for r in recs}
    return {
        "peft_type": "LORA",
        "task_type": _task_type(cm._source),
        "base_model_name_or_path": getattr(getattr(cm._source, "config", None), "_name_or_path", None) or None,
        "r": r0,
        "lora_alpha": a0,
        "target_modules": _targets(cm._source, records),
        "rank_pattern": _pattern(ranks, r0),
        "alpha_pattern": _pattern(alphas, a0),
        "lora_dropout": recs[0].dropout,
        "use_rslora": _rslora_flag(records),
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


def save_adapter(cm, directory: str, *, overwrite: bool = True) -> None:
    """Write ``cm``'s adapters to ``directory`` in PEFT's format.

    Atomic: if any step fails, the adapter already in ``directory`` stays as it was
    and no staging files remain.  Other files in ``directory`` are left alone.
    ``overwrite=False`` refuses to replace an adapter already there.
    """
    records = cm.lora_records()
    if not records:
        raise ValueError("this model has no LoRA adapters to save")
    meta = [s for s, r in records.items() if get_attr(cm, r.lora_A).is_meta or get_attr(cm, r.lora_B).is_meta]
    if meta:
        raise ValueError(f"cannot save the adapters: they are on the meta device (adapter {meta[0]!r} has no "
                         "values), because the model was compiled without weights, so there is nothing to save; "
                         "compile the model with real weights (or load real weights into it) first")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} is a file: pass a folder to save_adapter (it writes "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME} into it)")
    replacing = any(os.path.exists(os.path.join(directory, n)) for n in (CONFIG_NAME, WEIGHTS_NAME))
    if replacing and not overwrite:
        raise FileExistsError(f"{directory} already holds an adapter; pass overwrite=True to replace it")
    config = _peft_config(cm, records)
    tensors = {}
    for site, rec in records.items():
        tensors[f"{PREFIX}{site}.lora_A.weight"] = get_attr(cm, rec.lora_A).detach().contiguous().cpu()
        tensors[f"{PREFIX}{site}.lora_B.weight"] = get_attr(cm, rec.lora_B).detach().contiguous().cpu()
    os.makedirs(directory, exist_ok=True)
    _write_atomically(directory, config, tensors)
    if replacing:
        logger.warning("lorafx: replaced the adapter in %s", directory)


def _write_atomically(directory: str, config: dict, tensors: dict) -> None:
    """Stage both files in a hidden folder inside ``directory``, back up the old ones
    (hard links, else copies), then move weights and config in; on any error put the
    old files back."""
    from safetensors.torch import save_file

    stage = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)
    backups: Dict[str, str] = {}  # name -> backup of the file it replaces
    moved = []  # names already moved into ``directory``
    keep_stage = False
    try:
        with open(os.path.join(stage, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(stage, CONFIG_NAME), "rb") as f:
            config_sha = hashlib.sha256(f.read()).hexdigest()
        # lorafx's metadata goes in the weights: PEFT warns about unknown config keys
        save_file(tensors, os.path.join(stage, WEIGHTS_NAME),
                  metadata={"format": "pt", "lorafx_version": __version__,
                            PAIRING_KEY: config_sha})
        with open(os.path.join(stage, WEIGHTS_NAME), "rb") as f:
            os.fsync(f.fileno())
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            old = os.path.join(directory, name)
            if os.path.exists(old):
                backups[name] = os.path.join(stage, name + ".old")
                try:
                    os.link(old, backups[name])
                except OSError:  # no hard links here: copy
                    shutil.copy2(old, backups[name])
        for name in (WEIGHTS_NAME, CONFIG_NAME):  # weights first: a crash in between is caught on load
            os.replace(os.path.join(stage, name), os.path.join(directory, name))
            moved.append(name)
    except BaseException as error:
        try:
            for name in reversed(moved):
                if name in backups:
                    os.replace(backups[name], os.path.join(directory, name))
                else:
                    os.remove(os.path.join(directory, name))
        except OSError as undo_error:
            keep_stage = True
            raise OSError(f"saving the adapter in {directory} failed ({error}) and putting the previous adapter "
                          f"back failed too ({undo_error}): its files are in {stage}") from error
        raise
    finally:
        if not keep_stage:
            shutil.rmtree(stage, ignore_errors=True)
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Make the renames durable where the OS allows it (best effort: the save is done)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fix(path: str) -> str:
    return f"{path} is corrupt or truncated; save or download the adapter again"


def _read_config(directory: str) -> Tuple[dict, bytes]:
    """The parsed config in ``directory`` and its exact bytes."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: not a PEFT/lorafx adapter directory")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): {_fix(path)}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object: {_fix(path)}")
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
    return config, raw


def read_adapter_config(directory: str) -> dict:
    """The adapter config in ``directory``, checked to be one lorafx supports."""
    return _read_config(directory)[0]


def _weights_file(directory: str) -> str:
    for name in (WEIGHTS_NAME, "adapter_model.bin"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor adapter_model.bin")


def _load_state(path: str, trust_pickle: bool) -> Tuple[dict, dict]:
    """The tensors in the weights file ``path`` and its metadata."""
    from safetensors import SafetensorError, safe_open

    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except SafetensorError as e:
            raise ValueError(f"{path} is not a valid safetensors file ({e}): {_fix(path)}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise ValueError(f"{path} could not be unpickled ({e}): {_fix(path)}") from e
        reason = str(e.__context__ or "").split("\n")[0].split(". ")[0] or "it holds objects other than tensors"
        raise ValueError(f"{path} is a pickle that torch will not load with weights_only=True ({reason}): convert "
                         "it to safetensors, or pass trust_pickle=True if you trust the file") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path} could not be read ({str(e).splitlines()[0]}): {_fix(path)}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    return state, {}


def _read_weights(directory: str, trust_pickle: bool = False) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor]], dict]:
    """The (A, B) of every site in ``directory``'s weights file, and the file's metadata."""
    path = _weights_file(directory)
    state, metadata = _load_state(path, trust_pickle)
    sites: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", str(key))
        if m is None or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: unexpected entry {key!r} (lorafx loads lora_A/lora_B weights only)")
        sites.setdefault(m.group(1), {})[m.group(2)] = value
    half = sorted(s for s, ab in sites.items() if len(ab) != 2)
    if half:
        raise ValueError(f"{path}: {half[0]} has only lora_{''.join(sites[half[0]])}: {_fix(path)}")
    return {s: (ab["A"], ab["B"]) for s, ab in sites.items()}, metadata


def _read_adapter(directory: str, trust_pickle: bool = False):
    """Read and check both files of the adapter in ``directory``: (config, weights)."""
    config, raw = _read_config(directory)
    weights, metadata = _read_weights(directory, trust_pickle)
    expected = metadata.get(PAIRING_KEY)
    if expected is not None and expected != hashlib.sha256(raw).hexdigest():
        raise ValueError(f"the config and weights in {directory} come from different saves (an interrupted save, "
                         f"or {CONFIG_NAME} edited after saving?); save the adapter again")
    return config, weights


def load_adapter_weights(cm, directory: str, *, trust_pickle: bool = False) -> None:
    """Copy the adapter in ``directory`` into ``cm``'s adapters.

    The adapter must be one lorafx supports, target the same sites with the same
    shapes, and give every site the scale (alpha / r, or alpha / sqrt(r)) ``cm``
    was compiled with: otherwise the outputs would silently differ from PEFT's.
    Nothing is copied unless all of that holds.  ``trust_pickle=True`` lets a
    ``.bin`` file run the pickle code it holds.
    """
    config, weights = _read_adapter(directory, trust_pickle)
    _copy_weights(cm, directory, weights, config)


def _copy_weights(cm, directory: str, weights, config=None) -> None:
    """Copy ``weights`` (site -> (A, B)) into ``cm``'s adapters (shapes, and the scales
    when ``config`` is given, must match; nothing is copied otherwise)."""
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


def compile_settings(config: dict) -> dict:
    """The ``lorafx.compile`` options that reproduce an adapter configuration."""
    targets = config.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(targets)
    exclude = config.get("exclude_modules")
    return dict(
        r=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        target_modules=targets or "all-linear",
        rank_pattern=config.get("rank_pattern") or {},
        alpha_pattern=config.get("alpha_pattern") or {},
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        exclude_modules=tuple(exclude) if isinstance(exclude, list) else exclude,
    )


def read_adapter(directory: str, trust_pickle: bool = False):
    """``(config, weights)`` of the adapter in ``directory``, both files read and checked."""
    return _read_adapter(directory, trust_pickle)


def copy_adapter_weights(cm, directory: str, weights, config=None) -> None:
    """Copy ``weights`` (from ``read_adapter``) into ``cm``'s adapters; with ``config``,
    first check that it gives every site the scale ``cm`` was compiled with."""
    _copy_weights(cm, directory, weights, config)
