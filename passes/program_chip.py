"""ProgramChip: program the RRAM crossbars of a placed graph, once per chip.

Requires: ``"placement"`` (PartitionToTargets' ``rram_linear`` nodes).  Provides: ``"chip"``.
Preserves: with no noise and no ADC/DAC quantisation, every output exactly (the graph
is left as it is); in a training graph, the outputs too (training reads the ideal
weights: the adapters are trained digitally, as in HaLoRA's setting).

Programming a chip writes every RRAM-placed weight W as conductances, which the noise
model turns into W̃ = noise(W) (``lorafx.hw_targets.noise``).  The chip is sampled once,
from ``seed`` (per weight, from the seed and the weight's name), recorded as a decision
(``ctx.decide("chip")``), so a new call signature reads the very same W̃, and kept as
non-persistent buffers (``lorafx_chip_<weight>``; the model's weights and state dict are
untouched).  In an inference (eval) graph every ``rram_linear`` then reads W̃, and
quantises its input and output to the chip's DAC and ADC bits.  ``reprogram(gm,
decisions, seed)`` (``CompiledModel.reprogram``) samples a new chip into the same buffers.

Before (eval graph)::

    %q_rram = lorafx.rram_linear(%x, %w, None)
After::

    %chip_w = get_attr[target=lorafx_chip_model_layers_0_q_proj_weight]
    %q_rram = lorafx.rram_linear(%x, %w, None, %chip_w, 8, 8)       # rram programmed (dac_bits=8, adc_bits=8)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.fx

from lorafx import options as O
from lorafx.context import CompileContext
from lorafx.dialect import RRAM, args_of, kind_of, set_args
from lorafx.graph_utils import get_attr, safe_name
from lorafx.meta import PlacementRecord, get_record, graph_record, set_record
from lorafx.pipeline import Pass, PassResult

__all__ = ["ProgramChip", "chip_buffer", "reprogram", "rram_weights"]

CHIP = "chip"  # the decision key


def chip_buffer(weight_path: str) -> str:
    """The buffer holding the programmed copy of ``weight_path``."""
    return "lorafx_chip_" + safe_name(weight_path)


def rram_weights(gm: torch.fx.GraphModule) -> List[str]:
    """The paths of the weights ``rram_linear`` nodes read, in graph order."""
    out: Dict[str, None] = {}
    for node in gm.graph.nodes:
        if kind_of(node) is RRAM:
            out.setdefault(args_of(node).weight.target)
    return list(out)


@dataclass(frozen=True)
class ProgramChip(Pass):
    noise: Any = None  # a lorafx.hw_targets.noise.NoiseModel, or None for an ideal chip
    seed: int = 0
    dac_bits: int = 0
    adc_bits: int = 0
    # sample(weights {path: tensor}, noise, seed) -> {path: programmed tensor}: the target's sampler
    sample: Optional[Callable[[Dict[str, torch.Tensor], Any, int], Dict[str, torch.Tensor]]] = None

    requires = frozenset({"placement"})
    provides = frozenset({"chip"})

    def validate(self) -> None:
        O.check_seed("seed", self.seed, "ProgramChip: ")
        for name in ("dac_bits", "adc_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ProgramChip: {name} must be an int >= 0 (0: exact), got {value!r}")
        if self.noise is not None and self.sample is None:
            raise ValueError("ProgramChip: a noise model needs sample= (lorafx.hw_targets.noise.sample_chip)")

    @property
    def active(self) -> bool:
        """Whether programming changes the weights (a noise model that is not noiseless)."""
        return self.noise is not None and not self.noise.is_noiseless()

    def summary(self, info) -> List[str]:
        what = info["noise"] if info["programmed_weights"] else "ideal chip (no noise)"
        bits = [f"{k}={info[k]}" for k in ("dac_bits", "adc_bits") if info[k]]
        return [f"{what}, seed {info['seed']}" + (f", {', '.join(bits)}" if bits else "")
                + ("; this training graph reads the ideal weights" if info["training_graph"] else "")]

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        paths = rram_weights(gm)
        chip = None
        if self.active:
            chip = ctx.decide(CHIP, lambda: {
                "seed": self.seed, "noise": self.noise,
                "weights": self.sample({p: get_attr(gm, p).detach() for p in paths}, self.noise, self.seed)})
            for path, tensor in chip["weights"].items():
                gm.register_buffer(chip_buffer(path), tensor, persistent=False)
        changed = False
        if not ctx.training:
            for node in list(gm.graph.nodes):
                if kind_of(node) is not RRAM:
                    continue
                programmed = None
                if chip is not None:
                    with gm.graph.inserting_before(node):
                        programmed = gm.graph.get_attr(chip_buffer(args_of(node).weight.target))
                    programmed.meta["val"] = chip["weights"][args_of(node).weight.target]
                    placed = get_record(node, PlacementRecord)
                    set_record(programmed, PlacementRecord(placed.target if placed else "rram"))
                changed |= set_args(node, programmed=programmed, dac_bits=self.dac_bits, adc_bits=self.adc_bits)
        info = {"noise": self.noise.describe() if self.noise is not None else "none", "seed": self.seed,
                "programmed_weights": len(chip["weights"]) if chip else 0, "dac_bits": self.dac_bits,
                "adc_bits": self.adc_bits, "training_graph": bool(ctx.training)}
        if graph_record(gm).placement is not None:
            graph_record(gm).placement["chip"] = dict(info)
        return PassResult(gm, changed, info)


def reprogram(gm: torch.nn.Module, decisions: Dict[str, Any], seed: int,
              sample: Callable[[Dict[str, torch.Tensor], Any, int], Dict[str, torch.Tensor]]) -> int:
    """Sample a new chip from ``seed`` into every recorded chip's buffers (in place, so every
    graph reading them sees it); ``gm`` holds the ideal weights.  Returns how many chips."""
    count = 0
    for key, chip in decisions.items():
        if not (key.endswith(":" + CHIP) and isinstance(chip, dict) and "weights" in chip):
            continue
        fresh = sample({p: get_attr(gm, p).detach() for p in chip["weights"]}, chip["noise"], seed)
        with torch.no_grad():
            for path, tensor in chip["weights"].items():
                tensor.copy_(fresh[path])
        chip["seed"] = seed
        count += 1
    return count
