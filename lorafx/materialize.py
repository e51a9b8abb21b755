"""``lorafx.materialize``: attach real weights to a model planned on the meta device.

    with torch.device("meta"):
        model = LlamaForCausalLM(config)              # shapes only: no weight is allocated
    cm = lorafx.compile(model, example_kwargs={"input_ids": torch.zeros(2, 8, dtype=torch.long, device="meta")},
                        rank_budget=1.0, proxy="constant")
    print(cm.report())                                 # the plan: sites, ranks, schedules, cost
    lorafx.materialize(cm, "checkpoint/")              # a safetensors folder (sharded or not)

Requires: a CompiledModel whose base weights are on the meta device, and a checkpoint
holding them under the source model's state-dict names (``save_pretrained``'s folder).
Provides: every tensor of every captured graph on ``device``: base weights read from the
checkpoint one tensor at a time (cast to the planned dtype), adapters drawn exactly as
``lorafx.compile`` draws them on real weights (from each pass's recorded seed and draw
order, ``GraphRecord.deferred_init``), DoRA magnitudes (``use_dora=True``) computed as
||W + s·B A|| from those, the non-persistent buffers the checkpoint does
not hold (rotary ``inv_freq``) rebuilt, a noisy chip (``target="cim"``) programmed from
its recorded seed, and the ``device=meta`` arguments export baked into the graphs
rewritten.  Later call signatures are captured from the meta source and bound to these
tensors.
Preserves: the plan (graphs, ranks, schedules, decisions), so the model equals
``lorafx.compile`` of the loaded model with the same options and seed.  Every check runs
before the model is touched: a failed call leaves it planned and unchanged.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch

from lorafx.dialect import kind_named
from lorafx.passes.fold_lora import FOLDED_SUFFIX
from lorafx.passes.insert_lora import draw_A
from lorafx.passes.program_chip import CHIP, chip_buffer

from .compiled import CompiledModel
from .graph_utils import retarget_devices, tensor_slots
from .meta import graph_record

__all__ = ["materialize", "Checkpoint"]

INDEX_NAME = "model.safetensors.index.json"


class Checkpoint:
    """Read-only, lazy access to a checkpoint's tensors by name: a folder with
    ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (or other
    ``*.safetensors`` files), one ``.safetensors`` file, or a mapping of tensors.
    Pickled checkpoints (``.bin``, ``.pt``) are refused: they can run code."""

    def __init__(self, source: Union[str, os.PathLike, Mapping]):
        self._tensors: Optional[Mapping] = None
        self._files: Dict[str, str] = {}  # tensor name -> safetensors file
        if isinstance(source, Mapping):
            self._tensors = source
            self.description = "the given state dict"
            return
        path = os.fspath(source)
        self.description = path
        if os.path.isdir(path):
            index = os.path.join(path, INDEX_NAME)
            if os.path.isfile(index):
                try:
                    with open(index) as f:
                        weight_map = json.load(f)["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"materialize: {index} is not a valid safetensors index "
                                     f"({type(e).__name__}: {e})") from e
                self._files = {k: os.path.join(path, v) for k, v in weight_map.items()}
                return
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                pickled = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
                hint = (f" It has {pickled[0]!r}, a pickle: convert it to safetensors (transformers: "
                        "model.save_pretrained(folder, safe_serialization=True)) or pass a state dict"
                        if pickled else "")
                raise FileNotFoundError(f"materialize: no safetensors checkpoint in {path} (model.safetensors "
                                        f"or {INDEX_NAME}).{hint}")
        elif os.path.isfile(path) and path.endswith(".safetensors"):
            files = [path]
        elif os.path.exists(path):
            raise ValueError(f"materialize: {path} is not a safetensors file or folder; pickled checkpoints can "
                             "run code and are not read: convert to safetensors or pass a state dict")
        else:
            raise FileNotFoundError(f"materialize: {path} does not exist (a folder saved by save_pretrained, a "
                                    ".safetensors file or a state dict)")
        from safetensors import safe_open
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    self._files.update({k: file for k in f.keys()})
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"materialize: cannot read {file} ({type(e).__name__}: {e}); is it truncated?") \
                    from e

    def keys(self) -> List[str]:
        return list(self._tensors.keys() if self._tensors is not None else self._files)

    def __contains__(self, key: str) -> bool:
        return key in (self._tensors if self._tensors is not None else self._files)

    def read(self, keys: List[str]) -> Iterator[Tuple[str, torch.Tensor]]:
        """(key, tensor) for ``keys``, opening each file once."""
        if self._tensors is not None:
            for k in keys:
                yield k, self._tensors[k]
            return
        from safetensors import safe_open
        by_file: Dict[str, List[str]] = {}
        for k in keys:
            by_file.setdefault(self._files[k], []).append(k)
        for file, names in by_file.items():
            if not os.path.isfile(file):
                raise FileNotFoundError(f"materialize: the index of {self.description} names {file}, which is "
                                        "missing: copy every shard into the folder")
            with safe_open(file, framework="pt") as f:
                for k in names:
                    yield k, f.get_tensor(k)


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with every parameter on the meta device and buffers real (nothing
    large is allocated or initialised), to read the buffers a constructor computes."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _constructor_buffers(source: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The buffers a transformers model's constructor computes (rotary ``inv_freq``,
    position ids), from a fresh instance built from its config with parameters on meta."""
    config = getattr(source, "config", None)
    if config is None or not hasattr(type(source), "config_class"):
        return {}
    with _parameters_on_meta(), torch.device("cpu"):
        skeleton = type(source)(config)
    return {name: b for name, b in skeleton.named_buffers() if b.device.type != "meta"}


def _meta_tensors(module: torch.nn.Module) -> Dict[str, Tuple[str, torch.Tensor]]:
    """{path: ("param" | "buffer", tensor)} of every meta tensor of ``module`` (tied ones at every path)."""
    return {path: ("param" if table is owner._parameters else "buffer", t)
            for path, owner, table, _, t in tensor_slots(module) if t.device.type == "meta"}


def _adapter_draws(graphs) -> Dict[str, torch.Tensor]:
    """Every deferred adapter A, drawn in each pass's recorded order from its seed (float32)."""
    out: Dict[str, torch.Tensor] = {}
    for gm in graphs:
        for plan in graph_record(gm).deferred_init:
            gen = torch.Generator().manual_seed(plan.seed)
            for path, shape, init, r in plan.draws:
                out.setdefault(path, draw_A(shape, init, r, gen))
    return out


def _aliases(source: torch.nn.Module) -> Dict[str, List[str]]:
    """{state-dict key: every key of the same (tied) tensor}, for a checkpoint that saves a tied weight once."""
    state = source.state_dict(keep_vars=True)
    groups: Dict[int, List[str]] = {}
    for k, v in state.items():
        groups.setdefault(id(v), []).append(k)
    return {k: groups[id(v)] for k, v in state.items()}


def _listing(names: List[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def materialize(cm: CompiledModel, checkpoint: Union[str, os.PathLike, Mapping], *,
                device: Union[str, torch.device] = "cpu", buffers: Optional[Mapping[str, torch.Tensor]] = None,
                strict: bool = True, progress: Optional[bool] = None) -> CompiledModel:
    """Attach real weights to ``cm``, a model compiled on the meta device (see the module
    docstring), and return it.

    ``checkpoint``: a safetensors folder (``model.safetensors`` or sharded with
    ``model.safetensors.index.json``), one ``.safetensors`` file, or a state dict, with
    the source model's keys (a tied weight may be saved once).  ``device``: where the
    tensors go.  ``buffers``: values for non-persistent buffers that neither the
    checkpoint nor the model's constructor provides (a model of your own with one).
    ``strict``: refuse checkpoint keys the model does not have.  ``progress``: a bar over
    the tensors read (None: on a terminal only).
    """
    if not isinstance(cm, CompiledModel):
        raise TypeError(f"materialize takes the CompiledModel lorafx.compile returned for a model built on the meta "
                        f"device, got {type(cm).__name__}")
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("materialize: device='meta' attaches nothing; pass device='cpu' or 'cuda'")
    graphs = list(cm._variants.values())
    planned: Dict[str, Tuple[str, torch.Tensor]] = {}
    for gm in graphs:
        for path, entry in _meta_tensors(gm).items():
            planned.setdefault(path, entry)
    if not planned:
        raise ValueError("materialize: this model has no tensor on the meta device (it was compiled with real "
                         "weights, or is materialized already); load weights with cm.load_state_dict instead")
    ckpt = Checkpoint(checkpoint)
    source = cm.source_model
    aliases = _aliases(source)
    chip_paths = {chip_buffer(w): w for w in _chip_weights(cm)}
    adapters = _adapter_draws(graphs)
    for rec in cm.lora_records().values():
        adapters.setdefault(rec.lora_B, None)
        if rec.lora_bias is not None:  # PEFT's lora_bias: B's bias starts at 0
            adapters.setdefault(rec.lora_bias, None)
    for rec in cm.shortcut_records().values():
        adapters.setdefault(rec.lora_B, None)
    # fold_a=True: a buffer [W; A] of which W and A are views (FoldLoRAIntoBase)
    folds = {rec.weight + FOLDED_SUFFIX: (rec.weight, rec.lora_A) for rec in cm.lora_records().values()
             if rec.weight + FOLDED_SUFFIX in planned}
    # use_dora=True: each magnitude starts at ||W + s·B A|| of the loaded W and the drawn A, B
    magnitudes = {rec.magnitude: rec for rec in cm.lora_records().values()
                  if rec.magnitude and rec.magnitude in planned}

    # 1. where every planned tensor's value comes from
    from_ckpt: Dict[str, str] = {}  # path -> checkpoint key
    missing, rebuilt = [], {}
    constructed: Optional[Dict[str, torch.Tensor]] = None
    for path, (kind, t) in planned.items():
        if path in adapters or path in chip_paths or path in folds or path in magnitudes:
            continue
        key = next((k for k in aliases.get(path, [path]) if k in ckpt), None)
        if key is not None:
            from_ckpt[path] = key
        elif buffers is not None and path in buffers:
            rebuilt[path] = buffers[path]
        elif kind == "buffer" and path not in aliases:  # not in the state dict: a non-persistent buffer
            if constructed is None:
                constructed = _constructor_buffers(source)
            if path not in constructed:
                raise ValueError(f"materialize: the non-persistent buffer {path!r} is not in the checkpoint and "
                                 f"lorafx cannot rebuild it (only transformers models' constructors are rerun): "
                                 f"pass buffers={{{path!r}: tensor}}")
            rebuilt[path] = constructed[path]
        else:
            missing.append(path)
    if missing:
        raise ValueError(f"materialize: {ckpt.description} lacks {len(missing)} weight(s) of the planned model: "
                         f"{_listing(missing)}. It has {len(ckpt.keys())} tensor(s) (e.g. "
                         f"{_listing(sorted(ckpt.keys()), 3)}); save it from the same architecture "
                         "(model.save_pretrained(folder))")
    if strict:
        known = set(aliases) | set(planned)
        unexpected = sorted(k for k in ckpt.keys() if k not in known)
        if unexpected:
            raise ValueError(f"materialize: {ckpt.description} has {len(unexpected)} tensor(s) the model does not: "
                             f"{_listing(unexpected)}; is it another architecture? Pass strict=False to ignore them")

    # 2. read and check everything before touching the model
    values: Dict[str, torch.Tensor] = {}
    keys = sorted(set(from_ckpt.values()))
    by_key: Dict[str, List[str]] = {}
    for path, key in from_ckpt.items():
        by_key.setdefault(key, []).append(path)
    from tqdm.auto import tqdm
    bar = tqdm(total=len(keys), desc="materialize", unit="tensor", disable=None if progress is None else not progress)
    with bar:
        for key, tensor in ckpt.read(keys):
            for path in by_key[key]:
                values[path] = _checked(path, tensor, planned[path][1], device, f"checkpoint key {key!r}")
            bar.update()
    for path, tensor in rebuilt.items():
        values[path] = _checked(path, torch.as_tensor(tensor), planned[path][1], device, "rebuilt buffer")
    for path, A in adapters.items():
        if path not in planned:
            continue  # drawn on real weights already
        ref = planned[path][1]
        values[path] = (torch.zeros(ref.shape, dtype=ref.dtype, device=device) if A is None
                        else A.to(device=device, dtype=ref.dtype))
    for path, rec in magnitudes.items():
        W = values[rec.weight] if rec.weight in values else None
        if W is None or rec.lora_A not in values or rec.lora_B not in values:
            continue  # (reported as unset below)
        with torch.no_grad():
            n = kind_named(rec.kind).initial_magnitude(W, values[rec.lora_A], values[rec.lora_B], rec.scale,
                                                       rec.weight_transposed)
        values[path] = n.to(device=device, dtype=planned[path][1].dtype)
    for path in chip_paths:
        if path in planned:
            values[path] = torch.empty(planned[path][1].shape, dtype=planned[path][1].dtype, device=device)
    for path, (w, a) in folds.items():
        values[path] = torch.cat([values[w], values[a]])
    unset = [p for p in planned if p not in values]
    if unset:
        raise ValueError(f"materialize: no value for {_listing(unset)} (an adapter made with init='lors' needs the "
                         "weights at compile time: compile the loaded model instead)")

    # 3. attach (nothing below can fail on the inputs): one new tensor per planned tensor object
    new: Dict[int, torch.Tensor] = {}
    for path, (w, a) in folds.items():  # W and A stay views of the folded buffer
        ext, (_, meta_w), (_, meta_a) = values[path], planned[w], planned[a]
        new[id(planned[path][1])] = ext
        new[id(meta_w)] = torch.nn.Parameter(ext[:meta_w.shape[0]], requires_grad=meta_w.requires_grad)
        new[id(meta_a)] = torch.nn.Parameter(ext[meta_w.shape[0]:], requires_grad=meta_a.requires_grad)
    for gm in graphs:
        for path, owner, table, name, t in list(tensor_slots(gm)):
            if t.device.type != "meta":
                continue
            if id(t) not in new:
                v = values[path]
                new[id(t)] = torch.nn.Parameter(v, requires_grad=t.requires_grad) if table is owner._parameters else v
            table[name] = new[id(t)]
        retarget_devices(gm, "meta", device)
    _program_chips(cm, chip_paths, new)
    cm.__dict__["_materialized_on"] = device
    cm.__dict__["_compiled"] = {}
    return cm


def _checked(path: str, tensor: torch.Tensor, planned: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(planned.shape):
        raise ValueError(f"materialize: {path} was planned with shape {tuple(planned.shape)}, but the {what} has "
                         f"{tuple(tensor.shape)}: the checkpoint is of another configuration")
    return tensor.to(device=device, dtype=planned.dtype).detach()


def _chip_weights(cm: CompiledModel) -> List[str]:
    """The weights of every recorded chip (target="cim" with noise) that is still on meta."""
    out = []
    for key, chip in cm._context.decisions.items():
        if key.endswith(":" + CHIP) and isinstance(chip, dict):
            out.extend(p for p, t in chip.get("weights", {}).items() if t.device.type == "meta")
    return out


def _program_chips(cm: CompiledModel, chip_paths: Dict[str, str], new: Dict[int, torch.Tensor]) -> None:
    """Point each recorded chip at its new buffers and program it from its recorded seed."""
    seeds = []
    for key, chip in cm._context.decisions.items():
        if key.endswith(":" + CHIP) and isinstance(chip, dict) and chip_paths:
            chip["weights"] = {p: new.get(id(t), t) for p, t in chip["weights"].items()}
            seeds.append(chip["seed"])
    if seeds:
        cm.reprogram(seeds[0])
