"""The ``lora_embedding`` kind: one adapted ``nn.Embedding``.

``torch.ops.lorafx.lora_embedding(ids, weight, lora_A, lora_B, scale, padding_idx=-1)``
    Schema: ``lorafx::lora_embedding(Tensor ids, Tensor weight, Tensor lora_A, Tensor lora_B,
    float scale, int padding_idx=-1) -> Tensor``.
    y = W[ids] + scale * (A^T[ids]) B^T (Hu et al., arXiv 2106.09685, applied to an embedding
    table as PEFT's ``lora.Embedding`` does): the adapter is a lookup into A^T, then a
    product with B^T.  ``weight`` is (num_embeddings, dim), ``lora_A`` is (r, num_embeddings)
    and ``lora_B`` is (dim, r) (PEFT's ``lora_embedding_A`` / ``lora_embedding_B`` layout).
    ``padding_idx`` (>= 0, or -1 for none) is ``nn.Embedding``'s: the forward reads that row
    as any other, and no gradient flows into it (column ``padding_idx`` of dA is zero).
    Adapters in another dtype than W (``adapter_dtype=``) run in theirs, and the sum is
    rounded to W's dtype once (PEFT's order).
    Backward saves only ids, W, A and B: A^T[ids] is looked up again.  dA is formed as an
    ``index_add`` of s·(dy B)^T into an (r, num_embeddings) zero tensor, never through a
    dense (num_embeddings, dim) product; dB = s·dy^T (A^T[ids]).  ``ids`` has no gradient;
    W gets the dense embedding gradient when it asks for one.

Its fake kernel, autograd formula and FLOP formula (``FlopCounterMode``: forward 2·T·r·dim
for T ids) are here.  PEFT's embedding has no dropout (its ``lora_dropout`` is never applied
to an embedding), and neither has this op.  ``nn.Embedding``'s ``max_norm`` (which renormalises
W in place) and ``scale_grad_by_freq`` are refused when sites are found; ``sparse=True`` only
changes the layout of W's gradient (W is frozen), so it is accepted.

Kind: ``EMBEDDING`` (name ``lora_embedding``, layer ``Embedding``).  Each node carries a
``LoraRecord`` with ``in_features`` = num_embeddings and ``out_features`` = dim (its site's
``extra`` holds padding_idx); merged weight W + s·(B A)^T; no schedules (its two GEMMs have one
order); its base op is ``aten.embedding``.  PEFT's keys: ``<site>.lora_embedding_A`` and
``<site>.lora_embedding_B`` (no ``.weight``: PEFT keeps them as plain Parameters).
PEFT's init is the reverse of the linear one: A = 0 and B ~ N(0, 1).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from lorafx.graph_utils import Site, get_attr, node_module, safe_name
from lorafx.meta import LoraRecord, OriginRecord, get_record, set_record

from .registry import InputQuery, NodeCost, OpKind, create, register_kind, replace_node

__all__ = ["lora_embedding", "lora_embedding_reference", "embedding_flops", "EmbeddingKind", "EMBEDDING"]

aten = torch.ops.aten


# -- kernels ---------------------------------------------------------------------------------------

def _lookup_a(ids_flat: Tensor, lora_A: Tensor) -> Tensor:
    """A^T[ids]: the adapter's rank-r rows for the ids, shape (tokens, r)."""
    return lora_A.t().index_select(0, ids_flat)


def _forward(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    ids_flat = ids.reshape(-1)
    base = weight.index_select(0, ids_flat)  # W[ids], (tokens, dim)
    ea = _lookup_a(ids_flat, lora_A)  # (tokens, r)
    if lora_A.dtype != weight.dtype:  # adapters in their own dtype: the sum in theirs, rounded once
        y = torch.addmm(base.to(lora_A.dtype), ea, lora_B.t(), alpha=scale).to(weight.dtype)
    else:
        y = torch.addmm(base, ea, lora_B.t(), alpha=scale)
    return y.view(*ids.shape, weight.shape[1])


def _checks(ids, weight, lora_A, lora_B) -> None:
    torch._check(not ids.is_floating_point() and not ids.is_complex(),
                 lambda: "lora_embedding: ids must be an integer tensor")
    torch._check(weight.dim() == 2, lambda: "lora_embedding: weight must be (num_embeddings, dim)")
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == weight.shape[0],
                 lambda: "lora_embedding: lora_A must be (r, num_embeddings)")
    torch._check(lora_B.dim() == 2 and lora_B.shape[0] == weight.shape[1],
                 lambda: "lora_embedding: lora_B must be (dim, r)")
    torch._check(lora_A.shape[0] == lora_B.shape[1], lambda: "lora_embedding: lora_A and lora_B disagree on r")


# -- the op ----------------------------------------------------------------------------------------

@torch.library.custom_op("lorafx::lora_embedding", mutates_args=())
def lora_embedding(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                   padding_idx: int = -1) -> Tensor:
    _checks(ids, weight, lora_A, lora_B)
    return _forward(ids, weight, lora_A, lora_B, scale)


@lora_embedding.register_fake
def _(ids, weight, lora_A, lora_B, scale, padding_idx=-1):
    _checks(ids, weight, lora_A, lora_B)
    return weight.new_empty((*ids.shape, weight.shape[1]))


def _setup(ctx, inputs, output):
    ids, weight, lora_A, lora_B, scale, padding_idx = inputs
    ctx.scale, ctx.padding_idx = scale, padding_idx
    ctx.save_for_backward(ids, weight, lora_A, lora_B)  # never A^T[ids], never a (num, dim) tensor


def backward(dy, ids, weight, lora_A, lora_B, s: float, pad: int, need_w: bool, need_a: bool, need_b: bool):
    """(dW, dA, dB) of ``lora_embedding`` for the output gradient ``dy`` (None where not needed)."""
    ids_flat = ids.reshape(-1)
    dy2 = dy.reshape(-1, dy.shape[-1])
    dya = dy2.to(lora_A.dtype) if lora_A.dtype != dy2.dtype else dy2
    dw = da = db = None
    if need_w:  # the dense embedding gradient (W is frozen in a lorafx graph: rarely asked for)
        dw = dy2.new_zeros(weight.shape).index_add_(0, ids_flat, dy2)
        if pad >= 0:
            dw[pad].zero_()
    if need_a:
        z_t = F.linear(lora_B.t(), dya) if lora_B.shape[1] < 32 else dya.mm(lora_B).t()  # (dy B)^T, (r, tokens)
        da = lora_A.new_zeros(lora_A.shape).index_add_(1, ids_flat, z_t, alpha=s)  # s (dy B)^T scattered by id
        if pad >= 0:
            da[:, pad].zero_()
    if need_b:
        db = dya.t().mm(_lookup_a(ids_flat, lora_A)).mul_(s)  # s dy^T A^T[ids], (dim, r)
    return dw, da, db


def _backward(ctx, dy):
    ids, weight, lora_A, lora_B = ctx.saved_tensors
    _, need_w, need_a, need_b = ctx.needs_input_grad[:4]
    dw, da, db = backward(dy, ids, weight, lora_A, lora_B, ctx.scale, ctx.padding_idx, need_w, need_a, need_b)
    return None, dw, da, db, None, None


lora_embedding.register_autograd(_backward, setup_context=_setup)


def embedding_flops(tokens, dim, r, *, need_a: bool = True, need_b: bool = True):
    """(forward, backward) matrix-product FLOPs of ``lora_embedding`` (2 per multiply-add):
    forward A^T[ids] B^T, 2·T·r·dim; backward dy B for dA and dy^T A^T[ids] for dB, 2·T·r·dim
    each (the lookups and the index_add are not matrix products)."""
    unit = 2 * tokens * dim * r
    return unit, (unit if need_a else 0) + (unit if need_b else 0)


@register_flop_formula(torch.ops.lorafx.lora_embedding)
def _forward_flops(ids_shape, w_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return int(embedding_flops(math.prod(ids_shape), w_shape[1], a_shape[0])[0])


def lora_embedding_reference(ids, weight, lora_A, lora_B, scale, padding_idx=-1):
    """Plain-autograd definition of ``lora_embedding`` (PEFT's forward), for tests."""
    pad = None if padding_idx < 0 else padding_idx
    base = F.embedding(ids, weight, padding_idx=pad)
    delta = F.embedding(ids, lora_A.t(), padding_idx=pad) @ lora_B.t() * scale
    return (base + delta).to(weight.dtype)


# -- the kind --------------------------------------------------------------------------------------

OP = torch.ops.lorafx.lora_embedding.default


def _embedding_args(node: torch.fx.Node) -> Tuple:
    """(weight, ids, padding_idx, scale_grad_by_freq, sparse) of an ``aten.embedding`` node."""
    names = ("weight", "indices", "padding_idx", "scale_grad_by_freq", "sparse")
    defaults = (None, None, -1, False, False)
    values = list(node.args) + [node.kwargs.get(n, d) for n, d in zip(names[len(node.args):],
                                                                          defaults[len(node.args):])]
    return tuple(values)


class EmbeddingKind(OpKind):
    """``lora_embedding``: y = W[ids] + s·(Aᵀ[ids]) Bᵀ, one adapter on an ``nn.Embedding``.

    Requires a LoraRecord on the node.  Provides InsertLoRA's hooks (``find_sites``,
    ``adapter_init``, ``insert``), MergeLoRA's (``base_op``: ``aten.embedding``,
    ``merged_weight``: W + s·(B A)ᵀ, ``unmerge``), PEFT's keys (``peft_tensors``) and its
    cost.  Not scheduled, no canonical rewrite (the node is its own canonical form).
    """

    name = "lora_embedding"
    own_records = True
    layer = "Embedding"
    ops = (OP,)

    def input(self, node):
        return self.view(node).ids

    def saved_inputs(self, node) -> set:
        v = self.view(node)
        return {a for a in (v.ids, v.weight, v.lora_A, v.lora_B) if isinstance(a, torch.fx.Node)}

    def cost(self, node, q: InputQuery) -> NodeCost:
        v = self.view(node)
        rec = get_record(node, LoraRecord)
        w, a = q.shape(v.weight), q.shape(v.lora_A)
        dim = w[1] if w is not None else rec.out_features
        r = a[0] if a is not None else rec.r
        ids = q.shape(v.ids)
        tokens = 1
        for d in ids or ():
            tokens = tokens * d
        fwd, bwd = embedding_flops(tokens, dim, r, need_a=q.needs_grad(v.lora_A), need_b=q.needs_grad(v.lora_B))
        return NodeCost(sympy.sympify(fwd), sympy.sympify(bwd), sympy.sympify(tokens * dim))  # the add

    # InsertLoRA -----------------------------------------------------------------------------
    def find_sites(self, gm: torch.fx.GraphModule) -> list:
        """Every ``aten.embedding`` whose table is a stored (get_attr) 2-d weight, in graph
        order.  An embedding lorafx cannot adapt as PEFT does (``max_norm``,
        ``scale_grad_by_freq``) is a site too, so that naming it is refused with the reason
        (``refuse``) rather than as an unknown layer."""
        sites = []
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target is not aten.embedding.default:
                continue
            weight, ids, padding_idx, by_freq, _sparse = _embedding_args(node)
            if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
                continue
            table = get_attr(gm, weight.target)
            if not isinstance(table, torch.Tensor) or table.dim() != 2:
                continue
            renorm = any(u.target is aten.embedding_renorm_.default for d in weight.users
                         for u in ([d] + list(d.users)) if u.op == "call_function")
            num, dim = table.shape
            sites.append(Site(node=node, module=node_module(node), x=ids, weight=weight, bias=None,
                              weight_transposed=False, in_features=int(num), out_features=int(dim),
                              kind=self.name, layer=self.layer,
                              extra={"padding_idx": int(padding_idx if padding_idx is not None else -1),
                                     "max_norm": renorm, "scale_grad_by_freq": bool(by_freq)}))
        return sites

    def refuse(self, site) -> Optional[str]:
        """Why ``site`` cannot be adapted as PEFT adapts it, or None (InsertLoRA asks before it
        changes anything)."""
        if site.extra.get("max_norm"):
            return (f"{site.module} is an nn.Embedding with max_norm set: it renormalises its rows in place on "
                    "every call, which lorafx's frozen copy of the table cannot do; build the embedding without "
                    "max_norm (or leave it out of target_modules)")
        if site.extra.get("scale_grad_by_freq"):
            return (f"{site.module} is an nn.Embedding with scale_grad_by_freq=True, which lora_embedding does not "
                    "implement; build it with scale_grad_by_freq=False (or leave it out of target_modules)")
        return None

    def adapter_init(self, site, r: int, init) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        """PEFT's embedding init (the reverse of the linear one, whatever ``init``): A = 0 (r, num),
        B ~ N(0, 1) (dim, r)."""
        return {"lora_A": ((r, site.in_features), "zeros"), "lora_B": ((site.out_features, r), "normal")}

    def build(self, graph: torch.fx.Graph, ids, weight, record: LoraRecord, padding_idx: int, *, created_by: str,
              name: Optional[str] = None) -> torch.fx.Node:
        """A new ``lora_embedding`` node for ``record`` (before the insertion point), with its
        A/B get_attrs and its Origin and Lora records."""
        a, b = graph.get_attr(record.lora_A), graph.get_attr(record.lora_B)
        node = create(graph, OP, name=name or safe_name(record.site) + "_lora", ids=ids, weight=weight, lora_A=a,
                      lora_B=b, scale=record.scale, padding_idx=padding_idx)
        set_record(node, OriginRecord(record.site, self.layer, created_by=created_by))
        set_record(node, record)
        return node

    def insert(self, gm: torch.fx.GraphModule, site, record: LoraRecord, x, *, train: bool,
               created_by: str) -> torch.fx.Node:
        g = gm.graph
        with g.inserting_before(site.node):
            new = self.build(g, x, site.weight, record, site.extra.get("padding_idx", -1), created_by=created_by)
        replace_node(g, site.node, new)  # its users, provenance and value
        return new

    # MergeLoRA / UnmergeLoRA --------------------------------------------------------------------
    def base_op(self, graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
        v = self.view(node)
        return graph.call_function(aten.embedding.default, (v.weight, v.ids, v.padding_idx))

    def merged_weight(self, root: torch.nn.Module, node: torch.fx.Node) -> torch.Tensor:
        """W + s·(B A)ᵀ, (num_embeddings, dim), in W's dtype, computed in float32 or wider."""
        rec = get_record(node, LoraRecord)
        W = get_attr(root, rec.weight)
        acc = torch.promote_types(W.dtype, torch.float32)
        A = get_attr(root, rec.lora_A).detach().to(acc)
        B = get_attr(root, rec.lora_B).detach().to(acc)
        delta = torch.mm(A.t(), B.t()).mul_(rec.scale)  # (B A)^T = A^T B^T
        return (W.detach().to(acc) + delta).to(W.dtype)

    def unmerge(self, graph, base, record: LoraRecord, *, train: bool, created_by: str) -> torch.fx.Node:
        weight, ids, padding_idx, _, _ = _embedding_args(base)
        return self.build(graph, ids, weight, record, -1 if padding_idx is None else padding_idx,
                          created_by=created_by)

    # PEFT's format -------------------------------------------------------------------------------
    def peft_tensors(self, record: LoraRecord) -> Dict[str, str]:
        return {f"{record.site}.lora_embedding_A": record.lora_A, f"{record.site}.lora_embedding_B": record.lora_B}


EMBEDDING = register_kind(EmbeddingKind())
