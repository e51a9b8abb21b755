"""lorafx: a torch.fx compiler for LoRA fine-tuning.

    import lorafx
    cm = lorafx.compile(model, example_inputs=(ids,), r=8)
    print(cm.report())
"""
from . import dialect  # noqa: F401  registers the LoRA op kinds (torch.ops.lorafx.*)
from ._version import __version__
from .adapter_io import save_adapter
from .capture import CaptureError, capture
from .compiled import CompiledModel, CompileReport
from .compiler import compile, default_passes, load_adapter
from .context import CompileContext
from .inspect import DiffGraphs, DumpGraphs, PrintGraphs, TimePasses, diff_graphs, draw, format_graph, to_html, to_networkx
from .materialize import materialize
from .meta import DropoutRecord, GraphRecord, LoraRecord, OriginRecord, get_record, graph_record, set_record
from .options import Option
from .peft_names import peft_options
from .pipeline import Instrument, Pass, PassError, PassResult, Pipeline, PipelineOrderError, lint_graph
from .program_io import LoadedProgram, load_program
from .pruning import prune
from .reallocate import ReallocateRanks

__all__ = [
    "compile", "prune", "default_passes", "capture", "CompiledModel", "CompileReport", "CaptureError", "load_adapter", "save_adapter",
    "load_program", "LoadedProgram", "materialize",
    "Pass", "PassResult", "Pipeline", "PassError", "PipelineOrderError", "Instrument", "lint_graph",
    "format_graph", "diff_graphs", "to_networkx", "draw", "to_html", "PrintGraphs", "DiffGraphs", "TimePasses",
    "DumpGraphs", "LoraRecord", "OriginRecord", "DropoutRecord", "get_record", "set_record",
    "GraphRecord", "graph_record", "CompileContext", "Option", "ReallocateRanks", "ReallocateRanksCallback", "AdapterTrainer",
    "peft_options",
    "__version__",
]


def __getattr__(name):
    if name == "ReallocateRanksCallback":  # a transformers TrainerCallback: built on first use
        from .reallocate import ReallocateRanksCallback
        return ReallocateRanksCallback
    if name == "AdapterTrainer":  # a transformers Trainer: built on first use
        from .training import AdapterTrainer
        return AdapterTrainer
    raise AttributeError(f"module 'lorafx' has no attribute {name!r}")
