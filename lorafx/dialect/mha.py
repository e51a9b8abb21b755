"""nn.MultiheadAttention as PEFT adapts it: its packed input projection and its output projection.

PEFT's ``lora.MultiheadAttention`` puts one adapter on the packed q/k/v input projection
(``in_proj_weight``, (3E, E): A (r, E), B (3E, r)) and one on ``out_proj`` (A (r, E), B (E, r)),
both selected by naming the attention module itself.  In a captured graph both are ``aten.linear``
nodes that ran in the attention module (it never calls ``out_proj.forward``).  The packed
projection *is* a linear, x W_inᵀ + b_in with W_in (3E, E), so both sites are ``lora_linear`` sites
(no kind of their own): this module only names them as PEFT does.

* The in_proj site is the attention module (``mha``), weight ``mha.in_proj_weight``, adapter
  ``mha.lora_A`` / ``mha.lora_B``; PEFT keys ``mha.lora_A.weight`` / ``mha.lora_B.weight``.
* The out_proj site is ``mha.out_proj``, weight ``mha.out_proj.weight``, adapter
  ``mha.out_proj.lora_A`` / ``lora_B``; PEFT keys ``mha.base_layer.out_proj.lora_A.weight`` /
  ``lora_B.weight`` (PEFT wraps the attention module, then its out_proj).
* Both are selected, ranked and scaled by the attention module's name (``Site.extra["target"]``,
  ``peft_target``): ``target_modules=["mha"]`` adapts both, ``rank_pattern={"mha": 4}`` ranks both.
* PEFT runs these adapters merged into the weights for each forward, so its ``lora_dropout`` never
  applies to them: their records get dropout 0 (``LinearKind.insert``).

Refused, naming the reason (``Site.extra["problem"]``): ``_qkv_same_embed_dim=False`` (separate
q/k/v weights; PEFT refuses it too) and an attention called with different query / key / value
tensors (its input projection then runs on slices of ``in_proj_weight``).
"""
from __future__ import annotations

from typing import Dict, List

from lorafx.meta import LoraRecord, OriginRecord, get_record

__all__ = ["MHA", "mha_sites", "is_mha_out_proj", "peft_target", "mha_peft_tensors"]

MHA = "MultiheadAttention"


def _module_type(node) -> str:
    rec = get_record(node, OriginRecord)
    return rec.module_type if rec is not None else ""


def mha_sites(sites: List) -> List:
    """``sites`` (linear sites, graph order) with those of nn.MultiheadAttention modules named as
    PEFT names them (see the module docstring), in place; returns ``sites``."""
    by_mha: Dict[str, list] = {}
    for s in sites:
        if _module_type(s.node) == MHA:
            by_mha.setdefault(s.module, []).append(s)
    for mha, group in by_mha.items():
        for s in group:
            s.layer = MHA
            s.extra = {**s.extra, "target": mha}
            if s.weight.target == f"{mha}.in_proj_weight":
                s.extra["projection"] = "in_proj"
            elif s.weight.target == f"{mha}.out_proj.weight":
                s.module, s.extra["projection"] = f"{mha}.out_proj", "out_proj"
            else:  # q_proj_weight / k_proj_weight / v_proj_weight
                s.extra["problem"] = ("it has separate query, key and value weights (kdim or vdim differs from "
                                      "embed_dim: _qkv_same_embed_dim=False), which PEFT does not adapt either")
        if not any(s.extra.get("projection") == "in_proj" for s in group):
            for s in group:
                s.extra.setdefault("problem", (
                    "it is called with different query, key and value tensors (cross-attention), so its packed "
                    "input projection runs on slices of in_proj_weight, which lorafx cannot adapt yet"))
    return sites


def is_mha_out_proj(rec: LoraRecord) -> bool:
    """Whether ``rec`` is the adapter of an nn.MultiheadAttention's out_proj."""
    return rec.layer == MHA and rec.site.endswith(".out_proj") and rec.weight == rec.site + ".weight"


def peft_target(rec: LoraRecord) -> str:
    """The module name PEFT targets for ``rec``'s adapter (the attention module for its out_proj)."""
    return rec.site[:-len(".out_proj")] if is_mha_out_proj(rec) else rec.site


def mha_peft_tensors(rec: LoraRecord) -> Dict[str, str]:
    """PEFT's keys for an adapter on an nn.MultiheadAttention projection."""
    where = f"{peft_target(rec)}.base_layer.out_proj" if is_mha_out_proj(rec) else rec.site
    return {f"{where}.lora_A.weight": rec.lora_A, f"{where}.lora_B.weight": rec.lora_B}
