"""InsertLoRA: replace matched linears with ``lorafx.lora_linear`` ops.

Requires: a captured graph.  Provides: ``"lora"``.
Preserves: outputs and gradients w.r.t. inputs exactly while B = 0 (the default
init); afterwards only the adapters (A, B) are trainable.

Before::

    %w = get_attr[target=model.layers.0.self_attn.q_proj.weight]
    %linear = call_function[target=aten.linear.default](args=(%x, %w))

After::

    %w = get_attr[target=model.layers.0.self_attn.q_proj.weight]
    %A = get_attr[target=model.layers.0.self_attn.q_proj.lora_A]
    %B = get_attr[target=model.layers.0.self_attn.q_proj.lora_B]
    %..._q_proj_lora = call_function[target=lorafx.lora_linear.default](
        args=(%x, %w, None, %A, %B, 2.0))            # meta: lora(r=8, alpha=16, scale=2)

Options follow PEFT's LoraConfig: ``target_modules`` (list or regex, or
"all-linear" for every linear but the output layer), ``exclude_modules``,
``rank_pattern``/``alpha_pattern`` (regex -> value), ``use_rslora`` (scale =
alpha / sqrt(r), Kalajdzievski 2023), ``dropout`` and ``init`` ("kaiming": A
kaiming-uniform, "gaussian": A ~ N(0, 1/r); B = 0 in both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

import torch
import torch.fx

from lorafx.graph_utils import (LinearSite, find_linear_sites, get_attr, module_matches, pattern_value,
                                safe_name, set_parameter, unique)
from lorafx.meta import LoraRecord, OriginRecord, set_record
from lorafx.pipeline import CAPTURED, Pass, PassResult

__all__ = ["InsertLoRA", "freeze_base"]

ALL_LINEAR = "all-linear"
INITS = ("kaiming", "gaussian")


def _as_tuple(v):
    if v is None or isinstance(v, str):
        return v
    return tuple(v)


@dataclass(frozen=True)
class InsertLoRA(Pass):
    r: int = 8
    alpha: float = 16.0
    target_modules: Union[str, Tuple[str, ...]] = ALL_LINEAR
    exclude_modules: Union[str, Tuple[str, ...], None] = None
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    dropout: float = 0.0
    init: str = "kaiming"
    seed: Optional[int] = None
    freeze: bool = True

    requires = frozenset({CAPTURED})
    provides = frozenset({"lora"})

    def __post_init__(self):
        object.__setattr__(self, "target_modules", _as_tuple(self.target_modules))
        object.__setattr__(self, "exclude_modules", _as_tuple(self.exclude_modules))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        super().__post_init__()

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"InsertLoRA: r must be a positive int, got {self.r!r}")
        for key, r in self.rank_pattern.items():
            if not isinstance(r, int) or r <= 0:
                raise ValueError(f"InsertLoRA: rank_pattern[{key!r}] must be a positive int, got {r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"InsertLoRA: dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"InsertLoRA: unknown init {self.init!r}; choose one of {INITS}")
        if not self.target_modules:
            raise ValueError("InsertLoRA: target_modules is empty; pass module names, a regex or 'all-linear'")

    # -- matching -----------------------------------------------------------------
    def _selected(self, gm: torch.fx.GraphModule, sites):
        outputs = set(gm.meta.get("lorafx_output_modules", []))
        chosen = []
        for s in sites:
            if self.target_modules == ALL_LINEAR:
                ok = s.module not in outputs
            else:
                ok = module_matches(s.module, self.target_modules)
            if ok and not module_matches(s.module, self.exclude_modules):
                chosen.append(s)
        if not chosen:
            names = unique(s.module for s in sites)
            shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
            raise ValueError(
                f"InsertLoRA: target_modules={self.target_modules!r} matched no linear layer. "
                f"Linear modules in this model: {shown or 'none'}"
            )
        return chosen

    def site_config(self, site: LinearSite) -> Tuple[int, float]:
        r = pattern_value(site.module, self.rank_pattern, self.r)
        alpha = float(pattern_value(site.module, self.alpha_pattern, self.alpha))
        limit = min(site.in_features, site.out_features)
        if r > limit:
            raise ValueError(
                f"InsertLoRA: rank {r} for {site.module} exceeds min(in, out) = {limit} "
                f"({site.in_features} -> {site.out_features}); use r <= {limit} or a rank_pattern entry"
            )
        return r, alpha

    # -- rewriting ----------------------------------------------------------------
    def _make_adapters(self, weight: torch.Tensor, site: LinearSite, r: int, gen):
        dtype, device = weight.dtype, weight.device
        A = torch.empty(r, site.in_features, dtype=dtype, device=device)
        B = torch.zeros(site.out_features, r, dtype=dtype, device=device)
        if device.type != "meta":
            if self.init == "kaiming":  # nn.Linear's default init: kaiming_uniform(a=sqrt(5))
                bound = 1.0 / math.sqrt(site.in_features)
                A.copy_(torch.rand(A.shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound)
            else:
                A.copy_(torch.randn(A.shape, generator=gen, dtype=torch.float32) / r)
        return torch.nn.Parameter(A), torch.nn.Parameter(B)

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        sites = self._selected(gm, find_linear_sites(gm))
        configs = [self.site_config(s) for s in sites]  # validate all before touching the graph
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        gen = torch.Generator().manual_seed(seed)
        if self.freeze:
            freeze_base(gm)
        made: Dict[str, Tuple[str, str]] = {}
        for site, (r, alpha) in zip(sites, configs):
            a_path, b_path = f"{site.module}.lora_A", f"{site.module}.lora_B"
            if site.module not in made:  # a module called twice shares its adapter
                A, B = self._make_adapters(get_attr(gm, site.weight.target), site, r, gen)
                set_parameter(gm, a_path, A)
                set_parameter(gm, b_path, B)
                made[site.module] = (a_path, b_path)
            scale = alpha / math.sqrt(r) if self.use_rslora else alpha / r
            bias_path = site.bias.target if isinstance(site.bias, torch.fx.Node) and site.bias.op == "get_attr" else None
            record = LoraRecord(site=site.module, weight=site.weight.target, lora_A=a_path, lora_B=b_path, r=r,
                                alpha=alpha, scale=scale, in_features=site.in_features,
                                out_features=site.out_features, bias=bias_path, dropout=self.dropout,
                                weight_transposed=site.weight_transposed)
            replace_with_lora(gm, site.node, site.x, site.weight, site.bias, record, created_by=self.name)
        gm.graph.eliminate_dead_code()
        trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
        info = {
            "adapter_sites": len(sites),
            "adapted_modules": len(made),
            "trainable_params": trainable,
            "total_params": sum(p.numel() for p in gm.parameters()),
            "rank_pattern": {s.module: c[0] for s, c in zip(sites, configs)},
        }
        return PassResult(gm, True, info)


def replace_with_lora(gm, node, x, weight_node, bias, record: LoraRecord, created_by: str,
                      train: Optional[bool] = None) -> torch.fx.Node:
    """Insert a ``lora_linear`` computing ``node``'s linear plus the adapter; returns the new node."""
    g = gm.graph
    if train is None:
        train = gm.meta.get("lorafx_training", True)
    with g.inserting_before(node):
        w = g.call_function(torch.ops.aten.t.default, (weight_node,)) if record.weight_transposed else weight_node
        a = g.get_attr(record.lora_A)
        b = g.get_attr(record.lora_B)
        mask = None
        if record.dropout > 0:
            mask = g.call_function(torch.ops.lorafx.dropout_mask.default, (x, record.dropout, train))
            set_record(mask, OriginRecord(record.site, created_by=created_by))
        new = g.create_node("call_function", torch.ops.lorafx.lora_linear.default,
                            (x, w, bias, a, b, record.scale, mask, record.dropout),
                            name=safe_name(record.site) + "_lora")
    for key in ("nn_module_stack", "stack_trace", "val"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    set_record(new, OriginRecord(record.site, "Linear", created_by=created_by))
    set_record(new, record)
    node.replace_all_uses_with(new)
    g.erase_node(node)
    return new


def freeze_base(gm: torch.nn.Module) -> int:
    """Replace every parameter by a frozen one sharing its storage (the caller's
    model keeps its own Parameter objects and flags).  Returns how many."""
    seen: Dict[int, torch.nn.Parameter] = {}
    count = 0
    for module in gm.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in seen:
                seen[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=False)
                count += 1
            module._parameters[name] = seen[id(p)]
    return count
