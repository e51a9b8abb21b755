"""Helpers shared by passes: attribute paths and linear-site matching.

A *linear site* is one call of a frozen linear map in the captured graph, in any
of the forms torch.export produces:

    aten.linear(x, W, b?)                      nn.Linear
    aten.addmm(b, x, permute(W, [1, 0]))       nn.Linear after run_decompositions()
    aten.mm(x, permute(W, [1, 0]))             same, without bias
    aten.addmm(b, x, W)                        GPT-2 Conv1D (W stored as (in, out))
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Union

import torch
import torch.fx

from .meta import OriginRecord, get_record

aten = torch.ops.aten


def get_attr(root: torch.nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def owner_and_name(root: torch.nn.Module, path: str):
    """The module holding attribute ``path`` and the attribute's last name."""
    *parents, name = path.split(".")
    owner = root
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    return owner, name


def set_parameter(root: torch.nn.Module, path: str, value: torch.nn.Parameter) -> None:
    owner, name = owner_and_name(root, path)
    if name in owner._parameters or not hasattr(owner, name):
        owner.register_parameter(name, value)
    else:
        raise AttributeError(f"cannot register parameter {path!r}: a non-parameter attribute has that name")


def del_attr(root: torch.nn.Module, path: str) -> None:
    owner, name = owner_and_name(root, path)
    delattr(owner, name)


def node_module(node: torch.fx.Node) -> str:
    rec = get_record(node, OriginRecord)
    if rec is not None:
        return rec.module
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def safe_name(path: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", path)


@dataclass
class Site:
    """A layer an adapter can be put on, as an op kind found it (``OpKind.find_sites``).

    ``kind``: the name of the OpKind that adapts it; ``layer``: the layer type users know
    ("Linear", "Embedding", "Conv2d", ...: errors and reports); ``extra``: kind-specific
    facts (a convolution's stride and padding, an embedding's padding_idx, ...)."""

    node: torch.fx.Node  # the base op node (linear/addmm/mm, embedding, conv, ...)
    module: str  # dotted name of the module that owns it
    x: Optional[torch.fx.Node]  # the input the adapter reads
    weight: torch.fx.Node  # get_attr of the stored weight
    bias: Optional[torch.fx.Node]  # get_attr (or any node) of the bias
    weight_transposed: bool  # stored weight is (in, out)
    in_features: int
    out_features: int
    kind: str = "lora_linear"
    layer: str = "Linear"
    extra: dict = field(default_factory=dict)


LinearSite = Site  # a linear's site (kind "lora_linear")


def _as_get_attr(n) -> Optional[torch.fx.Node]:
    return n if isinstance(n, torch.fx.Node) and n.op == "get_attr" else None


def _transposed_get_attr(n) -> Optional[torch.fx.Node]:
    """W when ``n`` is permute(W, [1, 0]) or t(W) of a get_attr W."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function":
        return None
    if n.target is aten.t.default or (n.target is aten.permute.default and list(n.args[1]) == [1, 0]):
        return _as_get_attr(n.args[0])
    return None


def find_linear_sites(gm: torch.fx.GraphModule) -> List[LinearSite]:
    """Every linear map with a stored (get_attr) 2-d weight, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        x = w = b = None
        transposed = False
        if node.target is aten.linear.default:
            x, w = node.args[0], _as_get_attr(node.args[1])
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        elif node.target in (aten.addmm.default, aten.mm.default):
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            args = node.args if node.target is aten.mm.default else node.args[1:]
            b = node.args[0] if node.target is aten.addmm.default else None
            x = args[0]
            w = _transposed_get_attr(args[1])
            if w is None:
                w, transposed = _as_get_attr(args[1]), True
        if w is None:
            continue
        wt = get_attr(gm, w.target)
        if not isinstance(wt, torch.Tensor) or wt.dim() != 2:
            continue
        out_f, in_f = (wt.shape[1], wt.shape[0]) if transposed else (wt.shape[0], wt.shape[1])
        if b is not None:
            bval = b.meta.get("val") if isinstance(b, torch.fx.Node) else None
            if bval is not None and tuple(bval.shape) != (out_f,):
                continue  # addmm with a broadcast term that is not a bias
        sites.append(LinearSite(node, node_module(node), x, w, b, transposed, in_f, out_f))
    return sites


Patterns = Union[str, Sequence[str], None]


def module_matches(name: str, patterns: Patterns) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list
    matches a name equal to an item or ending with ``"." + item``."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def pattern_value(name: str, pattern: dict, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching the name's tail."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?(?:{key})$", name):
            return value
    return default


def unique(items: Iterable[str]) -> List[str]:
    return list(dict.fromkeys(items))


def retarget_devices(gm: torch.nn.Module, old: Union[str, torch.device], new: Union[str, torch.device]) -> int:
    """Replace every ``old`` device in the arguments of the nodes of ``gm``'s graph and of
    every graph module nested in it (export bakes the capture device into ``arange``,
    ``to``, ``_assert_tensor_metadata``, ...; also inside higher-order-op subgraphs).
    Returns how many nodes changed; the graphs are recompiled."""
    old, new = torch.device(old), torch.device(new)

    def swap(a):
        if isinstance(a, torch.device):
            return new if a == old else a
        if isinstance(a, (list, tuple)):
            return type(a)(swap(x) for x in a)
        if isinstance(a, dict):
            return {k: swap(v) for k, v in a.items()}
        return a

    changed = 0
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        touched = False
        for node in module.graph.nodes:
            args, kwargs = swap(node.args), swap(node.kwargs)
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                changed += 1
                touched = True
        if touched:
            module.recompile()
    return changed


def tensor_slots(module: torch.nn.Module):
    """Every parameter and buffer slot of ``module`` and its submodules, tied tensors at each
    of their paths: ``(path, owner, table, name, tensor)``, where ``table`` is the owner's
    ``_parameters`` or ``_buffers`` dict (assign ``table[name]`` to rebind the slot)."""
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for table in (owner._parameters, owner._buffers):
            for name, t in table.items():
                if t is not None:
                    yield (f"{prefix}.{name}" if prefix else name), owner, table, name, t
