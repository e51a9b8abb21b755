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
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.fx

from .dialect import kind_of
from .meta import LoraRecord, OriginRecord, PlacementRecord, describe, get_record, graph_record
from .pipeline import Instrument
from .printing import format_graph, format_node
from .printing import node_shape as _shape
from .printing import node_target as _target

__all__ = ["format_node", "format_graph", "diff_graphs", "GraphDiff", "to_networkx", "draw",
           "PrintGraphs", "DiffGraphs", "TimePasses", "DumpGraphs"]


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
        recs = _adapters(n)
        G.add_node(n.name, op=n.op, target=_target(n), shape=_shape(n), lorafx=describe(n),
                   lora=_is_lora(n), site=",".join(r.site for r in recs))
    for n in gm.graph.nodes:
        for user in n.users:
            G.add_edge(n.name, user.name)
    return G


_COLOURS = {"lora": "#d62728", "dropout": "#2ca02c", "placeholder": "#17a2b8", "output": "#17a2b8",
            "get_attr": "#999999", "call_function": "#3b5b92", "call_module": "#8c564b"}
# a placed graph (target="cim"): each node in the colour of the part it runs on
_PLACEMENT_COLOURS = {"rram": "#e67e22", "sram": "#d62728", "host": "#3b5b92"}
_LABEL_CHARS = 96


def _adapters(n: torch.fx.Node) -> List[LoraRecord]:
    """The adapters a node computes (its kind's, for a LoRA op) or carries (a sibling's
    output, a merged linear)."""
    kind = kind_of(n)
    recs = kind.adapters(n) if kind is not None else [get_record(n, LoraRecord)]
    return [r for r in recs if r is not None]


def _rank(n: torch.fx.Node) -> int:
    """The total rank of the adapters a node computes (any record with an ``r``: LoRA,
    shortcut); 0 for other nodes."""
    return sum(int(getattr(rec, "r", 0) or 0) for rec in n.meta.get("lorafx", {}).values()) or \
        sum(r.r for r in _adapters(n))


def _is_lora(n: torch.fx.Node) -> bool:
    """Whether the node computes an adapter (an op kind with trainable tensors, e.g. not
    ``rram_linear``) or carries a merged one."""
    kind = kind_of(n)
    return (kind is not None and bool(kind.adapter_tensors(n))) or get_record(n, LoraRecord) is not None


def _colour(n: torch.fx.Node) -> str:
    placed = get_record(n, PlacementRecord)
    if placed is not None and placed.target in _PLACEMENT_COLOURS:
        return _PLACEMENT_COLOURS[placed.target]
    if _is_lora(n):
        return _COLOURS["lora"]
    if "dropout" in _target(n):
        return _COLOURS["dropout"]
    return _COLOURS.get(n.op, "#888888")


def _is_plumbing(n: torch.fx.Node) -> bool:
    """Shape arithmetic, guards and metadata asserts: nodes that carry no tensor data."""
    if n.op == "call_module" and str(n.target).startswith("_guards"):
        return True
    if n.op != "call_function":
        return False
    name = _target(n)
    if "_assert" in name or "sym_size" in name or "sym_numel" in name or "sym_stride" in name:
        return True
    val = n.meta.get("val")
    return isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _draw_label(n: torch.fx.Node, scores: Optional[dict] = None) -> str:
    recs = _adapters(n)
    kind = kind_of(n)
    note = kind.describe(n) if kind is not None else ""
    if n.op == "placeholder":
        text = f"input {n.target}"
    elif n.op == "output":
        text = "output"
    elif len(recs) == 1:
        rec = recs[0]
        score = f" score={scores[rec.site]:.3g}" if scores and rec.site in scores else ""
        text = (f"{n.name}  LoRA r={rec.r}{score} alpha={rec.alpha:g} {rec.in_features}->{rec.out_features}"
                + (" merged" if rec.merged else "") + (f" ({note})" if note else ""))
    elif kind is not None and _is_lora(n):
        sites = ", ".join(r.site.rsplit(".", 1)[-1] for r in recs)
        text = f"{n.name}  LoRA {kind.name}" + (f" [{sites}]" if sites else "") + (f" ({note})" if note else "")
    else:
        target = _target(n)
        if target.startswith("aten."):
            target = target[5:]
        text = f"{n.name} = {target}" if n.op != "get_attr" else f"{n.name} = {n.target}"
        if note:
            text += f" ({note})"
    shape = _shape(n)
    if shape:
        text += f"  {shape}"
    return text if len(text) <= _LABEL_CHARS else text[:_LABEL_CHARS - 3] + "..."


def _block_of(n: torch.fx.Node):
    """The numbered block a node belongs to (``model.layers.3``), "" outside any,
    None when the node has no origin (it then stays in its neighbours' block)."""
    rec = get_record(n, OriginRecord)
    if rec is None or not rec.module or rec.module.startswith("_"):
        return None
    parts = rec.module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ""


def _lanes(nodes: List[torch.fx.Node], inputs) -> List[int]:
    """Assign each node (one per row, in graph order) a lane, git-log style.

    A value keeps its lane until its last user, so edges run straight down their
    producer's lane and bend only in the row of the consumer.  A node continues
    the lane of an input whose last use it is; otherwise it takes the free lane
    nearest to its first input.
    """
    row = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((row[u] for u in n.users if u in row), default=row[n]) for n in nodes}
    occupant: List[torch.fx.Node] = []
    lane_of = {}
    for i, n in enumerate(nodes):
        ins = inputs[n]
        lane = next((lane_of[p] for p in ins if last_use[p] == i and occupant[lane_of[p]] is p), None)
        if lane is None:
            free = [k for k, o in enumerate(occupant) if last_use[o] <= i]
            if free:
                near = lane_of[ins[0]] if ins else 0
                lane = min(free, key=lambda k: (abs(k - near), k))
            else:
                lane = len(occupant)
                occupant.append(n)
        occupant[lane] = n
        lane_of[n] = lane
    return [lane_of[n] for n in nodes]


def draw(gm: torch.fx.GraphModule, path: str, *, include_get_attr: bool = False, simplify: bool = True,
         max_nodes: int = 4000, title: Optional[str] = None, dpi: int = 110) -> str:
    """Draw the graph top-to-bottom to ``path`` (.svg, .png or .pdf); returns ``path``.

    One node per row in execution order, with its name, op and shape; edges run
    down lanes (like ``git log --graph``).  LoRA adapters are red, dropout green,
    inputs/outputs teal; in a graph placed on a chip (``target="cim"``) every node takes the
    colour of its part instead: RRAM orange, SRAM red, host blue.  Numbered blocks
    (``model.layers.N``) are shaded bands.  An adapter's rank sets its dot's size and the length of the red bar before its label.
    ``simplify`` hides shape arithmetic, guards and metadata asserts.  Needs
    matplotlib (``pip install 'lorafx[draw]'``), not graphviz.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".svg", ".png", ".pdf"):
        raise ValueError(f"draw: unsupported file type {ext!r}; use .svg, .png or .pdf")
    try:
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("draw() needs matplotlib: pip install 'lorafx[draw]'") from e
    shown = [n for n in gm.graph.nodes
             if (include_get_attr or n.op != "get_attr") and not (simplify and _is_plumbing(n))]
    hidden = len(gm.graph.nodes) - len(shown)
    truncated = len(shown) > max_nodes
    nodes = shown[:max_nodes]
    index = {n: i for i, n in enumerate(nodes)}
    inputs = {n: list(dict.fromkeys(p for p in n.all_input_nodes if p in index)) for n in nodes}
    lane = dict(zip(nodes, _lanes(nodes, inputs)))
    lanes = max(lane.values(), default=0) + 1
    scores = graph_record(gm).scores  # AllocateRanks' proxy scores, if it ran
    labels = [_draw_label(n, scores) for n in nodes]
    adapters = len({rec.site for n in nodes for rec in _adapters(n)})

    row_in, lane_in, char_in = 0.16, 0.2, 0.066  # inches per row / lane / label character (7 pt mono, hinted)
    header = 3  # rows above the graph for the title and legend
    ranks = [_rank(n) if _is_lora(n) else 0 for n in nodes]
    bar_room = 0.1 * min(max(ranks, default=0), 32)  # room for the rank bars (0.1 lane per rank unit)
    text_x = lanes + 0.6 + bar_room  # labels start right of the lanes (data units: 1 = one lane)
    placed = any(get_record(n, PlacementRecord) is not None for n in nodes)
    legend = (("LoRA adapter", "lora"), ("dropout", "dropout"), ("input/output", "placeholder"),
              ("op", "call_function"), ("submodule", "call_module"))
    if placed:  # coloured by the part each node runs on
        legend = (("RRAM crossbars", "rram"), ("SRAM (adapters)", "sram"), ("digital host", "host"))
    if title is None:
        title = (f"{type(gm).__name__}: {len(gm.graph.nodes)} nodes, {len(nodes)} drawn"
                 + (f" ({hidden} shape/guard/get_attr nodes hidden)" if hidden else "")
                 + (f", first {max_nodes} only" if truncated else "") + f", {adapters} LoRA adapters")
    text_lanes = (max((len(t) for t in labels), default=10) * char_in + 0.3) / lane_in
    legend_units = sum(0.8 + (len(name) * char_in + 0.5) / lane_in for name, _ in legend)
    title_units = len(title) * 0.085 / lane_in  # 8 pt bold proportional font, generously
    width_units = max(text_x + text_lanes, legend_units, title_units) - 1.2
    rows = len(nodes) + header
    fig = Figure(figsize=((width_units + 1.5) * lane_in, rows * row_in + 0.2))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-1.5, width_units)
    ax.set_ylim(-(len(nodes) - 0.5), header)
    ax.axis("off")

    # numbered blocks as alternating bands, named at the left edge
    blocks = [_block_of(n) for n in nodes]
    i = 0
    while i < len(nodes):
        j = i
        while j + 1 < len(nodes) and (blocks[j + 1] == blocks[i] or blocks[j + 1] is None):
            j += 1
        if blocks[i]:
            shade = "#f2f2f7" if int(blocks[i].rsplit(".", 1)[-1]) % 2 == 0 else "#e8eef7"
            ax.axhspan(-j - 0.5, -i + 0.5, color=shade, zorder=0, lw=0)
            ax.text(-1.3, -i, blocks[i], rotation=90, ha="left", va="top", fontsize=6, color="#555555")
        i = j + 1

    # edges: down the producer's lane, then a short bend into the consumer's row
    segments = []
    for n in nodes:
        for p in inputs[n]:
            x0, y0, x1, y1 = lane[p], -index[p], lane[n], -index[n]
            if x0 == x1:
                segments.append([(x0, y0), (x1, y1)])
            else:
                segments.append([(x0, y0), (x0, y1 + 0.5), (x1, y1)])
    ax.add_collection(LineCollection(segments, colors="#9a9a9a", linewidths=0.6, zorder=1))

    xs = [lane[n] for n in nodes]
    ys = [-index[n] for n in nodes]
    colours = [_colour(n) for n in nodes]
    sizes = [min(14 + 3 * r, 160) if _is_lora(n) else 10 for n, r in zip(nodes, ranks)]
    ax.scatter(xs, ys, s=sizes, c=colours, zorder=3, linewidths=0)
    # an adapter's width by rank: a bar just left of its label, 0.1 lane per rank unit (capped at 32)
    bars = [[(text_x - 0.2 - 0.1 * min(r, 32), -index[n]), (text_x - 0.2, -index[n])]
            for n, r in zip(nodes, ranks) if r]
    ax.add_collection(LineCollection(bars, colors=_COLOURS["lora"], linewidths=3.0, zorder=3))
    guides = [[(lane[n], -index[n]), (text_x - 0.2, -index[n])] for n in nodes]
    ax.add_collection(LineCollection(guides, colors=colours, linewidths=0.3, linestyles=":", alpha=0.5, zorder=2))
    for n, text, c in zip(nodes, labels, colours):
        lora = _is_lora(n)
        ax.text(text_x, -index[n], text, fontsize=7, family="monospace", va="center", ha="left", zorder=4,
                color=c if c != _COLOURS["call_function"] else "#222222",
                fontweight="bold" if lora else "normal")

    ax.text(-1.3, header - 0.8, title, fontsize=8, va="center", ha="left", fontweight="bold")
    x = -1.3
    for name, key in legend:
        ax.scatter([x + 0.3], [header - 2], s=22, c={**_COLOURS, **_PLACEMENT_COLOURS}[key], linewidths=0)
        ax.text(x + 0.8, header - 2, name, fontsize=7, va="center", ha="left")
        x += 0.8 + (len(name) * char_in + 0.5) / lane_in
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    import matplotlib
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # real, searchable text in SVGs
        fig.savefig(path, dpi=dpi, facecolor="white")
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
        before_set, after_set = set(names), set(after)
        created = [n for n in after if n not in before_set]
        erased = [n for n in names if n not in after_set]
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
