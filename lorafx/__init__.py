"""lorafx: a torch.fx compiler for LoRA fine-tuning.

    import lorafx
    cm = lorafx.compile(model, example_inputs=(ids,), r=8)
    print(cm.report())
"""
from . import ops  # noqa: F401  registers torch.ops.lorafx.*
from .adapter_io import load_adapter, save_adapter
from .capture import CaptureError, capture
from .compiled import CompiledModel, CompileReport
from .compiler import compile
from .inspect import DiffGraphs, DumpGraphs, PrintGraphs, TimePasses, diff_graphs, draw, format_graph, to_networkx
from .meta import DropoutRecord, LoraRecord, OriginRecord, get_record, set_record
from .pipeline import Instrument, Pass, PassError, PassResult, Pipeline, PipelineOrderError, lint_graph

__version__ = "0.1.0"

__all__ = [
    "compile", "capture", "CompiledModel", "CompileReport", "CaptureError", "load_adapter", "save_adapter",
    "Pass", "PassResult", "Pipeline", "PassError", "PipelineOrderError", "Instrument", "lint_graph",
    "format_graph", "diff_graphs", "to_networkx", "draw", "PrintGraphs", "DiffGraphs", "TimePasses",
    "DumpGraphs", "LoraRecord", "OriginRecord", "DropoutRecord", "get_record", "set_record",
]
