"""``lorafx.compile``: capture a model, run the LoRA pipeline, return a CompiledModel."""
from __future__ import annotations

import time
from typing import Any, Dict, Iterable, Optional, Sequence

import torch

from .capture import capture, is_hf_model
from .compiled import CompiledModel, CompileReport
from .pipeline import Instrument, Pipeline

__all__ = ["compile", "default_example_inputs", "LORA_OPTIONS", "SCHEDULE_OPTIONS", "REWRITE_OPTIONS"]

# compile() options forwarded to InsertLoRA, with their meaning.
LORA_OPTIONS = {
    "r": "LoRA rank (default 8)",
    "alpha": "LoRA alpha; scale = alpha / r (default 16)",
    "target_modules": "module names (list), a regex, or 'all-linear' (default)",
    "exclude_modules": "module names or regex to leave alone",
    "rank_pattern": "PEFT-style {regex: rank}",
    "alpha_pattern": "PEFT-style {regex: alpha}",
    "use_rslora": "scale = alpha / sqrt(r)",
    "dropout": "adapter dropout probability (default 0)",
    "init": "'kaiming' (default) or 'gaussian' init of A; B starts at 0",
    "seed": "seed for the adapter init",
}

# compile() options forwarded to SelectSchedule (RunLoRA schedule choice, lorafx/schedules.py).
SCHEDULE_OPTIONS = {
    "schedule": "'auto' (default: cheapest per node and token count) or a schedule / rule, e.g. 'f1b1'",
    "schedule_criterion": "'flops' (default: sympy FLOP formulas) or 'time' (measure on this machine, cached)",
    "schedule_keep_xa": "save x A^T (r x tokens) for backward instead of recomputing it (default False)",
}

# compile() options that add optional rewrites.
REWRITE_OPTIONS = {
    "fold_a": "store A as rows of the frozen weight's buffer so one GEMM computes x W^T and x A^T "
              "(FoldLoRAIntoBase; copies the adapted weights once; default False)",
    "fuse_siblings": "one op for the adapters that share an input (q/k/v, gate/up), their rank-r GEMMs "
                     "stacked (FuseSiblings; default True with the eager backend, False with a torch.compile "
                     "backend, where its backward would be specialised, and recompiled, per token-count range)",
}


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
    target: str = "cpu",
    example_inputs: Optional[Sequence[Any]] = None,
    example_kwargs: Optional[Dict[str, Any]] = None,
    dynamic: bool = True,
    backend: str = "eager",
    instruments: Iterable[Instrument] = (),
    progress: bool = False,
    **options: Any,
) -> CompiledModel:
    """Capture ``model``, insert LoRA adapters and lower to ``target``.

    ``backend="inductor"`` (or any torch.compile backend) runs the rewritten graph
    through ``torch.compile(fullgraph=True)``; the default ``"eager"`` runs it as is.

    Options: see ``LORA_OPTIONS`` (``r``, ``alpha``, ``target_modules``,
    ``rank_pattern``, ``dropout``, ...), ``SCHEDULE_OPTIONS`` (``schedule``,
    ``schedule_criterion``, ``schedule_keep_xa``) and ``REWRITE_OPTIONS`` (``fold_a``,
    ``fuse_siblings``).
    The model itself is not modified: the compiled model shares its weights (frozen copies
    of the Parameter objects), except those ``fold_a`` copies into its folded buffers.
    """
    _check_model(model)
    from lorafx.hw_targets import get_target
    from lorafx.passes import AnnotateCost, InlineGradModeRegions, InsertLoRA, SelectSchedule, SetTrainingMode
    from lorafx.passes import CausalMaskToIsCausal, FoldLoRAIntoBase, FuseSiblings, RecomputeInputs

    known_options = sorted(LORA_OPTIONS) + sorted(SCHEDULE_OPTIONS) + sorted(REWRITE_OPTIONS)
    unknown = sorted(set(options) - set(known_options))
    if unknown:
        raise TypeError(f"lorafx.compile got unknown option(s) {unknown}; known options: {known_options}")
    from lorafx.options import check_bool, check_choice
    from lorafx.passes.select_schedule import CRITERIA
    fold_a = options.get("fold_a", False)
    fuse_siblings = options.get("fuse_siblings", backend == "eager")
    keep_xa = options.get("schedule_keep_xa", False)
    criterion = options.get("schedule_criterion", "flops")
    for name, value in (("fold_a", fold_a), ("fuse_siblings", fuse_siblings), ("schedule_keep_xa", keep_xa)):
        check_bool(name, value, "lorafx.compile: ")
    check_choice("schedule_criterion", criterion, CRITERIA, "lorafx.compile: ")
    hw = get_target(target)
    if backend != "eager":
        known = torch._dynamo.list_backends()
        if backend not in known:
            raise ValueError(f"unknown backend {backend!r}; use 'eager' or a torch.compile backend: {known}")
    lora = InsertLoRA(**{k: v for k, v in options.items() if k in LORA_OPTIONS})  # validates before capture
    select = SelectSchedule(schedule=options.get("schedule", "auto"), criterion=criterion, keep_xa=keep_xa)
    if example_inputs is None and example_kwargs is None:
        example_kwargs = default_example_inputs(model)
    # AnnotateCost runs after every rewrite so its records describe the final graph.
    # FoldLoRAIntoBase first: it takes the adapters RecomputeInputs left; FuseSiblings groups the rest.
    rewrites = ([FoldLoRAIntoBase()] if fold_a else []) + ([FuseSiblings()] if fuse_siblings else [])
    passes = [InlineGradModeRegions(), lora, select, CausalMaskToIsCausal(), RecomputeInputs(), *rewrites,
              *hw.passes(), AnnotateCost(), SetTrainingMode(train=model.training)]
    instruments = list(instruments)
    if progress:
        instruments.append(_Progress(len(passes)))
    pipeline = Pipeline(passes, instruments=instruments)

    start = time.perf_counter()
    gm = capture(model, example_inputs or (), example_kwargs, dynamic=dynamic)
    capture_seconds = time.perf_counter() - start
    nodes = len(gm.graph.nodes)
    result = pipeline(gm)
    gm = result.graph_module
    reports = result.info["reports"]
    lora_info = next((r.info for r in reports if r.name == "InsertLoRA"), {})
    report = CompileReport(reports, capture_seconds, nodes, lora_info.get("adapter_sites", 0),
                           sum(p.numel() for p in gm.parameters() if p.requires_grad),
                           sum(p.numel() for p in gm.parameters()))
    replay = Pipeline(passes[:-1])  # for inputs captured later; the model sets the training mode
    return CompiledModel(model, gm, replay, report, target=hw.name, dynamic=dynamic, backend=backend,
                         options={"target": hw.name, **options})
