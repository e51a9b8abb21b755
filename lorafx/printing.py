"""Printing a graph one node a line, with its lorafx records (``lorafx.meta.describe``).

``lorafx.inspect`` builds its diffs, drawings and dumps on these; they sit in the
spine so that the driver (``CompiledModel.graph_report``) can print graphs too.
"""
from __future__ import annotations

import torch
import torch.fx

from .meta import PlacementRecord, describe, get_record

__all__ = ["format_node", "node_parts", "format_graph", "node_target", "node_shape", "short_arg", "PLACEMENT_ANSI"]


def short_arg(a) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(short_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, float):
        return f"{a:g}"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    return repr(a) if isinstance(a, str) else str(a)


def node_target(node: torch.fx.Node) -> str:
    t = node.target
    if node.op == "call_function":
        name = getattr(t, "__name__", str(t))
        if isinstance(t, torch._ops.OpOverload):
            ns = t.namespace
            base = t._schema.name.split("::")[-1]
            name = f"{ns}.{base}" + ("" if t._overloadname == "default" else f".{t._overloadname}")
        return name
    return str(t)


def node_shape(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dims = ",".join(str(d) for d in val.shape)
        return f"{str(val.dtype).replace('torch.', '')}[{dims}]"
    return ""


def format_node(node: torch.fx.Node) -> str:
    """``%name: shape = target(args)  # lorafx records``."""
    text, meta = node_parts(node)
    return f"{text}  # {meta}" if meta else text


def node_parts(node: torch.fx.Node) -> tuple:
    """``format_node``'s two halves: (``%name: shape = target(args)``, the lorafx records or "")."""
    if node.op == "placeholder":
        body = f"input {node.target}"
    elif node.op == "output":
        body = f"return {short_arg(node.args[0])}"
    elif node.op == "get_attr":
        body = f"get_attr {node.target}"
    else:
        args = [short_arg(a) for a in node.args] + [f"{k}={short_arg(v)}" for k, v in node.kwargs.items()]
        body = f"{node_target(node)}({', '.join(args)})"
    shape = node_shape(node)
    text = f"%{node.name}" + (f": {shape}" if shape else "") + f" = {body}" if node.op != "output" else body
    return text, describe(node)


# ANSI colours of the parts a placed graph runs on (PartitionToTargets' PlacementRecord)
PLACEMENT_ANSI = {"rram": "\033[33m", "sram": "\033[31m", "host": "\033[34m"}


def format_graph(gm: torch.fx.GraphModule, *, include_get_attr: bool = False, colour: bool = False) -> str:
    """The graph one node a line; ``colour``: each line in the colour of the part it is placed on
    (ANSI escapes: RRAM yellow, SRAM red, host blue), for a terminal."""
    lines = []
    for n in gm.graph.nodes:
        if include_get_attr or n.op != "get_attr":
            line = format_node(n)
            placed = get_record(n, PlacementRecord) if colour else None
            if placed is not None and placed.target in PLACEMENT_ANSI:
                line = f"{PLACEMENT_ANSI[placed.target]}{line}\033[0m"
            lines.append(line)
    return "\n".join(lines)
