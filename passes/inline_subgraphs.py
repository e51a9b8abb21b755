"""InlineGradModeRegions: inline torch.export's set-grad-enabled subgraphs.

torch.export wraps code run under ``torch.no_grad()`` (transformers' rotary
embedding) in a ``wrap_with_set_grad_enabled`` higher-order op calling a
submodule.  torch.compile with dynamic shapes refuses that op ("unexpected
freevars"), later passes cannot see inside it, and an exception inside it can
leave grad mode off.  This pass copies each such subgraph into the main graph.

Requires: a captured graph.  Provides: ``"inlined"``.
Preserves: outputs and gradients.  A region is inlined as plain nodes when none of
its inputs can require grad (so grad mode cannot change its result); otherwise the
region is bracketed by ``torch._C._set_grad_enabled`` calls that restore the mode.

Before::

    %submod_3 = get_attr[target=submod_3]
    %wrap = call_function[target=higher_order.wrap_with_set_grad_enabled](args=(False, %submod_3, %pos, %inv_freq))
    %cos = call_function[target=operator.getitem](args=(%wrap, 0))

After::

    %matmul = call_function[target=aten.matmul.default](args=(%inv_freq_expanded, %pos_expanded))
    ...
    %cos = call_function[target=aten.cos.default](args=(%cat,))
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from lorafx.context import CompileContext
from lorafx.graph_utils import get_attr
from lorafx.pipeline import CAPTURED, Pass, PassResult

__all__ = ["InlineGradModeRegions"]

_WRAP = torch.ops.higher_order.wrap_with_set_grad_enabled


def _may_require_grad(gm: torch.fx.GraphModule, node) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "get_attr":
        value = get_attr(gm, node.target)
        return isinstance(value, torch.Tensor) and value.requires_grad
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.is_floating_point() or val.is_complex()
    return False


@dataclass(frozen=True)
class InlineGradModeRegions(Pass):
    requires = frozenset({CAPTURED})
    provides = frozenset({"inlined"})
    invalidates = frozenset({"cost"})

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        count = 0
        for node in list(gm.graph.find_nodes(op="call_function", target=_WRAP)):
            enabled, sub_node, *operands = node.args
            sub = get_attr(gm, sub_node.target)
            guard = any(_may_require_grad(gm, a) for a in operands)
            g = gm.graph
            with g.inserting_before(node):
                if guard:
                    prev = g.call_function(torch.is_grad_enabled, ())
                    g.call_function(torch._C._set_grad_enabled, (enabled,))
                env = {}
                placeholders = iter(operands)
                outputs = None
                for inner in sub.graph.nodes:
                    if inner.op == "placeholder":
                        env[inner] = next(placeholders)
                    elif inner.op == "output":
                        outputs = torch.fx.node.map_arg(inner.args[0], lambda n: env[n])
                    elif inner.op == "get_attr":
                        raise NotImplementedError(f"{node.name}: subgraph reads attribute {inner.target!r}")
                    else:
                        env[inner] = g.node_copy(inner, lambda n: env[n])
                if guard:
                    g.call_function(torch._C._set_grad_enabled, (prev,))
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            for user in list(node.users):
                if user.target is operator.getitem:
                    user.replace_all_uses_with(outputs[user.args[1]])
                    g.erase_node(user)
                else:
                    raise NotImplementedError(f"{node.name} is used by {user.name} without getitem")
            g.erase_node(node)
            if not sub_node.users:
                g.erase_node(sub_node)
                if hasattr(gm, sub_node.target):
                    delattr(gm, sub_node.target)
            count += 1
        return PassResult(gm, count > 0, {"inlined_regions": count})
