"""CompiledModel: the nn.Module that ``lorafx.compile`` returns.

It runs the rewritten graph and owns the same parameters under the original
model's names (plus ``<site>.lora_A`` / ``<site>.lora_B``), so ``state_dict()``,
optimizers and the transformers ``Trainer`` see an ordinary module.

A captured graph is specialised to the set of keyword inputs it was captured
with.  Called with another set (say ``labels=`` added for the loss), the model
captures that signature once, runs the same pipeline on it with the compile's
context, whose recorded decisions (seeds, measured schedules, anything a pass took
from data) are replayed rather than recomputed, and binds it to the same
parameters, so every variant trains the same adapters.  Captures of one
compiled model are serialised by a lock, so concurrent first calls are safe.
A model with batch norm also gets one graph per train/eval mode.

The user's model is read-only: frozen base weights share its storage, so
``load_state_dict`` rebinds a private copy before it writes a base weight
(copy on write), ``merge()`` binds new tensors, and buffers a graph updates in
place (batch norm's running statistics) are private copies.
"""
from __future__ import annotations

import copy
import inspect
import json
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import torch
import torch.fx

from lorafx.passes import MergeLoRA, freeze_base, set_training_mode

from . import eager
from .adapter_io import load_adapter_weights
from .capture import bind_inputs, capture, check_input_ranks, signature_key
from .capture import mode_dependent as has_batch_norm_modes
from .context import CompileContext
from .dialect import ShortcutRecord, canonicalize, kind_of
from .dialect.cim import lower_to_digital
from .graph_utils import owner_and_name, retarget_devices, tensor_slots
from .meta import LoraRecord, get_record, graph_record
from .options import check_seed
from .pipeline import PassReport, Pipeline, lint_graph
from .printing import format_graph

__all__ = ["CompiledModel", "CompileReport", "own_base"]


class CompileReport:
    """Per-pass rows (nodes before/after, seconds, each pass's summary) plus graph totals.

    ``adapter_sites`` is what the pass providing ``"lora"`` reports; ``cost`` is the info
    of the last pass that provided ``"cost"`` (AnnotateCost), if one ran.
    """

    def __init__(self, reports: List[PassReport], capture_seconds: float, nodes_captured: int,
                 adapter_sites: int, trainable: int, total: int, sites_by_layer: Optional[Dict[str, List[str]]] = None):
        self.passes = list(reports)
        # {layer type: [site, ...]}: the adapted sites by the kind of layer they adapt ("Linear", "Embedding", ...)
        self.sites_by_layer = dict(sites_by_layer or {})
        self.capture_seconds = capture_seconds
        self.nodes_captured = nodes_captured
        self.adapter_sites = adapter_sites
        self.trainable_params = trainable
        self.total_params = total
        # the cost totals (symbolic FLOPs/bytes as strings) of the pass that provided "cost"
        self.cost = next((dict(r.info) for r in reversed(self.passes) if "cost" in r.provides), None)

    @classmethod
    def from_pipeline(cls, reports: List[PassReport], capture_seconds: float, nodes_captured: int,
                      gm: torch.fx.GraphModule) -> "CompileReport":
        """The report of a pipeline run on a graph of ``nodes_captured`` nodes that gave ``gm``."""
        def flat(rows):  # a nested Pipeline's report holds its passes' reports
            for r in rows:
                yield from flat(r.info["reports"]) if "reports" in r.info else (r,)

        sites = sum(r.info.get("adapter_sites", 0) for r in flat(reports) if "lora" in r.provides)
        return cls(reports, capture_seconds, nodes_captured, sites,
                   sum(p.numel() for p in gm.parameters() if p.requires_grad), sum(p.numel() for p in gm.parameters()),
                   _sites_by_layer(gm))

    def as_dict(self) -> dict:
        def clean(v):
            if isinstance(v, dict):
                return {str(k): clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)

        return {
            "capture": {"seconds": self.capture_seconds, "nodes": self.nodes_captured},
            "passes": [clean(r.as_dict()) for r in self.passes],
            "adapter_sites": self.adapter_sites,
            "sites_by_layer": {k: list(v) for k, v in self.sites_by_layer.items()},
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_percent": 100.0 * self.trainable_params / max(self.total_params, 1),
            **({"cost": clean(self.cost)} if self.cost is not None else {}),
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.as_dict(), indent=2, **kw)

    def __str__(self) -> str:
        rows = [("capture", "-", str(self.nodes_captured), f"{self.capture_seconds * 1000:.0f}", "")]
        for r in self.passes:
            note = r.summary[0] if r.summary else ""
            rows.append((r.name, str(r.nodes_before), str(r.nodes_after), f"{r.seconds * 1000:.0f}", note))
        head = ("pass", "nodes before", "nodes after", "ms", "info")
        widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(4)]
        fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4]
        lines = [fmt(head), fmt(tuple("-" * w for w in widths) + ("----",))] + [fmt(r) for r in rows]
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        by_layer = ", ".join(f"{layer} {len(sites)}" for layer, sites in self.sites_by_layer.items())
        lines.append(f"adapter sites: {self.adapter_sites}" + (f" ({by_layer})" if by_layer else "")
                     + f"   trainable params: {self.trainable_params:,} of {self.total_params:,} ({pct:.3f}%)")
        for r in self.passes:  # each pass's own further lines
            lines.extend(r.summary[1:])
        return "\n".join(lines)

    __repr__ = __str__


def _sites_by_layer(gm: torch.fx.GraphModule) -> Dict[str, List[str]]:
    """{layer type: [adapted site, ...]} of ``gm``'s adapters, shortcut adapters as "Shortcut"."""
    out: Dict[str, List[str]] = {}
    for node in gm.graph.nodes:
        kind = kind_of(node)
        records = kind.adapters(node) if kind is not None else [get_record(node, LoraRecord)]
        for rec in records:
            if rec is not None and rec.site not in out.get(rec.layer, ()):
                out.setdefault(rec.layer, []).append(rec.site)
        shortcut = get_record(node, ShortcutRecord) if kind is not None else None
        if shortcut is not None and shortcut.site not in out.get("Shortcut", ()):
            out.setdefault("Shortcut", []).append(shortcut.site)
    return out


class CompiledModel(torch.nn.Module):
    def __init__(self, source: torch.nn.Module, graph_module: torch.fx.GraphModule, pipeline: Pipeline,
                 report: CompileReport, *, context: Optional[CompileContext] = None, target: str = "cpu",
                 dynamic: bool = True, backend: str = "eager", options: Optional[Dict[str, Any]] = None,
                 mode_dependent: bool = False):
        super().__init__()
        # Share the graph module's attribute tables: parameters keep the model's own names.
        object.__setattr__(self, "_modules", graph_module._modules)
        _share_tensors(self, graph_module)
        self.__dict__["graph_module"] = graph_module
        self.__dict__["_source"] = source
        self.__dict__["_pipeline"] = pipeline  # replayed on every new call signature
        self.__dict__["_context"] = context if context is not None else CompileContext(training=source.training)
        self.__dict__["_variants"] = {}
        self.__dict__["_report"] = report
        self.__dict__["_merged"] = False
        self.__dict__["_compiled"] = {}  # id(graph) -> torch.compile'd graph, for backend != "eager"
        self.__dict__["_capture_lock"] = threading.RLock()
        # train and eval graphs are captured (and lowered) separately: for batch norm, or for a target whose
        # lowering depends on the mode (cim: ideal weights for training, the programmed chip for inference)
        self.__dict__["_mode_dependent"] = mode_dependent or has_batch_norm_modes(source)
        self.target = target
        self.backend = backend
        self.dynamic = dynamic
        self.options = dict(options or {})
        _privatize_mutated_buffers(graph_module, source)
        self._variants[self._key(graph_record(graph_module).signature, source.training)] = graph_module
        self.__class__ = _compiled_class(type(source))
        self.train(source.training)
        _inherit_checkpointing(self, source)  # the source's gradient_checkpointing_enable(), if called

    def _key(self, signature: tuple, training: bool) -> tuple:
        """A graph's key: the call signature, plus the mode for models with batch norm."""
        return (signature, training if self._mode_dependent else None)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> List[str]:
        """The names DistributedDataParallel must leave alone: the base tensors this model shares
        with the source model.  DDP copies rank 0's parameters and buffers into the other ranks'
        when it wraps a module (buffers again before each forward), which would write into the
        user's model; every rank builds the same base instead (one checkpoint, or one seed).  The
        adapters and private copies are broadcast and all-reduced as usual.  Names DDP's
        ``_set_params_and_buffers_to_ignore_for_model`` sets are added to these."""
        shared = _source_storages(self._source)
        own = [n for n, t in [*self.named_parameters(), *self.named_buffers()]
               if t.device.type != "meta" and type(t) in (torch.Tensor, torch.nn.Parameter)
               and t.untyped_storage().data_ptr() in shared]
        return own + [n for n in self.__dict__.get("_ddp_ignore_extra", ()) if n not in own]

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names) -> None:
        self.__dict__["_ddp_ignore_extra"] = list(names)

    @property
    def source_model(self) -> torch.nn.Module:
        """The model this was compiled from (never modified by lorafx)."""
        return self._source

    @property
    def decisions(self) -> Dict[str, Any]:
        """What the passes decided from data or randomness ({"<pass>#<i>:<key>": value}),
        replayed for every new call signature."""
        return dict(self._context.decisions)

    # -- running --------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Run the compiled graph with the original model's arguments."""
        args, kwargs = bind_inputs(self._source, args, kwargs)
        if self._merged and self.training and torch.is_grad_enabled():
            raise RuntimeError(
                "this model is merged (cm.merge()): its adapters are folded into the frozen weights and get no "
                "gradient, so it cannot train. Call cm.unmerge() before training, or run inference with "
                "cm.eval() or under torch.no_grad()")
        if self.__dict__.get("_adapter_state") is not None and self.training and torch.is_grad_enabled():
            from .adapters import check_training
            check_training(self)  # several active adapters with dropout at one site
        key = self._key(signature_key(args, kwargs), self.training)
        gm = self._variants.get(key)
        if gm is None:
            with self._capture_lock:  # concurrent first calls capture one at a time, each once
                gm = self._variants.get(key)
                if gm is None:
                    gm = self._add_variant(args, kwargs, key)
        check_input_ranks(gm, kwargs)
        gm = self._checkpointed(gm)
        try:
            if self.backend == "eager":
                # lorafx ops through their fast eager path; the inputs were checked above (lorafx/eager.py)
                return eager.run(gm, args, kwargs, inputs_checked=True)
            run = self._compiled.get(id(gm))
            if run is None:
                run = torch.compile(gm, backend=self.backend, fullgraph=True, dynamic=self.dynamic)
                self._compiled[id(gm)] = run
            return run(*args, **kwargs)
        except Exception as e:
            sharded = _sharded_submodules(self)
            if not sharded:
                raise
            raise RuntimeError(
                f"FSDP2's fully_shard was applied to {len(sharded)} submodule(s) of this lorafx compiled model "
                f"({', '.join(sharded[:3])}{', ...' if len(sharded) > 3 else ''}): its graph reads every parameter "
                "directly and never calls those submodules, so the forward hooks that gather their shards never run. "
                "Apply fully_shard to the compiled model only, fully_shard(cm): its parameters are then gathered as "
                "one group around each forward and backward") from e

    # -- activation checkpointing (the transformers names; passes/checkpoint_layers.py) --------------
    supports_gradient_checkpointing = True

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[Dict[str, Any]] = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Run every repeated block (decoder layer) under activation checkpointing when training
        (``CheckpointLayers``): its activations are recomputed in backward instead of kept.  The
        captured graphs are not captured again: each runs as a checkpointed copy sharing its
        parameters.  ``activation_checkpointing_kwargs``: ``torch.utils.checkpoint.checkpoint``
        keywords (``use_reentrant`` must be False); ``every_n_layers``: checkpoint layers 0, n, 2n, ..."""
        from lorafx.passes.checkpoint_layers import CheckpointLayers
        if offload:
            raise ValueError("activation checkpointing with offload=True (saved activations moved to pinned host "
                             "memory) is not implemented by lorafx; pass offload=False")
        kwargs = dict(activation_checkpointing_kwargs or {})
        config = CheckpointLayers(every_n_layers=every_n_layers, checkpoint_kwargs=tuple(sorted(kwargs.items())))
        self.__dict__["_checkpointing"] = config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[Dict[str, Any]] = None,
                                      **kwargs) -> None:
        """``activation_checkpointing_enable`` under its older name (what the Trainer calls)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        """Keep every activation again (the graphs run as captured)."""
        self.__dict__["_checkpointing"] = None

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.__dict__.get("_checkpointing") is not None

    is_gradient_checkpointing = is_activation_checkpointing

    def _checkpointed(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """``gm``, or its checkpointed copy when checkpointing is on and this call trains."""
        config = self.__dict__.get("_checkpointing")
        if config is None or not (self.training and torch.is_grad_enabled()) or self._merged:
            return gm
        from lorafx.passes.checkpoint_layers import checkpointed
        return checkpointed(gm, config)

    def _add_variant(self, args: tuple, kwargs: dict, key: tuple) -> torch.fx.GraphModule:
        detached = lambda v: v.detach() if isinstance(v, torch.Tensor) else v
        primary = self.graph_module
        check_input_ranks(primary, kwargs)  # named before a slow capture that would fail on it
        device = self.__dict__.get("_materialized_on")  # planned on meta, then lorafx.materialize'd
        if device is not None:  # the source has no weights: capture it with meta inputs, then retarget
            detached = lambda v: v.detach().to("meta") if isinstance(v, torch.Tensor) else v
        args, kwargs = tuple(map(detached, args)), {k: detached(v) for k, v in kwargs.items()}
        gm = capture(self._source, args, kwargs, dynamic=self.dynamic,
                     training=self.training if self._mode_dependent else None, during="call")
        own_base(gm, self._source)
        gm = self._pipeline(gm, self._context.for_capture(args, kwargs, training=self.training)).graph_module
        if device is not None:
            retarget_devices(gm, "meta", device)
        own = gm._modules
        object.__setattr__(gm, "_modules", {**primary._modules, **{k: v for k, v in own.items()
                                                                   if k not in primary._modules or k == "_guards_fn"}})
        _share_tensors(gm, primary)
        if self.__dict__.get("_adapter_state") is not None:
            from .adapters import prepare_variant
            prepare_variant(self, gm)  # the active adapters (named adapters, lorafx/adapters.py)
        if device is not None:
            unbound = next((n for n, t in gm.state_dict(keep_vars=True).items() if t.is_meta), None)
            if unbound is not None:
                raise RuntimeError(f"this call's inputs make the graph use {unbound!r}, which the planned graph "
                                   "did not have, so lorafx.materialize gave it no value: call the model once "
                                   "with these inputs (on meta) before materialize")
        _privatize_mutated_buffers(gm, self._source)
        lint_graph(gm)
        if self._merged:
            MergeLoRA()(gm)
        set_training_mode(gm, self.training)
        self._variants[key] = gm
        return gm

    def _rebuild_graphs(self) -> None:
        """Capture the primary call signature again, run the pipeline on it with the current
        decisions (e.g. a changed rank allocation, ``lorafx.ReallocateRanks``) and make it the
        primary graph; the other signatures are dropped and captured again on first use.

        Every tensor of the new graph module whose path, shape and dtype the old one also has
        is the old object (parameters, their flags and ``.grad``, buffers); a group of tensors
        sharing storage (a folded [W; A] and its views) is kept only as a whole.  The rest
        (adapters whose rank changed, new ones) are the new graph module's.  Refused while
        merged."""
        if self._merged:
            raise RuntimeError("cannot rebuild the graphs of a merged model: call cm.unmerge() first")
        from .adapters import check_rebuild
        check_rebuild(self)  # several named adapters: refused
        if self.__dict__.get("_materialized_on") is not None:
            raise RuntimeError("cannot rebuild the graphs of a model planned on the meta device and materialized: "
                               "its source has no weights to capture; compile the loaded model (from_pretrained) "
                               "with the new ranks instead")
        old, ctx = self.graph_module, self._context
        training = graph_record(old).captured_training if self._mode_dependent else None
        with self._capture_lock:
            start = time.perf_counter()
            gm = capture(self._source, ctx.example_args, ctx.example_kwargs, dynamic=self.dynamic,
                         training=training)
            seconds = time.perf_counter() - start
            own_base(gm, self._source)
            _keep_tensors(gm, old, before_passes=True)  # passes derive from the current base (a folded W)
            nodes = len(gm.graph.nodes)
            result = self._pipeline(gm, ctx.for_capture(ctx.example_args, ctx.example_kwargs,
                                                        training=self.training))
            gm = result.graph_module
            _keep_tensors(gm, old)
            _privatize_mutated_buffers(gm, self._source)
            lint_graph(gm)
            rec = graph_record(gm)
            set_training_mode(gm, rec.captured_training if self._mode_dependent else self.training)
            object.__setattr__(self, "_modules", gm._modules)
            _share_tensors(self, gm)
            self.__dict__["graph_module"] = gm
            self.__dict__["_variants"] = {self._key(rec.signature, rec.captured_training): gm}
            self.__dict__["_compiled"] = {}
            self.__dict__["_report"] = CompileReport.from_pipeline(result.info["reports"], seconds, nodes, gm)

    def train(self, mode: bool = True) -> "CompiledModel":
        """Switch dropout (and adapter dropout) on or off in every captured graph; a model
        with batch norm runs the graphs captured in that mode (captured on first use)."""
        self.training = mode
        for (_, fixed_mode), gm in self._variants.items():
            if fixed_mode is None and graph_record(gm).training != mode:
                set_training_mode(gm, mode)
        return self

    # -- hardware ---------------------------------------------------------------------
    def reprogram(self, seed: int) -> "CompiledModel":
        """Program a new chip (``target="cim"``): sample the RRAM noise again from ``seed``, for
        every graph (inference graphs read it; the ideal weights are untouched), e.g. to
        evaluate the same adapters across chips.  ``seed`` then is the ``noise_seed``."""
        from lorafx.passes.program_chip import ProgramChip, reprogram
        check_seed("seed", seed, "reprogram: ")
        chip = next((p for p in self._pipeline.passes if isinstance(p, ProgramChip) and p.active), None)
        if chip is None:
            raise ValueError("cm.reprogram(seed) samples a new noisy chip, but this model has none: compile it with "
                             "target='cim' and a noise model (noise='additive', noise_sigma > 0)")
        reprogram(self.graph_module, self._context.decisions, int(seed), chip.sample)
        self.options["noise_seed"] = int(seed)
        return self

    # -- inspection -------------------------------------------------------------------
    def report(self) -> CompileReport:
        """What each pass did: node counts, time and the pass's info."""
        return self._report

    def graph_report(self, *, colour: bool = False) -> str:
        """The rewritten graph, one node a line, with its lorafx metadata; ``colour``: each line in
        the colour of the chip part it is placed on (``target="cim"``; ANSI escapes, for a terminal)."""
        return format_graph(self.graph_module, colour=colour)

    def lora_records(self) -> Dict[str, LoraRecord]:
        """{site: LoraRecord} for every adapted linear (the adapters of every LoRA op node,
        and the merged ones while merged); with named adapters (``add_adapter``), the first
        active adapter's (``adapter_records(name)`` gives any adapter's)."""
        if self.__dict__.get("_adapter_state") is not None:
            from .adapters import active_records
            return active_records(self)
        return self._graph_lora_records()

    def _graph_lora_records(self) -> Dict[str, LoraRecord]:
        """{site: LoraRecord} read from the primary graph's nodes."""
        out = {}
        for node in self.graph_module.graph.nodes:
            kind = kind_of(node)
            for rec in kind.adapters(node) if kind is not None else [get_record(node, LoraRecord)]:
                if rec is not None:
                    out.setdefault(rec.site, rec)
        return out

    def shortcut_records(self) -> Dict[str, ShortcutRecord]:
        """{site: ShortcutRecord} for every shortcut adapter (``shortcuts=True``), in graph order;
        they are not in ``lora_records()``: they adapt no linear layer."""
        out = {}
        for node in self.graph_module.graph.nodes:
            rec = get_record(node, ShortcutRecord) if kind_of(node) is not None else None
            if rec is not None:
                out.setdefault(rec.site, rec)
        return out

    def trainable_parameters(self) -> Dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.trainable_parameters().values())
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100.0 * trainable / max(total, 1):.4f}")

    # -- merging ----------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._merged

    def merge(self, names=None) -> "CompiledModel":
        """Fold every active adapter into its frozen weight (W + scale·BA, in float32 or wider);
        ``names``: the named adapters to fold (``add_adapter``; they become the active ones).
        Shortcut adapters (``shortcuts=True``) have no weight to fold into: they keep running, and
        so do the SRAM adapters of ``target="cim"`` (folding them into the crossbars would program a
        new, differently noisy chip; ``merge_and_unload`` gives the digital merged model)."""
        from .adapters import merge
        merge(self, names)
        return self

    def _merge_active(self) -> "CompiledModel":
        from lorafx.passes import MergeLoRA
        from .adapters import merge_weights
        if not self._merged:
            # unmerge() restores these graphs exactly, with every later pass's choices
            self.__dict__["_unmerged_graphs"] = {k: copy.deepcopy(gm.graph) for k, gm in self._variants.items()}
            merge_weights(self)  # sites with several active adapters (named adapters)
            for gm in self._variants.values():
                MergeLoRA()(gm)
            self.__dict__["_merged"] = True
        return self

    def unmerge(self) -> "CompiledModel":
        """Undo ``merge()`` exactly: the unmerged weights and graphs were kept."""
        from lorafx.passes import UnmergeLoRA, set_training_mode
        from lorafx.passes.merge_lora import unmerge_site_weight
        from lorafx.passes.trainable_tokens import unmerge_token_weights
        from .adapters import all_records
        if self._merged:
            saved = self.__dict__.pop("_unmerged_graphs", {})
            for rec in all_records(self):
                unmerge_site_weight(self.graph_module, rec)
            unmerge_token_weights(self.graph_module)  # trainable_token_indices
            for key, gm in self._variants.items():
                if key in saved:
                    gm.graph = saved[key]
                    gm.recompile()
                    set_training_mode(gm, self.training)
                else:  # captured while merged
                    UnmergeLoRA(rebind_weights=False)(gm)
            self.__dict__["_merged"] = False
        return self

    def merge_and_unload(self, names=None) -> torch.fx.GraphModule:
        """``_merge_and_unload_active`` of the active adapters, or of the named adapters ``names``
        (``add_adapter``; lorafx/adapters.py)."""
        if self.__dict__.get("_adapter_state") is None and names in (None, "default", ["default"]):
            return self._merge_and_unload_active()
        from .adapters import merge_and_unload
        gm = merge_and_unload(self, names)
        _source_state_dict_keys(gm, self._source)
        return gm

    def _merge_and_unload_active(self) -> torch.fx.GraphModule:
        """A new plain GraphModule with merged weights and no lorafx ops or adapters,
        in eval mode (for ``target="cim"``: the digital model, on the ideal weights).  Shortcut
        adapters (``shortcuts=True``), which no weight can hold, become plain aten ops
        (y + s·(h Aᵀ) Bᵀ) with A and B as frozen parameters under ``lorafx_shortcuts``.  This model is left as it is; unadapted tensors are shared."""
        from lorafx.passes import MergeLoRA, set_training_mode
        was_merged = self._merged
        self.unmerge()
        try:
            src = self.graph_module
            # GraphModule(root, graph) builds a new module tree sharing the referenced tensors.
            graph = copy.deepcopy(src.graph)
            lower_to_digital(graph)  # target="cim": the digital model, on the ideal weights
            canonicalize(graph)  # one lora_linear per adapter, W read by name (before GraphModule picks attributes)
            gm = torch.fx.GraphModule(src, graph, class_name=type(src).__name__)
            gm.meta.update(copy.deepcopy(src.meta))
            MergeLoRA(unload=True)(gm)  # also lowers the shortcut adapters to aten ops
            set_training_mode(gm, False)
            gm.graph.lint()
            gm.recompile()
            _source_state_dict_keys(gm, self._source)
        finally:
            if was_merged:
                self.merge()
        return gm

    def merged_state_dict(self) -> Dict[str, torch.Tensor]:
        """The source model's state dict (the same keys, tied ones included) with this
        model's base weights and the adapters merged in float32: it loads into the source
        architecture with ``load_state_dict(..., strict=True)``.  Refused for a model with
        shortcut adapters (``shortcuts=True``): the source architecture has no place for them."""
        from lorafx.passes.merge_lora import merged_weights, unmergeable_nodes
        # adapters that adapt no weight (shortcuts); an SRAM adapter (target="cim") merges into its weight here
        kept = [n for n in unmergeable_nodes(self.graph_module.graph) if not kind_of(n).adapters(n)
                and kind_of(n).adapter_tensors(n)]
        if kept:
            sites = [getattr(get_record(n, ShortcutRecord), "site", n.name) for n in kept]
            raise ValueError(
                f"this model has {len(kept)} shortcut adapter(s) ({', '.join(sites[:3])}"
                f"{', ...' if len(sites) > 3 else ''}; shortcuts=True), which add low-rank maps between points of "
                "the residual stream: the source architecture has no place for them, so no state dict of it can "
                "hold them. Use cm.merge_and_unload() for a plain module that keeps them (as frozen aten ops), or "
                "cm.save_adapter(folder) to save the adapters (lorafx.load_adapter(model, folder) restores them)")
        was_merged = self._merged
        self.unmerge()
        try:
            own = self.state_dict()
            merged = merged_weights(self.graph_module)
        finally:
            if was_merged:
                self.merge()
        source = self._source.state_dict(keep_vars=True)
        kept_key = {}  # a source tensor -> the key this model kept it under (tied tensors have several keys)
        for key, value in source.items():
            if key in own:
                kept_key.setdefault(id(value), key)
        out = {}
        for key, value in source.items():
            kept = key if key in own else kept_key.get(id(value))
            out[key] = value.detach() if kept is None else merged.get(kept, own[kept])
        homeless = sorted(k for k in merged if k not in own and k not in source)
        if homeless:  # lora_bias=True on a layer without bias: the merged bias has no key in the source
            raise ValueError(
                f"the merged model has a bias {homeless[0]!r} ({len(homeless)} in all) that the source architecture "
                "has no place for: lora_bias=True adapted a layer without bias (PEFT refuses to merge these). Use "
                "cm.merge_and_unload(), which adds the bias, or save the adapters with cm.save_adapter(folder)")
        return out

    # -- adapters ---------------------------------------------------------------------
    def save_adapter(self, directory: str, *, overwrite: bool = True, selected_adapters=None,
                     tensors: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write the adapters in PEFT's format (adapter_config.json + adapter_model.safetensors),
        and the shortcut adapters, which PEFT cannot express, to lorafx_shortcuts.safetensors,
        atomically; ``overwrite=False`` refuses to replace an adapter already there.  Named adapters
        (``add_adapter``) in PEFT's multi-adapter layout: "default" in ``directory``, each other one
        in ``directory/<name>/`` (``selected_adapters``: only those).  ``tensors``: a state dict to
        take the values from (``lorafx.save_adapter``)."""
        from .adapters import save_adapters
        save_adapters(self, directory, overwrite=overwrite, selected_adapters=selected_adapters, tensors=tensors)

    def save_pretrained(self, save_directory: str, *, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                        is_main_process: bool = True, selected_adapters=None, **ignored) -> None:
        """``save_adapter`` under the name transformers and PEFT use (``lorafx.AdapterTrainer``,
        accelerate's ``unwrap_model(...).save_pretrained``): the adapters in PEFT's format.
        ``state_dict`` (a gathered one, as the Trainer passes under FSDP or DeepSpeed) supplies
        the adapter values by parameter name; ``is_main_process=False`` writes nothing; the other
        keywords of ``PreTrainedModel.save_pretrained`` (``safe_serialization``, ...) are accepted
        and ignored: the adapter is always safetensors."""
        if is_main_process:
            from .adapters import save_adapters
            save_adapters(self, save_directory, tensors=state_dict, selected_adapters=selected_adapters)

    def load_adapter(self, directory: str, adapter_name: Optional[str] = None, *,
                     trust_pickle: bool = False) -> "CompiledModel":
        """Load adapter weights (saved by lorafx or PEFT) into this model's adapters, the
        shortcut adapters too (the saved sites must be this model's); ``trust_pickle=True``
        lets a ``.bin`` file run the pickle code it holds.  ``adapter_name``: load it as that
        named adapter (created from the saved configuration if new, not active; PEFT's
        ``load_adapter``); without it, into the active adapter."""
        if adapter_name is not None:
            from .adapters import load_adapter
            load_adapter(self, directory, adapter_name, trust_pickle=trust_pickle)
        else:
            load_adapter_weights(self, directory, trust_pickle=trust_pickle)
        return self

    # -- named adapters (PEFT's API; lorafx/adapters.py) ---------------------------------
    def add_adapter(self, adapter_name: str, **options) -> "CompiledModel":
        """A new adapter with its own options (r, alpha, target_modules, exclude_modules,
        rank_pattern, alpha_pattern, use_rslora, dropout, init, seed, adapter_dtype), initialised as
        compile would; not active until ``set_adapter`` (PEFT's rule).  The compile's is "default"."""
        from .adapters import add_adapter
        add_adapter(self, adapter_name, **options)
        return self

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> "CompiledModel":
        """Make one adapter, or a list of adapters whose deltas add, the active (and only trainable;
        none with ``inference_mode=True``) ones.  The graphs are rewritten in place, never captured
        again (lorafx/adapters.py says what a switch costs)."""
        from .adapters import set_adapter
        set_adapter(self, adapter_name, inference_mode=inference_mode)
        return self

    def disable_adapters(self):
        """A context manager: inside, the model computes the base model's outputs exactly (every
        adapter site runs its plain layer); the adapters come back on exit, also on an exception."""
        from .adapters import disable_adapters
        return disable_adapters(self)

    disable_adapter = disable_adapters  # PeftModel's name

    def delete_adapter(self, adapter_name: str) -> "CompiledModel":
        """Delete a named adapter and its tensors (not the last one; not while merged)."""
        from .adapters import delete_adapter
        delete_adapter(self, adapter_name)
        return self

    @property
    def active_adapters(self) -> List[str]:
        """The names of the active adapters."""
        from .adapters import active_adapters
        return active_adapters(self)

    @property
    def active_adapter(self) -> str:
        """The first active adapter's name (PEFT's ``active_adapter``)."""
        return self.active_adapters[0]

    @property
    def adapter_names(self) -> List[str]:
        """Every adapter's name, "default" (the compile's) first."""
        st = self.__dict__.get("_adapter_state")
        return list(st.records) if st is not None else ["default"]

    def adapter_records(self, adapter_name: str) -> Dict[str, LoraRecord]:
        """{site: LoraRecord} of any adapter (``lora_records()`` is the active one's)."""
        from .adapters import adapter_records
        return adapter_records(self, adapter_name)

    def save_program(self, directory: str, *, overwrite: bool = False) -> None:
        """Save the whole program: every captured graph (torch.export), the weights, the
        adapters in PEFT's format and the lorafx records, atomically; ``lorafx.load_program``
        loads it without the source model (``lorafx/program_io.py``, which sets the saver: it
        imports this module, so this one does not import it)."""
        if len(self.adapter_names) > 1 or self.active_adapters != ["default"]:
            raise ValueError(f"save_program saves one adapter; this model has adapters {self.adapter_names} (active: "
                             f"{self.active_adapters}). Save them with cm.save_adapter(folder) (PEFT's multi-adapter "
                             "layout), or delete the others (cm.delete_adapter) and set_adapter('default') first")
        if PROGRAM_SAVER[0] is None:
            raise RuntimeError("cm.save_program needs lorafx.program_io: import lorafx (or lorafx.program_io) first")
        PROGRAM_SAVER[0](self, directory, overwrite=overwrite)

    # -- state ------------------------------------------------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The unmerged state: base weights as compiled (also while merged, so a state dict
        always loads into a merged or unmerged model alike) plus ``lora_A``/``lora_B``."""
        from lorafx.passes.merge_lora import kept_unmerged_weight
        from lorafx.passes.trainable_tokens import kept_token_weights
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self._merged:
            from .adapters import all_records
            for rec in all_records(self):
                kept = kept_unmerged_weight(self, rec)
                if kept is not None and prefix + rec.weight in out:
                    out[prefix + rec.weight] = kept if keep_vars else kept.detach()
                if rec.lora_bias is not None:  # the layer's own bias (or none) rather than the merged one
                    path = prefix + (rec.bias or f"{rec.site}.bias")
                    if rec.bias is None:
                        out.pop(path, None)
                    else:
                        kept = kept_unmerged_weight(self, rec, rec.bias)
                        if kept is not None and path in out:
                            out[path] = kept if keep_vars else kept.detach()
            for path, kept in kept_token_weights(self).items():  # trainable_token_indices
                if prefix + path in out:
                    out[prefix + path] = kept if keep_vars else kept.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load like ``nn.Module.load_state_dict``, without ever writing into the source
        model: a base tensor that shares the source's storage and would change is first
        rebound to a private copy.  Works merged or unmerged (the state is the unmerged one)."""
        was_merged = self._merged
        self.unmerge()
        try:  # _load_from_state_dict below unshares what the load would change
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            if was_merged:
                self.merge()

    def _unshare_changed(self, state_dict) -> None:
        """Rebind private copies of the base tensors that share storage with the source
        model and that ``state_dict`` would change (values, dtype or shape)."""
        shared = _source_storages(self._source)
        own = super().state_dict(keep_vars=True)
        for key, new in state_dict.items():
            old = own.get(key)
            if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor) or old.device.type == "meta":
                continue
            if old.untyped_storage().data_ptr() not in shared:
                continue
            same = new.shape == old.shape and torch.equal(new.to(device=old.device, dtype=old.dtype), old.detach())
            if not same:
                owner, name = owner_and_name(self, key)
                private = old.detach().clone()
                if name in owner._parameters:
                    owner._parameters[name] = torch.nn.Parameter(private, requires_grad=old.requires_grad)
                else:
                    owner._buffers[name] = private

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a CompiledModel nested in another module: its load goes through here, not load_state_dict
        self._unshare_changed({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a lorafx CompiledModel cannot be pickled (torch.save(cm) / pickle.dumps(cm)): its graphs hold "
            "functions torch.export made. Save the adapters with cm.save_adapter(folder) (PEFT format; "
            "lorafx.load_adapter(model, folder) or PEFT loads them), or the merged weights with "
            "torch.save(cm.merged_state_dict(), path), which load into the source architecture")

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key == "_capture_lock" else copy.deepcopy(value, memo)
        new.__dict__["_capture_lock"] = threading.RLock()
        return new

    def extra_repr(self) -> str:
        return (f"target={self.target!r}, backend={self.backend!r}, adapter_sites={len(self.lora_records())}, merged={self._merged}, "
                f"signatures={len(self._variants)}")


def _inherit_checkpointing(cm: CompiledModel, source: torch.nn.Module) -> None:
    """Carry a transformers model's activation checkpointing over (``source.gradient_checkpointing_enable()``
    before compile): the capture traces through ``torch.utils.checkpoint`` into a flat graph, so
    lorafx checkpoints the same layers itself, with the same ``checkpoint`` keywords."""
    import functools
    flags = [bool(m.gradient_checkpointing) for m in source.modules()
             if "GradientCheckpointingLayer" in {c.__name__ for c in type(m).__mro__}]
    if not any(flags):
        return
    every = next((n for n in range(1, len(flags) + 1) if flags == [i % n == 0 for i in range(len(flags))]), None)
    if every is None:
        raise ValueError(
            f"the source model checkpoints layers {[i for i, f in enumerate(flags) if f]} of {len(flags)} "
            "(gradient_checkpointing_enable()), not every n-th from layer 0, which is what lorafx can carry over: call "
            "source.gradient_checkpointing_disable() before lorafx.compile, then cm.gradient_checkpointing_enable("
            "every_n_layers=n) on the compiled model")
    func = next((getattr(m, "_gradient_checkpointing_func", None) for m in source.modules()
                 if getattr(m, "gradient_checkpointing", False) is True), None)
    kwargs = dict(func.keywords) if isinstance(func, functools.partial) else {}
    cm.activation_checkpointing_enable(kwargs, every_n_layers=every)


def _share_tensors(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Make ``dst`` read ``src``'s parameter and buffer tables (and which buffers are not persistent)."""
    for table in ("_parameters", "_buffers", "_non_persistent_buffers_set"):
        object.__setattr__(dst, table, getattr(src, table))


def _keep_tensors(gm: torch.nn.Module, old: torch.nn.Module, before_passes: bool = False) -> None:
    """Bind ``old``'s parameter or buffer at each of ``gm``'s tensor paths where it has the
    same kind, shape and dtype, for whole groups of ``gm``'s tensors sharing storage only
    (``CompiledModel._rebuild_graphs``).  ``before_passes``: parameters are bound as frozen
    Parameters sharing the old storage, so no pass can touch the old objects."""
    groups: Dict[Any, list] = {}  # storage -> [(table, name, path, tensor)]
    for path, _, table, name, t in tensor_slots(gm):
        key = id(t) if t.device.type == "meta" else (t.device, t.untyped_storage().data_ptr())
        groups.setdefault(key, []).append((table, name, path, t))
    frozen: Dict[int, torch.nn.Parameter] = {}
    for group in groups.values():
        olds = [_tensor_at(old, path) for _, _, path, _ in group]
        if not all(o is not None and isinstance(o, torch.nn.Parameter) == isinstance(t, torch.nn.Parameter)
                   and o.shape == t.shape and o.dtype == t.dtype for (_, _, _, t), o in zip(group, olds)):
            continue
        for (table, name, _, _), o in zip(group, olds):
            if before_passes and isinstance(o, torch.nn.Parameter):
                o = frozen.setdefault(id(o), torch.nn.Parameter(o.detach(), requires_grad=False))
            table[name] = o


def _tensor_at(root: torch.nn.Module, path: str) -> Optional[torch.Tensor]:
    """The parameter or buffer of ``root`` at ``path``, or None."""
    *parents, name = path.split(".")
    for part in parents:
        root = root._modules.get(part)
        if root is None:
            return None
    return root._parameters.get(name) if name in root._parameters else root._buffers.get(name)


def _tensors(module: torch.nn.Module):
    """Every parameter and buffer of ``module``, tied ones once."""
    yield from module.parameters()
    yield from module.buffers()


def _source_storages(source: torch.nn.Module) -> set:
    """The storage addresses of the source model's (non-meta) tensors: what a compiled model shares with it."""
    return {t.untyped_storage().data_ptr() for t in _tensors(source) if t.device.type != "meta"}


def _source_state_dict_keys(gm: torch.fx.GraphModule, source: torch.nn.Module) -> None:
    """Make ``gm.state_dict()`` carry the source model's keys, so that it loads strictly
    into the source architecture: buffers the source does not save (rotary ``inv_freq``)
    become non-persistent, and every key of a tied tensor is written (and read back once)."""
    source_keys = source.state_dict(keep_vars=True)
    for name, buf in list(gm.named_buffers()):
        if name not in source_keys:
            owner, attr = owner_and_name(gm, name)
            owner.register_buffer(attr, buf, persistent=False)
    aliases = {}  # missing key -> the key gm holds the same source tensor under
    for key, value in source_keys.items():
        held = next((k for k, v in source_keys.items() if v is value and k != key), None)
        if held is not None:
            aliases.setdefault(key, held)

    def add_aliases(module, state, prefix, local_metadata):
        for key, held in aliases.items():
            if prefix + key not in state and prefix + held in state:
                state[prefix + key] = state[prefix + held]

    def drop_aliases(module, state, prefix, *args):
        for key, held in aliases.items():
            if prefix + key in state and not _has_tensor(module, key):
                state.pop(prefix + key)

    gm._register_state_dict_hook(add_aliases)
    gm._register_load_state_dict_pre_hook(drop_aliases, with_module=True)


def _has_tensor(module: torch.nn.Module, path: str) -> bool:
    *parents, name = path.split(".")
    for part in parents:
        module = module._modules.get(part)
        if module is None:
            return False
    return name in module._parameters or name in module._buffers


def own_base(gm: torch.fx.GraphModule, source: torch.nn.Module) -> None:
    """Make a fresh capture of ``source`` own its base state, before any pass runs: every
    parameter becomes a frozen Parameter of its own sharing the source's storage (so a pass
    that runs backward never touches the source's parameters, flags or ``.grad``), and every
    buffer the graph writes in place a private copy."""
    freeze_base(gm)
    _privatize_mutated_buffers(gm, source)


# ops that update running statistics (arguments 3 and 4) without declaring it in their schema
_UNDECLARED_WRITES = {torch.ops.aten.batch_norm.default: (3, 4), torch.ops.aten.instance_norm.default: (3, 4)}


def _privatize_mutated_buffers(gm: torch.fx.GraphModule, source: torch.nn.Module) -> None:
    """Give ``gm`` its own copy of every buffer its graph writes in place (batch norm's
    running statistics in train mode) that shares storage with ``source``."""
    shared = _source_storages(source)
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None:
            continue
        implicit = _UNDECLARED_WRITES.get(node.target, ())
        for index, (arg, value) in enumerate(zip(schema.arguments, node.args)):
            written = (arg.alias_info is not None and arg.alias_info.is_write) or index in implicit
            if not written or not isinstance(value, torch.fx.Node) or value.op != "get_attr":
                continue
            owner, name = owner_and_name(gm, value.target)
            tensor = owner._buffers.get(name)
            if tensor is not None and tensor.device.type != "meta" and tensor.untyped_storage().data_ptr() in shared:
                owner._buffers[name] = tensor.clone()


def _sharded_submodules(cm: torch.nn.Module) -> List[str]:
    """The names of ``cm``'s submodules (not ``cm`` itself) that FSDP2's ``fully_shard`` wraps."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None or not hasattr(fsdp, "FSDPModule"):
        return []
    return [name for name, m in cm.named_modules() if m is not cm and isinstance(m, fsdp.FSDPModule)]


# the whole-program saver, set by lorafx.program_io (a driver module above this one)
PROGRAM_SAVER: List[Any] = [None]

_CLASSES: Dict[type, type] = {}


def _compiled_class(source_cls: type) -> type:
    """A CompiledModel subclass whose ``forward`` has ``source_cls.forward``'s signature.

    Tools that read the class's forward signature (the transformers Trainer picks
    dataset columns and label names from it) then see the original arguments.
    The class is registered in this module so compiled models pickle.
    """
    if source_cls not in _CLASSES:
        def forward(self, *args, **kwargs):
            return CompiledModel.forward(self, *args, **kwargs)

        try:
            forward.__signature__ = inspect.signature(source_cls.forward)
        except (TypeError, ValueError):
            pass
        forward.__doc__ = CompiledModel.forward.__doc__
        name = f"Compiled{source_cls.__name__}"
        while name in globals() and globals()[name] not in _CLASSES.values():
            name += "_"
        if name in globals():
            name = f"{name}{len(_CLASSES)}"
        cls = type(name, (CompiledModel,), {"forward": forward, "__module__": __name__, "__qualname__": name})
        globals()[name] = cls
        _CLASSES[source_cls] = cls
    return _CLASSES[source_cls]
