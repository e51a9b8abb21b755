"""Adapters in PEFT's on-disk format.

``adapter_config.json`` holds PEFT LoraConfig fields (r, lora_alpha, target_modules,
rank_pattern, alpha_pattern, lora_dropout, use_rslora, fan_in_fan_out, ...);
``adapter_model.safetensors`` holds ``base_model.model.<site>.lora_A.weight`` (r, in)
and ``base_model.model.<site>.lora_B.weight`` (out, r).  PEFT's
``PeftModel.from_pretrained(base, dir)`` loads what ``save_adapter`` writes, and
``load_adapter`` reads what PEFT's ``save_pretrained`` writes.

PiSSA/OLoRA adapters (``init="pissa"``/``"olora"``) are saved converted to plain LoRA of rank
2r for the original weights (``[B, -B0]·[A; A0]``, as PEFT's
``path_initial_model_for_weight_conversion``); an unconverted PEFT PiSSA/OLoRA adapter loads
as PEFT loads it, by compiling with its init (the residual recomputed from the original
weights) and copying A and B.

Compiling a model with an adapter's configuration and loading its weights
(``lorafx.load_adapter``) is the driver's ``lorafx.compiler.load_adapter``, built on
``read_adapter``, ``compile_settings`` and ``copy_adapter_weights`` here.

DoRA adapters (``use_dora=True``) also save each site's magnitude vector under PEFT's key
``base_model.model.<site>.lora_magnitude_vector`` (out_features,) and ``use_dora: true`` in the
config; a DoRA adapter loads only into a model compiled with ``use_dora=True`` (and a plain one
only without it), which ``lorafx.load_adapter`` does from the config.

Shortcut adapters (``shortcuts=True``, HeteroLoRA's LoRA-adapted shortcut
connections), which PEFT cannot express, go to a third file, ``lorafx_shortcuts.safetensors``:
``<site>.lora_A`` (r, dim) and ``<site>.lora_B`` (dim, r) per site (``shortcuts.3.attn_skip``),
and in its metadata each site's ``{r, alpha, scale, link}`` as JSON.  PEFT ignores the
file; ``lorafx.load_adapter`` compiles with the sites it lists and loads both parts.  A
model whose only adapters are shortcuts writes the config (``target_modules: []``) and
this file, and no PEFT weights.

Sparse adapters (``sparsity=...``, LoRS) were trained on a pruned base and merge as
W + (s·B A) ⊙ 1[W ≠ 0]: PEFT's own merge (W + s·B A) would fill the pruned zeros.  Their
sites, with pattern, method and gradient mode, go in the weights file's metadata
(``lorafx_sparsity``, JSON, which PEFT ignores), ``save_adapter`` warns how a PEFT user
reapplies the mask, and ``lorafx.load_adapter`` compiles those sites with
``sparsity="keep"`` (the base passed in must be the pruned one).

``save_adapter`` never leaves a half-written adapter: every file is staged, then moved
in (a file a save no longer writes, such as an old shortcuts file, is moved out last);
any error puts the previous files back.  The metadata of each weights file records the
sha256 of the config saved with it and an id of the save, so a mix left by a crash is
refused on load.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from ._version import __version__
from .dialect import SparseRecord
from .graph_utils import get_attr, pattern_value
from .dialect.mha import peft_target
from .meta import LoraRecord, get_record, graph_record
from lorafx.passes.modules_to_save import saved_tensors
from lorafx.passes.trainable_tokens import PEFT_DELTA, token_records, token_tensors

__all__ = ["save_adapter", "load_adapter_weights", "read_adapter_config", "read_adapter", "read_adapter_files",
           "compile_settings", "check_residual_init", "peft_keys", "trainable_tensors", "trained_settings", "shortcut_settings", "sparsity_settings", "sparse_sites", "copy_adapter_weights", "AdapterFiles", "SavedShortcut",
           "SCALE_OPTIONS", "CONFIG_NAME", "WEIGHTS_NAME", "SHORTCUTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SHORTCUTS_NAME = "lorafx_shortcuts.safetensors"  # the shortcut adapters, which PEFT cannot express
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
STAGING_PREFIX = ".lorafx-save-"  # the hidden folder a save stages its files in
# safetensors metadata key: the sha256 of the config bytes saved with these weights
PAIRING_KEY = "lorafx_config_sha256"
SAVE_ID_KEY = "lorafx_save_id"  # safetensors metadata key: the same random id in every weights file of one save
SHORTCUTS_KEY = "lorafx_shortcuts"  # metadata key of the shortcuts file: {site: {r, alpha, scale, link}} as JSON
SPARSITY_KEY = "lorafx_sparsity"  # metadata key of the weights file: {site: {pattern, method, grad}} as JSON
PEFT_MASK_HINT = ("merge each of these sites as W + (s·B @ A) * (W != 0) on the pruned base (not PEFT's "
                  "merge_and_unload, which fills the zeros), e.g. for a PeftModel: delta = layer.get_delta_weight("
                  "'default'); layer.base_layer.weight.data += delta * (layer.base_layer.weight != 0)")
logger = logging.getLogger("lorafx")
PARAMETER_KIND = "lora_parameter"  # the op kind of target_parameters adapters (lorafx.dialect.parameter)
EMBEDDING_KINDS = ("lora_embedding", "lora_dora_embedding")  # the op kinds of embedding adapters (lorafx.dialect)
# LoraConfig fields whose non-default values change what the adapter computes (or which
# weights it has): lorafx refuses such adapters instead of silently computing something else.
_UNSUPPORTED = {"bias": ("none", None), "use_qalora": (False, None),
                "alora_invocation_tokens": (None,),
                "layer_replication": (None,), "use_bdlora": (None, False),
                "arrow_config": (None,), "kasa_config": (None,), "monteclora_config": (None,)}
# init_lora_weights values with which PEFT rewrites the base weights when it loads the adapter.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq")
# ...of which lorafx recomputes these from the original weights, as PEFT's from_pretrained does (deterministic:
# not pissa_niter_N, whose randomised SVD PEFT draws from torch's global generator)
_RECOMPUTED_INITS = ("pissa", "olora")
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


def _dora_flag(records) -> bool:
    """PEFT's use_dora for these records (DoRA adapters carry a magnitude); PEFT has one flag
    per adapter, so a mix of DoRA and plain LoRA sites cannot be saved as one."""
    dora = {s for s, r in records.items() if r.magnitude}
    if dora and len(dora) != len(records):
        plain = sorted(set(records) - dora)
        raise ValueError(f"cannot save the adapters in PEFT's format: {sorted(dora)[0]} is a DoRA adapter and "
                         f"{plain[0]} is not, but PEFT's use_dora applies to every site of an adapter")
    return bool(dora)


def _pattern_name(rec: LoraRecord) -> str:
    """The name PEFT matches rank/alpha_pattern keys against: the module's (an nn.MultiheadAttention's
    for its out_proj, ``peft_target``), or for a target_parameters adapter the parameter's path."""
    return rec.weight if rec.kind == PARAMETER_KIND else peft_target(rec)


def _target_parameters(cm, records) -> list:
    """PEFT target_parameters naming exactly the parameter adapters of ``records`` (their full
    paths; PEFT takes no regex there, so a parameter left out whose path ends with "." + one of
    them cannot be told apart and is refused)."""
    names = sorted(r.weight for r in records.values() if r.kind == PARAMETER_KIND)
    others = {n for n, _ in cm._source.named_parameters()} - set(names)
    clash = next(((o, n) for o in sorted(others) for n in names if o.endswith("." + n)), None)
    if clash is not None:
        raise ValueError(f"cannot save adapters in PEFT's format: target_parameters={names!r} would also adapt "
                         f"{clash[0]!r} in PEFT (its rule matches the end of a name, and it takes no regex)")
    return names


def _peft_config(cm, records) -> dict:
    """The PEFT LoraConfig fields describing ``cm``'s adapters."""
    ranks = {_pattern_name(r): r.r for r in records.values()}
    alphas = {_pattern_name(r): r.alpha for r in records.values()}
    modules = {peft_target(r): r for r in records.values() if r.kind != PARAMETER_KIND}  # (an MHA's out_proj: the MHA)
    parameters = _target_parameters(cm, records)
    r0, a0 = _most_common(ranks.values()), _most_common(alphas.values())
    recs = list(records.values())
    transposed = {r.weight_transposed for r in recs}
    targets = _targets(cm._source, modules) if modules else []
    layers = {}
    if isinstance(targets, list) and cm.options.get("layers_to_transform") is not None:
        # informative (the targets are whole paths, which PEFT adapts whatever their index); PEFT refuses both
        # with a regex target_modules
        layers = {"layers_to_transform": _jsonable(cm.options["layers_to_transform"]),
                  "layers_pattern": _jsonable(cm.options.get("layers_pattern"))}
    return {
        "peft_type": "LORA",
        "task_type": _task_type(cm._source),
        "base_model_name_or_path": getattr(getattr(cm._source, "config", None), "_name_or_path", None) or None,
        "r": r0,
        "lora_alpha": a0,
        "target_modules": targets,
        "target_parameters": parameters or None,
        **layers,
        "rank_pattern": _pattern(ranks, r0),
        "alpha_pattern": _pattern(alphas, a0),
        "lora_dropout": max(r.dropout for r in recs),  # (an nn.MultiheadAttention's adapters have none, as in PEFT)
        "use_rslora": _rslora_flag(records),
        # PEFT picks the layout per layer (Conv1D -> fan_in_fan_out) and the saved A/B
        # are (r, in) / (out, r) either way, so a mixed model round-trips too.
        "fan_in_fan_out": transposed == {True},
        "bias": "none",
        "lora_bias": any(r.lora_bias is not None for r in recs),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": _dora_flag(records),
        **_trainable_config(cm),  # modules_to_save, trainable_token_indices
        "revision": None,
    }


def _converted_record(rec: LoraRecord, rslora: bool) -> LoraRecord:
    """The record of a PiSSA/OLoRA adapter saved as a plain LoRA: rank 2r at the same scale
    (alpha doubled, or times sqrt(2) with rsLoRA's alpha/sqrt(r), as PEFT's conversion)."""
    return dataclasses.replace(rec, r=2 * rec.r, alpha=rec.alpha * (2 ** 0.5 if rslora else 2))


def _convert_residual(weights: dict, converted: Dict[str, LoraRecord], value) -> None:
    """Rewrite the PiSSA/OLoRA adapters of ``weights`` (PEFT keys) as plain LoRA adapters of the
    original base: ΔW = s(B A - B0 A0) = s [B, -B0]·[A; A0] (PEFT's ``subtract_mutated_init``)."""
    for site, rec in converted.items():
        a_key, b_key = f"{PREFIX}{site}.lora_A.weight", f"{PREFIX}{site}.lora_B.weight"
        A0, B0 = value(rec.lora_A0), value(rec.lora_B0)
        weights[a_key] = torch.cat([weights[a_key], A0.to(weights[a_key].dtype)], dim=0).contiguous()
        weights[b_key] = torch.cat([weights[b_key], -B0.to(weights[b_key].dtype)], dim=1).contiguous()


def _jsonable(value):
    return list(value) if isinstance(value, (tuple, set, frozenset)) else value


def _shortcuts_only_config(cm, shortcuts) -> dict:
    """The config of an adapter made of shortcut adapters only: PEFT's fields, no target modules."""
    return {
        "peft_type": "LORA",
        "task_type": _task_type(cm._source),
        "base_model_name_or_path": getattr(getattr(cm._source, "config", None), "_name_or_path", None) or None,
        "r": _most_common(rec.r for rec in shortcuts.values()),
        "lora_alpha": _most_common(rec.alpha for rec in shortcuts.values()),
        "target_modules": [],  # no linear adapters: the weights are all in lorafx_shortcuts.safetensors
        "bias": "none",
        "inference_mode": True,
        "use_dora": False,
    }


def _is_dtensor(t) -> bool:
    """Whether ``t`` is a torch.distributed DTensor (a sharded parameter: FSDP2, tensor parallel)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def save_adapter(cm, directory: str, *, overwrite: bool = True, tensors=None, records=None) -> None:
    """Write ``cm``'s adapters to ``directory`` in PEFT's format, and its shortcut adapters
    (if any) to ``lorafx_shortcuts.safetensors`` beside them.  ``tensors``: a state dict to
    take the adapter values from (by parameter name) instead of ``cm``'s parameters; adapters
    sharded across processes (FSDP2's DTensors) are refused, naming how to gather them.

    Atomic: if any step fails, the adapter already in ``directory`` stays as it was
    and no staging files remain.  Other files in ``directory`` are left alone.
    ``overwrite=False`` refuses to replace an adapter already there.  ``records``: the
    {site: LoraRecord} of the one adapter to save (``cm.adapter_records(name)``); without it,
    the model's adapters (and shortcut adapters), named ones (``add_adapter``) in PEFT's
    multi-adapter layout (``cm.save_adapter``).
    """
    if records is None and cm.__dict__.get("_adapter_state") is not None:  # named adapters: PEFT's layout
        cm.save_adapter(directory, overwrite=overwrite, tensors=tensors)
        return
    shortcuts = cm.shortcut_records() if records is None else {}
    records = cm.lora_records() if records is None else records
    if not records and not shortcuts:
        raise ValueError("this model has no LoRA adapters to save")
    paths = {site: tuple(peft_keys({site: r}).values()) for site, r in records.items()}
    paths.update({site: (r.lora_A, r.lora_B) for site, r in shortcuts.items()})
    meta = [s for s, pair in paths.items() if any(get_attr(cm, p).is_meta for p in pair)]
    if meta:
        raise ValueError(f"cannot save the adapters: they are on the meta device (adapter {meta[0]!r} has no "
                         "values), because the model was compiled without weights, so there is nothing to save; "
                         "compile the model with real weights (or load real weights into it) first")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} is a file: pass a folder to save_adapter (it writes "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME} into it)")
    replacing = any(os.path.exists(os.path.join(directory, n)) for n in (CONFIG_NAME, WEIGHTS_NAME, SHORTCUTS_NAME))
    if replacing and not overwrite:
        raise FileExistsError(f"{directory} already holds an adapter; pass overwrite=True to replace it")
    if tensors is not None:
        missing = [p for pair in paths.values() for p in pair if p not in tensors]
        if missing:
            raise KeyError(f"save_adapter: the state dict given has no {missing[0]!r} ({len(missing)} adapter "
                           "tensors missing); pass the model's full state_dict() (or none, to save its parameters)")
    source = (lambda path: tensors[path]) if tensors is not None else (lambda path: get_attr(cm, path))
    sharded = [p for pair in paths.values() for p in pair if _is_dtensor(source(p))]
    if sharded:
        raise ValueError(
            f"cannot save the adapters: they are sharded across processes (adapter tensor {sharded[0]!r} is a "
            "DTensor, e.g. after FSDP2's fully_shard), so this rank holds only its shard. Gather the full tensors "
            "on every rank, then save on rank 0: full = torch.distributed.checkpoint.state_dict.get_model_state_dict("
            "cm, options=StateDictOptions(full_state_dict=True, cpu_offload=True)); then on rank 0 "
            "lorafx.save_adapter(cm, folder, tensors=full)")
    tensor = lambda path: source(path).detach().contiguous().cpu()
    files: Dict[str, Tuple[dict, dict]] = {}  # file name -> (tensors, extra metadata)
    sparse = sparse_sites(cm)
    if records:
        converted = {site: rec for site, rec in records.items() if rec.lora_A0 is not None}
        rslora = _rslora_flag(records) if converted else False
        config = _peft_config(cm, {**records, **{site: _converted_record(rec, rslora)
                                                 for site, rec in converted.items()}})
        extra = {SPARSITY_KEY: json.dumps({"sites": sparse, "merge": PEFT_MASK_HINT})} if sparse else {}
        keys = {**peft_keys(records), **_trainable_tensors(cm)}  # LoRA, modules_to_save, trainable rows
        weights = {f"{PREFIX}{key}": tensor(path) for key, path in keys.items()}
        _convert_residual(weights, converted, lambda path: get_attr(cm, path).detach().cpu())
        files[WEIGHTS_NAME] = (weights, extra)
    else:
        config = _shortcuts_only_config(cm, shortcuts)
    if shortcuts:
        listed = {site: {"r": rec.r, "alpha": rec.alpha, "scale": rec.scale, "link": rec.link}
                  for site, rec in shortcuts.items()}
        files[SHORTCUTS_NAME] = ({f"{site}.lora_{ab}": tensor(path) for site, rec in shortcuts.items()
                                  for ab, path in (("A", rec.lora_A), ("B", rec.lora_B))},
                                 {SHORTCUTS_KEY: json.dumps(listed)})
    # files of an earlier save that this one does not write (moved out, after the new ones are in)
    stale = [SHORTCUTS_NAME] if not shortcuts else ([] if records else [WEIGHTS_NAME, BIN_NAME])
    os.makedirs(directory, exist_ok=True)
    _write_atomically(directory, config, files, stale)
    if shortcuts and records:
        logger.warning("lorafx: PEFT cannot express shortcut adapters (%d sites, shortcuts=True): they are saved in "
                       "%s beside the PEFT adapter in %s, which PEFT's PeftModel.from_pretrained ignores; "
                       "lorafx.load_adapter(model, folder) restores both", len(shortcuts), SHORTCUTS_NAME, directory)
    elif shortcuts:
        logger.warning("lorafx: this model has shortcut adapters only (%d sites, shortcuts=True), which PEFT cannot "
                       "express: wrote %s and %s to %s (no %s, so PEFT cannot load it); lorafx.load_adapter(model, "
                       "folder) restores them", len(shortcuts), CONFIG_NAME, SHORTCUTS_NAME, directory, WEIGHTS_NAME)
    if records and converted:
        logger.warning("lorafx: %d adapter(s) were initialised with %s, which trains against a residual of the base "
                       "weights; %s holds them converted to plain LoRA adapters of rank 2r ([B, -B0]·[A; A0], "
                       "alpha doubled), which load on the original base model (PEFT's "
                       "path_initial_model_for_weight_conversion)", len(converted),
                       cm.options.get("init", "PiSSA/OLoRA"), directory)
    if sparse:
        logger.warning("lorafx: %d of these adapters were trained on pruned weights (sparsity=...) and keep their "
                       "zeros only when merged with the mask: %s. lorafx.load_adapter(pruned_model, folder) does this "
                       "itself", len(sparse), PEFT_MASK_HINT)
    if replacing:
        logger.warning("lorafx: replaced the adapter in %s", directory)


def sparse_sites(cm) -> Dict[str, dict]:
    """{site: {pattern, method, grad}} of ``cm``'s sparse adapters (merged ones too)."""
    out = {}
    for node in cm.graph_module.graph.nodes:
        sparse, rec = get_record(node, SparseRecord), get_record(node, LoraRecord)
        if sparse is not None and rec is not None:
            out[rec.site] = {"pattern": sparse.pattern, "method": sparse.method, "grad": sparse.grad}
    return out


def sparsity_settings(files: "AdapterFiles") -> dict:
    """The ``lorafx.compile`` options that make the saved sparse sites sparse again ({} for none)."""
    if not files.sparse:
        return {}
    grads = Counter(v.get("grad", "exact") for v in files.sparse.values())
    return dict(sparsity="keep", sparsity_modules=sorted(files.sparse), sparse_grad=grads.most_common(1)[0][0])


def _write_atomically(directory: str, config: dict, files: Dict[str, Tuple[dict, dict]], stale=()) -> None:
    """Stage the config and the weights ``files`` ({name: (tensors, extra metadata)}) in a
    hidden folder inside ``directory``, back up the old ones (hard links, else copies),
    move the weights then the config in, then move the ``stale`` files of an earlier save
    out (into the stage, as their own backups); on any error put the old files back."""
    from safetensors.torch import save_file

    stage = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)
    backups: Dict[str, str] = {}  # name -> backup of the file it replaces (or removes)
    moved = []  # names whose file in ``directory`` is no longer the old one
    keep_stage = False
    try:
        with open(os.path.join(stage, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(stage, CONFIG_NAME), "rb") as f:
            config_sha = hashlib.sha256(f.read()).hexdigest()
        save_id = uuid.uuid4().hex
        for name, (tensors, extra) in files.items():
            # lorafx's metadata goes in the weights: PEFT warns about unknown config keys
            save_file(tensors, os.path.join(stage, name),
                      metadata={"format": "pt", "lorafx_version": __version__, PAIRING_KEY: config_sha,
                                SAVE_ID_KEY: save_id, **extra})
            with open(os.path.join(stage, name), "rb") as f:
                os.fsync(f.fileno())
        names = [*files, CONFIG_NAME]  # weights first: a crash before the config is in is caught on load
        for name in names:
            old = os.path.join(directory, name)
            if os.path.exists(old):
                backups[name] = os.path.join(stage, name + ".old")
                try:
                    os.link(old, backups[name])
                except OSError:  # no hard links here: copy
                    shutil.copy2(old, backups[name])
        for name in names:
            os.replace(os.path.join(stage, name), os.path.join(directory, name))
            moved.append(name)
        for name in stale:  # last: until then a stale file is refused on load (its save id differs)
            old = os.path.join(directory, name)
            if os.path.exists(old):
                backups[name] = os.path.join(stage, name + ".old")
                os.replace(old, backups[name])
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
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS) \
            and init.lower() not in _RECOMPUTED_INITS:
        raise ValueError(f"{directory}: init_lora_weights={init!r} changes the base weights, which lorafx does not "
                         "do; convert it to a plain LoRA adapter first (PEFT's "
                         "save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    return config, raw


def read_adapter_config(directory: str) -> dict:
    """The adapter config in ``directory``, checked to be one lorafx supports."""
    return _read_config(directory)[0]


def _weights_file(directory: str) -> str:
    for name in (WEIGHTS_NAME, BIN_NAME):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {BIN_NAME}")


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


def _peft_key(key: str) -> str:
    """A saved key as ``peft_tensors`` names it: without "base_model.model." and without an
    adapter name after the LoRA tensor's name (``q.lora_A.default.weight`` -> ``q.lora_A.weight``)."""
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    m = re.fullmatch(r"(.+\.lora_[A-Za-z_]+)\.(?!weight$|bias$)[^.]+(\.(?:weight|bias))?", key)
    return m.group(1) + (m.group(2) or "") if m else key


def _read_weights(directory: str, trust_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The tensors of ``directory``'s weights file by PEFT key (``_peft_key``), and its metadata."""
    path = _weights_file(directory)
    state, metadata = _load_state(path, trust_pickle)
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: unexpected entry {key!r} (not a tensor): {_fix(path)}")
        out[_peft_key(str(key))] = value
    sites: Dict[str, set] = {}
    for key in out:
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if m:
            sites.setdefault(m.group(1), set()).add(m.group(2))
    half = sorted(s for s, ab in sites.items() if len(ab) != 2)
    if half:
        raise ValueError(f"{path}: {half[0]} has only lora_{''.join(sites[half[0]])}: {_fix(path)}")
    return out, metadata


def peft_keys(records: Dict[str, LoraRecord]) -> Dict[str, str]:
    """{PEFT key (without "base_model.model."): attribute path} of ``records``' adapters, as
    each record's op kind names them (``OpKind.peft_tensors``)."""
    from .dialect import kind_named
    out: Dict[str, str] = {}
    for rec in records.values():
        out.update(kind_named(rec.kind).peft_tensors(rec))
    return out


def _site_of(key: str) -> str:
    return re.split(r"\.(?:lora_|modules_to_save|token_adapter)", key, maxsplit=1)[0]


@dataclass(frozen=True)
class SavedShortcut:
    """One shortcut adapter of ``lorafx_shortcuts.safetensors``."""

    r: int
    alpha: float
    scale: float
    link: str
    lora_A: torch.Tensor  # (r, dim)
    lora_B: torch.Tensor  # (dim, r)


@dataclass(frozen=True)
class AdapterFiles:
    """What an adapter folder holds, every file read and checked (``read_adapter_files``).

    ``tensors``: the PEFT weights by key ({} for shortcut adapters only; see ``peft_keys``);
    ``shortcuts``: {site: SavedShortcut}, in the saved order ({} without a shortcuts file)."""

    config: dict
    tensors: Dict[str, torch.Tensor]
    shortcuts: Dict[str, SavedShortcut]
    sparse: Dict[str, dict] = None  # {site: {pattern, method, grad}} of the sparse adapters (LoRS)

    @property
    def weights(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """{site: (A, B)} of the adapters saved as ``<site>.lora_A.weight`` / ``lora_B.weight``."""
        out = {}
        for key, A in self.tensors.items():
            if key.endswith(".lora_A.weight") and key[:-len("A.weight")] + "B.weight" in self.tensors:
                out[key[:-len(".lora_A.weight")]] = (A, self.tensors[key[:-len("A.weight")] + "B.weight"])
        return out


def _read_shortcuts(directory: str) -> Tuple[Dict[str, SavedShortcut], dict]:
    """The shortcut adapters in ``directory``'s shortcuts file, and its metadata."""
    path = os.path.join(directory, SHORTCUTS_NAME)
    state, metadata = _load_state(path, trust_pickle=False)
    try:
        listed = json.loads(metadata[SHORTCUTS_KEY])
    except (KeyError, ValueError):
        listed = None
    if not isinstance(listed, dict):
        raise ValueError(f"{path} has no valid {SHORTCUTS_KEY!r} metadata (the sites' r, alpha, scale and link): "
                         f"{_fix(path)}")
    out = {}
    for site, cfg in listed.items():
        A, B = state.pop(f"{site}.lora_A", None), state.pop(f"{site}.lora_B", None)
        if A is None or B is None:
            raise ValueError(f"{path}: shortcut {site} has no {'lora_A' if A is None else 'lora_B'}: {_fix(path)}")
        try:
            out[site] = SavedShortcut(int(cfg["r"]), float(cfg["alpha"]), float(cfg["scale"]), str(cfg["link"]), A, B)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: the metadata of shortcut {site} is not {{r, alpha, scale, link}}: "
                             f"{_fix(path)}") from None
    if state:
        raise ValueError(f"{path}: unexpected entry {sorted(state)[0]!r} (a shortcut not in its metadata): "
                         f"{_fix(path)}")
    return out, metadata


def read_adapter_files(directory: str, trust_pickle: bool = False) -> AdapterFiles:
    """Read and check every file of the adapter in ``directory``: the config, the PEFT
    weights and the shortcut adapters, each paired with the config (and the weights with
    each other) by the save that wrote them."""
    config, raw = _read_config(directory)
    config_sha = hashlib.sha256(raw).hexdigest()
    has_shortcuts = os.path.exists(os.path.join(directory, SHORTCUTS_NAME))
    metas = {}
    weights: Dict[str, torch.Tensor] = {}
    if has_shortcuts and config.get("target_modules") == [] and not any(
            os.path.exists(os.path.join(directory, n)) for n in (WEIGHTS_NAME, BIN_NAME)):
        pass  # shortcut adapters only
    else:
        try:
            weights, metas[_weights_file(directory)] = _read_weights(directory, trust_pickle)
            _check_trained(_weights_file(directory), config, _trained_part(weights))
        except FileNotFoundError:
            raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {BIN_NAME}"
                                    + (f" (it has {SHORTCUTS_NAME}, but its {CONFIG_NAME} names linear adapters)"
                                       if has_shortcuts else "")) from None
    _check_lora_bias(directory, config, weights)
    shortcuts: Dict[str, SavedShortcut] = {}
    if has_shortcuts:
        shortcuts, metas[os.path.join(directory, SHORTCUTS_NAME)] = _read_shortcuts(directory)
    for path, metadata in metas.items():
        expected = metadata.get(PAIRING_KEY)
        if expected is not None and expected != config_sha:
            raise ValueError(f"the config and weights in {directory} come from different saves (an interrupted "
                             f"save, or {CONFIG_NAME} edited after saving?); save the adapter again")
    ids = {m.get(SAVE_ID_KEY) for m in metas.values()}
    if len(metas) > 1 and (None in ids or len(ids) > 1):
        raise ValueError(f"the PEFT weights and {SHORTCUTS_NAME} in {directory} come from different saves (an "
                         "interrupted save, or a file copied in from another adapter?); save the adapter again")
    sparse = {}
    raw_sparse = next((m[SPARSITY_KEY] for m in metas.values() if m and SPARSITY_KEY in m), None)
    if raw_sparse is not None:
        try:
            sparse = json.loads(raw_sparse)["sites"]
            assert isinstance(sparse, dict) and all(isinstance(v, dict) for v in sparse.values())
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ValueError(f"the {SPARSITY_KEY!r} metadata of the weights in {directory} is not valid JSON "
                             "{'sites': {site: {...}}}; save the adapter again") from None
    return AdapterFiles(config, weights, shortcuts, sparse)


def _check_lora_bias(directory: str, config: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """PEFT's lora_bias gives every lora_B a bias: the config and the weights must agree."""
    sites = sorted(k[:-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    biased = {k[:-len(".lora_B.bias")] for k in tensors if k.endswith(".lora_B.bias")}
    flag = bool(config.get("lora_bias", False))
    odd = next((s for s in sites if (s in biased) != flag), None)
    if odd is not None:
        raise ValueError(f"{directory}: {CONFIG_NAME} says lora_bias={flag} but {odd} has "
                         f"{'no' if flag else 'a'} lora_B bias in the weights ({len(biased)} of {len(sites)} sites "
                         f"have one): {_fix(directory)}")


def _read_adapter(directory: str, trust_pickle: bool = False):
    """Read and check the adapter in ``directory``: (config, PEFT tensors by key)."""
    files = read_adapter_files(directory, trust_pickle)
    return files.config, files.tensors


def load_adapter_weights(cm, directory: str, *, trust_pickle: bool = False) -> None:
    """Copy the adapter in ``directory`` into ``cm``'s adapters, its shortcut adapters too.

    The adapter must be one lorafx supports, target the same sites with the same
    shapes, and give every site the scale (alpha / r, or alpha / sqrt(r)) ``cm``
    was compiled with: otherwise the outputs would silently differ from PEFT's.
    The same holds for the shortcut adapters.  Nothing is copied unless all of that
    holds.  ``trust_pickle=True`` lets a ``.bin`` file run the pickle code it holds.
    """
    files = read_adapter_files(directory, trust_pickle)
    check_residual_init(cm, directory, files.config)
    _copy_weights(cm, directory, files.tensors, files.config, files.shortcuts)


def residual_init(config: dict):
    """The PiSSA/OLoRA init an unconverted PEFT adapter was trained from ("pissa", "olora"), or None."""
    init = config.get("init_lora_weights")
    return init.lower() if isinstance(init, str) and init.lower() in _RECOMPUTED_INITS else None


def check_residual_init(cm, directory: str, config: dict) -> None:
    """An unconverted PiSSA/OLoRA adapter holds A and B for the residual W - s·B0 A0, so it fits
    a model compiled with that init (whose frozen W is the residual) and no other; a plain one
    does not fit such a model."""
    init = residual_init(config)
    records = cm.lora_records()
    residual = sorted(site for site, rec in records.items() if rec.lora_A0 is not None)
    if init is not None and len(residual) != len(records):
        plain = next(site for site, rec in records.items() if rec.lora_A0 is None)
        raise ValueError(f"the adapter in {directory} was trained with init_lora_weights={init!r}, against the "
                         f"residual of each weight, but this model's {plain} keeps its own weight: compile with "
                         f"init={init!r}, or use lorafx.load_adapter(model, directory)")
    if init is None and residual:
        raise ValueError(f"this model was compiled with a PiSSA/OLoRA init ({residual[0]}'s frozen weight is a "
                         f"residual) but the adapter in {directory} is a plain LoRA for the original weights: "
                         "compile without init='pissa'/'olora', or use lorafx.load_adapter(model, directory)")


def _shortcut_copies(cm, directory: str, shortcuts: Dict[str, SavedShortcut]):
    """[(parameter path, tensor)] that load ``shortcuts`` into ``cm``'s shortcut adapters;
    ValueError, naming the fix, when they do not fit."""
    mine = cm.shortcut_records()
    if shortcuts and not mine:
        raise ValueError(f"the adapter in {directory} has {len(shortcuts)} shortcut adapter(s) ({SHORTCUTS_NAME}) "
                         "but this model was compiled without shortcuts; load it with lorafx.load_adapter(model, "
                         "folder), which compiles the saved shortcut sites")
    if mine and not shortcuts:
        raise ValueError(f"this model has {len(mine)} shortcut adapter(s) (shortcuts=True) but the adapter in "
                         f"{directory} has none (no {SHORTCUTS_NAME}); load it into a model compiled without "
                         "shortcuts, e.g. with lorafx.load_adapter(model, folder)")
    missing, extra = sorted(set(mine) - set(shortcuts)), sorted(set(shortcuts) - set(mine))
    if missing or extra:
        raise ValueError(f"the shortcut adapters in {directory} do not fit this model: its shortcut sites without "
                         f"weights {missing[:10]}, saved shortcuts without a site {extra[:10]}; load the adapter "
                         "with lorafx.load_adapter(model, folder), which compiles the saved sites")
    out = []
    for site, rec in mine.items():
        saved = shortcuts[site]
        pa, pb = get_attr(cm, rec.lora_A), get_attr(cm, rec.lora_B)
        if saved.lora_A.shape != pa.shape or saved.lora_B.shape != pb.shape:
            raise ValueError(f"{site}: shortcut shapes A{tuple(saved.lora_A.shape)} B{tuple(saved.lora_B.shape)} "
                             f"do not match this model's A{tuple(pa.shape)} B{tuple(pb.shape)}")
        if not _close(saved.scale, rec.scale):
            raise ValueError(f"{site}: the shortcut in {directory} has scale {saved.scale:g} (alpha {saved.alpha:g} "
                             f"/ r {saved.r}) but this model was compiled with scale {rec.scale:g}; compile with "
                             f"shortcut_alpha={saved.alpha:g} or use lorafx.load_adapter(model, directory)")
        out += [(rec.lora_A, saved.lora_A), (rec.lora_B, saved.lora_B)]
    return out


SAVED_TABLE_SUFFIX = ".base_layer.weight"  # PEFT's save_embedding_layers: an embedding's own table


def _without_saved_tables(cm, directory: str, records, tensors) -> Dict[str, torch.Tensor]:
    """``tensors`` without the embedding tables PEFT saves beside an embedding's adapter
    (``<site>.base_layer.weight``: its ``save_embedding_layers="auto"`` for names such as
    embed_tokens), each checked to equal the model's table: lorafx never changes a base weight,
    so a table that differs (a resized or trained vocabulary) is refused."""
    from lorafx.passes.merge_lora import kept_unmerged_weight
    out = dict(tensors)
    for site, rec in records.items():
        saved = out.pop(site + SAVED_TABLE_SUFFIX, None) if rec.kind in EMBEDDING_KINDS else None
        if saved is None:
            continue
        mine = kept_unmerged_weight(cm, rec)
        mine = (mine if mine is not None else get_attr(cm, rec.weight)).detach().cpu()
        if saved.shape != mine.shape or not torch.equal(saved.to(mine.dtype), mine):
            raise ValueError(f"{site}: the adapter in {directory} also holds the embedding table "
                             f"{site}.base_layer.weight {tuple(saved.shape)}, which differs from this model's "
                             f"{tuple(mine.shape)} (a resized or trained vocabulary?); lorafx does not change base "
                             "weights: load that table into the model first (model.get_input_embeddings().weight), "
                             "then the adapter")
    return out


def _copy_weights(cm, directory: str, tensors, config=None, shortcuts=None, records=None) -> None:
    """Copy ``tensors`` (PEFT key -> tensor) into ``cm``'s adapters (``records``, default
    ``cm.lora_records()``) and ``shortcuts`` (site -> SavedShortcut) into its shortcut adapters
    (shapes, and the scales of the linear ones when ``config`` is given, must match; nothing is
    copied otherwise)."""
    records = cm.lora_records() if records is None else records
    expected = peft_keys(records)
    trained = _trained_part(tensors, _trainable_tensors(cm))  # modules_to_save, trainable rows
    tensors = {k: v for k, v in tensors.items() if k not in trained}
    tensors = _without_saved_tables(cm, directory, records, tensors)
    if records and not tensors and shortcuts:
        raise ValueError(f"the adapter in {directory} has shortcut adapters only ({SHORTCUTS_NAME}, no PEFT weights) "
                         f"but this model has {len(records)} linear adapter(s); load it with "
                         "lorafx.load_adapter(model, folder), which compiles its shortcut sites alone")
    bias_keys = sorted(k for k in set(expected) ^ set(tensors) if k.endswith(".lora_B.bias"))
    if bias_keys:
        has = bias_keys[0] in tensors
        raise ValueError(f"{_site_of(bias_keys[0])}: the adapter in {directory} " + (
            "has a bias on lora_B (lora_bias=True) but this model was compiled without: compile with lora_bias=True"
            if has else "has no bias on lora_B but this model was compiled with lora_bias=True: compile with "
            "lora_bias=False") + ", or use lorafx.load_adapter(model, directory)")
    if config is not None and records:
        _check_dora(cm, directory, records, config, tensors)
    missing = sorted({_site_of(k) for k in set(expected) - set(tensors)})
    extra = sorted({_site_of(k) for k in set(tensors) - set(expected)})
    if missing or extra:
        raise ValueError(f"adapter in {directory} does not fit this model: "
                         f"sites without weights {missing[:10]}, weights without a site {extra[:10]}")
    for site, rec in records.items():
        keys = peft_keys({site: rec})
        wrong = [k for k, path in keys.items() if tensors[k].shape != get_attr(cm, path).shape]
        if wrong:
            label = lambda k: k[len(site) + 1:].replace("lora_", "").replace(".weight", "")
            shown = " ".join(f"{label(k)}{tuple(tensors[k].shape)}" for k in keys)
            mine = " ".join(f"{label(k)}{tuple(get_attr(cm, p).shape)}" for k, p in keys.items())
            raise ValueError(f"{site}: adapter shapes {shown} do not match this model's {mine}")
        if config is not None and not _close(rec.scale, _expected_scale(config, _pattern_name(rec))):
            raise ValueError(f"{site}: the adapter in {directory} gives this site scale "
                             f"{_expected_scale(config, _pattern_name(rec)):g} (from r, lora_alpha, rank/alpha_pattern, "
                             f"use_rslora) but this model was compiled with scale {rec.scale:g}; compile with "
                             "the adapter's settings or use lorafx.load_adapter(model, directory)")
    copies = _shortcut_copies(cm, directory, shortcuts or {}) + _trained_copies(cm, directory, trained, config)
    was_merged = cm.merged
    cm.unmerge()
    with torch.no_grad():
        for key, path in expected.items():
            get_attr(cm, path).copy_(tensors[key])
        for path, value in copies:
            get_attr(cm, path).copy_(value)
    if was_merged:
        cm.merge()


def _check_dora(cm, directory: str, records, config: dict, tensors) -> None:
    """A DoRA adapter loads into a DoRA model only (and a plain one into a plain model): the
    same A and B compute something else with and without the magnitude."""
    saved = bool(config.get("use_dora"))
    mine = any(r.magnitude for r in records.values())
    if saved != mine:
        raise ValueError(f"the adapter in {directory} has use_dora={saved} but this model was compiled with "
                         f"use_dora={mine}; compile with use_dora={saved}, or use lorafx.load_adapter(model, "
                         "directory), which compiles with the adapter's settings")
    if saved:
        lacking = sorted(k for k in peft_keys(records) if k.endswith(".lora_magnitude_vector") and k not in tensors)
        if lacking:
            raise ValueError(f"the adapter in {directory} says use_dora=True but has no DoRA magnitude for "
                             f"{_site_of(lacking[0])} ({len(lacking)} site(s) lack '<site>.lora_magnitude_vector'): "
                             f"{_fix(directory)}")


def compile_settings(config: dict) -> dict:
    """The ``lorafx.compile`` options that reproduce an adapter configuration."""
    targets = config.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(targets)
    exclude = config.get("exclude_modules")
    parameters = config.get("target_parameters") or None
    return dict(
        r=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        target_modules=targets or (() if parameters else "all-linear"),
        rank_pattern=config.get("rank_pattern") or {},
        alpha_pattern=config.get("alpha_pattern") or {},
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        exclude_modules=tuple(exclude) if isinstance(exclude, list) else exclude,
        **({"use_dora": True} if config.get("use_dora") else {}),
        **({"target_parameters": tuple(parameters)} if parameters else {}),
        **({"lora_bias": True} if config.get("lora_bias") else {}),
        **({"init": residual_init(config)} if residual_init(config) else {}),  # recomputed, as PEFT does
        **({"layers_to_transform": config["layers_to_transform"], "layers_pattern": config.get("layers_pattern")}
           if config.get("layers_to_transform") is not None else {}),
    )


def trained_settings(files: "AdapterFiles") -> dict:
    """The ``lorafx.compile`` options for the adapter's modules_to_save (the names whose
    tensors it holds: PEFT's SEQ_CLS lists both 'classifier' and 'score') and
    trainable_token_indices ({} for none)."""
    out = {}
    names = files.config.get("modules_to_save") or []
    held = [n for n in names if any(_under(key, n) for key in _trained_part(files.tensors) if not _is_token_key(key))]
    if held:
        out["modules_to_save"] = held
    if files.config.get("trainable_token_indices") is not None:
        out["trainable_token_indices"] = files.config["trainable_token_indices"]
    return out


def _trained_part(tensors: Dict[str, torch.Tensor], mine=()) -> Dict[str, torch.Tensor]:
    """The tensors (by PEFT key) that belong to modules_to_save or trainable rows: the keys of no LoRA
    tensor (no ".lora_" in them), and ``mine`` (a model's own modules_to_save / row keys).  An
    embedding table PEFT saves beside an embedding's adapter (``<site>.base_layer.weight``) is
    neither: ``_without_saved_tables`` checks it."""
    return {k: v for k, v in tensors.items()
            if k in mine or (".lora_" not in k and not k.endswith(SAVED_TABLE_SUFFIX))}


def _is_token_key(key: str) -> bool:
    return key.endswith("." + PEFT_DELTA) or re.search(r"\.token_adapter\.trainable_tokens_delta(\.[^.]+)?$", key) \
        is not None


def _token_module(key: str) -> str:
    return re.sub(r"\.token_adapter\.trainable_tokens_delta(\.[^.]+)?$", "", key)


def _under(key: str, name: str) -> bool:
    """Whether parameter ``key`` belongs to a module whose path ends with ``name`` (PEFT's rule)."""
    parts = key.split(".")[:-1]
    return any(".".join(parts[:i]).endswith(name) for i in range(1, len(parts) + 1))


def _check_trained(path: str, config: dict, trained: Dict[str, torch.Tensor]) -> None:
    """Every tensor of the weights file that is no LoRA pair is a modules_to_save parameter or
    trainable rows the config names (else the file is refused as before)."""
    names = config.get("modules_to_save") or []
    if config.get("trainable_token_indices") is not None and not any(_is_token_key(k) for k in trained):
        raise ValueError(f"{path}: the config has trainable_token_indices={config['trainable_token_indices']!r} but "
                         f"the weights hold no trainable rows (...{PEFT_DELTA}); save the adapter again")
    for key in trained:
        if _is_token_key(key):
            if config.get("trainable_token_indices") is None:
                raise ValueError(f"{path}: unexpected entry {key!r}: trainable rows (token_adapter) but the config has "
                                 "no trainable_token_indices; save the adapter again")
        elif not any(_under(key, n) for n in names):
            raise ValueError(f"{path}: unexpected entry {PREFIX + key!r} (lorafx loads lora_A/lora_B weights, and the "
                             f"parameters of modules_to_save {names})")


def trainable_tensors(cm) -> Dict[str, str]:
    """{PEFT key without base_model.model.: parameter path} of cm's modules_to_save and trainable rows."""
    return {**saved_tensors(cm), **token_tensors(cm)}


_trainable_tensors = trainable_tensors


def _trainable_config(cm) -> dict:
    """The LoraConfig fields for cm's modules_to_save and trainable_token_indices."""
    rec = graph_record(cm.graph_module)
    out = {}
    if rec.modules_to_save:
        out["modules_to_save"] = list(rec.modules_to_save)
    owners = [r for _, r in token_records(cm.graph_module) if not r.tied]
    if owners:
        if all(r.name is None for r in owners) and len({r.tokens for r in owners}) == 1:
            out["trainable_token_indices"] = list(owners[0].tokens)
        else:
            out["trainable_token_indices"] = {r.name or r.module: list(r.tokens) for r in owners}
    return out


def _trained_copies(cm, directory: str, trained: Dict[str, torch.Tensor], config=None):
    """[(parameter path, tensor)] that load ``trained`` into cm's modules_to_save and trainable
    rows; ValueError, naming the fix, when they do not fit."""
    mine = _trainable_tensors(cm)
    missing, extra = sorted(set(mine) - set(trained)), sorted(set(trained) - set(mine))
    if missing or extra:
        raise ValueError(f"the adapter in {directory} does not fit this model's modules_to_save / "
                         f"trainable_token_indices: tensors this model trains that it lacks {missing[:10]}, tensors it "
                         f"holds that this model does not train {extra[:10]}; load it with lorafx.load_adapter(model, "
                         "folder), which compiles with the adapter's modules_to_save and trainable_token_indices")
    out = []
    for key, path in mine.items():
        have, saved = get_attr(cm, path), trained[key]
        if tuple(have.shape) != tuple(saved.shape):
            raise ValueError(f"{key}: saved shape {tuple(saved.shape)} does not match this model's {tuple(have.shape)}")
        out.append((path, saved))
    if config is not None and config.get("trainable_token_indices") is not None:
        given = config["trainable_token_indices"]
        for _, rec in token_records(cm.graph_module):
            if rec.tied:
                continue
            want = given if not isinstance(given, dict) else next(
                (v for k, v in given.items() if rec.module.endswith(k)), None)
            if want is None or tuple(int(i) for i in want) != rec.tokens:
                raise ValueError(f"{rec.module}: the adapter in {directory} trains rows {want} but this model was "
                                 f"compiled with trainable_token_indices rows {list(rec.tokens)}; compile with the "
                                 "adapter's trainable_token_indices or use lorafx.load_adapter(model, folder)")
    return out


def shortcut_settings(shortcuts: Dict[str, SavedShortcut]) -> dict:
    """The ``lorafx.compile`` options that rebuild exactly the saved shortcut sites ({} for none)."""
    if not shortcuts:
        return {}
    # (InsertShortcuts gives every site one alpha; the scales are checked when the weights are copied)
    return dict(shortcuts=True, shortcut_pattern={site: s.r for site, s in shortcuts.items()},
                shortcut_alpha=_most_common(s.alpha for s in shortcuts.values()))


def read_adapter(directory: str, trust_pickle: bool = False):
    """``(config, tensors by PEFT key)`` of the adapter in ``directory``, every file read and
    checked (``read_adapter_files`` also gives its shortcut adapters)."""
    return _read_adapter(directory, trust_pickle)


def copy_adapter_weights(cm, directory: str, weights, config=None, shortcuts=None, records=None) -> None:
    """Copy ``weights`` (PEFT key -> tensor, from ``read_adapter``) and ``shortcuts`` (``AdapterFiles.shortcuts``;
    None: no shortcut adapters) into ``cm``'s adapters (``records``: one named adapter's, default
    ``cm.lora_records()``); with ``config``, first check that it gives every site the scale ``cm``
    was compiled with."""
    _copy_weights(cm, directory, weights, config, shortcuts, records)
