"""The compute-in-memory kinds: a linear split between a noisy RRAM crossbar and an exact SRAM adapter.

On a hybrid CIM chip (HaLoRA, arXiv 2502.19747) the frozen pretrained weight W sits in
RRAM crossbars, which compute x Wᵀ in the analog domain with noisy conductances, and the
LoRA adapter sits in exact digital SRAM.  ``PartitionToTargets`` splits every adapted
linear into the two ops below; ``ProgramChip`` makes the RRAM op read the programmed chip.

``torch.ops.lorafx.rram_linear(x, weight, bias, programmed=None, dac_bits=0, adc_bits=0, transposed=False)``
    y = ADC(DAC(x) · W̃ᵀ) + bias, where W̃ = ``programmed`` when given (the conductances a
    chip was programmed to, or a fresh noise sample) and ``weight`` otherwise.  ``weight``
    is (out, in), or (in, out) with ``transposed`` (GPT-2's Conv1D).  ``dac_bits`` > 0
    quantises each token of x to that many bits (symmetric, uniform, full scale = the
    token's max |x|) before the crossbar; ``adc_bits`` > 0 quantises each token of the
    crossbar's output likewise; 0 leaves them exact.  Backward: dx = dy·W̃ (what the
    crossbar computed), with straight-through quantisers; the weights get no gradient.

``torch.ops.lorafx.rram_program(weight, noise)``
    A fresh sample of the noise model ``noise`` (a spec string of ``lorafx.hw_targets.noise``)
    applied to ``weight``, drawn from torch's default generator on every call: the noisy
    path of HaLoRA's training rewrite.  ``lorafx.hw_targets`` installs the sampler
    (``set_noise_sampler``); the op has no gradient.

``torch.ops.lorafx.lora_sram(x, base, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.)``
    out = base + scale · (d(x) Aᵀ) Bᵀ: the SRAM adapter added to the crossbar's output,
    with ``lora_linear``'s dropout d(x).  Backward saves x, A, B (and the mask) only.

Kinds: ``RRAM`` owns ``rram_linear`` (and ``rram_program`` as a helper); its nodes adapt
nothing (``adapters`` is empty), are not mergeable and lower to ``aten.linear`` on the
ideal weight.  ``SRAM_ADAPTER`` owns ``lora_sram``; its nodes carry the adapter's
``LoraRecord`` (the PEFT files see them like any adapter), are not mergeable (merging would
reprogram the crossbar) and lower to aten ops.

Before (``lora_linear``)::

    %q = lorafx.lora_linear(%x, %w, None, %A, %B, 2.0)
After (PartitionToTargets, then ProgramChip in an eval graph)::

    %q_rram = lorafx.rram_linear(%x, %w, None, %w_chip, 0, 0, False)   # placement: rram
    %q = lorafx.lora_sram(%x, %q_rram, %A, %B, 2.0)                     # placement: sram
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from lorafx.meta import LoraRecord, OriginRecord, get_record, set_record

from .linear import MASK_OP, dropped, dyb_t, flat, xa_t
from .registry import InputQuery, NodeCost, OpKind, args_of, create, register_kind, replace_node

__all__ = ["rram_linear", "rram_program", "lora_sram", "quantize_tokens", "set_noise_sampler", "RRAMKind",
           "SRAMAdapterKind", "RRAM", "SRAM_ADAPTER", "RRAM_OP", "PROGRAM_OP", "SRAM_OP", "lower_to_digital"]


# -- quantisation -----------------------------------------------------------------------------------

def quantize_tokens(t2: Tensor, bits: int) -> Tensor:
    """Symmetric uniform quantisation of each row of ``t2`` to ``bits`` bits (2^(bits-1) - 1
    positive levels; full scale = the row's max |value|); ``bits`` = 0 returns ``t2``."""
    if bits <= 0:
        return t2
    levels = max(2 ** (bits - 1) - 1, 1)
    step = t2.abs().amax(dim=-1, keepdim=True).div(levels)
    step = torch.where(step > 0, step, torch.ones_like(step))
    return torch.round(t2 / step) * step


# -- rram_linear ------------------------------------------------------------------------------------

def _used(weight: Tensor, programmed: Optional[Tensor]) -> Tensor:
    return programmed if programmed is not None else weight


def _rram_check(x, weight, programmed, transposed) -> None:
    n = weight.shape[0] if transposed else weight.shape[1]
    torch._check(x.shape[-1] == n, lambda: "rram_linear: x and weight disagree on in_features")
    if programmed is not None:
        torch._check(programmed.shape == weight.shape, lambda: "rram_linear: programmed must be shaped like weight")


@torch.library.custom_op("lorafx::rram_linear", mutates_args=())
def rram_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], programmed: Optional[Tensor] = None,
                dac_bits: int = 0, adc_bits: int = 0, transposed: bool = False) -> Tensor:
    _rram_check(x, weight, programmed, transposed)
    w = _used(weight, programmed)
    x2 = quantize_tokens(flat(x), dac_bits)
    if adc_bits <= 0:  # the kernels of the linear it replaces (addmm), so that no noise means the same bits
        y = (torch.addmm(bias, x2, w) if bias is not None else x2.mm(w)) if transposed else F.linear(x2, w, bias)
    else:  # the ADC reads the crossbar's sums; the bias is added digitally after it
        y = quantize_tokens(x2.mm(w) if transposed else F.linear(x2, w), adc_bits)
        if bias is not None:
            y = y + bias
    out = w.shape[1] if transposed else w.shape[0]
    return y.view(*x.shape[:-1], out)


@rram_linear.register_fake
def _(x, weight, bias, programmed=None, dac_bits=0, adc_bits=0, transposed=False):
    _rram_check(x, weight, programmed, transposed)
    return x.new_empty((*x.shape[:-1], weight.shape[1] if transposed else weight.shape[0]))


def _rram_setup(ctx, inputs, output):
    x, weight, bias, programmed, dac_bits, adc_bits, transposed = inputs
    ctx.transposed, ctx.has_bias, ctx.has_programmed = transposed, bias is not None, programmed is not None
    ctx.save_for_backward(_used(weight, programmed))


def _rram_backward(ctx, dy):
    (w,) = ctx.saved_tensors
    need_x, _, need_b = ctx.needs_input_grad[:3]
    dy2 = flat(dy)
    dx = db = None
    if need_x:  # straight through the quantisers: dx = dy W̃
        dx = (dy2.mm(w.t()) if ctx.transposed else dy2.mm(w)).view(*dy.shape[:-1], -1)
    if need_b and ctx.has_bias:
        db = dy2.sum(0)
    return dx, None, db, None, None, None, None


rram_linear.register_autograd(_rram_backward, setup_context=_rram_setup)


@register_flop_formula(torch.ops.lorafx.rram_linear)
def _rram_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


# -- rram_program -----------------------------------------------------------------------------------

_SAMPLER: List[Optional[Callable[[str, Tensor], Tensor]]] = [None]


def set_noise_sampler(sampler: Callable[[str, Tensor], Tensor]) -> None:
    """Install ``sampler(spec, weight) -> noisy weight`` for ``rram_program`` (lorafx.hw_targets
    does, on import)."""
    _SAMPLER[0] = sampler


@torch.library.custom_op("lorafx::rram_program", mutates_args=())
def rram_program(weight: Tensor, noise: str) -> Tensor:
    if _SAMPLER[0] is None:
        raise RuntimeError("lorafx.rram_program has no noise sampler: import lorafx.hw_targets, which installs it")
    return _SAMPLER[0](noise, weight.detach())


@rram_program.register_fake
def _(weight, noise):
    return torch.empty_like(weight)


# -- lora_sram --------------------------------------------------------------------------------------

def _sram_check(x, base, lora_A, lora_B) -> None:
    torch._check(lora_A.shape[1] == x.shape[-1], lambda: "lora_sram: lora_A must be (r, in_features)")
    torch._check(lora_B.shape[0] == base.shape[-1], lambda: "lora_sram: lora_B must be (out_features, r)")
    torch._check(lora_A.shape[0] == lora_B.shape[1], lambda: "lora_sram: lora_A and lora_B disagree on r")


@torch.library.custom_op("lorafx::lora_sram", mutates_args=())
def lora_sram(x: Tensor, base: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
              dropout_mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    _sram_check(x, base, lora_A, lora_B)
    xa = xa_t(dropped(flat(x), dropout_mask, dropout_p), lora_A)  # (r, tokens)
    return torch.addmm(flat(base), xa.t(), lora_B.t(), alpha=scale).view(base.shape)


@lora_sram.register_fake
def _(x, base, lora_A, lora_B, scale, dropout_mask=None, dropout_p=0.0):
    _sram_check(x, base, lora_A, lora_B)
    return torch.empty_like(base, memory_format=torch.contiguous_format)


def _sram_setup(ctx, inputs, output):
    x, base, lora_A, lora_B, scale, mask, p = inputs
    ctx.scale, ctx.p = scale, p
    ctx.save_for_backward(x, lora_A, lora_B, mask)


def _sram_backward(ctx, dy):
    x, lora_A, lora_B, mask = ctx.saved_tensors
    need_x, need_base, need_a, need_b = ctx.needs_input_grad[:4]
    s, p = ctx.scale, ctx.p
    xd, dy2 = dropped(flat(x), mask, p), flat(dy)
    dx = da = db = None
    if need_x or need_a:
        z_t = dyb_t(dy2, lora_B).mul_(s)  # s (dy B)^T, (r, tokens)
        if need_a:
            da = z_t.mm(xd)
        if need_x:
            dx = dropped(z_t.t().mm(lora_A), mask, p).view(x.shape)
    if need_b:
        db = xa_t(xd, lora_A).mm(dy2).mul_(s).t().contiguous()
    return dx, (dy if need_base else None), da, db, None, None, None


lora_sram.register_autograd(_sram_backward, setup_context=_sram_setup)


def sram_flops(tokens, n, m, r, *, need_x: bool = True, need_a: bool = True, need_b: bool = True):
    """(forward, backward) GEMM FLOPs of ``lora_sram``: forward d(x)Aᵀ and (.)Bᵀ; backward
    dy B (for dx or dA), dA, dx, and for dB d(x)Aᵀ recomputed and dyᵀ(d(x)Aᵀ)."""
    fwd = 2 * tokens * r * (n + m)
    bwd = 0
    if need_x or need_a:
        bwd += 2 * tokens * m * r + (2 * tokens * r * n if need_a else 0) + (2 * tokens * r * n if need_x else 0)
    if need_b:
        bwd += 2 * tokens * n * r + 2 * tokens * m * r
    return fwd, bwd


@register_flop_formula(torch.ops.lorafx.lora_sram)
def _sram_flops(x_shape, base_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return int(sram_flops(math.prod(x_shape[:-1]), x_shape[-1], base_shape[-1], a_shape[0])[0])


RRAM_OP = torch.ops.lorafx.rram_linear.default
PROGRAM_OP = torch.ops.lorafx.rram_program.default
SRAM_OP = torch.ops.lorafx.lora_sram.default


# -- the kinds --------------------------------------------------------------------------------------

class RRAMKind(OpKind):
    """``rram_linear``: a frozen linear on RRAM crossbars.  Adapts nothing; not mergeable; its
    lowering (``merge_and_unload``) is ``aten.linear`` on the ideal weight."""

    name = "rram_linear"
    ops = (RRAM_OP,)
    helper_ops = (PROGRAM_OP,)
    mergeable = False

    def adapters(self, node) -> List[LoraRecord]:
        return []

    def adapter_tensors(self, node) -> List[str]:
        return []

    def check(self, node) -> Optional[str]:
        return None

    def input(self, node):
        return self.view(node).x

    def describe(self, node) -> str:
        v = self.view(node)
        bits = [f"{k}={getattr(v, k)}" for k in ("dac_bits", "adc_bits") if getattr(v, k)]
        return "rram" + (" programmed" if v.programmed is not None else "") + (f" ({', '.join(bits)})" if bits else "")

    def saved_inputs(self, node) -> set:
        v = self.view(node)
        return {a for a in (v.programmed if v.programmed is not None else v.weight,) if isinstance(a, torch.fx.Node)}

    def cost(self, node, q: InputQuery) -> NodeCost:
        v = self.view(node)
        w = q.shape(v.weight)
        n, m = (w[0], w[1]) if v.transposed else (w[1], w[0])
        tokens = q.tokens(v.x)
        fwd = 2 * tokens * n * m
        bwd = fwd if q.needs_grad(v.x) else 0
        other = tokens * m if v.bias is not None else 0
        return NodeCost(sympy.sympify(fwd), sympy.sympify(bwd), sympy.sympify(other))

    def build(self, graph, x, weight, bias, *, transposed: bool, site: str, created_by: str,
              name: Optional[str] = None) -> torch.fx.Node:
        """A new ``rram_linear`` node (before the insertion point) reading the ideal weight."""
        node = create(graph, RRAM_OP, name=name, x=x, weight=weight, bias=bias, transposed=transposed)
        set_record(node, OriginRecord(site, "Linear", created_by=created_by))
        return node

    def lower(self, graph, node) -> torch.fx.Node:
        aten = torch.ops.aten
        v = self.view(node)
        with graph.inserting_before(node):
            w = graph.call_function(aten.t.default, (v.weight,)) if v.transposed else v.weight
            out = graph.call_function(aten.linear.default, (v.x, w, v.bias))
        replace_node(graph, node, out)
        return out


class SRAMAdapterKind(OpKind):
    """``lora_sram``: a LoRA adapter in SRAM added to a crossbar's output.  Carries the
    adapter's LoraRecord; not mergeable (merging would reprogram the RRAM crossbar)."""

    name = "lora_sram"
    ops = (SRAM_OP,)
    mergeable = False

    def saved_inputs(self, node) -> set:
        v = self.view(node)
        return {a for a in (v.x, v.lora_A, v.lora_B, v.dropout_mask) if isinstance(a, torch.fx.Node)}

    def cost(self, node, q: InputQuery) -> NodeCost:
        v = self.view(node)
        rec = get_record(node, LoraRecord)
        a = q.shape(v.lora_A)
        r = a[0] if a is not None else rec.r
        tokens = q.tokens(v.x)
        fwd, bwd = sram_flops(tokens, rec.in_features, rec.out_features, r, need_x=q.needs_grad(v.x),
                              need_a=q.needs_grad(v.lora_A), need_b=q.needs_grad(v.lora_B))
        dropout = isinstance(v.dropout_mask, torch.fx.Node)
        other = 2 * tokens * rec.out_features + (2 * tokens * rec.in_features if dropout else 0)
        return NodeCost(sympy.sympify(fwd), sympy.sympify(bwd), sympy.sympify(other))

    def build(self, graph, x, base, mask, record: LoraRecord, *, created_by: str,
              name: Optional[str] = None) -> torch.fx.Node:
        """A new ``lora_sram`` node for ``record`` (before the insertion point), reading its A/B."""
        a, b = graph.get_attr(record.lora_A), graph.get_attr(record.lora_B)
        node = create(graph, SRAM_OP, name=name, x=x, base=base, lora_A=a, lora_B=b, scale=record.scale,
                      dropout_mask=mask, dropout_p=record.dropout if mask is not None else 0.0)
        set_record(node, OriginRecord(record.site, "Linear", created_by=created_by))
        set_record(node, record)
        return node

    def lower(self, graph, node) -> torch.fx.Node:
        """base + scale·linear(linear(x, A), B) in aten ops (an inference graph: no dropout)."""
        aten = torch.ops.aten
        v = self.view(node)
        with graph.inserting_before(node):
            xa = graph.call_function(aten.linear.default, (v.x, v.lora_A))
            delta = graph.call_function(aten.linear.default, (xa, v.lora_B))
            scaled = graph.call_function(aten.mul.Tensor, (delta, v.scale))
            out = graph.call_function(aten.add.Tensor, (v.base, scaled))
        replace_node(graph, node, out, xa, delta, scaled)
        return out


def lower_to_digital(graph: torch.fx.Graph) -> int:
    """Undo the CIM split in ``graph``: each ``lora_sram`` on an ``rram_linear`` becomes the
    ``lora_linear`` it came from, every other ``rram_linear`` an ``aten.linear``, both on the
    ideal weights (no chip, no quantisation), so that the adapters merge into their weights
    (``merge_and_unload``).  Returns how many nodes it rewrote; the caller recompiles."""
    from .linear import OP as LORA_OP
    aten = torch.ops.aten
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not SRAM_OP:
            continue
        v = args_of(node)
        base = v.base
        if not (isinstance(base, torch.fx.Node) and base.target is RRAM_OP and len(base.users) == 1):
            continue
        b = args_of(base)
        with graph.inserting_before(node):
            w = graph.call_function(aten.t.default, (b.weight,)) if b.transposed else b.weight
            new = create(graph, LORA_OP, name=node.name + "_digital", x=v.x, weight=w, bias=b.bias,
                         lora_A=v.lora_A, lora_B=v.lora_B, scale=v.scale, dropout_mask=v.dropout_mask,
                         dropout_p=v.dropout_p)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(base)
        count += 1
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is RRAM_OP:
            RRAM.lower(graph, node)
            count += 1
    for node in list(graph.nodes):  # the programmed chip's weights, read no more
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    return count


def mask_of(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The dropout-mask node a ``lora_linear`` node reads, if any."""
    mask = args_of(node).dropout_mask
    return mask if isinstance(mask, torch.fx.Node) and mask.target is MASK_OP else None


RRAM = register_kind(RRAMKind())
SRAM_ADAPTER = register_kind(SRAMAdapterKind())
