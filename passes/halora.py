"""HaLoRA: train the adapters to be robust to the RRAM noise of the chip they will run on.

Requires: ``"placement"`` and ``"chip"`` (an RRAM-lowered graph).  Provides: ``"halora"``.
Preserves: every output of an inference graph (it is left alone) and every output but the
loss of a training graph; the loss becomes HaLoRA's objective.

HaLoRA (Wu et al., arXiv 2502.19747) keeps the pretrained weights on noisy RRAM and the
LoRA adapters on exact SRAM, and trains the adapters so that the objective under noisy
weights agrees with the ideal one.  The rewrite changes only training graphs that compute
their own loss (a transformers model called with ``labels``, or a model whose output holds
a scalar ``loss``), so an ordinary training loop and the transformers Trainer get it
without adding loss terms.  ``mode``:

* ``"dual"``: loss = (1 − λ)·L(W) + λ·L(W + ε), ε a fresh sample of the chip's noise model
  on every RRAM weight at every step (``rram_program``), λ = ``noise_weight``.  Every node
  that depends on an RRAM output and leads to the loss is computed a second time on the
  noisy weights (with the chip's ADC/DAC quantisation): one extra forward and backward of
  that part per step, nothing more.
* ``"spectral"``: loss = L(W) + μ·Σ (‖A Aᵀ‖₂ + ‖Bᵀ B‖₂) over the adapters (the spectral
  norms of the r×r Gram matrices, i.e. σ_max(A)² + σ_max(B)²), μ = ``mu``: small adapter
  gains amplify the RRAM error less.
* ``"both"``: the two together.

Inference graphs (``cm.eval()``) run a single path on the programmed chip.

Before (training graph)::

    %h_rram = lorafx.rram_linear(%x, %w, None)
    %h = lorafx.lora_sram(%x, %h_rram, %A, %B, 2.0)
    %loss = aten.cross_entropy_loss(%h, %labels)
    return (loss, h)
After (``mode="dual"``)::

    %w_noisy = lorafx.rram_program(%w, 'additive(sigma=0.1,per=layer)')
    %h_rram_noisy = lorafx.rram_linear(%x, %w, None, %w_noisy)
    %h_noisy = lorafx.lora_sram(%x, %h_rram_noisy, %A, %B, 2.0)
    %loss_noisy = aten.cross_entropy_loss(%h_noisy, %labels)
    %halora_loss = aten.add(aten.mul(%loss, 0.5), aten.mul(%loss_noisy, 0.5))
    return (halora_loss, h)
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.fx

from lorafx.context import CompileContext
from lorafx.dialect import RRAM, SRAM_ADAPTER, args_of, create, kind_of, set_args
from lorafx.dialect.cim import PROGRAM_OP
from lorafx.meta import OriginRecord, PlacementRecord, graph_record, set_record
from lorafx.pipeline import Pass, PassResult

__all__ = ["HaLoRA", "MODES", "loss_output", "check_settings"]

log = logging.getLogger("lorafx")
aten = torch.ops.aten
MODES = ("dual", "spectral", "both")


def _outputs(gm: torch.fx.GraphModule):
    """(the output node, its flattened outputs as a list)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    return out, list(value) if isinstance(value, (tuple, list)) else [value]


def loss_output(gm: torch.fx.GraphModule) -> Optional[int]:
    """The index, among the graph's flattened outputs, of its scalar loss: the output field
    named ``loss`` (a transformers ModelOutput or a dict), or a lone scalar output, or the
    first of a tuple when it is a scalar; None when the graph computes no loss."""
    _, leaves = _outputs(gm)
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)
    index: Optional[int] = None
    if spec is not None and not spec.is_leaf() and isinstance(spec.context, (list, tuple)) and "loss" in spec.context:
        at = list(spec.context).index("loss")
        children = spec.children()
        if children[at].num_leaves == 1:
            index = sum(c.num_leaves for c in children[:at])
    elif len(leaves) >= 1:
        index = 0
    if index is None or index >= len(leaves) or not isinstance(leaves[index], torch.fx.Node):
        return None
    val = leaves[index].meta.get("val")
    if not (isinstance(val, torch.Tensor) and val.dim() == 0 and val.is_floating_point()):
        return None
    return index


def check_settings(mode, noise_weight, mu, where: str = "HaLoRA: ") -> None:
    """Refuse a bad ``mode``, ``noise_weight`` (λ in (0, 1]) or ``mu`` (≥ 0), naming it."""
    if mode not in MODES:
        raise ValueError(f"{where}mode must be one of {list(MODES)}, got {mode!r}")
    if isinstance(noise_weight, bool) or not isinstance(noise_weight, numbers.Real) \
            or not math.isfinite(noise_weight) or not 0 < noise_weight <= 1:
        raise ValueError(f"{where}noise_weight must be a number in (0, 1], got {noise_weight!r}")
    if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not math.isfinite(mu) or mu < 0:
        raise ValueError(f"{where}mu (the spectral penalty's weight) must be a number >= 0, got {mu!r}")


@dataclass(frozen=True)
class HaLoRA(Pass):
    mode: str = "dual"
    noise_weight: float = 0.5  # λ of the dual objective
    mu: float = 1e-3  # μ of the spectral penalty
    noise: Any = None  # the chip's NoiseModel: the dual objective's fresh noise
    dac_bits: int = 0
    adc_bits: int = 0

    requires = frozenset({"placement", "chip"})
    provides = frozenset({"halora"})
    invalidates = frozenset({"cost"})

    def validate(self) -> None:
        check_settings(self.mode, self.noise_weight, self.mu)
        if self.mode in ("dual", "both") and (self.noise is None or self.noise.is_noiseless()):
            raise ValueError(f"HaLoRA: mode={self.mode!r} trains against fresh RRAM noise, but the chip has no noise "
                             "(noise=None or noise_sigma=0): give the chip a noise model, or use mode='spectral'")

    def summary(self, info) -> List[str]:
        if not info["active"]:
            return [f"inactive: {info['why']}"]
        parts = []
        if info["dual"]:
            parts.append(f"dual objective (λ={self.noise_weight:g}; {info['copied']} nodes recomputed on noisy weights)")
        if info["spectral"]:
            parts.append(f"spectral penalty μ={self.mu:g} on {info['spectral']} adapters")
        return ["; ".join(parts)]

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        idle = lambda why: PassResult(gm, False, {"active": False, "why": why, "dual": False, "spectral": 0,
                                                  "copied": 0})
        if not ctx.training:
            return idle("an inference graph runs a single path")
        index = loss_output(gm)
        if index is None:
            log.warning(
                "HaLoRA: this training graph (inputs %s) computes no loss, so HaLoRA cannot add its terms: calls with "
                "these inputs train as plain LoRA. Calls of a transformers model with labels=... get HaLoRA; a model "
                "of your own gets it when forward returns the loss (a scalar, or an output field named 'loss').",
                list(graph_record(gm).inputs))
            return idle("the graph computes no loss (call the model with labels)")
        out, leaves = _outputs(gm)
        loss = leaves[index]
        copied = 0
        with gm.graph.inserting_before(out):
            total = loss
            if self.mode in ("dual", "both"):
                noisy, copied = self._noisy_copy(gm, loss)
                total = self._host(gm, create(gm.graph, aten.add.Tensor, self=self._host(
                    gm, create(gm.graph, aten.mul.Tensor, self=loss, other=1.0 - self.noise_weight)),
                    other=self._host(gm, create(gm.graph, aten.mul.Tensor, self=noisy, other=self.noise_weight))))
            spectral = 0
            if self.mode in ("spectral", "both") and self.mu > 0:
                penalty, spectral = self._spectral(gm)
                if penalty is not None:
                    total = self._host(gm, create(gm.graph, aten.add.Tensor, self=total, other=self._host(
                        gm, create(gm.graph, aten.mul.Tensor, self=penalty, other=float(self.mu)))))
        if total is not loss:
            total.meta["val"] = loss.meta.get("val")
            leaves[index] = total
            out.args = (type(out.args[0])(leaves) if isinstance(out.args[0], (tuple, list)) else total,)
        gm.graph.lint()
        return PassResult(gm, total is not loss, {"active": True, "dual": self.mode in ("dual", "both"),
                                                 "spectral": spectral, "copied": copied, "why": ""})

    # -- the rewrites -----------------------------------------------------------------------------
    def _host(self, gm, node: torch.fx.Node) -> torch.fx.Node:
        set_record(node, OriginRecord("", created_by=self.name))
        set_record(node, PlacementRecord("host"))
        return node

    def _noisy_copy(self, gm: torch.fx.GraphModule, loss: torch.fx.Node):
        """A copy of every node between the RRAM outputs and ``loss`` on freshly noisy weights;
        returns (the noisy loss, how many nodes were copied)."""
        graph = gm.graph
        tainted = set()
        for node in graph.nodes:
            if kind_of(node) is RRAM or any(a in tainted for a in node.all_input_nodes):
                tainted.add(node)
        needed, stack = set(), [loss]
        while stack:
            n = stack.pop()
            if n in needed or n not in tainted:
                continue
            needed.add(n)
            stack.extend(n.all_input_nodes)
        env: Dict[torch.fx.Node, torch.fx.Node] = {}
        samples: Dict[str, torch.fx.Node] = {}
        spec = self.noise.spec()
        for node in list(graph.nodes):
            if node not in needed:
                continue
            new = graph.node_copy(node, lambda a: env.get(a, a))
            if "lorafx" in node.meta:  # node_copy copies meta shallowly: the copy gets its own records
                new.meta["lorafx"] = dict(node.meta["lorafx"])
            env[node] = new
            if kind_of(node) is RRAM:
                w = args_of(node).weight
                if w.target not in samples:
                    sample = create(graph, PROGRAM_OP, weight=w, noise=spec)
                    set_record(sample, OriginRecord("", created_by=self.name))
                    set_record(sample, PlacementRecord("rram"))
                    if "val" in w.meta:
                        sample.meta["val"] = w.meta["val"]
                    samples[w.target] = sample
                    new.prepend(sample)  # the sample comes right before its first reader
                set_args(new, programmed=samples[w.target], dac_bits=self.dac_bits, adc_bits=self.adc_bits)
        return env[loss], len(env)

    def _spectral(self, gm: torch.fx.GraphModule):
        """μ's factor: Σ over the adapters of ‖A Aᵀ‖₂ + ‖Bᵀ B‖₂, as graph nodes; (node, count)."""
        graph = gm.graph
        terms, seen = [], set()
        for node in list(graph.nodes):
            if kind_of(node) is not SRAM_ADAPTER:
                continue
            v = args_of(node)
            key = (v.lora_A.target, v.lora_B.target)
            if key in seen:
                continue
            seen.add(key)
            a_t = self._host(gm, create(graph, aten.t.default, self=v.lora_A))
            gram_a = self._host(gm, create(graph, aten.mm.default, self=v.lora_A, mat2=a_t))
            b_t = self._host(gm, create(graph, aten.t.default, self=v.lora_B))
            gram_b = self._host(gm, create(graph, aten.mm.default, self=b_t, mat2=v.lora_B))
            for gram in (gram_a, gram_b):
                terms.append(self._host(gm, create(graph, aten.linalg_matrix_norm.default, self=gram, ord=2)))
        if not terms:
            return None, 0
        total = terms[0]
        for t in terms[1:]:
            total = self._host(gm, create(graph, aten.add.Tensor, self=total, other=t))
        return total, len(seen)
