"""PruneWeights: zero out part of each frozen linear weight (magnitude or Wanda; unstructured or N:M).

Requires: a captured graph.  Provides: ``"sparsity"`` -- the graph record's ``sparsity``
map {weight path: SparsityInfo} that ``ApplySparsity`` turns into sparse LoRA ops.
Preserves: nothing numerically (pruning changes the model); the graph's structure is
unchanged, only the pruned weights are rebound.

The mask producers (``prune_mask``) score every weight entry and drop the lowest:

* ``magnitude``: score |W_ij|, compared across the whole matrix (unstructured);
* ``wanda``: score |W_ij|·‖X_j‖₂ (Sun et al., arXiv 2306.11695), X_j the j-th input feature
  over every calibration token, compared within each output row (Wanda's per-output
  group).  The norms are collected through the captured graph on ``calibration=`` batches,
  all layers in one pass over the unpruned model (Wanda's reference code prunes layer by
  layer, feeding each layer the previous pruned ones' outputs);
* pattern ``"N:M"`` (``"2:4"``, ``"4:8"``): in every group of M consecutive inputs of a
  row, keep the N highest scores (exactly (M-N)/M sparsity); ``"unstructured"``: drop
  ``int(sparsity · count)`` entries per comparison group;
* ``sparsity="keep"``: no pruning; the weights' existing zeros are the mask (a model pruned
  elsewhere, by SparseGPT say).

The pruned weights are new tensors bound in the compiled graph (frozen Parameters): the
source model's weights are never written.  The result is a recorded decision, so a new
call signature binds the very same tensors instead of pruning again.

Before::

    %w = get_attr[target=model.layers.0.mlp.up_proj.weight]          # dense
    %linear = call_function[target=aten.linear.default](args=(%x, %w))
After::

    %w = get_attr[target=model.layers.0.mlp.up_proj.weight]          # a pruned copy, 50% zeros
    %linear = call_function[target=aten.linear.default](args=(%x, %w))
"""
from __future__ import annotations

import math
import numbers
import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.fx

from lorafx import options as O
from lorafx.context import CompileContext
from lorafx.graph_utils import get_attr, set_parameter, unique
from lorafx.meta import SparsityInfo, graph_record
from lorafx.options import Option
from lorafx.pipeline import CAPTURED, Pass, PassResult

from .insert_lora import ALL_LINEAR, find_adapter_sites, select_linear_sites, shared_weight_user
from .score_sites import numbered_batches, private_copy, split_labels

__all__ = ["PruneWeights", "prune_mask", "parse_pattern", "check_sparsity", "METHODS", "KEEP"]

METHODS = ("wanda", "magnitude")
KEEP = "keep"
_N_M = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str, where: str = "") -> Optional[Tuple[int, int]]:
    """(N, M) for ``"N:M"``; None for ``"unstructured"``; ValueError otherwise."""
    if pattern == "unstructured":
        return None
    match = _N_M.match(pattern) if isinstance(pattern, str) else None
    if match is None or not 0 < int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"{where}sparsity_pattern must be 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4' or "
                         f"'4:8', got {pattern!r}")
    return int(match.group(1)), int(match.group(2))


def check_sparsity(name: str, value, where: str = "") -> None:
    """A number in [0, 1), or "keep"."""
    if value == KEEP or value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}{name} must be a fraction in [0, 1) or 'keep', got {value!r}; "
                        f"pass e.g. {name}=0.5, or {name}='keep' to keep an already pruned model's zeros")
    if not (math.isfinite(value) and 0 <= value < 1):
        raise ValueError(f"{where}{name} must be in [0, 1) (the share of each weight set to 0), got {value!r}; "
                         f"pass e.g. {name}=0.5")


def prune_mask(scores: torch.Tensor, sparsity: float, pattern: Optional[Tuple[int, int]],
               per_row: bool) -> torch.Tensor:
    """The keep-mask (bool, (out, in)) dropping the lowest ``scores``: per N:M group when
    ``pattern`` is (N, M), else ``int(sparsity · count)`` per row (``per_row``) or per matrix.
    Ties go to the lower index (a stable sort), so the mask is deterministic."""
    out_f, in_f = scores.shape
    if pattern is not None:
        n_keep, m = pattern
        groups = scores.reshape(out_f, in_f // m, m)
        order = torch.sort(groups, dim=-1, stable=True).indices
        keep = torch.ones_like(groups, dtype=torch.bool)
        keep.scatter_(-1, order[..., :m - n_keep], False)
        return keep.reshape(out_f, in_f)
    rows = scores if per_row else scores.reshape(1, -1)
    k = int(sparsity * rows.shape[1])
    keep = torch.ones_like(rows, dtype=torch.bool)
    if k:
        order = torch.sort(rows, dim=-1, stable=True).indices
        keep.scatter_(-1, order[:, :k], False)
    return keep.reshape(out_f, in_f)


class _SquareSum(torch.nn.Module):
    """Accumulates Σ x_j² over every token of its input (per last-dim feature)."""

    def __init__(self):
        super().__init__()
        self.total: Optional[torch.Tensor] = None

    def forward(self, x):
        s = x.detach().to(torch.float64).pow(2).reshape(-1, x.shape[-1]).sum(0)
        self.total = s if self.total is None else self.total + s
        return x


def _input_norms(gm: torch.fx.GraphModule, ctx: CompileContext, sites) -> Dict[torch.fx.Node, torch.Tensor]:
    """{site.x: ‖X_j‖₂ per input feature} over the calibration batches, through a private
    copy of the graph with an observer after each distinct site input."""
    sg = private_copy(gm)
    nodes = {n.name: n for n in sg.graph.nodes}
    observers: Dict[str, _SquareSum] = {}
    for i, name in enumerate(unique(s.x.name for s in sites)):
        obs = _SquareSum()
        sg.add_submodule(f"_lorafx_wanda_{i}", obs)
        with sg.graph.inserting_after(nodes[name]):
            sg.graph.call_module(f"_lorafx_wanda_{i}", (nodes[name],))  # a side effect only: its value is unused
        observers[name] = obs
    sg.recompile()
    count = 0
    with torch.no_grad():
        for i, args, kwargs in numbered_batches(ctx):
            kwargs, _ = split_labels(gm, kwargs, i)
            sg(*args, **kwargs)
            count += 1
    if count == 0:
        raise ValueError("sparsity_method='wanda': calibration= yielded no batch; give at least one batch")
    return {s.x: observers[s.x.name].total.sqrt() for s in sites}


@dataclass(frozen=True)
class PruneWeights(Pass):
    sparsity: Union[float, str, None] = None
    method: str = "wanda"
    pattern: str = "unstructured"
    modules: Union[str, Tuple[str, ...]] = ALL_LINEAR

    requires = frozenset({CAPTURED})
    provides = frozenset({"sparsity"})
    invalidates = frozenset({"cost"})
    options = (
        Option("sparsity", (float, int, str, type(None)), None,
               "prune the frozen linears to this share of zeros, in [0, 1) (None: no pruning), or 'keep' to keep "
               "the zeros of an already pruned model; their adapters become sparse LoRA ops (LoRS)",
               check=check_sparsity),
        Option("sparsity_method", str, "wanda", "'wanda' (|W|·‖X‖ on calibration= batches, per output row) or "
               "'magnitude' (|W|, per matrix)", field="method",
               check=lambda name, value, where: O.check_choice(name, value, METHODS, where)),
        Option("sparsity_pattern", str, "unstructured", "'unstructured' or 'N:M' ('2:4', '4:8': N kept in "
               "every M consecutive inputs)", field="pattern", check=lambda name, value, where: parse_pattern(value, where)),
        Option("sparsity_modules", (str, list), ALL_LINEAR, "the linears to prune: 'all-linear' (every linear but "
               "the output layer), names or a regex", field="modules", check=O.check_modules),
    )

    @classmethod
    def from_options(cls, values, ctx: CompileContext) -> Optional["PruneWeights"]:
        """Built only with ``sparsity=``; the other sparsity options need it."""
        if values.get("sparsity") is None:
            for name in ("sparsity_method", "sparsity_pattern", "sparsity_modules", "sparse_grad"):
                if name in values:
                    raise ValueError(f"lorafx.compile: {name}={values[name]!r} only applies with sparsity=...; "
                                     "pass sparsity=0.5 (or sparsity='keep' for an already pruned model) or leave it out")
            return None
        kwargs = {opt.target_field: values[opt.name] for opt in cls.options if opt.name in values}
        pattern = values.get("sparsity_pattern")
        if values["sparsity"] != KEEP and pattern not in (None, "unstructured"):
            n, m = parse_pattern(pattern, "lorafx.compile: ")
            if not math.isclose(values["sparsity"], (m - n) / m):
                raise ValueError(f"lorafx.compile: sparsity_pattern={pattern!r} prunes exactly {(m - n) / m:g} of "
                                 f"each weight, but sparsity={values['sparsity']!r}; pass sparsity={(m - n) / m:g}")
        return cls(**kwargs)

    def __post_init__(self):
        if self.modules is not None and not isinstance(self.modules, str):
            object.__setattr__(self, "modules", tuple(self.modules))
        super().__post_init__()

    def validate(self) -> None:
        where = "PruneWeights: "
        check_sparsity("sparsity", self.sparsity, where)
        if self.sparsity is None:
            raise ValueError(f"{where}needs sparsity=, a fraction in [0, 1) or 'keep'")
        O.check_choice("method", self.method, METHODS, where)
        parse_pattern(self.pattern, where)
        O.check_modules("modules", self.modules, where)

    def summary(self, info) -> List[str]:
        return [f"{info['pruned_weights']} weights, {info['sparsity']:.1%} zeros "
                f"({info['method']}, {info['pattern']})"]

    # -- the pass ---------------------------------------------------------------------------
    def _sites(self, gm):
        chosen = select_linear_sites(gm, find_adapter_sites(gm), self.modules, None, where="PruneWeights")
        other = [c for c in chosen if c.kind != "lora_linear"]
        if other:
            raise ValueError(f"PruneWeights: sparsity prunes linear layers only, but sparsity_modules={self.modules!r} "
                             f"selects {other[0].module!r} ({other[0].layer}); leave it out of sparsity_modules")
        shared = shared_weight_user(gm, chosen)
        if shared is not None:
            site, other = shared
            raise ValueError(f"PruneWeights: {site.module}'s weight ({site.weight.target}) is also used by {other} "
                             f"(tied weights): pruning it would prune that too. Leave {site.module} out of "
                             "sparsity_modules, or untie the weights first")
        first = {}  # a module called twice is pruned once
        for s in chosen:
            first.setdefault(s.weight.target, s)
        return list(first.values())

    def _check_pattern(self, sites, nm) -> None:
        if nm is None:
            return
        bad = [s for s in sites if s.in_features % nm[1]]
        if bad:
            s = bad[0]
            raise ValueError(
                f"PruneWeights: sparsity_pattern={self.pattern!r} groups every {nm[1]} consecutive inputs, but "
                f"{s.module} has {s.in_features} input features, not a multiple of {nm[1]}"
                + (f" ({len(bad)} such linears)" if len(bad) > 1 else "")
                + "; use sparsity_pattern='unstructured', or leave those linears out with sparsity_modules=...")

    def _prune(self, gm, ctx, sites) -> Dict[str, torch.Tensor]:
        """{weight path: pruned weight}, new tensors (the graph's weights are not written)."""
        nm = parse_pattern(self.pattern)
        norms = None
        if self.method == "wanda":
            if ctx.calibration is None:
                raise ValueError("sparsity_method='wanda' scores weights by their inputs' norms and needs "
                                 "calibration data: pass calibration=[batch, ...] (batches of the model's inputs, "
                                 "e.g. 8 to 128 sequences of real text), or use sparsity_method='magnitude'")
            norms = _input_norms(gm, ctx, sites)
        out = {}
        for s in sites:
            W = get_attr(gm, s.weight.target).detach()
            stored_out_in = W.t() if s.weight_transposed else W  # (out, in)
            scores = stored_out_in.abs().to(torch.float64)
            if norms is not None:
                scores = scores * norms[s.x].to(scores.device)
            keep = prune_mask(scores, float(self.sparsity), nm, per_row=self.method == "wanda")
            if s.weight_transposed:
                keep = keep.t()
            out[s.weight.target] = W * keep  # a new tensor, W's dtype and layout
        return out

    def _keep(self, gm, sites) -> Dict[str, torch.Tensor]:
        out = {s.weight.target: get_attr(gm, s.weight.target).detach() for s in sites}
        out = {path: w for path, w in out.items() if bool((w == 0).any())}
        if not out:
            raise ValueError("sparsity='keep' keeps the zeros of an already pruned model, but none of the "
                             f"{len(sites)} selected linear weights has a zero entry; prune first (sparsity=0.5, or "
                             "lorafx.prune(model, ...)), or leave sparsity out to fine-tune the dense model")
        return out

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        start = time.perf_counter()
        sites = self._sites(gm)
        nm = parse_pattern(self.pattern)
        keep = self.sparsity == KEEP
        if not keep:
            self._check_pattern(sites, nm)
        meta = next((s.weight.target for s in sites if get_attr(gm, s.weight.target).is_meta), None)
        if meta is not None:
            raise ValueError(f"sparsity={self.sparsity!r} reads the weights' values, but they are on the meta "
                             f"device ({meta}); load the weights first")
        pruned = ctx.decide("pruned", lambda: self._keep(gm, sites) if keep else self._prune(gm, ctx, sites))
        by_path = {s.weight.target: s for s in sites}
        rec = graph_record(gm)
        rec.sparsity = {}
        zeros = total = 0
        for path, weight in pruned.items():
            if not keep:  # bind the pruned copy (the source's storage is never written)
                set_parameter(gm, path, torch.nn.Parameter(weight, requires_grad=False))
            z = int((weight == 0).sum())
            zeros, total = zeros + z, total + weight.numel()
            rec.sparsity[path] = SparsityInfo(module=by_path[path].module, pattern=self.pattern if not keep else KEEP,
                                              method=self.method if not keep else KEEP, zeros=z, numel=weight.numel())
        info = {"pruned_weights": len(pruned), "sparsity": zeros / total if total else 0.0,
                "method": self.method if not keep else KEEP, "pattern": self.pattern if not keep else KEEP,
                "seconds": time.perf_counter() - start}
        return PassResult(gm, True, info)
