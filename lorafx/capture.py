"""Capture a model as a torch.fx GraphModule with torch.export.

``capture(model, example_inputs, example_kwargs, dynamic=True)`` works on Hugging
Face transformers models and plain ``nn.Module``s:

* positional inputs are bound to the forward's parameter names, so the graph is
  called with keywords (``gm(input_ids=ids)``);
* for transformers models ``use_cache`` is off and ``return_dict`` on during
  export (the model's config is restored afterwards);
* batch (dim 0) and sequence (dim 1 of integer inputs and of 3-d+ float inputs)
  are dynamic; an example of size 1 is repeated to 2 first, since torch.export
  would otherwise specialise it to a constant;
* the model is exported in training mode (so dropout nodes exist), unless it
  holds batch norm, whose train/eval behaviour cannot be switched after export:
  such a model is exported in the mode it is in (``training=`` overrides);
* nothing about the user's model is changed: captures are serialised by one
  lock (torch.export swaps a module's parameters for fake tensors while it
  traces), and its parameters, buffers, modes, ``forward`` and config are put
  back in a ``finally``, also when export fails.

What the graph is specialised to (call signature, input ranks, the symbolic dims
{symbol: "batch"|"seq"}, the export mode, the output layers) is recorded in its
``GraphRecord`` (``lorafx.meta.graph_record(gm)``), and every call_function node
gets an ``OriginRecord`` naming its module.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch.export import Dim

from .meta import META_KEY, GraphRecord, OriginRecord, graph_record, set_record

__all__ = ["capture", "CaptureError", "bind_inputs", "is_hf_model", "signature_key", "mode_dependent",
           "check_input_ranks", "is_causal_lm"]

# torch.export is not thread-safe on one model (it swaps the module's parameters for fake
# tensors while tracing): every capture in this process holds this lock.
_CAPTURE_LOCK = threading.RLock()


class CaptureError(RuntimeError):
    """The model could not be captured as an fx graph."""


def is_hf_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _binding(sig: inspect.Signature) -> Tuple[inspect.Signature, bool, frozenset]:
    """(``sig``, whether it takes ``*args``, the names its arguments can be passed by)."""
    P = inspect.Parameter
    return (sig, any(p.kind is P.VAR_POSITIONAL for p in sig.parameters.values()),
            frozenset(n for n, p in sig.parameters.items() if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)))


@functools.lru_cache(maxsize=256)
def _method_binding(func) -> Tuple[inspect.Signature, bool, frozenset]:
    """``_binding`` of ``func`` bound to an instance (its first parameter dropped)."""
    sig = inspect.signature(func)
    return _binding(sig.replace(parameters=list(sig.parameters.values())[1:]))


def _forward_binding(model: torch.nn.Module) -> Tuple[inspect.Signature, bool, frozenset]:
    """``_binding(inspect.signature(model.forward))``, cached per forward function (read on
    every call of a compiled model; building a signature takes tens of microseconds)."""
    forward = model.forward
    func = getattr(forward, "__func__", None)
    if func is not None and getattr(forward, "__self__", None) is model:
        try:
            return _method_binding(func)
        except TypeError:  # unhashable callable
            pass
    return _binding(inspect.signature(forward))


def bind_inputs(model: torch.nn.Module, args: Sequence[Any], kwargs: Optional[Dict[str, Any]]) -> Tuple[tuple, dict]:
    """Bind positional ``args`` to the forward's parameter names; drops None keywords.

    Returns ``(remaining_args, kwargs)``; ``remaining_args`` is empty unless the
    forward takes ``*args``.
    """
    kwargs = dict(kwargs or {})
    args = tuple(args or ())
    sig, var_positional, named = _forward_binding(model)
    if var_positional:
        return args, {k: v for k, v in kwargs.items() if v is not None}
    if not args and named.issuperset(kwargs):  # keywords only, all named: what bind_partial gives
        return (), {name: kwargs[name] for name in sig.parameters if kwargs.get(name) is not None}
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as e:
        names = [p for p in sig.parameters]
        raise CaptureError(
            f"example inputs do not match {type(model).__name__}.forward{sig}: {e}. "
            f"Pass inputs by name, e.g. example_kwargs={{'{names[0] if names else 'x'}': tensor}}."
        ) from None
    out = {}
    for name, value in bound.arguments.items():
        param = sig.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update({k: v for k, v in value.items() if v is not None})
        elif value is not None:
            out[name] = value
    return (), out


def signature_key(args: tuple, kwargs: dict) -> tuple:
    """What a captured graph is specialised to: the argument names and the values
    of non-tensor arguments (torch.export bakes those in as constants)."""

    def static(v):
        if isinstance(v, torch.Tensor):
            return ("<tensor>",)
        leaves = torch.utils._pytree.tree_leaves(v)
        return tuple("<tensor>" if isinstance(x, torch.Tensor) else repr(x) for x in leaves)

    return tuple(static(a) for a in args), tuple(sorted((k, static(v)) for k, v in kwargs.items()))


def _dynamic_dims(t: torch.Tensor) -> Dict[int, str]:
    """Which dims of an example tensor are batch/seq."""
    if t.dim() == 0:
        return {}
    dims = {0: "batch"}
    is_int = not (t.is_floating_point() or t.is_complex())
    if t.dim() >= 2 and (is_int or t.dim() >= 3):
        dims[1] = "seq"
    return dims


def _grow_unit_dims(kwargs: dict, args: tuple, dynamic: bool):
    """Repeat size-1 batch/seq dims to 2 (torch.export specialises size-1 dims)."""
    if not dynamic:
        return args, kwargs

    def grow(t):
        if not isinstance(t, torch.Tensor):
            return t
        for d in _dynamic_dims(t):
            if t.shape[d] == 1:
                reps = [1] * t.dim()
                reps[d] = 2
                t = t.repeat(*reps)
        return t

    return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """torch.export dynamic_shapes keyed by the forward's parameter names."""

    def spec(t):
        if isinstance(t, torch.Tensor):
            return {d: Dim.AUTO for d in _dynamic_dims(t)} or None
        return torch.utils._pytree.tree_map(lambda _: None, t)

    shapes = {k: spec(v) for k, v in kwargs.items()}
    if args:
        params = inspect.signature(model.forward).parameters.values()
        var_name = next(p.name for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL)
        shapes = {var_name: tuple(spec(a) for a in args), **shapes}
    return shapes


@contextlib.contextmanager
def _keyword_forward(model: torch.nn.Module, names: Sequence[str], active: bool):
    """Give ``model.forward`` an explicit keyword-only signature of ``names`` while
    exporting: torch.export cannot take dynamic shapes for inputs that land in a
    ``**kwargs`` parameter (transformers' ``num_items_in_batch``)."""
    if not active:
        yield
        return
    original = model.forward

    def forward(**kw):
        return original(**kw)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names])
    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def mode_dependent(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds modules whose train/eval behaviour torch.export bakes in
    beyond what SetTrainingMode can flip (batch norm: batch statistics and running-stat
    updates in train, running statistics in eval)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               or (isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and m.track_running_stats)
               for m in model.modules())


@contextlib.contextmanager
def _preserved(model: torch.nn.Module):
    """Put back every module's parameter/buffer/submodule tables, mode and instance
    ``forward``, and a transformers config's values, whatever happens inside."""
    saved = [(m, dict(m._parameters), dict(m._buffers), dict(m._modules), m.training,
              m.__dict__.get("forward", _MISSING)) for m in model.modules()]
    config = getattr(model, "config", None) if is_hf_model(model) else None
    config_values = dict(config.__dict__) if config is not None else None
    try:
        yield
    finally:
        for m, params, buffers, modules, training, forward in saved:
            for table, old in ((m._parameters, params), (m._buffers, buffers), (m._modules, modules)):
                if table.keys() != old.keys() or any(table[k] is not v for k, v in old.items()):
                    table.clear()
                    table.update(old)
            m.training = training
            if forward is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = forward
        if config is not None and (config.__dict__.keys() != config_values.keys()
                                   or any(config.__dict__[k] is not v for k, v in config_values.items())):
            config.__dict__.clear()
            config.__dict__.update(config_values)


_MISSING = object()


def _set_export_mode(model: torch.nn.Module, training: bool) -> None:
    """The export mode, and for transformers models use_cache=False/return_dict=True
    (``_preserved`` puts the model's own values back)."""
    config = getattr(model, "config", None) if is_hf_model(model) else None
    for key, value in (("use_cache", False), ("return_dict", True)):
        if config is not None and hasattr(config, key):
            setattr(config, key, value)
    model.train(training)


def _user_frame(err: BaseException) -> str:
    """The innermost traceback frame outside torch: the model code that failed."""
    import os
    import traceback

    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith(torch_dir) and not f.filename.startswith(os.path.dirname(__file__))]
    if not frames:
        return ""
    f = frames[-1]
    return f"\n  at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _hint(err: BaseException, during: str = "compile") -> str:
    text = f"{type(err).__name__}: {err}".strip()
    first = text.splitlines()[0][:400]
    low = text.lower()
    if "data-dependent" in low or "data dependent" in low:
        hints = ["the model branches on tensor values (Python `if` on a tensor); lorafx cannot capture "
                 "value-dependent control flow: make the branch static or express it with torch.where/torch.cond"]
    elif "cache" in low:
        hints = ["disable the KV cache (use_cache=False) in the model's config"]
    elif "constraint" in low or "specializ" in low:
        hints = ["retry with dynamic=False (fixed shapes), or use example inputs of the size you will run"]
    elif during == "call":
        hints = ["check that these inputs are what the original model(...) accepts in eager mode",
                 "compile with dynamic=False if the failure is about shapes"]
    else:
        hints = ["check that example_inputs/example_kwargs are what model(...) accepts in eager mode",
                 "retry with dynamic=False"]
    return f"{first}{_user_frame(err)}\n  what to try: " + "; ".join(hints)


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: Optional[Dict[str, Any]] = None,
    *,
    dynamic: bool = True,
    training: Optional[bool] = None,
    during: str = "compile",
) -> torch.fx.GraphModule:
    """Export ``model`` to an fx GraphModule called with keyword inputs.

    Requires: ``model(*example_inputs, **example_kwargs)`` runs in eager mode.
    Provides: a GraphModule whose parameters and buffers are the model's own
    tensors (no copy), with dynamic batch/seq dims when ``dynamic``.
    ``training``: the mode to export in; by default training mode, or the model's
    own mode when it holds batch norm (``mode_dependent``); recorded in the
    graph's ``GraphRecord`` (``captured_training``).  ``during="call"`` words errors for
    inputs of a call rather than example inputs.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"capture() needs an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not example_inputs and not example_kwargs:
        raise CaptureError(
            f"capture({type(model).__name__}) needs example inputs: pass example_inputs=(tensor, ...) "
            "or example_kwargs={'input_ids': ids}"
        )
    args, kwargs = bind_inputs(model, example_inputs, example_kwargs)
    args, kwargs = _grow_unit_dims(kwargs, args, dynamic)
    shapes = _dynamic_shapes(model, args, kwargs) if dynamic else None
    params = inspect.signature(model.forward).parameters
    spill = any(k not in params or params[k].kind is inspect.Parameter.VAR_KEYWORD for k in kwargs)
    if training is None:
        training = model.training if mode_dependent(model) else True
    what = "these call inputs" if during == "call" else "it"
    with _CAPTURE_LOCK, _preserved(model), torch.enable_grad():
        _set_export_mode(model, training)
        with _keyword_forward(model, list(kwargs), spill and not args):
            try:
                ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
            except Exception as e:  # torch.export raises many exception types
                raise CaptureError(f"could not capture {type(model).__name__} for {what}: "
                                   f"{_hint(e, during)}") from e
        gm = ep.module()
    gm.meta[META_KEY] = GraphRecord(
        signature=signature_key(args, kwargs), inputs=tuple(sorted(kwargs)), nargs=len(args),
        input_ranks={k: v.dim() for k, v in kwargs.items() if isinstance(v, torch.Tensor)},
        dims=_name_symbols(gm) if dynamic else {}, output_modules=tuple(_output_modules(model)),
        captured_training=training, causal_lm=is_causal_lm(model))
    _record_origins(gm)
    return gm


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a transformers causal language model (it takes ``labels`` equal to
    its ``input_ids`` and shifts them itself)."""
    name = type(model).__name__
    return is_hf_model(model) and (name.endswith("ForCausalLM") or name.endswith("LMHeadModel"))


def _output_modules(model: torch.nn.Module) -> list:
    """Names of the model's output layer(s), which "all-linear" leaves alone."""
    names = []
    head = model.get_output_embeddings() if is_hf_model(model) else None
    for name, mod in model.named_modules():
        if (head is not None and mod is head) or name.rsplit(".", 1)[-1] in ("lm_head", "classifier", "score"):
            names.append(name)
    return names


def _name_symbols(gm: torch.fx.GraphModule) -> Dict[str, str]:
    names: Dict[str, str] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for d, role in _dynamic_dims(val).items():
            size = val.shape[d]
            if isinstance(size, torch.SymInt):
                names.setdefault(str(size.node.expr), role)
    return names


def _record_origins(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, mtype = list(stack.values())[-1]
            mtype = mtype if isinstance(mtype, str) else getattr(mtype, "__qualname__", str(mtype))
            set_record(node, OriginRecord(module=path, module_type=mtype.rsplit(".", 1)[-1]))


def check_input_ranks(gm: torch.fx.GraphModule, kwargs: dict) -> None:
    """Refuse a tensor input whose number of dims differs from the captured one, naming
    the input and the fix (torch.export guards only on the dims it marked dynamic)."""
    for name, rank in graph_record(gm).input_ranks.items():
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() != rank:
            roles = {0: "batch", 1: "seq"}
            dims = ", ".join(roles.get(d, f"dim {d}") for d in range(rank))
            raise ValueError(
                f"input {name!r} has {value.dim()} dim(s) (shape {tuple(value.shape)}), but this compiled model "
                f"takes {name} with {rank} ({dims}), as captured: "
                + (f"add the batch dim, e.g. {name}.unsqueeze(0)" if value.dim() == rank - 1 else
                   f"pass a tensor with {rank} dims"))
