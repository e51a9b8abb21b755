"""CompiledModel: the nn.Module that ``lorafx.compile`` returns.

It runs the rewritten graph and owns the same parameters under the original
model's names (plus ``<site>.lora_A`` / ``<site>.lora_B``), so ``state_dict()``,
optimizers and the transformers ``Trainer`` see an ordinary module.

A captured graph is specialised to the set of keyword inputs it was captured
with.  Called with another set (say ``labels=`` added for the loss), the model
captures that signature once, runs the same pipeline on it and binds it to the
same parameters, so every variant trains the same adapters.
"""
from __future__ import annotations

import inspect
import json
from typing import Any, Dict, List, Optional

import torch
import torch.fx

from .capture import bind_inputs, capture, signature_key
from .meta import LoraRecord, get_record
from .pipeline import PassReport, Pipeline, lint_graph

__all__ = ["CompiledModel", "CompileReport"]


class CompileReport:
    """Per-pass rows (nodes before/after, seconds, info) plus graph totals."""

    def __init__(self, reports: List[PassReport], capture_seconds: float, nodes_captured: int,
                 adapter_sites: int, trainable: int, total: int):
        self.passes = list(reports)
        self.capture_seconds = capture_seconds
        self.nodes_captured = nodes_captured
        self.adapter_sites = adapter_sites
        self.trainable_params = trainable
        self.total_params = total
        # AnnotateCost's totals (symbolic FLOPs/bytes as strings), if it ran
        self.cost = next((dict(r.info) for r in reversed(self.passes) if r.name == "AnnotateCost"), None)

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
            note = ", ".join(f"{k}={v}" if len(str(v)) <= 90 else f"{k}={str(v)[:87]}..."
                             for k, v in r.info.items() if not isinstance(v, (dict, list)))
            rows.append((r.name, str(r.nodes_before), str(r.nodes_after), f"{r.seconds * 1000:.0f}", note))
        head = ("pass", "nodes before", "nodes after", "ms", "info")
        widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(4)]
        fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4]
        lines = [fmt(head), fmt(tuple("-" * w for w in widths) + ("----",))] + [fmt(r) for r in rows]
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        lines.append(f"adapter sites: {self.adapter_sites}   trainable params: {self.trainable_params:,} "
                     f"of {self.total_params:,} ({pct:.3f}%)")
        if self.cost is not None:
            from lorafx.passes.cost_model import cost_summary
            lines.extend(cost_summary(self.cost))
        return "\n".join(lines)

    __repr__ = __str__


class CompiledModel(torch.nn.Module):
    def __init__(self, source: torch.nn.Module, graph_module: torch.fx.GraphModule, pipeline: Pipeline,
                 report: CompileReport, *, target: str = "cpu", dynamic: bool = True,
                 backend: str = "eager", options: Optional[Dict[str, Any]] = None):
        super().__init__()
        # Share the graph module's attribute tables: parameters keep the model's own names.
        object.__setattr__(self, "_modules", graph_module._modules)
        object.__setattr__(self, "_parameters", graph_module._parameters)
        object.__setattr__(self, "_buffers", graph_module._buffers)
        self.__dict__["graph_module"] = graph_module
        self.__dict__["_source"] = source
        self.__dict__["_pipeline"] = pipeline
        self.__dict__["_variants"] = {}
        self.__dict__["_report"] = report
        self.__dict__["_merged"] = False
        self.__dict__["_compiled"] = {}  # id(graph) -> torch.compile'd graph, for backend != "eager"
        self.target = target
        self.backend = backend
        self.dynamic = dynamic
        self.options = dict(options or {})
        self._variants[graph_module.meta["lorafx_signature"]] = graph_module
        self.__class__ = _compiled_class(type(source))
        self.train(source.training)

    # -- running --------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Run the compiled graph with the original model's arguments."""
        args, kwargs = bind_inputs(self._source, args, kwargs)
        gm = self._variants.get(signature_key(args, kwargs))
        if gm is None:
            gm = self._add_variant(args, kwargs)
        if self.backend == "eager":
            return gm(*args, **kwargs)
        run = self._compiled.get(id(gm))
        if run is None:
            run = torch.compile(gm, backend=self.backend, fullgraph=True, dynamic=self.dynamic)
            self._compiled[id(gm)] = run
        return run(*args, **kwargs)

    def _add_variant(self, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
        detached = lambda v: v.detach() if isinstance(v, torch.Tensor) else v
        gm = capture(self._source, tuple(map(detached, args)), {k: detached(v) for k, v in kwargs.items()},
                     dynamic=self.dynamic)
        gm = self._pipeline(gm).graph_module
        primary = self.graph_module
        own = gm._modules
        object.__setattr__(gm, "_modules", {**primary._modules, **{k: v for k, v in own.items()
                                                                   if k not in primary._modules or k == "_guards_fn"}})
        object.__setattr__(gm, "_parameters", primary._parameters)
        object.__setattr__(gm, "_buffers", primary._buffers)
        lint_graph(gm)
        from lorafx.passes import MergeLoRA, set_training_mode
        if self._merged:
            MergeLoRA()(gm)
        set_training_mode(gm, self.training)
        self._variants[signature_key(args, kwargs)] = gm
        return gm

    def train(self, mode: bool = True) -> "CompiledModel":
        """Switch dropout (and adapter dropout) on or off in every captured graph."""
        from lorafx.passes import set_training_mode
        self.training = mode
        for gm in self._variants.values():
            if gm.meta.get("lorafx_training") != mode:
                set_training_mode(gm, mode)
        return self

    # -- inspection -------------------------------------------------------------------
    def report(self) -> CompileReport:
        """What each pass did: node counts, time and the pass's info."""
        return self._report

    def graph_report(self) -> str:
        """The rewritten graph, one node a line, with its lorafx metadata."""
        from .inspect import format_graph
        return format_graph(self.graph_module)

    def lora_records(self) -> Dict[str, LoraRecord]:
        """{site: LoraRecord} for every adapted linear."""
        out = {}
        for node in self.graph_module.graph.nodes:
            rec = get_record(node, LoraRecord)
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

    def merge(self) -> "CompiledModel":
        """Fold every adapter into its frozen weight (W + scale·BA, in float32 or wider)."""
        import copy
        from lorafx.passes import MergeLoRA
        if not self._merged:
            # unmerge() restores these graphs exactly, with every later pass's choices
            self.__dict__["_unmerged_graphs"] = {k: copy.deepcopy(gm.graph) for k, gm in self._variants.items()}
            for gm in self._variants.values():
                MergeLoRA()(gm)
            self.__dict__["_merged"] = True
        return self

    def unmerge(self) -> "CompiledModel":
        """Undo ``merge()`` exactly: the unmerged weights and graphs were kept."""
        from lorafx.passes import UnmergeLoRA, set_training_mode
        from lorafx.passes.merge_lora import unmerge_site_weight
        if self._merged:
            saved = self.__dict__.pop("_unmerged_graphs", {})
            for rec in self.lora_records().values():
                unmerge_site_weight(self.graph_module, rec)
            for key, gm in self._variants.items():
                if key in saved:
                    gm.graph = saved[key]
                    gm.recompile()
                    set_training_mode(gm, self.training)
                else:  # captured while merged
                    UnmergeLoRA(rebind_weights=False)(gm)
            self.__dict__["_merged"] = False
        return self

    def merge_and_unload(self) -> torch.fx.GraphModule:
        """A new plain GraphModule with merged weights and no lorafx ops or adapters,
        in eval mode.  This model is left as it is; unadapted tensors are shared."""
        import copy
        from lorafx.passes import MergeLoRA, set_training_mode
        from lorafx.passes.fold_lora import unfold
        was_merged = self._merged
        self.unmerge()
        try:
            src = self.graph_module
            # GraphModule(root, graph) builds a new module tree sharing the referenced tensors.
            graph = copy.deepcopy(src.graph)
            unfold(graph)  # FoldLoRAIntoBase's nodes read W by name again (before GraphModule picks attributes)
            gm = torch.fx.GraphModule(src, graph, class_name=type(src).__name__)
            gm.meta.update(copy.deepcopy(src.meta))
            MergeLoRA(unload=True)(gm)
            set_training_mode(gm, False)
            gm.graph.lint()
            gm.recompile()
        finally:
            if was_merged:
                self.merge()
        return gm

    def merged_state_dict(self) -> Dict[str, torch.Tensor]:
        """The original model's state dict with adapters merged: load it into the
        source architecture with ``model.load_state_dict(...)``."""
        return {k: v for k, v in self.merge_and_unload().state_dict().items()}

    # -- adapters ---------------------------------------------------------------------
    def save_adapter(self, directory: str) -> None:
        """Write the adapters in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
        from .adapter_io import save_adapter
        save_adapter(self, directory)

    def load_adapter(self, directory: str) -> "CompiledModel":
        """Load adapter weights (saved by lorafx or PEFT) into this model's adapters."""
        from .adapter_io import load_adapter_weights
        load_adapter_weights(self, directory)
        return self

    def extra_repr(self) -> str:
        return (f"target={self.target!r}, backend={self.backend!r}, adapter_sites={len(self.lora_records())}, merged={self._merged}, "
                f"signatures={len(self._variants)}")


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
