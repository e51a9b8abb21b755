"""Save and load a whole compiled program: ``cm.save_program(folder)``, ``lorafx.load_program(folder)``.

A program folder holds::

    lorafx_program.json          the manifest: format, lorafx/torch versions, the source model's
                                 class name, forward signature, module names and state-dict keys,
                                 every graph's call signature, mode, output structure, GraphRecord
                                 and node records, the compile report, and each file's sha256
    program.pt2                  the primary graph, re-exported with torch.export and written by
                                 torch.export.save (its weights included: it loads on its own)
    program_1.pt2, ...           the other graphs (other call signatures; the other train/eval
                                 mode of a mode-dependent model), whose tensors that program.pt2
                                 also holds are written as one-element placeholders (weights once)
    adapter_config.json          the adapters in PEFT's format (``lorafx.adapter_io.save_adapter``):
    adapter_model.safetensors    PeftModel.from_pretrained(base, folder) reads them

Nothing is pickled but plain tensors (torch.export's sample inputs), and a load refuses
an archive with any other pickle before torch.export.load reads it (torch would fall back
to a full unpickle); no class of the user's model is needed to load.  Each graph is re-exported with its lorafx ops as single
nodes (``torch.library`` custom ops with fake kernels) and dynamic batch/seq dims, and
returns a flat tuple; the manifest gives the output structure back (a transformers
``ModelOutput`` when its class can be imported, else a dict).  The lorafx records of the
nodes (``node.meta["lorafx"]``) are kept as JSON: for an op node under the re-exported
node's name (from torch.export's ``from_node`` provenance), for a parameter read under
its attribute path.

``load_program`` returns a ``LoadedProgram``: a CompiledModel whose source model is a
stand-in (names, signature, no weights).  It runs, trains (adapters trainable, base
frozen), switches train/eval, merges and unmerges, saves its adapter and its program,
and prints its graph; it cannot capture a call signature it was not saved with (call the
compiled model once with each input set you need, e.g. with ``labels``, before saving).

A save is atomic: everything is written into a hidden folder beside ``folder`` and
renamed into place; the folder a failed save leaves is the one there before.
``CompiledModel.save_program`` calls ``save_program`` here through
``lorafx.compiled.PROGRAM_SAVER`` (this module imports ``compiled``, not the reverse).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import logging
import operator
import os
import shutil
import tempfile
import types
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx
from torch.utils import _pytree as pytree

from ._version import __version__
from .adapter_io import CONFIG_NAME, WEIGHTS_NAME, peft_keys, read_adapter_files, save_adapter
from .compiled import PROGRAM_SAVER, CompiledModel, CompileReport, _share_tensors
from .context import CompileContext
from .graph_utils import get_attr, tensor_slots
from .meta import META_KEY, GraphRecord, graph_record
from .pipeline import PassError, PassReport, Pipeline, lint_graph

__all__ = ["save_program", "load_program", "LoadedProgram", "MANIFEST_NAME", "PROGRAM_NAME", "FORMAT_VERSION"]

MANIFEST_NAME = "lorafx_program.json"
PROGRAM_NAME = "program.pt2"
FORMAT_VERSION = 1  # the layout of the folder and manifest; a newer one is refused
STAGING_PREFIX = ".lorafx-program-"
logger = logging.getLogger("lorafx")


class ProgramFormatError(ValueError):
    """A program folder that is missing, corrupt, mixed from several saves or of another format."""


# -- JSON for lorafx records ------------------------------------------------------------------------

class _Unencodable(TypeError):
    pass


def _sympy_class(qualified: str) -> type:
    """The sympy expression class ``module:name`` names: sympy's or torch's own only."""
    import sympy

    module, _, name = qualified.partition(":")
    if not (module == "sympy" or module.startswith("sympy.") or module.startswith("torch.utils._sympy.")):
        raise ValueError(f"{qualified!r} is not a sympy expression class")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, sympy.Basic)):
        raise ValueError(f"{qualified!r} is not a sympy expression class")
    return cls


def _encode_expr(e, rename: Dict[str, str]):
    import sympy

    if e.is_Symbol:
        given = getattr(e, "_assumptions_orig", None)  # the assumptions it was made with (sympy >= 1.12)
        given = e.assumptions0 if given is None else given
        return ["S", rename.get(e.name, e.name), {k: v for k, v in given.items() if isinstance(v, bool)}]
    if e.is_Integer:
        return ["I", int(e)]
    if e.is_Rational:
        return ["Q", int(e.p), int(e.q)]
    if e.is_Float:
        return ["F", str(e)]
    if isinstance(e, sympy.Basic) and e.args:
        return ["f", f"{type(e).__module__}:{type(e).__name__}", [_encode_expr(a, rename) for a in e.args]]
    if isinstance(e, sympy.Basic):  # an argument-less constant (oo, zoo, true, ...)
        return ["c", f"{type(e).__module__}:{type(e).__name__}"]
    raise _Unencodable(type(e).__name__)


def _decode_expr(v, classes: Dict[str, type]):
    import sympy

    tag = v[0]
    if tag == "S":
        return sympy.Symbol(v[1], **v[2])
    if tag == "I":
        return sympy.Integer(v[1])
    if tag == "Q":
        return sympy.Rational(v[1], v[2])
    if tag == "F":
        return sympy.Float(v[1])
    if v[1] not in classes:
        classes[v[1]] = _sympy_class(v[1])
    cls = classes[v[1]]
    if tag == "c":
        return cls()
    return cls(*[_decode_expr(a, classes) for a in v[2]])


def _encode(value, rename: Dict[str, str]):
    """``value`` (records, their fields) as JSON data; sympy symbols renamed by ``rename``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, rename) for v in value]}
    if isinstance(value, list):
        return [_encode(v, rename) for v in value]
    if isinstance(value, (set, frozenset)):
        return {"__frozenset__": sorted((_encode(v, rename) for v in value), key=json.dumps)}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, rename), _encode(v, rename)] for k, v in value.items()]}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).split(".")[-1]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith("lorafx."):
            raise _Unencodable(f"{cls.__module__}.{cls.__qualname__}")
        return {"__record__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _encode(getattr(value, f.name), rename) for f in dataclasses.fields(value)}}
    try:
        import sympy
    except ImportError:  # pragma: no cover - torch depends on sympy
        sympy = None
    if sympy is not None and isinstance(value, sympy.Basic):
        return {"__sympy__": _encode_expr(value, rename)}
    raise _Unencodable(type(value).__name__)


def _record_class(qualified: str) -> type:
    module, _, name = qualified.partition(":")
    if not module.startswith("lorafx."):  # only lorafx's own record classes are ever imported
        raise ValueError(f"record class {qualified!r} is not a lorafx class")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise ValueError(f"{qualified!r} is not a lorafx record class")
    return obj


def _decode(value, classes: Optional[Dict[str, type]] = None):
    if isinstance(value, list):
        return [_decode(v, classes) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_decode(v, classes) for v in value["__tuple__"])
    if "__frozenset__" in value:
        return frozenset(_decode(v, classes) for v in value["__frozenset__"])
    if "__dict__" in value:
        return {_decode(k, classes): _decode(v, classes) for k, v in value["__dict__"]}
    if "__float__" in value:
        return float(value["__float__"])
    if "__dtype__" in value:
        dtype = getattr(torch, value["__dtype__"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {value['__dtype__']!r}")
        return dtype
    if "__sympy__" in value:
        return _decode_expr(value["__sympy__"], classes if classes is not None else {})
    if "__record__" in value:
        cls = _record_class(value["__record__"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _decode(v, classes) for k, v in value["fields"].items() if k in known})
    raise ValueError(f"unexpected JSON object with keys {sorted(value)[:3]}")


# -- exporting one graph ----------------------------------------------------------------------------

def _example_value(node: torch.fx.Node):
    """A concrete input like the one ``node`` (a placeholder) was captured with, and its dynamic dims."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        shape, dynamic = [], {}
        for d, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt):
                hint = size.node.hint
                shape.append(max(int(hint) if hint is not None else 2, 2))
                dynamic[d] = torch.export.Dim.AUTO
            else:
                shape.append(int(size))
        return torch.zeros(shape, dtype=val.dtype, device=val.device), (dynamic or None)
    if val is None or isinstance(val, (bool, int, float, str)):
        return val, None
    raise ValueError(f"graph input {node.name!r} is a {type(val).__name__}, which save_program cannot "
                     "re-export: save a model whose graphs take tensors and plain constants only")


def _node_sources(node: torch.fx.Node, graph_id: int) -> List[str]:
    """Names of the nodes of the graph ``graph_id`` that ``node`` came from (``from_node``)."""
    out, stack = [], list(node.meta.get("from_node") or ())
    while stack:
        src = stack.pop()
        if src.graph_id == graph_id:
            out.append(src.name)
        else:
            stack.extend(src.from_node or ())
    return out


def _symbols(node: torch.fx.Node) -> List[Optional[str]]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return []
    return [str(s.node.expr) if isinstance(s, torch.SymInt) else None for s in val.shape]


def _export_graph(gm: torch.fx.GraphModule) -> Tuple[Any, dict]:
    """Re-export ``gm`` (flat outputs, dynamic dims where it has them): the ExportedProgram
    and the manifest entry of this graph (output structure, GraphRecord, node records)."""
    graph = copy.deepcopy(gm.graph)
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    out_spec = info.out_spec if info is not None else None
    placeholders = list(graph.find_nodes(op="placeholder"))
    if info is not None:
        graph._codegen = torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(info.orig_args, info.in_spec, None))
        in_spec = info.in_spec
    else:
        in_spec = None
    flat = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    examples = [_example_value(n) for n in placeholders]
    if in_spec is not None:
        args, kwargs = pytree.tree_unflatten([v for v, _ in examples], in_spec)
        args_shapes, kwargs_shapes = pytree.tree_unflatten([s for _, s in examples], in_spec)
        if len(args) + len(kwargs) != len(examples):
            raise ValueError("save_program: this graph takes nested inputs (lists or dicts of tensors), which it "
                             "cannot re-export; save a model called with tensors and plain constants")
        shapes = {**dict(zip(info.orig_args, args_shapes)), **kwargs_shapes}
    else:
        args, kwargs, shapes = tuple(v for v, _ in examples), {}, tuple(s for _, s in examples)
    with torch.enable_grad():
        ep = torch.export.export(flat, args, kwargs, dynamic_shapes=shapes, strict=False)

    # symbols of the captured graph -> the re-exported program's (matched by input and dim)
    new_inputs = {s.arg.name: s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    ep_nodes = {n.name: n for n in ep.graph.nodes}
    rename: Dict[str, str] = {}
    for old in placeholders:
        new = ep_nodes.get(old.name) if old.name in new_inputs else None
        for a, b in zip(_symbols(old), _symbols(new) if new is not None else []):
            if a is not None and b is None:
                raise ValueError(f"save_program: re-exporting specialised dim of input {old.name!r} that the "
                                 "graph has dynamic; please report this with the model")
            if a is not None:
                rename[a] = b

    # node records: op nodes under the re-exported node's name, parameter reads under their path
    sources = {n.name: n for n in gm.graph.nodes}
    records: Dict[str, Any] = {}
    dropped: Dict[str, int] = {}
    renames: Dict[str, str] = {}  # old node name -> new node name (for records naming nodes)

    def encode_records(node: torch.fx.Node) -> Optional[dict]:
        recs = node.meta.get(META_KEY)
        if not recs:
            return None
        out = {}
        for kind, rec in recs.items():
            try:
                out[kind] = _encode(rec, rename)
            except _Unencodable:
                dropped[kind] = dropped.get(kind, 0) + 1
        return out or None

    origin: Dict[torch.fx.Node, Optional[torch.fx.Node]] = {}  # re-exported node -> the captured node it computes
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        found = None
        parent = node.args[0] if node.target is operator.getitem and node.args else None
        if isinstance(parent, torch.fx.Node) and origin.get(parent) is not None and parent.op == "call_function":
            # an output of a multi-output op: the captured getitem of the same index (it holds the records)
            found = next((u for u in origin[parent].users if u.target is operator.getitem
                          and u.args[1:2] == node.args[1:2]), None)
        else:  # (a getitem of an output the captured graph did not read gets no records)
            names_from = _node_sources(node, id(graph))
            found = next((sources[n] for n in names_from if n in sources and sources[n].meta.get(META_KEY)),
                         next((sources[n] for n in names_from if n in sources), None))
        origin[node] = found
        if found is not None:
            renames.setdefault(found.name, node.name)
    for node, src in origin.items():
        if src is not None:
            enc = encode_records(src)
            if enc:
                records[f"node:{node.name}"] = enc
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            enc = encode_records(node)
            if enc:
                records[f"attr:{node.target}"] = enc
        elif node.op == "placeholder":
            enc = encode_records(node)
            if enc:
                records[f"input:{node.name}"] = enc
    if dropped:
        logger.warning("lorafx: save_program could not write these node records as JSON, so the loaded program "
                       "lacks them: %s", ", ".join(f"{k} ({n})" for k, n in sorted(dropped.items())))
    try:
        spec = pytree.treespec_dumps(out_spec) if out_spec is not None else None
    except Exception as e:  # an output type without a pytree serialization name
        n_out = len(ep.graph_signature.user_outputs)
        spec = None
        logger.warning("lorafx: the output structure of this model (%s) cannot be written (%s): the loaded program "
                       "returns a tuple of its %d output tensors", out_spec, e, n_out)
    grec = graph_record(gm)
    grec = dataclasses.replace(grec, dims={rename.get(k, k): v for k, v in grec.dims.items()})
    entry = {
        "output": spec,
        "graph_record": _encode(grec, rename),
        "records": records,
        "renamed_nodes": renames,
        "dropped_records": dropped,
    }
    return ep, entry


def _placeholder_state(ep, shared: Dict[str, torch.Tensor]):
    """A shallow copy of ``ep`` whose state tensors that ``shared`` holds (the same object)
    are one-element placeholders of their shape and dtype (written once, by the primary)."""
    out = copy.copy(ep)
    state = {}
    kept = []
    for key, t in ep.state_dict.items():
        if shared.get(key) is t:
            stub = torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
            state[key] = torch.nn.Parameter(stub, requires_grad=t.requires_grad) if isinstance(
                t, torch.nn.Parameter) else stub
            kept.append(key)
        else:
            state[key] = t
    out._state_dict = state
    return out, kept


# -- saving -----------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _signature_data(source: torch.nn.Module) -> Optional[list]:
    try:
        sig = inspect.signature(source.forward)
    except (TypeError, ValueError):
        return None
    return [[p.name, p.kind.name] for p in sig.parameters.values()]


def _source_data(source: torch.nn.Module) -> dict:
    """What a loaded program keeps of its source model: class name, forward signature, module
    names, state-dict keys (tied keys in one group), config name and whether it is a causal LM."""
    groups: Dict[int, int] = {}
    keys = []
    for key, value in source.state_dict(keep_vars=True).items():
        keys.append([key, groups.setdefault(id(value), len(groups))])
    config = getattr(source, "config", None)
    return {
        "class": type(source).__name__,
        "module": type(source).__module__,
        "forward": _signature_data(source),
        "modules": [n for n, _ in source.named_modules() if n],
        "state_dict_keys": keys,
        "config_name": getattr(config, "_name_or_path", None) or None,
        "model_type": getattr(config, "model_type", None),
    }


def _check_target(directory: str, overwrite: bool) -> bool:
    """Whether ``directory`` holds a program to replace; refuses what must not be replaced."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} is a file: pass a folder to save_program")
    if not os.path.isdir(directory) or not os.listdir(directory):
        return False
    if not os.path.exists(os.path.join(directory, MANIFEST_NAME)):
        raise FileExistsError(f"{directory} is not empty and holds no lorafx program ({MANIFEST_NAME}): save_program "
                              "replaces a whole folder, so it writes only into a new or empty folder or over a "
                              "program saved before; choose another folder")
    if not overwrite:
        raise FileExistsError(f"{directory} already holds a lorafx program; pass overwrite=True to replace it")
    return True


def _ensure_mode_graphs(cm: CompiledModel) -> None:
    """For a mode-dependent model, capture the primary signature's graph of the other mode
    (what a call in that mode would capture), so that the save holds train and eval."""
    if not cm._mode_dependent:
        return
    ctx = cm._context
    signature = graph_record(cm.graph_module).signature
    mode = cm.training
    for training in (True, False):
        key = (signature, training)
        if key in cm._variants:
            continue
        cm.training = training  # _add_variant captures and sets the mode of cm.training
        try:
            with cm._capture_lock:
                if key not in cm._variants:
                    cm._add_variant(ctx.example_args, ctx.example_kwargs, key)
        finally:
            cm.training = mode


def save_program(cm: CompiledModel, directory: str, *, overwrite: bool = False) -> None:
    """Write ``cm``'s whole program to ``directory``: every captured graph (re-exported,
    ``torch.export.save``), the base and adapter weights (once), the adapters in PEFT's
    format, and a manifest with the lorafx records.  Requires real (not meta) weights.

    ``directory`` must be new or empty, or hold a program saved before (then
    ``overwrite=True`` replaces it).  Atomic: on any error the folder is as it was and no
    staging folder remains.  A merged model is saved unmerged and merged again on load.
    """
    if not isinstance(cm, CompiledModel):
        raise TypeError(f"save_program needs a lorafx CompiledModel, got {type(cm).__name__}")
    meta = [n for n, t in [*cm.named_parameters(), *cm.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"cannot save the program: {meta[0]!r} is on the meta device (the model was compiled "
                         "without weights); load real weights into it first (lorafx.materialize)")
    directory = os.path.abspath(directory)
    replacing = _check_target(directory, overwrite)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    was_merged = cm.merged
    cm.unmerge()
    stage = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent)
    try:
        _ensure_mode_graphs(cm)
        manifest = _write_programs(cm, stage)
        if cm.lora_records() or cm.shortcut_records():
            save_adapter(cm, stage, overwrite=True)
        manifest["merged"] = was_merged
        manifest["files"] = {name: {"bytes": os.path.getsize(os.path.join(stage, name)),
                                    "sha256": _sha256(os.path.join(stage, name))}
                             for name in sorted(os.listdir(stage))}
        with open(os.path.join(stage, MANIFEST_NAME), "w") as f:
            json.dump(manifest, f, separators=(",", ":"))
        _swap_in(stage, directory, replacing)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        if was_merged:
            cm.merge()


PROGRAM_SAVER[0] = save_program  # CompiledModel.save_program calls it


def _swap_in(stage: str, directory: str, replacing: bool) -> None:
    """Rename ``stage`` to ``directory``; an old program there is moved aside first and
    deleted last (put back if the rename fails)."""
    if os.path.isdir(directory) and not replacing:  # an empty folder
        os.rmdir(directory)
    if not replacing:
        os.rename(stage, directory)
        return
    old = tempfile.mkdtemp(prefix=STAGING_PREFIX + "old-", dir=os.path.dirname(directory))
    os.rmdir(old)
    os.rename(directory, old)
    try:
        os.rename(stage, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _key_data(key: tuple) -> dict:
    signature, mode = key
    return {"signature": _encode(signature, {}), "mode": mode}


def _write_programs(cm: CompiledModel, stage: str) -> dict:
    """Export and write every graph of ``cm`` into ``stage``; the manifest without files."""
    primary = cm.graph_module
    keys = [k for k, gm in cm._variants.items() if gm is primary]
    keys += [k for k, gm in cm._variants.items() if gm is not primary]
    programs = []
    shared: Dict[str, torch.Tensor] = {}
    for i, key in enumerate(keys):
        gm = cm._variants[key]
        ep, entry = _export_graph(gm)
        name = PROGRAM_NAME if i == 0 else f"program_{i}.pt2"
        if i == 0:
            shared = dict(ep.state_dict)
            torch.export.save(ep, os.path.join(stage, name))
            entry["shared"] = []
        else:
            stub, kept = _placeholder_state(ep, shared)
            with warnings.catch_warnings():  # torch warns that a placeholder covers less than its storage
                warnings.filterwarnings("ignore", message="No complete tensor found")
                torch.export.save(stub, os.path.join(stage, name))
            entry["shared"] = kept
        entry.update(file=name, **_key_data(key), training=graph_record(gm).training)
        programs.append(entry)
    report = cm.report()
    return {
        "format": FORMAT_VERSION,
        "lorafx_version": __version__,
        "torch_version": torch.__version__,
        "source": _source_data(cm._source),
        "target": cm.target,
        "backend": cm.backend,
        "dynamic": cm.dynamic,
        "options": _encode_or_none(cm.options),
        "decisions": _encode_or_none(cm._context.decisions),
        "mode_dependent": cm._mode_dependent,
        # buffers the compiled model's state dict leaves out (torch.export may save them as persistent)
        "non_persistent": sorted({n for n, _ in cm.named_buffers()} - set(CompiledModel.state_dict(cm).keys())),
        "training": cm.training,
        "checkpointing": _encode_or_none(cm.__dict__.get("_checkpointing")),  # gradient_checkpointing_enable()
        "report": _encode_or_none(report.as_dict()) if isinstance(report, CompileReport) else None,
        "programs": programs,
    }


def _encode_or_none(value):
    try:
        return _encode(value, {})
    except _Unencodable:
        return None


# -- loading ----------------------------------------------------------------------------------------

def _fail(directory: str, what: str) -> ProgramFormatError:
    return ProgramFormatError(f"{directory}: {what}; save the program again with cm.save_program(folder, "
                              "overwrite=True) from the compiled model")


def _read_manifest(directory: str) -> dict:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a folder: pass the folder cm.save_program(folder) wrote")
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.exists(path):
        hint = (" (it holds an adapter only: lorafx.load_adapter(model, folder) compiles a model with it)"
                if os.path.exists(os.path.join(directory, CONFIG_NAME)) else "")
        raise FileNotFoundError(f"{directory} holds no lorafx program ({MANIFEST_NAME} is missing){hint}; "
                                "write one with cm.save_program(folder)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(directory, f"{MANIFEST_NAME} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), int):
        raise _fail(directory, f"{MANIFEST_NAME} is not a lorafx program manifest")
    if manifest["format"] > FORMAT_VERSION:
        raise ProgramFormatError(
            f"{directory} was saved by lorafx {manifest.get('lorafx_version')} in program format "
            f"{manifest['format']}, newer than this lorafx {__version__} reads (format {FORMAT_VERSION}): "
            "upgrade lorafx to load it")
    if manifest.get("lorafx_version") != __version__:
        warnings.warn(f"{directory} was saved by lorafx {manifest.get('lorafx_version')}, this is lorafx "
                      f"{__version__}: the program loads, but check its outputs (or save it again with this "
                      "version)", stacklevel=3)
    if manifest.get("torch_version") != torch.__version__:
        logger.warning("lorafx: %s was saved with torch %s, this is torch %s", directory,
                       manifest.get("torch_version"), torch.__version__)
    return manifest


def _check_files(directory: str, manifest: dict, verify: bool) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("programs"), list) or not manifest["programs"]:
        raise _fail(directory, f"{MANIFEST_NAME} lists no files or programs")
    for name, meta in files.items():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise _fail(directory, f"{name} is missing")
        if os.path.getsize(path) != meta.get("bytes"):
            raise _fail(directory, f"{name} has {os.path.getsize(path)} bytes, not the {meta.get('bytes')} saved "
                                   "(a truncated copy, or a file from another save)")
        if verify and _sha256(path) != meta.get("sha256"):
            raise _fail(directory, f"{name} differs from the file saved (its sha256 does not match the manifest: "
                                   "corrupt, or from another save)")


def _check_pickles(directory: str, file: str) -> None:
    """Refuse a program archive holding a pickle that torch's weights-only unpickler rejects
    (torch.export.load would fall back to a full unpickle, which runs code): its sample
    inputs, and any tensor it stores pickled."""
    path = os.path.join(directory, file)
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pickled = [n for n in names if n.endswith(".pt")]
            for name in names:
                if name.endswith("_config.json") and "/data/" in name:
                    folder = name.rsplit("/", 1)[0]
                    for meta in (json.loads(z.read(name)).get("config") or {}).values():
                        if meta.get("use_pickle"):
                            pickled.append(f"{folder}/{meta['path_name']}")
            for name in pickled:
                try:
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)
                except Exception as e:
                    raise _fail(directory, f"{file} holds a pickle ({name}) that is not plain tensors "
                                           f"({type(e).__name__}); lorafx does not unpickle it") from None
    except (zipfile.BadZipFile, KeyError, ValueError, AttributeError) as e:
        if isinstance(e, ProgramFormatError):
            raise
        raise _fail(directory, f"{file} is not a readable .pt2 archive ({type(e).__name__}: {e})") from None


def _output_spec(text: Optional[str]):
    """The saved output structure; a type that cannot be imported becomes a dict (warned)."""
    if text is None:
        return None
    data = json.loads(text)
    missing = []

    def visit(node):
        t = node.get("type")
        if t and t not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            module = t.rsplit(".", 1)[0]
            if module.startswith("transformers."):  # the output classes of transformers register on import
                try:
                    importlib.import_module(module)
                except ImportError:
                    pass
            if t not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
                missing.append(t)
                node["type"] = "builtins.dict"  # a ModelOutput's context is its keys, as a dict's
        for child in node.get("children_spec") or ():
            visit(child)

    visit(data[1])
    if missing:
        logger.warning("lorafx: the output type %s cannot be imported here: the loaded program returns a dict "
                       "of its fields", ", ".join(sorted(set(missing))))
    return pytree.treespec_loads(json.dumps(data))


def _set_output_spec(gm: torch.fx.GraphModule, spec) -> None:
    info = gm.graph._codegen.pytree_info
    gm.graph._codegen = torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(info.orig_args, info.in_spec, spec))
    gm.recompile()


def _restore_records(gm: torch.fx.GraphModule, entry: dict, classes: Dict[str, type]) -> None:
    records = entry.get("records") or {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            key = f"node:{node.name}"
        elif node.op == "get_attr":
            key = f"attr:{node.target}"
        elif node.op == "placeholder":
            key = f"input:{node.name}"
        else:
            continue
        saved = records.get(key)
        if saved:
            recs = {kind: _decode(value, classes) for kind, value in saved.items()}
            renames = entry.get("renamed_nodes") or {}
            for kind, rec in list(recs.items()):  # records naming captured nodes (a shortcut's src/dst)
                changes = {f: renames[getattr(rec, f)] for f in ("src", "dst")
                           if isinstance(getattr(rec, f, None), str) and getattr(rec, f) in renames}
                if changes:
                    recs[kind] = dataclasses.replace(rec, **changes)
            node.meta[META_KEY] = recs
    grec = _decode(entry["graph_record"], classes)
    if not isinstance(grec, GraphRecord):
        raise ValueError("the saved graph record is not a GraphRecord")
    gm.meta[META_KEY] = grec


def _bind_to_primary(gm: torch.fx.GraphModule, primary: torch.fx.GraphModule, shared: List[str],
                     directory: str, file: str) -> None:
    """Make ``gm`` read ``primary``'s tensors (its placeholders must all be there) and hold
    its own further tensors in ``primary``'s tables, as a compiled model's graphs do."""
    mine = {path for path, *_ in tensor_slots(primary)}
    for path, m, table, name, _ in list(tensor_slots(gm)):
        if path in mine:
            continue
        if path in shared:
            raise _fail(directory, f"{file} reads {path!r}, which {PROGRAM_NAME} does not hold")
        owner = primary
        *parents, attr = path.split(".")
        for part in parents:
            if part not in owner._modules:
                owner._modules[part] = torch.nn.Module()
            owner = owner._modules[part]
        if table is m._parameters:
            owner._parameters[attr] = table[name]
        else:
            owner._buffers[attr] = table[name]
            if name in m._non_persistent_buffers_set:
                owner._non_persistent_buffers_set.add(attr)
    guards = gm._modules.get("_guards_fn")
    object.__setattr__(gm, "_modules", {**primary._modules, **({"_guards_fn": guards} if guards is not None else {})})
    _share_tensors(gm, primary)


def _set_persistence(gm: torch.nn.Module, non_persistent: set) -> None:
    """Make exactly the buffers at the ``non_persistent`` paths non-persistent, as in the
    compiled model saved (so that both have the same state-dict keys)."""
    for path, m, table, name, _ in list(tensor_slots(gm)):
        if table is m._buffers:
            if path in non_persistent:
                m._non_persistent_buffers_set.add(name)
            else:
                m._non_persistent_buffers_set.discard(name)


class _SavedSource(torch.nn.Module):
    """Stands in for the source model of a loaded program: its class name, forward
    signature, module names and state-dict keys; it holds no weights and cannot run."""

    def __init__(self, data: dict):
        super().__init__()
        self.__dict__["_saved"] = data
        self.config = types.SimpleNamespace(_name_or_path=data.get("config_name"), model_type=data.get("model_type"))
        for path in data.get("modules") or ():
            owner = self
            for part in path.split("."):
                if part not in owner._modules:
                    owner._modules[part] = torch.nn.Module()
                owner = owner._modules[part]
        groups: Dict[int, object] = {}
        self.__dict__["_keys"] = {key: groups.setdefault(g, object()) for key, g in data.get("state_dict_keys") or ()}

    def state_dict(self, *args, keep_vars: bool = False, **kwargs):
        """The source's keys, each mapped to one marker per tied group (no tensors)."""
        return dict(self._keys)

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"the source model ({self._saved.get('class')}) of a loaded lorafx program is not saved, "
                           "so it cannot run: call the loaded program itself")


_SOURCE_CLASSES: Dict[tuple, type] = {}


def _source_class(data: dict) -> type:
    """A ``_SavedSource`` subclass with the source's class name and forward signature."""
    params = data.get("forward")
    key = (data.get("class"), json.dumps(params))
    if key not in _SOURCE_CLASSES:
        ns: Dict[str, Any] = {"__module__": __name__}
        if params is not None:
            def forward(self, *args, **kwargs):
                return _SavedSource.forward(self, *args, **kwargs)
            kinds = inspect.Parameter
            forward.__signature__ = inspect.Signature(
                [kinds("self", kinds.POSITIONAL_OR_KEYWORD)]
                + [kinds(n, getattr(kinds, k), **({} if k.startswith("VAR") else {"default": None}))
                   for n, k in params])
            ns["forward"] = forward
        name = str(data.get("class") or "Model")
        _SOURCE_CLASSES[key] = type(name, (_SavedSource,), ns)
    return _SOURCE_CLASSES[key]


class LoadedProgram(CompiledModel):
    """A compiled model loaded by ``lorafx.load_program``: it runs its saved graphs (every
    call signature and train/eval mode saved), trains, merges, prints and saves like the
    compiled model it was saved from.  It has no source model: it cannot capture a new call
    signature, rebuild its graphs (rank reallocation) or program a new chip."""

    @property
    def source_model(self) -> torch.nn.Module:
        raise RuntimeError("a loaded lorafx program has no source model (it was not saved): compile the model again "
                           "with lorafx.load_adapter(model, folder) to get one")

    def _signatures(self) -> str:
        return "; ".join(sorted({", ".join(k for k, _ in sig[1]) or "(positional)" for sig, _ in self._variants}))

    def _add_variant(self, args: tuple, kwargs: dict, key: tuple):
        mode = "" if key[1] is None else f" in {'train' if key[1] else 'eval'} mode"
        raise RuntimeError(
            f"this loaded program has no graph for inputs ({', '.join(kwargs) or 'positional'}){mode}: it was saved "
            f"with graphs for ({self._signatures()}), and without its source model it cannot capture others. Call "
            "it with those inputs, or call the compiled model once with these inputs before cm.save_program(), or "
            "compile the source model with lorafx.load_adapter(model, folder)")

    def _rebuild_graphs(self) -> None:
        raise RuntimeError("a loaded lorafx program cannot rebuild its graphs (it has no source model to capture): "
                           "reallocate ranks on the compiled model, then save it again")

    def reprogram(self, seed: int):
        raise RuntimeError("a loaded lorafx program cannot program a new chip: compile the source model with "
                           "target='cim' (lorafx.load_adapter(model, folder, target='cim', ...))")

    def merged_state_dict(self):
        own = set(CompiledModel.state_dict(self).keys())
        keys = self._source._keys
        held = {marker for key, marker in keys.items() if key in own}
        missing = [k for k, marker in keys.items() if marker not in held]
        if missing:
            raise RuntimeError(f"the source model's state dict has {len(missing)} tensor(s) the program does not hold "
                               f"(e.g. {missing[0]!r}, unused by its forward), so a loaded program cannot give the "
                               "whole merged state dict: use cm.merge_and_unload(), or the compiled model")
        return super().merged_state_dict()


_LOADED_CLASSES: Dict[type, type] = {}


def _loaded_class(source_cls: type) -> type:
    if source_cls not in _LOADED_CLASSES:
        ns: Dict[str, Any] = {"__module__": __name__}
        if "forward" in source_cls.__dict__:
            def forward(self, *args, **kwargs):
                return CompiledModel.forward(self, *args, **kwargs)
            forward.__signature__ = inspect.signature(source_cls.forward)
            forward.__doc__ = CompiledModel.forward.__doc__
            ns["forward"] = forward
        _LOADED_CLASSES[source_cls] = type(f"Loaded{source_cls.__name__}", (LoadedProgram,), ns)
    return _LOADED_CLASSES[source_cls]


def _report(data: Optional[dict], gm: torch.fx.GraphModule) -> CompileReport:
    if not isinstance(data, dict):
        return CompileReport.from_pipeline([], 0.0, len(gm.graph.nodes), gm)
    data = _decode(data)
    rows = [PassReport(name=r["name"], nodes_before=r["nodes_before"], nodes_after=r["nodes_after"],
                       seconds=r["seconds"], modified=r["modified"], info=r.get("info") or {},
                       summary=list(r.get("summary") or ()), provides=frozenset(r.get("provides") or ()))
            for r in data.get("passes", [])]
    return CompileReport(rows, data["capture"]["seconds"], data["capture"]["nodes"], data["adapter_sites"],
                         data["trainable_params"], data["total_params"], data.get("sites_by_layer"))


def load_program(directory: str, *, verify: bool = True) -> LoadedProgram:
    """Load a program written by ``cm.save_program(directory)``.

    Checks the manifest (format, lorafx version: another version warns, a newer format is
    refused) and every file (size, and sha256 unless ``verify=False``), loads each graph
    with ``torch.export.load``, puts its lorafx records back, binds every graph to one set
    of tensors, and checks the adapters against the PEFT adapter saved beside them.
    """
    directory = os.path.abspath(directory)
    manifest = _read_manifest(directory)
    _check_files(directory, manifest, verify)
    classes: Dict[str, type] = {}  # sympy classes met so far
    graphs = []
    try:
        for entry in manifest["programs"]:
            _check_pickles(directory, entry["file"])
            try:
                ep = torch.export.load(os.path.join(directory, entry["file"]))
            except Exception as e:  # torch raises many types for a damaged archive
                raise _fail(directory, f"{entry['file']} is not a program torch.export.load can read "
                                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
            gm = ep.module()
            spec = _output_spec(entry.get("output"))
            if spec is not None:
                _set_output_spec(gm, spec)
            _restore_records(gm, entry, classes)
            lint_graph(gm)  # the LoRA ops are well formed (each kind's check), as after a compile
            key = (_decode(entry["signature"]), entry["mode"])
            graphs.append((key, gm, entry))
    except (KeyError, TypeError, ValueError, PassError) as e:
        if isinstance(e, ProgramFormatError):
            raise
        raise _fail(directory, f"the manifest or a program does not read back ({type(e).__name__}: {e})") from e
    key, primary, _ = graphs[0]
    _set_persistence(primary, set(manifest.get("non_persistent") or ()))
    for _, gm, entry in graphs[1:]:
        _bind_to_primary(gm, primary, entry.get("shared") or [], directory, entry["file"])
    source = _source_class(manifest["source"])(manifest["source"])
    source.train(bool(manifest.get("training", True)))
    decisions = _decode(manifest["decisions"]) if manifest.get("decisions") is not None else {}
    options = _decode(manifest["options"]) if manifest.get("options") is not None else {}
    ctx = CompileContext(training=bool(manifest.get("training", True)), decisions=decisions,
                         backend=manifest.get("backend", "eager"))
    cm = CompiledModel(source, primary, Pipeline([]), _report(manifest.get("report"), primary), context=ctx,
                       target=manifest.get("target", "cpu"), dynamic=bool(manifest.get("dynamic", True)),
                       backend=manifest.get("backend", "eager"), options=options,
                       mode_dependent=bool(manifest.get("mode_dependent", False)))
    cm.__class__ = _loaded_class(type(source))
    cm._variants.clear()
    for k, gm, _ in graphs:
        cm._variants[k] = gm
    _check_adapter(cm, directory, manifest)
    if manifest.get("checkpointing") is not None:
        cm.__dict__["_checkpointing"] = _decode(manifest["checkpointing"])
    if manifest.get("merged"):
        cm.merge()
    cm.train(bool(manifest.get("training", True)))
    return cm


def _check_adapter(cm: CompiledModel, directory: str, manifest: dict) -> None:
    """The PEFT adapter beside the program must hold the program's adapter values."""
    if not (cm.lora_records() or cm.shortcut_records()):
        return
    if CONFIG_NAME not in manifest["files"]:
        raise _fail(directory, f"the program has adapters but the save lists no {CONFIG_NAME}")
    files = read_adapter_files(directory)
    pairs = [(site, files.tensors.get(key), path) for site, rec in cm.lora_records().items()
             for key, path in peft_keys({site: rec}).items()]
    pairs += [(site, getattr(s, ab, None), getattr(rec, ab)) for site, rec in cm.shortcut_records().items()
              for s in [files.shortcuts.get(site)] for ab in ("lora_A", "lora_B")]
    for site, saved, path in pairs:
        if saved is None or not torch.equal(saved, get_attr(cm, path).detach().cpu()):
            raise _fail(directory, f"the adapter of {site} in {WEIGHTS_NAME} differs from the program's "
                                   "(files from different saves)")
