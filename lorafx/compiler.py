"""``lorafx.compile``: capture a model, run the LoRA pipeline, return a CompiledModel.

The options ``compile`` takes are the ones its passes and its target declare
(``Pass.options``, ``Target.options``; see ``declarations``), plus its own keywords
(``COMPILE_KEYWORDS``).  The default pipeline is ``lorafx.passes.DEFAULT_PASSES``,
then the target's passes, then ``FINAL_PASSES``, each pass built from the options
it declares (``default_passes``).
"""
from __future__ import annotations

import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from lorafx.hw_targets import Target, get_target, target_class
from lorafx.passes import DEFAULT_PASSES, FINAL_PASSES, InsertLoRA

from . import adapter_io
from .capture import bind_inputs, capture, is_hf_model
from .compiled import CompiledModel, CompileReport, own_base
from .context import CompileContext
from .options import Option, check_options, check_seed
from .peft_names import resolve_peft_names
from .pipeline import Instrument, Pass, Pipeline

__all__ = ["compile", "default_passes", "declarations", "load_adapter", "default_example_inputs",
           "without_linear_adapters", "COMPILE_KEYWORDS"]

# compile()'s own keywords (the rest are the options passes and targets declare)
COMPILE_KEYWORDS = ("target", "example_inputs", "example_kwargs", "calibration", "seed", "passes", "dynamic",
                    "backend", "instruments", "progress")


def declarations(target: Any = "cpu", passes: Optional[Sequence[Pass]] = None) -> List[Tuple[str, Sequence[Option]]]:
    """``[(who, options)]``: the compile options each default pass (or each of ``passes``)
    and the target declare, in pipeline order; passes that declare none are left out."""
    if passes is not None:  # instances: a Pipeline among them declares its passes' options
        owners = [(p.name, tuple(p.options)) for p in passes]
    else:
        owners = [(cls.__name__, cls.options) for cls in (*DEFAULT_PASSES, *FINAL_PASSES)]
    out, seen = [], set()
    for name, options in owners:
        key = (name, tuple(o.name for o in options))
        if options and key not in seen:
            seen.add(key)
            out.append((name, options))
    target_cls = target_class(target)
    out.append((f"target {target_cls.name!r}", target_cls.options))
    return out


def _declared_names(target_cls: type, passes: Optional[Sequence[Pass]] = None) -> set:
    """Every option name the default pipeline (and ``passes``, if given) and the target declare,
    and compile's own keywords: the names PEFT's LoraConfig fields resolve against."""
    owners = declarations(target_cls) + (declarations(target_cls, passes) if passes is not None else [])
    return {o.name for _, opts in owners for o in opts} | set(COMPILE_KEYWORDS)


def _split(options: Dict[str, Any], target_cls: type) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(the target's options, the rest)."""
    mine = {o.name for o in target_cls.options}
    return {k: v for k, v in options.items() if k in mine}, {k: v for k, v in options.items() if k not in mine}


def _build(options: Dict[str, Any], ctx: CompileContext, hw: Target) -> List[Pass]:
    """The default pipeline for checked ``options``."""
    built = [cls.from_options(options, ctx) for cls in DEFAULT_PASSES]
    final = [cls.from_options(options, ctx) for cls in FINAL_PASSES]
    return [p for p in built if p is not None] + list(hw.passes(options)) + [p for p in final if p is not None]


def compilable_target(target: Any) -> type:
    """The Target class of ``target``; refuses a part of a composite target (``rram``, ``sram``, ``host``)."""
    target_cls = target_class(target)
    if not target_cls.compilable:
        raise ValueError(f"target {target_cls.name!r} ({target_cls.description}) is not compiled for on its own; "
                         f"compile with target='cim', whose {target_cls.name!r} part it is, or target='cpu'")
    return target_cls


def default_passes(target: Any = "cpu", *, backend: str = "eager", **options) -> List[Pass]:
    """The pipeline ``compile`` runs for these options.  Edit the list and give it back as
    ``compile(model, passes=...)``."""
    target_cls = compilable_target(target)
    options = resolve_peft_names(options, _declared_names(target_cls), "lorafx.default_passes")
    check_options(options, declarations(target_cls), where="lorafx.default_passes")
    target_options, _ = _split(options, target_cls)
    hw = get_target(target, **target_options)
    return _build(options, CompileContext(target=hw, backend=backend), hw)


def default_example_inputs(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A (2, 16) batch of token ids for a transformers model, on the model's device."""
    if not is_hf_model(model):
        raise ValueError(
            f"{type(model).__name__} is not a transformers model, so lorafx cannot guess its inputs: "
            "pass example_inputs=(tensor, ...) or example_kwargs={...}"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=gen).to(device)
    return {"input_ids": ids}


def compile_context(model: torch.nn.Module, example_inputs, example_kwargs, **fields
                    ) -> Tuple[tuple, Optional[Dict[str, Any]], CompileContext]:
    """``(example_inputs, example_kwargs, context)`` for capturing ``model``: the inputs
    normalised (a transformers model's default batch when none is given, a lone tensor as a
    tuple) and a CompileContext bound to them; ``fields`` go to the context."""
    if example_inputs is None and example_kwargs is None:
        example_kwargs = default_example_inputs(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs or ())
    args, kwargs = bind_inputs(model, example_inputs, example_kwargs)
    ctx = CompileContext(example_args=args, example_kwargs=kwargs, training=model.training,
                         bind=lambda a, k: bind_inputs(model, a, k), **fields)
    return example_inputs, example_kwargs, ctx


def _check_model(model) -> None:
    """Refuse, with the fix, models lorafx cannot compile as they are."""
    if isinstance(model, CompiledModel):
        raise TypeError(
            "lorafx.compile got a model lorafx already compiled. Compile its source model again "
            "(lorafx.compile(cm.source_model, ...)), or load other adapters into it with cm.load_adapter(folder)")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lorafx.compile needs a torch.nn.Module, got {type(model).__name__}")
    peft_layers = [name for name, m in model.named_modules() if type(m).__module__.split(".")[0] == "peft"]
    if peft_layers:
        raise TypeError(
            f"lorafx.compile got a model wrapped by PEFT ({type(model).__name__}; PEFT modules such as "
            f"{next((n for n in peft_layers if n), type(model).__name__)!r}). lorafx adds its own adapters to the base model: pass "
            "peft_model.get_base_model() after peft_model.unload() to drop PEFT's adapters, or "
            "peft_model.merge_and_unload() to keep them merged into the weights; to train PEFT's adapters "
            "with lorafx, save them (save_pretrained) and use lorafx.load_adapter(base_model, folder)")


def _check_passes_and_options(passes: Sequence[Pass], options: Dict[str, Any], target_cls: type) -> None:
    """With ``passes=``, the passes come configured: refuse the options they would take."""
    for p in passes:
        if not isinstance(p, Pass):
            raise TypeError(f"lorafx.compile: passes= must hold lorafx passes (instances), got {p!r}")
    pass_options = {o.name: owner for owner, opts in declarations(target_cls, passes)[:-1] for o in opts}
    clash = sorted(k for k in options if k in pass_options)
    if clash:
        raise TypeError(
            f"lorafx.compile got pass option(s) {clash} together with passes=[...]: the passes given are used as "
            f"they are, so configure them instead ({clash[0]!r} is declared by {pass_options[clash[0]]}, e.g. "
            f"InsertLoRA(r=16)), or build the list with lorafx.default_passes({clash[0]}=...) and edit it")


class _Progress(Instrument):
    """A tqdm bar over the passes (created when the pipeline starts, after capture)."""

    def __init__(self, total: int):
        self.total = total
        self.bar = None

    def before_pipeline(self, gm):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=self.total, desc="lorafx passes", unit="pass", leave=False)

    def before_pass(self, p, gm):
        self.bar.set_postfix_str(p.name)

    def after_pass(self, p, result, report):
        self.bar.update(1)

    def after_pipeline(self, gm, reports):
        self.bar.close()


def compile(
    model: torch.nn.Module,
    *,
    target: Any = "cpu",
    example_inputs: Optional[Sequence[Any]] = None,
    example_kwargs: Optional[Dict[str, Any]] = None,
    calibration: Optional[Iterable[Any]] = None,
    seed: Optional[int] = None,
    passes: Optional[Sequence[Pass]] = None,
    dynamic: bool = True,
    backend: str = "eager",
    instruments: Iterable[Instrument] = (),
    progress: bool = False,
    **options: Any,
) -> CompiledModel:
    """Capture ``model``, insert LoRA adapters and lower to ``target``.

    ``options`` are the ones the passes and the target declare (``r``, ``alpha``,
    ``target_modules``, ``schedule``, ``fold_a``, ...; the README's table, or
    ``lorafx.compiler.declarations()``); all are checked before the model is captured,
    and an unknown one is refused naming the close matches.  PEFT's LoraConfig fields are
    accepted under their own names (``lora_alpha``, ``lora_dropout``, ``init_lora_weights``
    as aliases; ``compile(model, **lorafx.peft_options(lora_config))``), a field lorafx does
    not implement only at PEFT's default value (``lorafx.peft_names``).

    ``calibration``: an iterable of batches (dicts of keyword inputs, tuples or tensors)
    for passes that take decisions from data; ``seed``: the seed of every random choice
    (the adapter init; drawn from torch's generator if None).  Decisions taken from data or
    randomness are recorded in the compiled model and replayed when it captures a new
    call signature.  ``passes``: a custom pipeline (a list of pass instances, e.g.
    ``lorafx.default_passes(...)`` edited); it runs as given, so options that passes
    declare are refused with it, while the target's options still configure the target
    (its passes are not added: include ``target.passes()`` yourself).

    ``backend="inductor"`` (or any torch.compile backend) runs the rewritten graph
    through ``torch.compile(fullgraph=True)``; the default ``"eager"`` runs it as is.
    The model itself is not modified: before the first pass, the compiled model owns
    frozen copies of its Parameter objects (sharing their storage) and private copies
    of the buffers the graph writes, except those ``fold_a`` copies into its folded buffers.
    """
    _check_model(model)
    check_seed("seed", seed, "lorafx.compile: ")
    seed = None if seed is None else int(seed)
    target_cls = compilable_target(target)
    if backend != "eager":
        known = torch._dynamo.list_backends()
        if backend not in known:
            raise ValueError(f"unknown backend {backend!r}; use 'eager' or a torch.compile backend: {known}")
    options = resolve_peft_names(options, _declared_names(target_cls, passes))  # PEFT's LoraConfig names
    check_options(options, declarations(target_cls, passes), COMPILE_KEYWORDS)
    if passes is not None:
        _check_passes_and_options(passes, options, target_cls)
    target_options, _ = _split(options, target_cls)
    hw = get_target(target, **target_options)
    example_inputs, example_kwargs, ctx = compile_context(model, example_inputs, example_kwargs,
                                                          calibration=calibration, seed=seed, target=hw,
                                                          backend=backend)
    pass_list = list(passes) if passes is not None else _build(options, ctx, hw)  # validated before capture
    instruments = list(instruments)
    if progress:
        instruments.append(_Progress(len(pass_list)))
    pipeline = Pipeline(pass_list, instruments=instruments)

    start = time.perf_counter()
    gm = capture(model, example_inputs, example_kwargs, dynamic=dynamic)
    capture_seconds = time.perf_counter() - start
    own_base(gm, model)  # before the first pass: no pass can touch the model's parameters
    nodes = len(gm.graph.nodes)
    result = pipeline(gm, ctx)
    gm = result.graph_module
    report = CompileReport.from_pipeline(result.info["reports"], capture_seconds, nodes, gm)
    # for inputs captured later; the compiled model sets the training mode of every graph itself
    replay = Pipeline([p for p in pass_list if "training_mode" not in p.provides])
    recorded = {"target": hw.name, **options, **({"seed": seed} if seed is not None else {})}
    return CompiledModel(model, gm, replay, report, context=ctx, target=hw.name, dynamic=dynamic, backend=backend,
                         options=recorded, mode_dependent=hw.mode_dependent)


def load_adapter(model, directory: str, *, example_inputs=None, example_kwargs=None, trust_pickle: bool = False,
                 **options):
    """Compile ``model`` with the adapter configuration in ``directory`` and load its weights.

    Every file is read and checked before compiling.  An adapter with shortcut adapters
    (``lorafx_shortcuts.safetensors``, written for a model compiled with ``shortcuts=True``)
    compiles with exactly its saved sites (``shortcuts=True, shortcut_pattern=...,
    shortcut_alpha=...``) and loads them too; one with shortcut adapters only compiles
    without linear adapters.  ``model`` may also be a CompiledModel, whose adapters then
    receive the weights.  ``trust_pickle=True`` lets a ``.bin`` file run the pickle code
    it holds.  An adapter trained on pruned weights (``sparsity=...``) compiles its sites
    with ``sparsity="keep"``: pass the pruned model.
    """
    if isinstance(model, CompiledModel):
        model.load_adapter(directory, trust_pickle=trust_pickle)
        return model
    options = resolve_peft_names(options, _declared_names(compilable_target(options.get("target", "cpu"))),
                                 "lorafx.load_adapter")  # PEFT's names overriding the saved settings
    files = adapter_io.read_adapter_files(directory, trust_pickle)  # fail before the (slow) compile
    shortcut = adapter_io.shortcut_settings(files.shortcuts)
    if files.tensors:
        settings = {**adapter_io.compile_settings(files.config), **shortcut, **adapter_io.sparsity_settings(files),
                    **adapter_io.trained_settings(files), **options}
        cm = compile(model, example_inputs=example_inputs, example_kwargs=example_kwargs, **settings)
    else:  # shortcut adapters only: the default pipeline without InsertLoRA and the passes that need it
        mine = {k: v for k, v in options.items() if k in COMPILE_KEYWORDS}
        target = mine.pop("target", "cpu")
        passes = without_linear_adapters(default_passes(target, backend=mine.get("backend", "eager"),
                                                        **{**shortcut, **{k: v for k, v in options.items()
                                                                          if k not in COMPILE_KEYWORDS}}))
        cm = compile(model, target=target, example_inputs=example_inputs, example_kwargs=example_kwargs,
                     passes=passes, **mine)
    # Options that change the scales were chosen on purpose: check the scales only otherwise.
    scales_chosen = any(k in options for k in adapter_io.SCALE_OPTIONS)
    adapter_io.check_residual_init(cm, directory, files.config)  # a PiSSA/OLoRA adapter needs the residual
    adapter_io.copy_adapter_weights(cm, directory, files.tensors, None if scales_chosen else files.config,
                                    files.shortcuts)
    return cm


def without_linear_adapters(passes: Sequence[Pass]) -> List[Pass]:
    """``passes`` without InsertLoRA: a pipeline for a model with shortcut adapters only
    (InsertShortcuts then provides the ``"lora"`` the later passes require)."""
    return [p for p in passes if not isinstance(p, InsertLoRA)]
