"""Looking at graphs: print with lorafx metadata, diff, networkx, drawings, dumps.

    print(format_graph(gm))            # one node a line, lorafx records in a column
    d = diff_graphs(before, after)     # d.lines (unified diff), d.created, d.erased
    G = to_networkx(gm)                # nodes carry op/target/lorafx attributes
    draw(gm, "graph.svg")              # adapters and placements coloured, repeated layers folded
    to_html(gm, "graph.html")          # modules as sections that fold and unfold, every node once
    Pipeline(passes, instruments=[DumpGraphs("out/")])   # one file per pass
"""
from __future__ import annotations

import collections
import difflib
import html
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx

from .dialect import kind_of
from .meta import LoraRecord, OriginRecord, PlacementRecord, describe, get_record, graph_record
from .pipeline import Instrument
from .printing import format_graph, format_node, node_parts
from .printing import node_shape as _shape
from .printing import node_target as _target

__all__ = ["format_node", "format_graph", "diff_graphs", "GraphDiff", "to_networkx", "draw", "to_html",
           "repeated_blocks", "Block", "SiteSummary", "FOLD_ABOVE", "PrintGraphs", "DiffGraphs", "TimePasses",
           "DumpGraphs"]


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
    """The numbered block a node belongs to (``model.layers.3``: its module path up to the first
    index of a ``ModuleList``/``Sequential``), "" outside any, None when the node has no origin of
    its own (get_attr, fused sibling ops, shortcut adapters): it then stays in its neighbours' block."""
    rec = get_record(n, OriginRecord)
    if rec is None or not rec.module or rec.module.startswith("_") or rec.module_type == "Shortcut":
        return None
    parts = rec.module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ""


def _runs(nodes) -> List[Tuple[str, List[torch.fx.Node]]]:
    """The nodes cut into maximal runs of one block, in graph order: [(block, nodes)]; a node
    without a block of its own joins the run it sits in ("" before the first block)."""
    runs: List[Tuple[str, List[torch.fx.Node]]] = []
    for n in nodes:
        b = _block_of(n)
        if runs and (b is None or b == runs[-1][0]):
            runs[-1][1].append(n)
        else:
            runs.append(("" if b is None else b, [n]))
    return runs


@dataclass(frozen=True)
class SiteSummary:
    """One adapter site of a block, as a folded drawing and the HTML view show it.

    ``name``: the site (``model.layers.3.self_attn.q_proj``, or a shortcut's
    ``shortcuts.3.attn_skip``); ``short``: the shortest dotted suffix naming it within the
    block; ``r``: its rank (0: AllocateRanks gave it none); ``kind``: "lora", "shortcut" or
    "none"; ``parts``: the chip parts its nodes run on, in the order rram, sram, host (empty
    unless the graph is placed); ``adapter_part``: the part running its adapter."""

    name: str
    short: str
    r: int
    kind: str
    parts: Tuple[str, ...] = ()
    adapter_part: Optional[str] = None

    def label(self) -> str:
        return f"{self.short} r={self.r}" + (f" @{'+'.join(self.parts)}" if self.parts else "")


@dataclass
class Block:
    """One numbered block of a repeated structure (``model.layers.5`` of ``model.layers``).

    ``nodes``: all its graph nodes, hidden ones included, in graph order; ``pattern``: the
    sequence of (module path inside the block, module type) its nodes run through, equal
    for blocks of the same structure whatever ops their adapters lowered to; ``sites``: its
    adapter sites in graph order."""

    name: str
    group: str
    index: int
    module_type: str
    nodes: List[torch.fx.Node]
    pattern: tuple
    sites: List[SiteSummary]

    def summary(self) -> str:
        """``7 adapters, r 6-13`` (or ``no adapters``)."""
        ranks = [s.r for s in self.sites if s.r]
        if not ranks:
            return "no adapters"
        span = f"r={ranks[0]}" if min(ranks) == max(ranks) else f"r {min(ranks)}-{max(ranks)}"
        return f"{len(ranks)} adapter{'s' if len(ranks) > 1 else ''}, {span}"


_PART_ORDER = ("rram", "sram", "host")


def _short_names(names: List[str]) -> Dict[str, str]:
    """The shortest dotted suffix of each name that no other name in ``names`` ends with."""
    split = {name: tuple(name.split(".")) for name in names}
    counts: Dict[int, collections.Counter] = {}  # k -> how many names end with each k-part suffix
    out = {}
    for name, parts in split.items():
        for k in range(1, len(parts) + 1):
            if k not in counts:
                counts[k] = collections.Counter(p[-k:] for p in split.values() if len(p) >= k)
            if counts[k][parts[-k:]] == 1:
                break
        out[name] = ".".join(parts[-k:])
    return out


def _block_sites(gm: torch.fx.GraphModule, block: str, nodes: List[torch.fx.Node]) -> List[SiteSummary]:
    """The adapter sites of a block's nodes (LoRA, shortcut, and those AllocateRanks gave rank 0),
    ordered by the first node of their module, with the parts they run on when placed."""
    seen: Dict[str, Tuple[int, str]] = {}  # site -> (rank, kind), in record order
    first: Dict[str, int] = {}  # module -> index of its first node
    parts: Dict[str, set] = {}
    adapter_part: Dict[str, str] = {}
    for i, n in enumerate(nodes):
        origin = get_record(n, OriginRecord)
        placed = get_record(n, PlacementRecord)
        sites = [(r.site, r.r, "lora") for r in _adapters(n)]
        sites += [(rec.site, int(rec.r), "shortcut") for rec in n.meta.get("lorafx", {}).values()
                  if not isinstance(rec, LoraRecord) and isinstance(getattr(rec, "site", None), str)
                  and isinstance(getattr(rec, "r", None), int)]
        modules = {origin.module} if origin is not None else set()
        modules |= {s for s, _, _ in sites}
        for m in modules:
            first.setdefault(m, i)
            if placed is not None:
                parts.setdefault(m, set()).add(placed.target)
        adapts = placed is not None and _is_lora(n)
        for site, r, kind in sites:
            seen.setdefault(site, (r, kind))
            if placed is not None and (adapts or kind == "shortcut"):
                adapter_part.setdefault(site, placed.target)
    allocation = graph_record(gm).allocation or {}
    for site, r in allocation.items():
        if not r and site not in seen and site in first and site.startswith(block + "."):
            seen[site] = (0, "none")
    position = {s: k for k, s in enumerate(seen)}
    order = sorted(seen, key=lambda s: (first.get(s, len(nodes)), position[s]))
    rel = {s: s[len(block) + 1:] if s.startswith(block + ".") else s for s in order}
    short = _short_names(list(rel.values()))
    return [SiteSummary(s, short[rel[s]], seen[s][0], seen[s][1],
                        tuple(p for p in _PART_ORDER if p in parts.get(s, ())) +
                        tuple(sorted(parts.get(s, set()) - set(_PART_ORDER))),
                        adapter_part.get(s)) for s in order]


def repeated_blocks(gm: torch.fx.GraphModule) -> Dict[str, List[Block]]:
    """The graph's repeated structures: ``{"model.layers": [Block(model.layers.0), ...]}``.

    A repeated structure is a module path followed by an index (a ``ModuleList`` or
    ``Sequential``, e.g. decoder layers, ``encoder.layer.N``, ``transformer.h.N``) under
    which at least two blocks ran; nested lists (``experts.N`` inside a layer) stay
    inside their block.  Requires the nodes' ``OriginRecord`` (every captured graph has them).
    """
    runs = _runs(gm.graph.nodes)
    by_name: Dict[str, List[torch.fx.Node]] = {}
    for block, nodes in runs:
        if block:
            by_name.setdefault(block, []).extend(nodes)
    groups: Dict[str, List[Block]] = {}
    for name, nodes in by_name.items():
        group, index = name.rsplit(".", 1) if "." in name else ("", name)
        pattern, module_type = [], ""
        for n in nodes:
            rec = get_record(n, OriginRecord)
            if rec is None or _block_of(n) != name:
                continue
            step = (rec.module[len(name) + 1:], rec.module_type)
            if not pattern or pattern[-1] != step:
                pattern.append(step)
            if rec.module == name and not module_type:
                module_type = rec.module_type
        groups.setdefault(group, []).append(
            Block(name, group, int(index), module_type, nodes, tuple(pattern), _block_sites(gm, name, nodes)))
    return {g: sorted(bs, key=lambda b: b.index) for g, bs in groups.items() if len(bs) >= 2}


FOLD_ABOVE = 4  # draw() folds a repeated structure of more blocks than this unless told otherwise


def _fold_choice(groups: Dict[str, List[Block]], fold: Optional[bool], full_layers) -> Tuple[set, set]:
    """(names of the blocks drawn as one box each, names of the blocks of folded structures drawn
    in full).  By default a structure of more than FOLD_ABOVE blocks folds, and the first block
    of each distinct pattern is drawn in full; ``full_layers`` picks those instead (indices into
    every folded structure, or block names) and folds every repeated structure."""
    if fold is False and full_layers is not None:
        raise ValueError("draw: full_layers= picks the layers a folded drawing shows in full, and fold=False "
                         "folds nothing; pass one of them")
    folding = [g for g, bs in groups.items()
               if fold or (fold is None and (full_layers is not None or len(bs) > FOLD_ABOVE))]
    full: set = set()
    if full_layers is None:
        for g in folding:
            patterns = set()
            for b in groups[g]:
                if b.pattern not in patterns:
                    patterns.add(b.pattern)
                    full.add(b.name)
    else:
        wanted = [full_layers] if isinstance(full_layers, (int, str)) else list(full_layers)
        names = {b.name for g in folding for b in groups[g]}
        for w in wanted:
            hits = {f"{g}.{w}" for g in folding} & names if isinstance(w, int) else {w} & names
            if not hits:
                have = "; ".join(f"{g}.{groups[g][0].index}-{groups[g][-1].index}" for g in folding) or "none"
                raise ValueError(f"draw: full_layers={full_layers!r}: no repeated block {w!r} "
                                 f"(repeated structures: {have}); give layer indices or block names")
            full |= hits
    folded = {b.name for g in folding for b in groups[g] if b.name not in full}
    return folded, full


def _lanes(nodes: List, inputs, users=None) -> List[int]:
    """Assign each item (one per row, in graph order) a lane, git-log style.

    A value keeps its lane until its last user, so edges run straight down their
    producer's lane and bend only in the row of the consumer.  An item continues
    the lane of an input whose last use it is; otherwise it takes the free lane
    nearest to its first input.  ``users``: each item's consumers (default: a node's users).
    """
    row = {n: i for i, n in enumerate(nodes)}
    if users is None:
        users = {n: n.users for n in nodes}
    last_use = {n: max((row[u] for u in users[n] if u in row), default=row[n]) for n in nodes}
    occupant: List = []
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


class _Box:
    """A folded block in a drawing: one item spanning a header row and its site rows."""

    def __init__(self, block: Block, nodes: List[torch.fx.Node], columns: int):
        self.block, self.nodes = block, nodes
        self.columns = max(1, min(columns, len(block.sites)))
        self.rows = 1 + -(-len(block.sites) // self.columns)

    @property
    def name(self) -> str:
        return self.block.name

    def header(self) -> str:
        b = self.block
        return f"{b.name}  {b.module_type or 'block'} folded: {len(self.nodes)} nodes, {b.summary()}"


def _site_colour(site: SiteSummary) -> str:
    if site.adapter_part in _PLACEMENT_COLOURS:
        return _PLACEMENT_COLOURS[site.adapter_part]
    return _COLOURS["lora"] if site.r else "#999999"


def draw(gm: torch.fx.GraphModule, path: str, *, include_get_attr: bool = False, simplify: bool = True,
         max_nodes: int = 4000, title: Optional[str] = None, dpi: int = 110,
         fold: Optional[bool] = None, full_layers=None) -> str:
    """Draw the graph top-to-bottom to ``path`` (.svg, .png or .pdf; .html writes ``to_html``);
    returns ``path``.

    One node per row in execution order, with its name, op and shape; edges run
    down lanes (like ``git log --graph``).  LoRA adapters are red, dropout green,
    inputs/outputs teal; in a graph placed on a chip (``target="cim"``) every node takes the
    colour of its part instead: RRAM orange, SRAM red, host blue.  Numbered blocks
    (``model.layers.N``) are shaded bands.  An adapter's rank sets its dot's size and the
    length of the red bar before its label.

    Folding: a repeated structure of more than ``FOLD_ABOVE`` blocks (decoder layers,
    see ``repeated_blocks``) is drawn with the first block of each pattern in full and
    every other block as one box listing its adapter sites, their ranks and, when
    placed, the parts they run on (coloured by the adapter's part).  ``fold=True`` folds
    every repeated structure, ``fold=False`` none; ``full_layers`` (layer indices or
    block names) picks the blocks drawn in full.  ``graph_report()``/``format_graph`` and
    ``to_html`` keep every node.
    ``simplify`` hides shape arithmetic, guards and metadata asserts.  Needs
    matplotlib (``pip install 'lorafx[draw]'``), not graphviz.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext == ".html":
        return to_html(gm, path, title=title)
    if ext not in (".svg", ".png", ".pdf"):
        raise ValueError(f"draw: unsupported file type {ext!r}; use .svg, .png, .pdf or .html")
    try:
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
        from matplotlib.patches import FancyBboxPatch
    except ImportError as e:
        raise ImportError("draw() needs matplotlib: pip install 'lorafx[draw]'") from e
    groups = repeated_blocks(gm)
    folded, full = _fold_choice(groups, fold, full_layers)
    blocks = {b.name: b for bs in groups.values() for b in bs}

    def visible(n):
        return (include_get_attr or n.op != "get_attr") and not (simplify and _is_plumbing(n))

    # the items drawn, one per row (a node) or a few rows (a folded block), in graph order
    items: List = []
    item_of: Dict[torch.fx.Node, object] = {}
    # a placed site's cell starts with a swatch in the colour of its frozen weight's part (2 characters)
    swatch = 2 if any(s.parts for name in folded for s in blocks[name].sites) else 0
    site_chars = max((len(s.label()) for name in folded for s in blocks[name].sites), default=0) + 2 + swatch
    columns = max(1, 112 // site_chars)
    for block, run in _runs(gm.graph.nodes):
        if block in folded and sum(map(visible, run)) > 1 + -(-len(blocks[block].sites) // columns):
            box = _Box(blocks[block], run, columns)
            items.append(box)
            item_of.update((n, box) for n in run)
        else:
            for n in run:
                if visible(n):
                    items.append(n)
                    item_of[n] = n
    boxes = [it for it in items if isinstance(it, _Box)]
    shown = [it for it in items if not isinstance(it, _Box)]
    hidden = len(gm.graph.nodes) - len(shown) - sum(len(b.nodes) for b in boxes)
    truncated = len(items) > max_nodes
    items = items[:max_nodes]
    index = {it: i for i, it in enumerate(items)}
    members = {it: (it.nodes if isinstance(it, _Box) else [it]) for it in items}
    inputs, users = {}, {}
    for it in items:
        ins = (item_of.get(p) for n in members[it] for p in n.all_input_nodes)
        inputs[it] = list(dict.fromkeys(p for p in ins if p is not None and p is not it and p in index))
        outs = (item_of.get(u) for n in members[it] for u in n.users)
        users[it] = list(dict.fromkeys(u for u in outs if u is not None and u is not it and u in index))
    lane = dict(zip(items, _lanes(items, inputs, users)))
    lanes = max(lane.values(), default=0) + 1
    # rows: a node takes one, a box its header and site rows
    top, row = {}, 0
    for it in items:
        top[it] = row
        row += it.rows if isinstance(it, _Box) else 1
    total_rows = row
    bottom = {it: top[it] + (it.rows - 1 if isinstance(it, _Box) else 0) for it in items}

    nodes = [it for it in items if not isinstance(it, _Box)]
    boxes = [it for it in items if isinstance(it, _Box)]
    scores = graph_record(gm).scores  # AllocateRanks' proxy scores, if it ran
    labels = [_draw_label(n, scores) for n in nodes]
    adapters = len({rec.site for n in gm.graph.nodes for rec in _adapters(n)})

    row_in, lane_in, char_in = 0.16, 0.2, 0.066  # inches per row / lane / label character (7 pt mono, hinted)
    fold_line = ""
    if boxes:
        parts = []
        for g, bs in groups.items():
            drawn = [b for b in boxes if b.block.group == g]
            if drawn:
                in_full = [b.name for b in bs if b.name in full]
                parts.append(f"{g}: {len(bs)} blocks, {', '.join(in_full) or 'none'} in full, "
                             f"{len({b.name for b in drawn})} folded into one box each (sites, ranks"
                             + ("; text in the colour of the adapter's part, square in the frozen weight's)"
                                if any(s.parts for b in drawn for s in b.block.sites) else ")"))
        fold_line = "; ".join(parts)
    header = 4 if fold_line else 3  # rows above the graph for the title, fold note and legend
    ranks = [_rank(n) if _is_lora(n) else 0 for n in nodes]
    bar_room = 0.1 * min(max(ranks, default=0), 32)  # room for the rank bars (0.1 lane per rank unit)
    text_x = lanes + 0.6 + bar_room  # labels start right of the lanes (data units: 1 = one lane)
    placed = any(get_record(n, PlacementRecord) is not None for n in gm.graph.nodes)
    legend = (("LoRA adapter", "lora"), ("dropout", "dropout"), ("input/output", "placeholder"),
              ("op", "call_function"), ("submodule", "call_module"))
    if placed:  # coloured by the part each node runs on
        legend = (("RRAM crossbars", "rram"), ("SRAM (adapters)", "sram"), ("digital host", "host"))
    if title is None:
        title = (f"{type(gm).__name__}: {len(gm.graph.nodes)} nodes, {len(nodes)} drawn"
                 + (f", {sum(len(b.nodes) for b in boxes)} in {len(boxes)} folded blocks" if boxes else "")
                 + (f" ({hidden} shape/guard/get_attr nodes hidden)" if hidden else "")
                 + (f", first {max_nodes} rows only" if truncated else "") + f", {adapters} LoRA adapters")
    box_chars = max([len(b.header()) for b in boxes] + [b.columns * site_chars for b in boxes] + [0])
    text_lanes = (max([len(t) for t in labels] + [box_chars + 2, 10]) * char_in + 0.3) / lane_in
    legend_units = sum(0.8 + (len(name) * char_in + 0.5) / lane_in for name, _ in legend)
    title_units = max(len(title), len(fold_line) * 0.9) * 0.085 / lane_in  # 8 pt bold proportional, generously
    width_units = max(text_x + text_lanes, legend_units, title_units) - 1.2
    fig = Figure(figsize=((width_units + 1.5) * lane_in, (total_rows + header) * row_in + 0.2))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-1.5, width_units)
    ax.set_ylim(-(total_rows - 0.5), header)
    ax.axis("off")

    # numbered blocks as alternating bands, named at the left edge
    def block_name(it):
        return it.name if isinstance(it, _Box) else _block_of(it)

    names = [block_name(it) for it in items]
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and (names[j + 1] == names[i] or names[j + 1] is None) \
                and not isinstance(items[j + 1], _Box):
            j += 1
        if names[i]:
            last = names[i].rsplit(".", 1)[-1]
            shade = "#f2f2f7" if not last.isdigit() or int(last) % 2 == 0 else "#e8eef7"
            ax.axhspan(-bottom[items[j]] - 0.5, -top[items[i]] + 0.5, color=shade, zorder=0, lw=0)
            if not isinstance(items[i], _Box):
                ax.text(-1.3, -top[items[i]], names[i] + (" (in full)" if names[i] in full else ""),
                        rotation=90, ha="left", va="top", fontsize=6, color="#555555")
        i = j + 1

    # edges: down the producer's lane from its last row, then a short bend into the consumer's first row
    segments = []
    for it in items:
        for p in inputs[it]:
            x0, y0, x1, y1 = lane[p], -bottom[p], lane[it], -top[it]
            if x0 == x1:
                segments.append([(x0, y0), (x1, y1)])
            else:
                segments.append([(x0, y0), (x0, y1 + 0.5), (x1, y1)])
    ax.add_collection(LineCollection(segments, colors="#9a9a9a", linewidths=0.6, zorder=1))

    xs = [lane[n] for n in nodes]
    ys = [-top[n] for n in nodes]
    colours = [_colour(n) for n in nodes]
    sizes = [min(14 + 3 * r, 160) if _is_lora(n) else 10 for n, r in zip(nodes, ranks)]
    ax.scatter(xs, ys, s=sizes, c=colours, zorder=3, linewidths=0)
    # an adapter's width by rank: a bar just left of its label, 0.1 lane per rank unit (capped at 32)
    bars = [[(text_x - 0.2 - 0.1 * min(r, 32), -top[n]), (text_x - 0.2, -top[n])]
            for n, r in zip(nodes, ranks) if r]
    ax.add_collection(LineCollection(bars, colors=_COLOURS["lora"], linewidths=3.0, zorder=3))
    guides = [[(lane[n], -top[n]), (text_x - 0.2, -top[n])] for n in nodes]
    ax.add_collection(LineCollection(guides, colors=colours, linewidths=0.3, linestyles=":", alpha=0.5, zorder=2))
    for n, text, c in zip(nodes, labels, colours):
        lora = _is_lora(n)
        ax.text(text_x, -top[n], text, fontsize=7, family="monospace", va="center", ha="left", zorder=4,
                color=c if c != _COLOURS["call_function"] else "#222222",
                fontweight="bold" if lora else "normal")

    # folded blocks: a bar down their lane, a framed box with a header and one cell per adapter site
    cell = site_chars * char_in / lane_in  # data units per site cell
    if boxes:
        ax.add_collection(LineCollection([[(lane[b], -top[b]), (lane[b], -bottom[b])] for b in boxes],
                                         colors="#555555", linewidths=4.0, zorder=3))
        ax.scatter([lane[b] for b in boxes], [-top[b] for b in boxes], s=26, marker="s", c="#555555",
                   zorder=3, linewidths=0)
        ax.add_collection(LineCollection([[(lane[b], -top[b]), (text_x - 0.2, -top[b])] for b in boxes],
                                         colors="#555555", linewidths=0.3, linestyles=":", zorder=2))
    swatches = []
    for b in boxes:
        width = (max(len(b.header()), b.columns * site_chars) * char_in + 0.1) / lane_in
        ax.add_patch(FancyBboxPatch((text_x - 0.1, -bottom[b] - 0.4), width, bottom[b] - top[b] + 0.8,
                                    boxstyle="round,pad=0,rounding_size=0.3", facecolor="#ffffff",
                                    edgecolor="#555555", linewidth=0.6, zorder=2, gid=f"fold-{b.name}"))
        ax.text(text_x, -top[b], b.header(), fontsize=7, family="monospace", va="center", ha="left",
                zorder=4, color="#222222", fontweight="bold", gid=f"fold-header-{b.name}")
        for k, site in enumerate(b.block.sites):
            line, col = divmod(k, b.columns)
            x, y = text_x + col * cell, -top[b] - 1 - line
            if site.parts:
                weight = next((p for p in site.parts if p != site.adapter_part), site.adapter_part)
                swatches.append((x + 0.5 * char_in / lane_in, y, _PLACEMENT_COLOURS.get(weight, "#888888")))
            ax.text(x + swatch * char_in / lane_in, y, site.label(), fontsize=7, family="monospace",
                    va="center", ha="left", zorder=4, color=_site_colour(site),
                    fontweight="bold" if site.r else "normal", gid=f"site-{site.name}")
    if swatches:
        xs, ys, cs = zip(*swatches)
        ax.scatter(xs, ys, s=16, marker="s", c=cs, zorder=4, linewidths=0)

    ax.text(-1.3, header - 0.8, title, fontsize=8, va="center", ha="left", fontweight="bold")
    if fold_line:
        ax.text(-1.3, header - 1.8, fold_line, fontsize=7, va="center", ha="left", color="#333333")
    x = -1.3
    for name, key in legend:
        ax.scatter([x + 0.3], [header - (3 if fold_line else 2)], s=22,
                   c={**_COLOURS, **_PLACEMENT_COLOURS}[key], linewidths=0)
        ax.text(x + 0.8, header - (3 if fold_line else 2), name, fontsize=7, va="center", ha="left")
        x += 0.8 + (len(name) * char_in + 0.5) / lane_in
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    import matplotlib
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # real, searchable text in SVGs
        fig.savefig(path, dpi=dpi, facecolor="white")
    return path


# -- the interactive HTML view ------------------------------------------------------------------

_HTML_CSS = """
body{font:13px/1.45 system-ui,sans-serif;margin:1.2em;color:#222}
h1{font-size:16px;margin:0 0 .3em} p.note{margin:.2em 0 .6em;color:#555}
details{margin-left:1.1em;border-left:1px solid #ddd;padding-left:.5em}
details>summary{cursor:pointer;margin-left:-1.1em;padding:1px 0}
summary b{font-family:ui-monospace,monospace;font-weight:600}
summary .t{color:#8c564b} summary .c{color:#666}
.n{font-family:ui-monospace,monospace;font-size:12px;white-space:pre;padding-left:.4em}
.n .m{color:#666} .site{font-family:ui-monospace,monospace;font-size:12px;margin-left:.6em}
.lora{color:#d62728;font-weight:600} .dropout{color:#2ca02c} .io{color:#17a2b8} .attr{color:#999}
.op{color:#222} .mod{color:#8c564b} .rram{color:#e67e22} .sram{color:#d62728} .host{color:#3b5b92}
.none{color:#999} .legend span{margin-right:1em} button{font-size:12px;margin-right:.4em}
"""

_HTML_JS = ("function setAll(o){document.querySelectorAll('details').forEach(function(d){d.open=o;});}")


def _css_class(n: torch.fx.Node) -> str:
    placed = get_record(n, PlacementRecord)
    if placed is not None and placed.target in _PLACEMENT_COLOURS:
        return placed.target
    if _is_lora(n):
        return "lora"
    if "dropout" in _target(n):
        return "dropout"
    return {"placeholder": "io", "output": "io", "get_attr": "attr", "call_module": "mod"}.get(n.op, "op")


def _site_class(site: SiteSummary) -> str:
    if site.adapter_part in _PLACEMENT_COLOURS:
        return site.adapter_part
    return "lora" if site.r else "none"


def _sections(gm: torch.fx.GraphModule) -> Dict[torch.fx.Node, str]:
    """The module section each node is listed in: its origin module; for a node without one, the
    common module of the sites it adapts, else its block (the run it sits in); a get_attr
    goes beside its first user; placeholders, the output and guards sit at the top level."""
    where: Dict[torch.fx.Node, str] = {}
    run_block = {n: block for block, run in _runs(gm.graph.nodes) for n in run}
    for n in gm.graph.nodes:
        rec = get_record(n, OriginRecord)
        if n.op in ("placeholder", "output") or (rec is not None and rec.module.startswith("_")):
            where[n] = ""
        elif rec is not None and rec.module_type != "Shortcut":
            where[n] = rec.module
        elif n.op != "get_attr":
            sites = [r.site.split(".") for r in _adapters(n)]
            common = os.path.commonprefix(sites) if sites else []
            where[n] = ".".join(common) if common else run_block[n]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            user = min(n.users, key=order.__getitem__, default=None)
            where[n] = where[user] if user is not None else str(n.target).rpartition(".")[0]
    return where


def to_html(gm: torch.fx.GraphModule, path: str, *, title: Optional[str] = None) -> str:
    """Write the graph as one self-contained HTML page to ``path``; returns ``path``.

    Modules nest as ``<details>`` sections (model > layers > layer N > self_attn > q_proj)
    that fold and unfold in any browser, with no script library and no network.  Every
    node appears once, in the section of the module it came from, as ``format_node``
    prints it (op, shape, lorafx records: rank, schedule, placement, cost), coloured
    like ``draw``; each block of a repeated structure sums up its adapter sites, ranks
    and parts in its heading.  The file is written whole or not at all.
    """
    where = _sections(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    key = {n: (min((order[u] for u in n.users), default=order[n]) - 0.5 if n.op == "get_attr" else order[n])
           for n in gm.graph.nodes}
    children: Dict[str, List] = {"": []}  # section -> its nodes and subsections
    first: Dict[str, float] = {"": -1.0}
    counts: Dict[str, list] = {"": [0, set()]}  # section -> [nodes, adapter sites] in its subtree
    for n in gm.graph.nodes:
        sec = where[n]
        chain = sec.split(".") if sec else []
        for k in range(len(chain) + 1):
            name = ".".join(chain[:k])
            if name not in children:
                children[name] = []
                children[".".join(chain[:k - 1])].append(name)
                counts[name] = [0, set()]
            first[name] = min(first.get(name, key[n]), key[n])
            counts[name][0] += 1
            counts[name][1].update(r.site for r in _adapters(n))
        children[sec].append(n)
    types: Dict[str, str] = {}
    for n in gm.graph.nodes:
        rec = get_record(n, OriginRecord)
        if rec is not None and rec.module_type and rec.module not in types:
            types[rec.module] = rec.module_type
    blocks = {b.name: b for bs in repeated_blocks(gm).values() for b in bs}
    first_blocks = {bs[0].name for bs in repeated_blocks(gm).values()} if blocks else set()
    sites = {s.name: s for b in blocks.values() for s in b.sites}
    esc = html.escape

    def site_span(s: SiteSummary) -> str:
        return f'<span class="site {_site_class(s)}">{esc(s.label())}</span>'

    out: List[str] = []

    def section(name: str, depth: int) -> None:
        nodes, adapters = counts[name][0], len(counts[name][1])
        label = name or type(gm).__name__
        opened = depth <= 1 or (name in first_blocks) or (name + ".0" in blocks)
        if name in blocks:
            stats = blocks[name].summary()
        else:
            stats = f"{adapters} adapter{'s' if adapters != 1 else ''}" if adapters else ""
        head = (f'<b>{esc(label)}</b>' + (f' <span class="t">{esc(types[name])}</span>' if name in types else "")
                + f' <span class="c">{nodes} node{"s" if nodes != 1 else ""}' + (f", {stats}" if stats else "")
                + "</span>")
        if name in blocks:
            head += ":" + "".join(site_span(s) for s in blocks[name].sites)
        elif name in sites:
            head += site_span(sites[name])
        out.append(f'<details id="m-{esc(name or "root")}"{" open" if opened else ""}><summary>{head}</summary>')
        for entry in sorted(children[name], key=lambda e: first[e] if isinstance(e, str) else key[e]):
            if isinstance(entry, str):
                section(entry, depth + 1)
            else:
                text, meta = node_parts(entry)
                out.append(f'<div class="n {_css_class(entry)}" id="n-{entry.name}">{esc(text)}'
                           + (f'  <span class="m"># {esc(meta)}</span>' if meta else "") + "</div>")
        out.append("</details>")

    section("", 0)
    adapters_total = len({r.site for n in gm.graph.nodes for r in _adapters(n)})
    placed = any(get_record(n, PlacementRecord) is not None for n in gm.graph.nodes)
    legend = ([("rram", "RRAM crossbars"), ("sram", "SRAM (adapters)"), ("host", "digital host")] if placed else
              [("lora", "LoRA adapter"), ("dropout", "dropout"), ("io", "input/output"), ("op", "op"),
               ("attr", "get_attr")])
    title = title or f"{type(gm).__name__}: {len(gm.graph.nodes)} nodes, {adapters_total} LoRA adapters"
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{_HTML_CSS}</style><script>{_HTML_JS}</script></head><body>\n"
            f"<h1>{esc(title)}</h1>\n<p class=\"note\">Every node once, in the section of the module it came "
            "from (click a heading to fold or unfold it); a numbered block's heading lists its adapter sites "
            "with their ranks" + (" and the parts they run on" if placed else "") + ". "
            "<code>graph_report()</code> prints the same nodes in execution order.</p>\n"
            "<p><button onclick=\"setAll(true)\">unfold all</button><button onclick=\"setAll(false)\">fold all"
            "</button> <span class=\"legend\">"
            + "".join(f'<span class="{c}">&#9632; {t}</span>' for c, t in legend) + "</span></p>\n"
            + "\n".join(out) + "\n</body></html>\n")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
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
