"""The ``lora_conv`` kind: one adapted convolution (nn.Conv1d / Conv2d / Conv3d), PEFT's conv LoRA.

``torch.ops.lorafx.lora_conv(x, weight, bias, lora_A, lora_B, scale, stride, padding, dilation, groups, dropout_mask=None, dropout_p=0.0)``
    Schema: ``lorafx::lora_conv(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B,
    float scale, int[] stride, int[] padding, int[] dilation, int groups, Tensor? dropout_mask=None,
    float dropout_p=0.) -> Tensor``.

        y = conv(x, W, b; stride, padding, dilation, groups)
            + scale * conv1x1(conv(d(x), A; stride, padding, dilation), B; groups)

    with d(x) = x * mask / (1 - p) for a non-empty boolean ``dropout_mask`` (else x).  This is PEFT's
    ``lora._ConvNd``: ``lora_A`` is a convolution weight ``(r, in, *kernel)`` with the layer's kernel,
    stride and padding and no groups; ``lora_B`` is a 1x1 convolution weight ``(out, r / groups, 1, ...)``
    with the layer's groups (so r must be a multiple of groups, as PEFT requires).  PEFT builds A
    without the layer's dilation, which only gives an output of the layer's shape when the kernel is
    1 or the dilation is 1; InsertLoRA refuses the other (dilated) layers, as PEFT cannot run them,
    and the op applies the layer's dilation to A (the same thing on every layer it accepts).
    The input may be unbatched (``x`` one dim short), as torch's convolutions allow.

    Autograd saves only the inputs (x, W, A, B, the boolean mask): backward recomputes the rank-r
    intermediate ``conv(d(x), A)`` when B needs a gradient, and runs ``aten.convolution_backward``
    for the three convolutions (traceable: torch.compile sees the aten ops themselves).

Merging (``get_delta_weight`` in PEFT): for groups == 1 the adapter is one convolution with weight
``ΔW = scale * B ∘ A``: for a 1x1 kernel ``B[..., 0] @ A[..., 0]``; in general the composition of the
two convolutions, ``ΔW[o, i] = Σ_j B[o, j] A[j, i]`` at every kernel offset (PEFT computes the same
numbers as ``conv(A.transpose(0, 1), B).transpose(0, 1)``).  With groups > 1, A mixes every input
channel into each group's rank slice, so ΔW is dense while W is block-diagonal: it cannot be folded
into the layer's weight (PEFT refuses to merge it).  lorafx's ``merge()`` leaves such an adapter
running (``merge_problem``), ``merge_and_unload()`` writes it as plain aten convolutions
(``lower``), and ``merged_state_dict()`` refuses it (the source architecture has no place for it).

PEFT's ``lora_bias`` (B a 1x1 convolution with a bias b, so the adapter adds s·b to every output
position) needs no op argument: ``build`` feeds the bias argument with the layer's bias + s·b, shaped
(out,) (``with_lora_bias``, as the linear kind does), whose gradient is b's; MergeLoRA folds s·b into
the layer's bias (a layer without one gets one).

Kind: ``CONV`` (name ``"lora_conv"``; layers ``"Conv1d"``, ``"Conv2d"``, ``"Conv3d"``).  Not
scheduled (SelectSchedule leaves it alone); the passes that rewrite ``lora_linear`` (RecomputeInputs,
FoldLoRAIntoBase, FuseSiblings, ApplySparsity) ask for that kind and leave it alone too.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import sympy
import torch
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from lorafx.graph_utils import Site, get_attr, node_module, safe_name
from lorafx.meta import LoraRecord, OriginRecord, get_record, set_record

from .registry import InputQuery, NodeCost, OpKind, create, register_kind, replace_node

__all__ = ["lora_conv", "lora_conv_reference", "conv_delta_weight", "ConvKind", "CONV", "CONV_OPS", "conv_site_problem"]

aten = torch.ops.aten
_CONV = {3: torch.conv1d, 4: torch.conv2d, 5: torch.conv3d}
LAYERS = {3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}


def _conv(x: Tensor, w: Tensor, b: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    return _CONV[w.dim()](x, w, b, list(stride), list(padding), list(dilation), groups)


def _dropped(x: Tensor, mask: Optional[Tensor], p: float) -> Tensor:
    """d(x) = x * mask / (1 - p) for a non-empty mask, else x."""
    if mask is None or mask.numel() == 0:
        return x
    return x * mask * (1.0 / (1.0 - p))


def _ones(n: int) -> List[int]:
    return [1] * n


def forward(x, weight, bias, lora_A, lora_B, scale, stride, padding, dilation, groups, mask, p) -> Tensor:
    """The forward: the frozen convolution, then the adapter's two (A: the layer's geometry, no
    groups; B: 1x1 with the layer's groups), added with ``scale``.  Adapters in another dtype than
    x (``adapter_dtype=``) run in theirs and the sum is rounded back to x's once, as PEFT does."""
    n = weight.dim() - 2
    y = _conv(x, weight, bias, stride, padding, dilation, groups)
    mixed = lora_A.dtype != x.dtype
    xd = _dropped(x.to(lora_A.dtype) if mixed else x, mask, p)
    h = _conv(xd, lora_A, None, stride, padding, dilation, 1)
    z = _conv(h, lora_B, None, _ones(n), [0] * n, _ones(n), groups)
    if mixed:
        return torch.add(y.to(lora_A.dtype), z, alpha=scale).to(x.dtype)
    return y.add_(z, alpha=scale)


def backward(dy, x, weight, lora_A, lora_B, mask, scale, p, stride, padding, dilation, groups, needs):
    """(dx, dW, dbias, dA, dB), None where ``needs`` (five flags) says no gradient is needed: the
    convolutions' backward (``aten.convolution_backward``), with ``conv(d(x), A)`` recomputed only
    when B needs a gradient."""
    need_x, need_w, need_b, need_a, need_bb = needs
    n = weight.dim() - 2
    zeros, ones = [0] * n, _ones(n)
    unbatched = x.dim() == weight.dim() - 1
    if unbatched:
        x, dy = x.unsqueeze(0), dy.unsqueeze(0)
        mask = mask.unsqueeze(0) if mask is not None and mask.numel() else mask
    dx = dw = db = da = dbb = None
    if need_x or need_w or need_b:
        dx, dw, db = aten.convolution_backward(dy, x, weight, [weight.shape[0]] if need_b else None, list(stride),
                                               list(padding), list(dilation), False, zeros, groups,
                                               [need_x, need_w, need_b])
    if need_x or need_a or need_bb:
        mixed = lora_A.dtype != x.dtype
        xa = x.to(lora_A.dtype) if mixed else x
        dz = dy.to(lora_A.dtype) * scale if mixed else dy * scale
        xd = _dropped(xa, mask, p) if (need_a or need_bb) else xa  # (only its shape when A needs no gradient)
        if need_bb:
            h = _conv(xd, lora_A, None, stride, padding, dilation, 1)  # recomputed: rank-r, never saved
        else:  # convolution_backward reads only the shape of the input when no weight gradient is asked
            h = dz.new_empty((dz.shape[0], lora_A.shape[0], *dz.shape[2:]))
        need_h = need_x or need_a
        dh, dbb, _ = aten.convolution_backward(dz, h, lora_B, None, ones, zeros, ones, False, zeros, groups,
                                               [need_h, need_bb, False])
        del h
        if need_h:
            dxd, da, _ = aten.convolution_backward(dh, xd, lora_A, None, list(stride), list(padding), list(dilation),
                                                   False, zeros, 1, [need_x, need_a, False])
            if need_x:
                dxl = _dropped(dxd, mask, p)
                dx = dxl.to(x.dtype) if dx is None else dx.add_(dxl.to(dx.dtype))
    if unbatched and dx is not None:
        dx = dx.squeeze(0)
    return dx, dw, db, da, dbb


# -- the op ----------------------------------------------------------------------------------------

@torch.library.custom_op("lorafx::lora_conv", mutates_args=())
def lora_conv(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    dropout_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    return forward(x, weight, bias, lora_A, lora_B, scale, stride, padding, dilation, groups, dropout_mask,
                   dropout_p)


def _fake_checks(x, weight, lora_A, lora_B, groups):
    k = weight.dim()
    torch._check(k in (3, 4, 5), lambda: f"lora_conv: weight must be a conv1d/2d/3d weight, got {k} dims")
    torch._check(lora_A.dim() == k and lora_B.dim() == k, lambda: "lora_conv: lora_A and lora_B must have weight's dims")
    torch._check(tuple(lora_A.shape[2:]) == tuple(weight.shape[2:]), lambda: "lora_conv: lora_A must have the layer's kernel")
    torch._check(lora_A.shape[1] == weight.shape[1] * groups, lambda: "lora_conv: lora_A must be (r, in_channels, *kernel)")
    torch._check(lora_B.shape[0] == weight.shape[0], lambda: "lora_conv: lora_B must be (out_channels, r / groups, 1, ...)")
    torch._check(lora_B.shape[1] * groups == lora_A.shape[0], lambda: "lora_conv: lora_A and lora_B disagree on r")
    torch._check(all(d == 1 for d in lora_B.shape[2:]), lambda: "lora_conv: lora_B must be a 1x1 kernel")


@lora_conv.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, stride, padding, dilation, groups, dropout_mask=None, dropout_p=0.0):
    _fake_checks(x, weight, lora_A, lora_B, groups)
    return _conv(x, weight, bias, stride, padding, dilation, groups)


def _setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, stride, padding, dilation, groups, mask, p = inputs
    ctx.geometry = (list(stride), list(padding), list(dilation), groups)
    ctx.scale, ctx.p, ctx.has_bias = scale, p, bias is not None
    ctx.save_for_backward(x, weight, lora_A, lora_B, mask)  # the inputs only, never a copy of x


def _backward(ctx, dy):
    x, weight, lora_A, lora_B, mask = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    grads = backward(dy, x, weight, lora_A, lora_B, mask, ctx.scale, ctx.p, *ctx.geometry,
                     (need_x, need_w, need_b and ctx.has_bias, need_a, need_bb))
    return (*grads, None, None, None, None, None, None, None)


lora_conv.register_autograd(_backward, setup_context=_setup)


def _out_shape(x_shape, w_shape, stride, padding, dilation) -> Tuple[int, ...]:
    """(N, out, *spatial) of the layer's convolution (N = 1 for an unbatched input)."""
    n = len(w_shape) - 2
    batched = len(x_shape) == len(w_shape)
    spatial = x_shape[-n:]
    pick = lambda v, i: v[i] if len(v) > 1 else v[0]
    out = [(spatial[i] + 2 * pick(padding, i) - pick(dilation, i) * (w_shape[2 + i] - 1) - 1) // pick(stride, i) + 1
           for i in range(n)]
    return (x_shape[0] if batched else 1, w_shape[0], *out)


def conv_flops(x_shape, w_shape, a_shape, bb_shape, out_shape) -> Tuple[int, int, int]:
    """Forward FLOPs of the three convolutions (frozen layer, A, B), FlopCounterMode's count."""
    batched = list(x_shape) if len(x_shape) == len(w_shape) else [1, *x_shape]
    out = list(out_shape) if len(out_shape) == len(w_shape) else [1, *out_shape]
    h = [out[0], a_shape[0], *out[2:]]
    return (conv_flop_count(batched, list(w_shape), out), conv_flop_count(batched, list(a_shape), h),
            conv_flop_count(h, list(bb_shape), out))


@register_flop_formula(torch.ops.lorafx.lora_conv)
def _flops(x_shape, w_shape, b_shape, a_shape, bb_shape, *args, out_shape=None, **kwargs) -> int:
    return int(sum(conv_flops(x_shape, w_shape, a_shape, bb_shape, out_shape)))


def lora_conv_reference(x, weight, bias, lora_A, lora_B, scale, stride, padding, dilation, groups,
                        dropout_mask=None, dropout_p=0.0):
    """Plain-autograd definition of ``lora_conv`` (PEFT's ``_ConvNd`` forward), for tests."""
    n = weight.dim() - 2
    y = _conv(x, weight, bias, stride, padding, dilation, groups)
    h = _conv(_dropped(x, dropout_mask, dropout_p), lora_A, None, stride, padding, dilation, 1)
    return y + scale * _conv(h, lora_B, None, _ones(n), [0] * n, _ones(n), groups)


def conv_delta_weight(lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """scale · B ∘ A as one convolution weight (out, in, *kernel), for groups == 1: at every kernel
    offset, B[:, :, 0...] @ A[:, :, offset]."""
    B2 = lora_B.reshape(lora_B.shape[0], lora_B.shape[1])
    return (B2 @ lora_A.reshape(lora_A.shape[0], -1)).reshape(lora_B.shape[0], *lora_A.shape[1:]) * scale


# -- sites ------------------------------------------------------------------------------------------

CONV_OPS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
            aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default)


def _expand(v, n: int) -> Tuple[int, ...]:
    v = [v] if isinstance(v, int) else list(v)
    return tuple(int(a) for a in (v * n if len(v) == 1 else v))


def conv_geometry(node: torch.fx.Node, w_shape) -> Optional[dict]:
    """{stride, padding, dilation, groups} of an aten convolution node (None for a transposed one);
    ``padding`` is a tuple of ints, or the string the ``.padding`` overloads take."""
    n = len(w_shape) - 2
    v = {a.name: (node.args[i] if i < len(node.args) else node.kwargs.get(a.name, a.default_value))
         for i, a in enumerate(node.target._schema.arguments)}
    if node.target is aten.convolution.default:
        if v["transposed"]:
            return None
    padding = v["padding"]
    out = {"stride": _expand(v["stride"], n), "dilation": _expand(v["dilation"], n),
           "groups": int(v["groups"])}
    if isinstance(padding, str):
        kernel = w_shape[2:]
        if padding == "valid":
            padding = (0,) * n
        else:  # "same": torch pads d(k-1) in all, the odd one at the end
            total = [out["dilation"][i] * (kernel[i] - 1) for i in range(n)]
            if any(t % 2 for t in total):
                out["problem"] = ("its padding='same' pads one side more than the other (an even kernel), which "
                                  "PEFT's adapter convolution cannot reproduce")
            padding = tuple(t // 2 for t in total)
    out["padding"] = _expand(padding, n)
    return out


def conv_site_problem(e: dict) -> Optional[str]:
    """Why a convolution (its geometry ``e``, a site's ``extra``) cannot get PEFT's conv LoRA (None when it can)."""
    if e.get("problem"):
        return e["problem"]
    if any(d != 1 for d in e["dilation"]) and any(k != 1 for k in e["kernel"]):
        return (f"it is dilated (dilation={list(e['dilation'])}, kernel {list(e['kernel'])}): PEFT builds the "
                "adapter's first convolution without the dilation, so its output does not have the layer's shape "
                "(PEFT fails in forward)")
    if e.get("pre_padded"):
        return ("it pads its input itself (padding_mode other than 'zeros'), while PEFT's adapter convolution "
                "zero-pads the unpadded input")
    return None


def find_conv_sites(gm: torch.fx.GraphModule) -> list:
    """Every convolution with a stored (get_attr) weight, in graph order, as ``Site``s of kind
    ``lora_conv`` (transposed convolutions are not sites: PEFT does not adapt them)."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in CONV_OPS:
            continue
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
            continue
        wt = get_attr(gm, w.target)
        if not isinstance(wt, torch.Tensor) or wt.dim() not in LAYERS:
            continue
        geo = conv_geometry(node, tuple(wt.shape))
        if geo is None:
            continue
        module = node_module(node)
        geo["kernel"] = tuple(int(k) for k in wt.shape[2:])
        # padding_mode != "zeros": the module pads x itself (aten.pad in the module) and convolves with padding 0
        geo["pre_padded"] = (isinstance(x, torch.fx.Node) and x.op == "call_function" and node_module(x) == module
                             and x.target in (aten.pad.default, aten.reflection_pad1d.default,
                                              aten.reflection_pad2d.default, aten.reflection_pad3d.default,
                                              aten.replication_pad1d.default, aten.replication_pad2d.default,
                                              aten.replication_pad3d.default, aten.constant_pad_nd.default)
                             and all(p == 0 for p in geo["padding"]))
        groups = geo["groups"]
        geo["fan_in"] = int(wt.shape[1]) * groups * math.prod(geo["kernel"])  # B·A's rank bound is min(fan_in, out)
        geo["problem"] = conv_site_problem(geo)  # (InsertLoRA refuses a selected site with a problem)
        sites.append(Site(node, module, x, w, b if isinstance(b, torch.fx.Node) else None, False,
                          int(wt.shape[1]) * groups, int(wt.shape[0]), kind="lora_conv", layer=LAYERS[wt.dim()],
                          extra=geo))
    return sites


# -- the kind ---------------------------------------------------------------------------------------

OP = torch.ops.lorafx.lora_conv.default


class ConvKind(OpKind):
    """``lora_conv``: a convolution plus PEFT's conv adapter (see the module docstring).

    Requires a LoraRecord on each node (``in_features``/``out_features`` are the layer's
    channels).  Not scheduled; merged for groups == 1 (a grouped layer's adapter keeps running,
    see ``merge_problem``)."""

    name = "lora_conv"
    ops = (OP,)
    layer = "Conv1d/Conv2d/Conv3d"
    supports_lora_bias = True  # PEFT's lora_bias (B a 1x1 conv with a bias): s·b added into the bias argument

    # sites and adapters --------------------------------------------------------------------
    def find_sites(self, gm):
        return find_conv_sites(gm)

    def adapter_init(self, site, r: int, init: str) -> Dict[str, tuple]:
        groups = site.extra["groups"]
        if r % groups:
            raise ValueError(f"InsertLoRA: {site.module} is a {site.layer} with groups={groups} and rank {r}: "
                             "PEFT's conv adapter needs a rank divisible by groups (its B is a grouped 1x1 "
                             f"convolution); use r (or rank_pattern={{{site.module.rsplit('.', 1)[-1]!r}: ...}}) "
                             f"a multiple of {groups}, or leave {site.module} out of target_modules")
        kernel = site.extra["kernel"]
        return {"lora_A": ((r, site.in_features, *kernel), init),
                "lora_B": ((site.out_features, r // groups, *(1,) * len(kernel)), "zeros")}

    def build(self, graph, x, weight, bias, record: LoraRecord, geometry: dict, *, train: bool, created_by: str,
              layer: str = "") -> torch.fx.Node:
        """A new ``lora_conv`` node for ``record`` before the insertion point (its get_attrs, a
        dropout mask when ``record.dropout`` > 0, the Origin and Lora records)."""
        from .linear import MASK_OP, with_lora_bias
        layer = layer or getattr(record, "layer", "") or "Conv"
        bias = with_lora_bias(graph, bias, weight, record, created_by, layer)
        a, b = graph.get_attr(record.lora_A), graph.get_attr(record.lora_B)
        mask = None
        if record.dropout > 0:
            mask = create(graph, MASK_OP, x=x, p=record.dropout, train=train)
            set_record(mask, OriginRecord(record.site, created_by=created_by))
        new = create(graph, OP, name=safe_name(record.site) + "_lora", x=x, weight=weight, bias=bias, lora_A=a,
                     lora_B=b, scale=record.scale, stride=list(geometry["stride"]), padding=list(geometry["padding"]),
                     dilation=list(geometry["dilation"]), groups=int(geometry["groups"]), dropout_mask=mask,
                     dropout_p=record.dropout)
        set_record(new, OriginRecord(record.site, layer, created_by=created_by))
        set_record(new, record)
        return new

    def insert(self, gm, site, record, x, *, train: bool, created_by: str):
        g = gm.graph
        with g.inserting_before(site.node):
            new = self.build(g, x, site.weight, site.bias, record, site.extra, train=train, created_by=created_by,
                             layer=site.layer)
        replace_node(g, site.node, new)  # its users, provenance and value
        return new

    def check(self, node):
        problem = super().check(node)
        if problem:
            return problem
        v = self.view(node)
        for name in ("stride", "padding", "dilation"):
            if not isinstance(getattr(v, name), (list, tuple)):
                return f"lora_conv node {node.name}: {name} must be a list of ints, got {getattr(v, name)!r}"
        return None

    # merging -----------------------------------------------------------------------------------
    def base_op(self, graph, node) -> torch.fx.Node:
        """The frozen layer alone: ``aten.convolution`` with the node's geometry, from its weight and bias."""
        v = self.view(node)
        n = len(v.stride)
        return graph.call_function(aten.convolution.default, (v.x, v.weight, v.bias, list(v.stride), list(v.padding),
                                                              list(v.dilation), False, [0] * n, int(v.groups)))

    def merged_weight(self, root, node) -> Tensor:
        rec = get_record(node, LoraRecord)
        problem = self.merge_problem(node)
        if problem:
            raise ValueError(f"cannot merge the adapter of {problem}, so no state dict of the source architecture "
                             "can hold it; use cm.merge_and_unload() for a plain module that runs it (as aten "
                             "convolutions), or cm.save_adapter(folder)")
        W = get_attr(root, rec.weight)
        acc = torch.promote_types(W.dtype, torch.float32)
        delta = conv_delta_weight(get_attr(root, rec.lora_A).detach().to(acc), get_attr(root, rec.lora_B).detach().to(acc),
                                  rec.scale)
        return (W.detach().to(acc) + delta).to(W.dtype)

    def merge_problem(self, node) -> Optional[str]:
        """A grouped convolution's adapter cannot be folded (MergeLoRA leaves it running)."""
        v = self.view(node)
        if int(v.groups) != 1:
            rec = get_record(node, LoraRecord)
            return (f"{rec.site if rec else node.name} (a convolution with groups={v.groups}): its update mixes "
                    "every input channel into each group, so it is no grouped weight (PEFT refuses to merge it too)")
        return None

    def lower(self, graph, node) -> torch.fx.Node:
        """``merge_and_unload`` of an adapter that cannot be merged: the op as three aten convolutions and an
        add (eval: no dropout), before ``node``; A and B stay its get_attr inputs."""
        v = self.view(node)
        n = len(v.stride)
        geo = (list(v.stride), list(v.padding), list(v.dilation), False, [0] * n)
        with graph.inserting_before(node):
            base = graph.call_function(aten.convolution.default, (v.x, v.weight, v.bias, *geo, int(v.groups)))
            h = graph.call_function(aten.convolution.default, (v.x, v.lora_A, None, *geo, 1))
            z = graph.call_function(aten.convolution.default, (h, v.lora_B, None, [1] * n, [0] * n, [1] * n, False,
                                                               [0] * n, int(v.groups)))
            out = graph.call_function(aten.add.Tensor, (base, z), {"alpha": v.scale})
        rec = get_record(node, LoraRecord)
        if rec is not None:
            for made in (base, h, z, out):
                set_record(made, OriginRecord(rec.site, rec.layer, created_by="merge_and_unload"))
        replace_node(graph, node, out, base, h, z)
        return out

    def unmerge(self, graph, base, record: LoraRecord, *, train: bool, created_by: str):
        a = list(base.args) + [None] * (9 - len(base.args))
        x, weight, bias, stride, padding, dilation, _t, _op, groups = a[:9]
        geo = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
        if record.lora_bias is not None:  # the merged conv reads the merged bias: build from the layer's own
            bias = graph.get_attr(record.bias) if record.bias is not None else None
        return self.build(graph, x, weight, bias, record, geo, train=train, created_by=created_by)

    # memory and cost --------------------------------------------------------------------------------
    def saved_inputs(self, node) -> set:
        v = self.view(node)
        return {a for a in (v.x, v.weight, v.lora_A, v.lora_B, v.dropout_mask) if isinstance(a, torch.fx.Node)}

    def cost(self, node, q: InputQuery) -> NodeCost:
        """The three convolutions' FLOPs (FlopCounterMode's convention, groups counted exactly): forward
        base + A + B; backward the base's dx/dW, and for the adapter dh (through B), dB (with
        conv(d(x), A) recomputed), dx through A and dA, as the needed gradients ask."""
        v = self.view(node)
        xs, ws = q.shape(v.x), q.shape(v.weight)
        as_ = q.shape(v.lora_A) or (get_record(node, LoraRecord).r, *ws[1:])
        out = q.shape(node)
        if out is None or len(out) not in (len(ws), len(ws) - 1):
            out = _sym_out_shape(xs, ws, v.stride, v.padding, v.dilation)
        base, fa, fb = _sym_conv_flops(xs, ws, as_, out, int(v.groups))
        gx, gw, ga, gb = (q.needs_grad(v.x), q.needs_grad(v.weight), q.needs_grad(v.lora_A), q.needs_grad(v.lora_B))
        bwd = base * (int(gx) + int(gw))
        if gx or ga or gb:
            bwd += fb * (int(gx or ga) + int(gb)) + (fa if gb else 0)  # dh, dB (and h recomputed for dB)
            bwd += fa * (int(gx) + int(ga))  # dx through A, dA
        outn = sympy.Mul(*out)
        other = outn * (2 if v.bias is not None else 1)  # s·z added (and the bias)
        if isinstance(v.dropout_mask, torch.fx.Node) and xs is not None:
            other += 2 * sympy.Mul(*xs)  # d(x) = x * mask / (1 - p)
        return NodeCost(sympy.sympify(base + fa + fb), sympy.sympify(bwd), sympy.sympify(other))


def _sym_out_shape(xs, ws, stride, padding, dilation):
    n = len(ws) - 2
    batched = len(xs) == len(ws)
    out = [sympy.floor((xs[-n + i] + 2 * padding[i] - dilation[i] * (ws[2 + i] - 1) - 1) / stride[i]) + 1
           for i in range(n)]
    return (xs[0] if batched else 1, ws[0], *out)


def _sym_conv_flops(xs, ws, as_, out, groups):
    """2·N·prod(weight)·prod(out spatial) for each of the three convolutions (sympy-friendly)."""
    n = len(ws) - 2
    batch = out[0] if len(out) == len(ws) else 1
    spatial = sympy.Mul(*out[-n:])
    prod = lambda s: sympy.Mul(*s)
    base = 2 * batch * prod(ws) * spatial
    fa = 2 * batch * prod(as_) * spatial
    fb = 2 * batch * ws[0] * (as_[0] // groups) * spatial
    return base, fa, fb


CONV = register_kind(ConvKind())
