"""Looking at graphs: print with lorafx metadata, diff, networkx, drawings, dumps.

    print(format_graph(gm))            # one node a line, lorafx records in a column
    d = diff_graphs(before, after)     # d.lines (unified diff), d.created, d.erased
    G = to_networkx(gm)                # nodes carry op/target/lorafx attributes
    draw(gm, "graph.svg")              # adapters and placements coloured
    Pipeline(passes, instruments=[DumpGraphs("out/")])   # one file per pass
"""
from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass, field
from typing import List

import torch
import torch.fx

from .meta import LoraRecord, describe, get_record
from .pipeline import Instrument

__all__ = ["format_node", "format_graph", "diff_graphs", "GraphDiff", "to_networkx", "draw",
           "PrintGraphs", "DiffGraphs", "TimePasses", "DumpGraphs"]


def _short(a) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_short(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, float):
        return f"{a:g}"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    return repr(a) if isinstance(a, str) else str(a)


def _target(node: torch.fx.Node) -> str:
    t = node.target
    if node.op == "call_function":
        name = getattr(t, "__name__", str(t))
        if isinstance(t, torch._ops.OpOverload):
            ns = t.namespace
            base = t._schema.name.split("::")[-1]
            name = f"{ns}.{base}" + ("" if t._overloadname == "default" else f".{t._overloadname}")
        return name
    return str(t)


def _shape(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dims = ",".join(str(d) for d in val.shape)
        return f"{str(val.dtype).replace('torch.', '')}[{dims}]"
    return ""


def format_node(node: torch.fx.Node) -> str:
    """``%name: shape = target(args)  # lorafx records``."""
    if node.op == "placeholder":
        body = f"input {node.target}"
    elif node.op == "output":
        body = f"return {_short(node.args[0])}"
    elif node.op == "get_attr":
        body = f"get_attr {node.target}"
    else:
        args = [_short(a) for a in node.args] + [f"{k}={_short(v)}" for k, v in node.kwargs.items()]
        body = f"{_target(node)}({', '.join(args)})"
    shape = _shape(node)
    text = f"%{node.name}" + (f": {shape}" if shape else "") + f" = {body}" if node.op != "output" else body
    meta = describe(node)
    return f"{text}  # {meta}" if meta else text


def format_graph(gm: torch.fx.GraphModule, *, include_get_attr: bool = False) -> str:
    lines = [format_node(n) for n in gm.graph.nodes if include_get_attr or n.op != "get_attr"]
    return "\n".join(lines)


@dataclass
class GraphDiff:
    lines: List[str]
    created: List[str] = field(default_factory=list)
    erased: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"+{len(self.created)} nodes, -{len(self.erased)} nodes"
        return head + ("\n" + "\n".join(self.lines) if self.lines else "")


def diff_graphs(before: torch.fx.GraphModule, after: torch.fx.GraphModule, context: int = 2) -> GraphDiff:
    """Unified diff of the printed graphs plus the node names created and erased."""
    a = format_graph(before, include_get_attr=True).splitlines()
    b = format_graph(after, include_get_attr=True).splitlines()
    lines = list(difflib.unified_diff(a, b, "before", "after", n=context, lineterm=""))
    na = [n.name for n in before.graph.nodes]
    nb = [n.name for n in after.graph.nodes]
    sa, sb = set(na), set(nb)
    return GraphDiff(lines, [n for n in nb if n not in sa], [n for n in na if n not in sb])


def to_networkx(gm: torch.fx.GraphModule):
    """A networkx DiGraph: one vertex per node (attrs: op, target, shape, lorafx, module),
    one edge per use."""
    import networkx as nx

    G = nx.DiGraph()
    for n in gm.graph.nodes:
        rec = get_record(n, LoraRecord)
        G.add_node(n.name, op=n.op, target=_target(n), shape=_shape(n), lorafx=describe(n),
                   lora=rec is not None, site=rec.site if rec else "")
    for n in gm.graph.nodes:
        for user in n.users:
            G.add_edge(n.name, user.name)
    return G


_COLOURS = {"lora": "#e4572e", "dropout": "#76b041", "placeholder": "#17bebb", "output": "#17bebb",
            "get_attr": "#cccccc", "call_function": "#4a6fa5"}


def _colour(n: torch.fx.Node) -> str:
    if get_record(n, LoraRecord) is not None:
        return _COLOURS["lora"]
    if "dropout" in _target(n):
        return _COLOURS["dropout"]
    return _COLOURS.get(n.op, "#888888")


def draw(gm: torch.fx.GraphModule, path: str, *, include_get_attr: bool = False, max_nodes: int = 4000) -> str:
    """Draw the graph top-to-bottom to ``path`` (.svg or .png) with adapters in red."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".svg", ".png", ".pdf"):
        raise ValueError(f"draw: unsupported file type {ext!r}; use .svg, .png or .pdf")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("draw() needs matplotlib: pip install 'lorafx[draw]'") from e
    nodes = [n for n in gm.graph.nodes if include_get_attr or n.op != "get_attr"][:max_nodes]
    index = {n: i for i, n in enumerate(nodes)}
    # Column: a node sits right of its first input if that input has another user placed already.
    col = {}
    used_cols = {}
    for n in nodes:
        parents = [p for p in n.all_input_nodes if p in index]
        c = col[parents[0]] if parents else 0
        while used_cols.get((c, index[n] - 1)):
            c += 1
        col[n] = c
        used_cols[(c, index[n])] = True
    rows = len(nodes)
    width = max(6.0, 2.2 * (max(col.values(), default=0) + 1))
    fig, ax = plt.subplots(figsize=(width, max(4.0, 0.28 * rows)))
    for n in nodes:
        for p in n.all_input_nodes:
            if p in index:
                ax.plot([col[p], col[n]], [-index[p], -index[n]], color="#bbbbbb", lw=0.5, zorder=1)
    for n in nodes:
        label = n.name if len(n.name) < 28 else n.name[:25] + "..."
        ax.text(col[n], -index[n], label, fontsize=6, ha="center", va="center", zorder=2,
                bbox=dict(boxstyle="round,pad=0.2", fc=_colour(n), ec="none", alpha=0.9), color="white")
    ax.set_xlim(-1, max(col.values(), default=0) + 1)
    ax.set_ylim(-rows, 1)
    ax.axis("off")
    handles = [plt.Line2D([], [], marker="s", ls="", color=c, label=k) for k, c in
               [("lora adapter", _COLOURS["lora"]), ("dropout", _COLOURS["dropout"]),
                ("input/output", _COLOURS["placeholder"]), ("op", _COLOURS["call_function"])]]
    ax.legend(handles=handles, loc="upper right", fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


class PrintGraphs(Instrument):
    """Print the graph after every pass."""

    def __init__(self, file=None):
        self.file = file

    def after_pass(self, p, result, report):
        print(f"=== after {p.name}\n{format_graph(result.graph_module)}", file=self.file)


class DiffGraphs(Instrument):
    """Print what every pass changed (unified diff, created and erased nodes)."""

    def __init__(self, file=None):
        self.file = file
        self._before = None

    def before_pass(self, p, gm):
        self._before = format_graph(gm, include_get_attr=True).splitlines(), [n.name for n in gm.graph.nodes]

    def after_pass(self, p, result, report):
        a, names = self._before
        b = format_graph(result.graph_module, include_get_attr=True).splitlines()
        after = [n.name for n in result.graph_module.graph.nodes]
        lines = list(difflib.unified_diff(a, b, "before", p.name, n=1, lineterm=""))
        created = [n for n in after if n not in set(names)]
        erased = [n for n in names if n not in set(after)]
        print(f"=== {p.name}: {str(GraphDiff(lines, created, erased))}", file=self.file)


class TimePasses(Instrument):
    """Collect (pass name, seconds) for every pass in ``self.times``."""

    def __init__(self):
        self.times = []

    def after_pass(self, p, result, report):
        self.times.append((p.name, report.seconds))


class DumpGraphs(Instrument):
    """Write ``00_captured.txt``, ``01_<pass>.txt``, ... (and .svg drawings if ``draw``) to a folder."""

    def __init__(self, folder: str, draw: bool = False):
        self.folder = folder
        self.draw = draw
        self.count = 0

    def _write(self, name: str, gm: torch.fx.GraphModule):
        os.makedirs(self.folder, exist_ok=True)
        stem = os.path.join(self.folder, f"{self.count:02d}_{name}")
        with open(stem + ".txt", "w") as f:
            f.write(format_graph(gm, include_get_attr=True) + "\n")
        if self.draw:
            draw(gm, stem + ".svg")
        self.count += 1

    def before_pipeline(self, gm):
        self._write("captured", gm)

    def after_pass(self, p, result, report):
        self._write(p.name, result.graph_module)
