"""The ``lora_parameter`` kind: a LoRA adapter on a bare ``nn.Parameter`` (PEFT's ``target_parameters``).

``torch.ops.lorafx.lora_parameter(weight, lora_A, lora_B, scale)``
    Schema: ``lorafx::lora_parameter(Tensor weight, Tensor lora_A, Tensor lora_B, float scale) -> Tensor``.
    out = W + scale * B A: the adapted parameter itself, which replaces every read of the
    parameter in the graph (a parameter used directly, as in ``x @ self.weight``, or an expert
    weight of a mixture-of-experts layer, has no layer lorafx could rewrite, so the parameter
    is adapted where it is read, as PEFT's ``ParamWrapper`` does with a parametrization).
    For a 2-d parameter of shape (d0, d1), PEFT's layout: ``lora_A`` is (r, d1), ``lora_B``
    is (d0, r), whichever side the model multiplies with.  The delta is formed in the
    adapters' dtype and rounded to W's dtype before the add (PEFT's order).
    Backward saves only A and B: with G the gradient of the output, dA = s·Bᵀ G,
    dB = s·G Aᵀ, dW = G.  3-d (expert-stacked) parameters are refused when sites are found.

The cost is that of forming the merged parameter on every call (forward 2·d0·d1·r; the
backward's two products the same each), as in PEFT: the op does not know how the parameter
is used.

Kind: ``PARAMETER`` (name ``lora_parameter``, layer ``Parameter``).  Its sites come from the
``target_parameters`` option (``parameter_sites``; ``find_sites`` finds none, so
``target_modules`` never selects a bare parameter, as in PEFT).  The LoraRecord's ``site`` is
the module holding the parameter, ``weight`` the parameter's path.  Merged weight W + s·B A;
its base op is ``aten.alias(W)`` (the parameter read as it is); PEFT's keys are
``<module>.lora_A.weight`` / ``<module>.lora_B.weight``, as for a linear.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import sympy
import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from lorafx.graph_utils import Site, get_attr, node_module, safe_name
from lorafx.meta import LoraRecord, OriginRecord, get_record, set_record

from .registry import InputQuery, NodeCost, OpKind, create, register_kind

__all__ = ["lora_parameter", "lora_parameter_reference", "parameter_flops", "parameter_matches", "ParameterKind",
           "PARAMETER"]

aten = torch.ops.aten


# -- the op ----------------------------------------------------------------------------------------

def _checks(weight, lora_A, lora_B) -> None:
    torch._check(weight.dim() == 2, lambda: "lora_parameter: weight must be 2-d (d0, d1)")
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == weight.shape[1],
                 lambda: "lora_parameter: lora_A must be (r, d1) for a (d0, d1) weight")
    torch._check(lora_B.dim() == 2 and lora_B.shape[0] == weight.shape[0],
                 lambda: "lora_parameter: lora_B must be (d0, r) for a (d0, d1) weight")
    torch._check(lora_A.shape[0] == lora_B.shape[1], lambda: "lora_parameter: lora_A and lora_B disagree on r")


@torch.library.custom_op("lorafx::lora_parameter", mutates_args=())
def lora_parameter(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    _checks(weight, lora_A, lora_B)
    if lora_A.dtype != weight.dtype:  # the delta in the adapters' dtype, rounded to W's, then added
        return weight + torch.mm(lora_B, lora_A).mul_(scale).to(weight.dtype)
    return torch.addmm(weight, lora_B, lora_A, alpha=scale)


@lora_parameter.register_fake
def _(weight, lora_A, lora_B, scale):
    _checks(weight, lora_A, lora_B)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    weight, lora_A, lora_B, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(lora_A, lora_B)  # never W, never the output


def _backward(ctx, grad):
    lora_A, lora_B = ctx.saved_tensors
    need_w, need_a, need_b = ctx.needs_input_grad[:3]
    s = ctx.scale
    g = grad.to(lora_A.dtype) if grad.dtype != lora_A.dtype else grad
    da = lora_B.t().mm(g).mul_(s) if need_a else None  # s Bᵀ G, (r, d1)
    db = lora_A.mm(g.t()).mul_(s).t().contiguous() if need_b else None  # s G Aᵀ, formed as (r, d0)
    return (grad if need_w else None), da, db, None


lora_parameter.register_autograd(_backward, setup_context=_setup)


def parameter_flops(d0, d1, r, *, need_a: bool = True, need_b: bool = True):
    """(forward, backward) matrix-product FLOPs of ``lora_parameter`` (2 per multiply-add):
    forward B A, 2·d0·d1·r; backward Bᵀ G and G Aᵀ, 2·d0·d1·r each."""
    unit = 2 * d0 * d1 * r
    return unit, (unit if need_a else 0) + (unit if need_b else 0)


@register_flop_formula(torch.ops.lorafx.lora_parameter)
def _forward_flops(w_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return int(parameter_flops(w_shape[0], w_shape[1], a_shape[0])[0])


def lora_parameter_reference(weight, lora_A, lora_B, scale):
    """Plain-autograd definition of ``lora_parameter`` (PEFT's ParamWrapper), for tests."""
    return weight + (scale * (lora_B @ lora_A)).to(weight.dtype)


# -- matching PEFT's target_parameters ---------------------------------------------------------------

def parameter_matches(path: str, names: Sequence[str]) -> bool:
    """PEFT's rule for ``target_parameters``: a parameter ``module.name`` is targeted when it
    equals an item or ends with ``"." + item`` (no regex)."""
    return any(path == n or path.endswith("." + n) for n in names)


# -- the kind --------------------------------------------------------------------------------------

OP = torch.ops.lorafx.lora_parameter.default


class ParameterKind(OpKind):
    """``lora_parameter``: W + s·B A, the adapted parameter, read where W was read.

    Requires a LoraRecord on the node.  Provides InsertLoRA's hooks (``parameter_sites``
    from ``target_parameters``, ``adapter_init``, ``insert``), MergeLoRA's (``base_op``:
    ``aten.alias(W)``, ``merged_weight``, ``unmerge``), PEFT's keys and its cost.  Not
    scheduled.
    """

    name = "lora_parameter"
    own_records = True
    layer = "Parameter"
    ops = (OP,)

    def input(self, node):
        return self.view(node).weight

    def saved_inputs(self, node) -> set:
        v = self.view(node)
        return {a for a in (v.lora_A, v.lora_B) if isinstance(a, torch.fx.Node)}

    def cost(self, node, q: InputQuery) -> NodeCost:
        v = self.view(node)
        rec = get_record(node, LoraRecord)
        w, a = q.shape(v.weight), q.shape(v.lora_A)
        d0, d1 = (w[0], w[1]) if w is not None else (rec.out_features, rec.in_features)
        r = a[0] if a is not None else rec.r
        fwd, bwd = parameter_flops(d0, d1, r, need_a=q.needs_grad(v.lora_A), need_b=q.needs_grad(v.lora_B))
        return NodeCost(sympy.sympify(fwd), sympy.sympify(bwd), sympy.sympify(d0 * d1))  # the add

    # InsertLoRA -----------------------------------------------------------------------------
    def find_sites(self, gm: torch.fx.GraphModule) -> list:
        """None: a bare parameter is adapted only when ``target_parameters`` names it
        (``parameter_sites``), never through ``target_modules``."""
        return []

    def parameter_sites(self, gm: torch.fx.GraphModule, names: Sequence[str], where: str = "InsertLoRA") -> list:
        """The sites of the parameters ``names`` selects (PEFT's rule, ``parameter_matches``),
        one per read (get_attr node) of each, in graph order.  Raises, naming the parameter and
        the fix, for a parameter that is not 2-d, one on the top-level module, one read outside
        the module that holds it, two targeted parameters on one module, or names matching none."""
        if not names:
            return []
        params = dict(gm.named_parameters(remove_duplicate=False))
        chosen = [p for p in params if parameter_matches(p, names)]
        if not chosen:
            shown = ", ".join(list(params)[:30]) + (f", ... ({len(params)} in all)" if len(params) > 30 else "")
            raise ValueError(f"{where}: target_parameters={list(names)!r} matched no parameter (PEFT's rule: a "
                             f"parameter's full name equals an item or ends with '.' + an item). Parameters of "
                             f"this model: {shown or 'none'}")
        owners: Dict[str, str] = {}
        sites = []
        for path in chosen:
            module, _, pname = path.rpartition(".")
            value = params[path]
            if not module:
                raise ValueError(f"{where}: target_parameters names {path!r}, a parameter of the top-level model; "
                                 "PEFT cannot target those (its adapters live in a submodule), so lorafx does not "
                                 "either: move the parameter into a submodule")
            if value.dim() != 2:
                raise ValueError(f"{where}: target_parameters names {path!r} of shape {tuple(value.shape)}; lorafx "
                                 "adapts 2-d parameters only (3-d expert-stacked parameters and 1-d ones are not "
                                 "supported): leave it out of target_parameters")
            if module in owners:
                raise ValueError(f"{where}: target_parameters names two parameters of {module!r} ({owners[module]!r} "
                                 f"and {pname!r}); PEFT nests one wrapper per parameter, which lorafx does not "
                                 "reproduce: target one parameter per module")
            owners[module] = pname
            reads = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == path]
            for read in reads:
                outside = [u for u in read.users if not _inside(node_module(u), module)]
                if outside:
                    raise ValueError(
                        f"{where}: {path!r} (target_parameters) is also read outside {module!r}, by "
                        f"{node_module(outside[0]) or outside[0].name!r}; PEFT adapts it only inside the module "
                        "that holds it and a merged adapter would change the other reader too: leave it out of "
                        "target_parameters, or give the other reader its own parameter")
                if not read.users:
                    continue
                sites.append(Site(node=read, module=module, x=None, weight=read, bias=None, weight_transposed=False,
                                  in_features=int(value.shape[1]), out_features=int(value.shape[0]),
                                  kind=self.name, layer=self.layer, extra={"parameter": pname}))
        if not sites:
            raise ValueError(f"{where}: target_parameters={list(names)!r} names {chosen}, which the captured graph "
                             "never reads under that name (unused, or tied to another parameter that is read "
                             "instead); nothing would be adapted: name a parameter the forward reads")
        return sites

    def adapter_init(self, site, r: int, init) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        """PEFT's ParamWrapper init, as for a linear: A (r, d1) drawn by ``init``, B (d0, r) = 0."""
        return {"lora_A": ((r, site.in_features), init), "lora_B": ((site.out_features, r), "zeros")}

    def build(self, graph: torch.fx.Graph, weight, record: LoraRecord, *, created_by: str,
              name: Optional[str] = None) -> torch.fx.Node:
        """A new ``lora_parameter`` node for ``record`` (before the insertion point), with its
        A/B get_attrs and its Origin and Lora records."""
        a, b = graph.get_attr(record.lora_A), graph.get_attr(record.lora_B)
        node = create(graph, OP, name=name or safe_name(record.weight) + "_lora", weight=weight, lora_A=a, lora_B=b,
                      scale=record.scale)
        set_record(node, OriginRecord(record.site, self.layer, created_by=created_by))
        set_record(node, record)
        return node

    def insert(self, gm: torch.fx.GraphModule, site, record: LoraRecord, x, *, train: bool,
               created_by: str) -> torch.fx.Node:
        """Put a ``lora_parameter`` node right after the parameter's read and give it every
        user of that read (the read itself stays: it is the op's input)."""
        g = gm.graph
        read = site.node
        users = list(read.users)
        first = min(users, key=_position(g))
        with g.inserting_before(first):
            new = self.build(g, read, record, created_by=created_by)
        if "val" in read.meta:
            new.meta["val"] = read.meta["val"]
        for key in ("nn_module_stack", "stack_trace"):
            if key in first.meta:
                new.meta[key] = first.meta[key]
        for user in users:
            user.replace_input_with(read, new)
        return new

    # MergeLoRA / UnmergeLoRA --------------------------------------------------------------------
    def base_op(self, graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
        """``aten.alias(W)``: the (merged) parameter read as it is, a node of its own so that
        it can carry the merged record."""
        return graph.call_function(aten.alias.default, (self.view(node).weight,))

    def merged_weight(self, root: torch.nn.Module, node: torch.fx.Node) -> torch.Tensor:
        """W + s·B A in W's dtype, computed in float32 or wider."""
        rec = get_record(node, LoraRecord)
        W = get_attr(root, rec.weight)
        acc = torch.promote_types(W.dtype, torch.float32)
        delta = torch.mm(get_attr(root, rec.lora_B).detach().to(acc), get_attr(root, rec.lora_A).detach().to(acc))
        return (W.detach().to(acc) + delta.mul_(rec.scale)).to(W.dtype)

    def unmerge(self, graph, base, record: LoraRecord, *, train: bool, created_by: str) -> torch.fx.Node:
        return self.build(graph, base.args[0], record, created_by=created_by)

    # PEFT's format -------------------------------------------------------------------------------
    def peft_tensors(self, record: LoraRecord) -> Dict[str, str]:
        return {f"{record.site}.lora_A.weight": record.lora_A, f"{record.site}.lora_B.weight": record.lora_B}


def _inside(module: str, owner: str) -> bool:
    return module == owner or module.startswith(owner + ".")


def _position(graph: torch.fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]


PARAMETER = register_kind(ParameterKind())
