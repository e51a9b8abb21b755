"""RecomputeInputs: adapters rebuild their input in backward instead of keeping it alive.

A LoRA adapter needs its input x in backward (dA = s·(dy B)ᵀ x), so
``lora_linear`` saves x.  The frozen model saves no linear inputs at all: in a
LLaMA layer x is the RMSNorm output (q/k/v, gate/up) or ``silu(gate) * up``
(down_proj), tensors nobody else keeps.  But their producers' own backward
keeps what is needed to rebuild them: ``mul(h, rsqrt)`` saves h and rsqrt,
``mul(silu, up)`` saves both factors.  This pass rewrites each such
``lora_linear`` into ``lora_linear_recompute`` (lorafx/dialect/recompute.py), which saves
those tensors (already alive, so no new memory) instead of x and rebuilds
``x = recipe(sources)`` in backward with the very same ATen ops -- one or two
elementwise kernels, so the result is bit-identical.

How a recipe is found.  From x, the pass walks back through cheap ops
(``lorafx.dialect.recipe.RECIPE_OPS``: elementwise maps, casts, views with constant
sizes) until every leaf is *free*: a parameter or buffer, or a tensor that an
autograd node upstream of x saves anyway (the rules in ``_saved_inputs``:
``mul`` saves each factor when the other needs a gradient, ``silu``/``gelu``/
``pow``/``layer_norm`` their input, ``rsqrt``/``sigmoid``/``tanh``/SDPA their
output, ...).  Only saves by nodes on x's gradient path count, so the sources
stay alive until the adapter's backward has run.  The rewrite is made for all
adapters reading one x together, and only when nothing else saves x (through a
view or not): otherwise x stays alive and recomputing would buy nothing.
``info["kept"]`` says why an adapter input was left alone (layer 0's q/k/v
read the frozen embedding's output, which nobody saves, so they keep x).

Measured (tools/bench_train_step.py, LLaMA 4 x 512 / 1376, batch 4 x 256, r=8): the
step's saved tensors fall from 185.5 to 150.0 MB and peak memory over the frozen floor
from +41.1 to +5.6 MB (PEFT: +37.9); with CausalMaskToIsCausal +1.6 MB.  Time: the
recipes (5 norm rebuilds and one mul per layer) cost ~1-2% of the step in 1-thread
CPU time (noisy); FuseSiblings shares one rebuild per q/k/v and gate/up group.

Requires: ``"lora"``.  Provides: ``"recompute_inputs"``.
Preserves: outputs and gradients, bit for bit (same kernels on the same values).

Before::

    %mul_3 = call_function[target=aten.mul.Tensor](args=(%h, %rsqrt))
    %to_7 = call_function[target=aten.to.dtype](args=(%mul_3, torch.float32))
    %x = call_function[target=aten.mul.Tensor](args=(%norm_w, %to_7))
    %q_lora = call_function[target=lorafx.lora_linear.default](args=(%x, %w, None, %A, %B, 2.0, None, 0.0, 'f1b1'))

After::

    %q_lora = call_function[target=lorafx.lora_linear_recompute.default](
        args=(%x, %w, None, %A, %B, 2.0, None, 0.0, 'f1b1',
              'aten.mul.Tensor(s0, aten.to.dtype(aten.mul.Tensor(s1, s2), torch.float32))', [%norm_w, %h, %rsqrt]))
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Set

import torch
import torch.fx

from lorafx.context import CompileContext
from lorafx.dialect import LINEAR, RECOMPUTE, kind_of, owner_of
from lorafx.dialect.recipe import RECIPE_OPS, compile_recipe, recipe_op_name
from lorafx.graph_utils import get_attr
from lorafx.meta import LoraRecord, get_record
from lorafx.pipeline import Pass, PassResult

__all__ = ["RecomputeInputs", "requires_grad_flags", "find_recipe"]

aten = torch.ops.aten

# Ops whose output shares its input's storage (a saved view keeps the base alive).
_VIEW_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.default, aten.t.default, aten.alias.default, aten.detach.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.unflatten.int, aten.flatten.using_ints,
    aten.as_strided.default, aten.to.dtype, aten.contiguous.default, operator.getitem,
}
# Ops that save nothing a recipe could use and nothing that keeps x alive.
_SAVE_NOTHING = {
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.neg.default, aten.to.dtype,
    aten._to_copy.default, aten.clone.default, aten.mean.dim, aten.sum.dim_IntList, aten.sum.default,
    aten.cat.default, aten.stack.default, aten.mul.Scalar, aten.div.Scalar, aten.dropout.default,
    aten._assert_tensor_metadata.default, aten.sym_size.int, aten.pad.default,
} | (_VIEW_OPS - {operator.getitem})
# Ops that save (some of) their tensor inputs whenever their output needs a gradient.
_SAVE_INPUT = {
    aten.silu.default: (0,), aten.gelu.default: (0,), aten.pow.Tensor_Scalar: (0,), aten.layer_norm.default: (0, 2, 3),
    aten.rms_norm.default: (0, 2), aten.embedding.default: (1,), aten.log_softmax.int: (), aten.softmax.int: (),
    aten.scaled_dot_product_attention.default: (0, 1, 2, 3), aten.cross_entropy_loss.default: (0, 1),
}
# Products: each factor is saved when the other one needs a gradient ({op: (i, j)}).
_PRODUCTS = {
    aten.mul.Tensor: (0, 1), aten.linear.default: (0, 1), aten.mm.default: (0, 1), aten.matmul.default: (0, 1),
    aten.bmm.default: (0, 1), aten.addmm.default: (1, 2),
}
# Ops whose backward reads their own output.
_SAVE_OUTPUT = {
    aten.rsqrt.default, aten.sigmoid.default, aten.tanh.default, aten.exp.default, aten.relu.default,
    aten.softmax.int, aten.log_softmax.int, aten.scaled_dot_product_attention.default,
}


def requires_grad_flags(gm: torch.fx.GraphModule, inputs_require_grad: bool = False) -> Dict[torch.fx.Node, bool]:
    """Whether each node's value (may) need a gradient: parameters per ``requires_grad``,
    float graph inputs per ``inputs_require_grad``, float op results with such an input."""
    flags: Dict[torch.fx.Node, bool] = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        floating = isinstance(val, torch.Tensor) and (val.is_floating_point() or val.is_complex())
        if node.op == "placeholder":
            flags[node] = inputs_require_grad and floating
        elif node.op == "get_attr":
            try:
                v = get_attr(gm, node.target)
            except AttributeError:
                v = None
            flags[node] = isinstance(v, torch.Tensor) and v.requires_grad
        elif node.op == "call_function":
            if node.target is aten.detach.default or (kind_of(node) is None and owner_of(node) is not None):
                flags[node] = False  # detach, and a LoRA kind's helper ops (the dropout mask)
            elif isinstance(val, torch.Tensor) and not floating:
                flags[node] = False
            else:
                flags[node] = any(flags.get(a, False) for a in node.all_input_nodes)
        else:
            flags[node] = False
    return flags


def _saved_inputs(node: torch.fx.Node, rg) -> Optional[Set[torch.fx.Node]]:
    """The input nodes ``node``'s autograd saves (None: unknown op)."""
    if node.op != "call_function":
        return set()
    if not rg.get(node, False):
        return set()  # no autograd node, nothing saved
    t = node.target
    kind = kind_of(node)
    if kind is not None:  # a LoRA op: its kind knows what it saves
        return kind.saved_inputs(node)
    if t in _PRODUCTS or t is aten.div.Tensor:
        i, j = _PRODUCTS.get(t, (0, 1))
        a, b = node.args[i], node.args[j]
        out = set()
        if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
            if rg.get(b, False):
                out.add(a)
            if rg.get(a, False) or t is aten.div.Tensor:
                out.add(b)
        elif t is aten.div.Tensor and isinstance(b, torch.fx.Node):
            out.add(b)
        return out
    if t in _SAVE_INPUT:
        return {node.args[i] for i in _SAVE_INPUT[t] if i < len(node.args) and isinstance(node.args[i], torch.fx.Node)}
    if t in _SAVE_NOTHING or t in _SAVE_OUTPUT:
        return set()
    return None


def _saves_output(node: torch.fx.Node, rg) -> bool:
    return node.op == "call_function" and node.target in _SAVE_OUTPUT and rg.get(node, False)


def _grad_ancestors(x: torch.fx.Node, rg) -> Set[torch.fx.Node]:
    """Nodes upstream of ``x`` along edges that carry a gradient (their backward runs after x's consumers')."""
    seen, stack = set(), [x]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes if rg.get(a, False))
    return seen


def _savers_of(node: torch.fx.Node, rg, skip: Set[torch.fx.Node]) -> List[str]:
    """Nodes (other than ``skip``) whose autograd keeps ``node``'s storage alive, following views.
    Unknown ops count as savers."""
    out = []
    for user in node.users:
        if user in skip:
            continue
        saved = _saved_inputs(user, rg)
        if saved is None or node in saved:
            out.append(user.name)
        if user.op == "call_function" and user.target in _VIEW_OPS:
            out.extend(_savers_of(user, rg, skip))
    return out


class _RecipeBuilder:
    def __init__(self, gm, rg, x: torch.fx.Node, max_ops: int):
        self.gm, self.rg, self.max_ops = gm, rg, max_ops
        self.anc = _grad_ancestors(x, rg)
        self.sources: List[torch.fx.Node] = []
        self.ops = 0

    def free(self, node: torch.fx.Node) -> bool:
        if node.op == "get_attr":
            return True
        if _saves_output(node, self.rg):
            return True
        for user in node.users:
            if user in self.anc:
                saved = _saved_inputs(user, self.rg)
                if saved and node in saved:
                    return True
        return False

    def leaf(self, node) -> str:
        if node not in self.sources:
            self.sources.append(node)
        return f"s{self.sources.index(node)}"

    def build(self, node: torch.fx.Node, top: bool = False) -> Optional[str]:
        if not top and self.free(node):
            return self.leaf(node)
        if node.op != "call_function" or node.target not in RECIPE_OPS or self.ops >= self.max_ops:
            return None
        self.ops += 1
        parts = []
        for a in node.args:
            text = self.arg(a)
            if text is None:
                return None
            parts.append(text)
        for k, v in node.kwargs.items():
            text = self.arg(v)
            if text is None:
                return None
            parts.append(f"{k}={text}")
        return f"{recipe_op_name(node.target)}({', '.join(parts)})"

    def arg(self, a) -> Optional[str]:
        if isinstance(a, torch.fx.Node):
            if not isinstance(a.meta.get("val"), torch.Tensor):
                return None  # a symbolic size: not expressible as a constant
            return self.build(a)
        if isinstance(a, (list, tuple)):
            items = [self.arg(v) for v in a]
            return None if any(i is None for i in items) else f"[{', '.join(items)}]"
        if a is None or isinstance(a, (bool, int, float)):
            return repr(a)
        if isinstance(a, (torch.dtype, torch.memory_format)):
            return str(a)
        return None


def find_recipe(gm: torch.fx.GraphModule, x: torch.fx.Node, rg, max_ops: int = 6):
    """``(recipe, sources)`` rebuilding ``x`` from free tensors, or None."""
    b = _RecipeBuilder(gm, rg, x, max_ops)
    text = b.build(x, top=True)
    if text is None:
        return None
    compile_recipe(text)  # always parses: the builder only emits the recipe language
    return text, list(b.sources)


@dataclass(frozen=True)
class RecomputeInputs(Pass):
    max_ops: int = 6  # longest recipe (ops recomputed per adapter input)
    inputs_require_grad: bool = False  # treat float graph inputs as needing gradients

    requires = frozenset({"lora"})
    provides = frozenset({"recompute_inputs"})
    invalidates = frozenset({"cost"})

    def validate(self) -> None:
        if not isinstance(self.max_ops, int) or self.max_ops < 1:
            raise ValueError(f"RecomputeInputs: max_ops must be a positive int, got {self.max_ops!r}")

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        rg = requires_grad_flags(gm, self.inputs_require_grad)
        groups: Dict[torch.fx.Node, List[torch.fx.Node]] = {}
        for node in gm.graph.nodes:
            if kind_of(node) is LINEAR and not LINEAR.keeps_xa(node) and isinstance(LINEAR.input(node), torch.fx.Node):
                groups.setdefault(LINEAR.input(node), []).append(node)
        rewritten, kept, recipes = 0, {}, {}
        for x, loras in groups.items():
            reason = self._why_not(gm, x, loras, rg)
            if reason is None:
                found = find_recipe(gm, x, rg, self.max_ops)
                if found is None:
                    reason = "no recipe from tensors saved anyway"
            if reason is not None:
                for n in loras:
                    kept[n.name] = reason
                continue
            recipe, sources = found
            for n in loras:
                RECOMPUTE.adopt(n, recipe, sources)
                rewritten += 1
            recipes[x.name] = {"recipe": recipe, "sources": [s.name for s in sources],
                               "adapters": [n.name for n in loras]}
        return PassResult(gm, rewritten > 0, {"rewritten": rewritten, "inputs": len(recipes), "recipes": recipes,
                                              "kept": kept})

    def _why_not(self, gm, x, loras, rg) -> Optional[str]:
        if not rg.get(x, False):
            return "x needs no gradient (nothing upstream saves tensors for it)"
        for n in loras:
            rec = get_record(n, LoraRecord)
            if rec is not None and rec.merged:
                return "merged"
        others = _savers_of(x, rg, set(loras))
        if others:
            return f"x is saved anyway by {', '.join(sorted(set(others))[:3])}"
        return None
