"""InsertLoRA: replace matched layers with their op kind's LoRA op (``lorafx.lora_linear`` for a linear).

Every registered op kind with a ``layer`` finds its sites (``OpKind.find_sites``: linears,
embeddings, convolutions; ``target_parameters`` names bare parameters), says which adapter
tensors to draw (``adapter_init``) and builds its node (``insert``).

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
kaiming-uniform, "gaussian": A ~ N(0, 1/r); B = 0 in both; "lors": LoRS's
initialisation, arXiv 2501.08582 -- the dense weight gradient ∂L/∂W is averaged over up
to ``LORS_BATCHES`` calibration batches, and A's rows are its top-r right singular
vectors, so the first step moves B along the gradient's top-r directions, s·G Aᵀ = s·U_r Σ_r;
B = 0 keeps the identity at init).  PEFT's ``layers_to_transform``/``layers_pattern`` keep
only the sites in those layers (PEFT's rule, ``passes/peft_init.py``); ``lora_bias`` gives B a
bias b (0 at init; the node's bias argument becomes bias + s·b); ``init=False`` draws A and B
(kaiming-uniform, not the identity); ``init="pissa"``/``"pissa_niter_N"``/``"olora"`` take A and
B from the SVD/QR of W and replace the frozen W by a private residual W − s·B A (the model's W is
untouched), keeping A₀, B₀ as buffers ``lora_A0``/``lora_B0`` for ``save_adapter``'s conversion.
After AllocateRanks (``rank_budget=...``) it adapts exactly the sites the graph record's
``allocation`` gives a rank, at that rank.

``use_dora=True`` (PEFT's option; DoRA, arXiv 2402.09353) builds ``lorafx.lora_dora`` nodes
instead on linear sites (``lorafx/dialect/dora.py``), and ``lora_dora_conv`` /
``lora_dora_embedding`` on convolution and embedding sites (``lorafx/dialect/dora_layers.py``), with
a trainable magnitude ``<site>.lora_magnitude`` (PEFT's shape) that starts at ||W + s·ΔW|| as PEFT's
does, so the model is still the identity at init.  Sites of other layer kinds (target_parameters)
are refused with use_dora (nothing is built).  On the meta device the magnitude is planned
empty and ``lorafx.materialize`` computes it from the loaded W and the drawn A and B.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.fx

from lorafx import options as O
from lorafx.context import CompileContext
from lorafx.dialect import CONV, DORA, DORA_CONV, DORA_EMBEDDING, EMBEDDING, LINEAR, PARAMETER, kind_named, kinds
from lorafx.dialect.dora import MAGNITUDE
from lorafx.graph_utils import (LinearSite, Site, get_attr, module_matches, node_module,
                                owner_and_name, pattern_value, set_parameter, unique)
from lorafx.meta import DeferredInit, LoraRecord, graph_record
from lorafx.options import Option
from lorafx.pipeline import CAPTURED, Pass, PassResult

from . import peft_init
from .modules_to_save import is_saved_module
from .score_sites import Candidate, mean_weight_gradients

__all__ = ["InsertLoRA", "draw_A", "freeze_base", "find_adapter_sites", "select_linear_sites", "shared_weight_user"]


def draw_A(shape, init: str, r: int, gen: torch.Generator) -> torch.Tensor:
    """An adapter tensor (float32) drawn from ``gen`` by rule: "kaiming" is nn.Linear's default
    (kaiming-uniform with a = sqrt(5): bound 1/sqrt(fan_in), fan_in = prod(shape[1:])),
    "gaussian" is N(0, 1/r^2), "normal" N(0, 1), "zeros" draws nothing."""
    shape = tuple(shape)
    if init == "kaiming":
        bound = 1.0 / math.sqrt(math.prod(shape[1:]))
        return torch.rand(shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound
    if init == "gaussian":
        return torch.randn(shape, generator=gen, dtype=torch.float32) / r
    if init == "normal":
        return torch.randn(shape, generator=gen, dtype=torch.float32)
    if init == "zeros":
        return torch.zeros(shape, dtype=torch.float32)
    raise ValueError(f"draw_A: no drawing rule for init={init!r} (kaiming, gaussian, normal, zeros)")


log = logging.getLogger("lorafx")

ALL_LINEAR = "all-linear"
INITS = ("kaiming", "gaussian", "lors")
LORS_BATCHES = 16  # calibration batches init="lors" averages the weight gradient over
_ALPHA_WHY = (": the adapters' output is scaled by alpha / r (alpha / sqrt(r) with use_rslora), so 0 means "
              "they never change the model and nan or inf makes every output nan")


def _check_alpha(name, value, where):
    O.check_positive_real(name, value, where, _ALPHA_WHY)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def _check_adapter_dtype(name, value, where):
    if value is None or (isinstance(value, torch.dtype) and value in _DTYPES.values()):
        return
    if isinstance(value, str) and value.replace("torch.", "") in _DTYPES:
        return
    raise (ValueError if isinstance(value, (str, torch.dtype)) else TypeError)(
        f"{where}{name} must be a floating dtype or its name, got {value!r}; pass e.g. {name}='float32' "
        f"(one of {sorted(set(_DTYPES))}) or None for the weight's dtype")


def _check_parameters(name, value, where):
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{where}{name} must be a list of parameter names (PEFT takes no regex here), got {value!r}; "
                        f"pass e.g. {name}=['experts.gate_up_proj']")


def _as_tuple(v):
    if v is None or isinstance(v, str):
        return v
    return tuple(v)


@dataclass(frozen=True)
class InsertLoRA(Pass):
    r: int = 8
    alpha: float = 16.0
    target_modules: Union[str, Tuple[str, ...], None] = None  # None: all-linear, or none with target_parameters
    exclude_modules: Union[str, Tuple[str, ...], None] = None
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    dropout: float = 0.0
    init: Union[str, bool] = "kaiming"
    layers_to_transform: Union[int, Tuple[int, ...], None] = None
    layers_pattern: Union[str, Tuple[str, ...], None] = None
    lora_bias: bool = False
    fan_in_fan_out: Optional[bool] = None
    seed: Optional[int] = None
    freeze: bool = True
    adapter_dtype: Optional[str] = None
    autocast_adapter_dtype: bool = False
    use_dora: bool = False
    target_parameters: Optional[Tuple[str, ...]] = None

    requires = frozenset({CAPTURED})
    provides = frozenset({"lora"})
    invalidates = frozenset({"cost"})
    options = (
        Option("r", int, 8, "LoRA rank", check=O.check_positive_int),
        Option("alpha", float, 16.0, "LoRA alpha; scale = alpha / r", check=_check_alpha),
        Option("target_modules", (str, list, type(None)), None,
               "'all-linear' (every linear but the output layer), a list of module names (PEFT's suffix rule) "
               "or a regex; None (PEFT's default): 'all-linear', or no modules when target_parameters is given",
               check=lambda name, value, where: O.check_modules(name, value, where, allow_none=True),
               default_text="None ('all-linear')"),
        Option("exclude_modules", (str, list, type(None)), None, "module names or a regex to leave alone",
               check=lambda name, value, where: O.check_modules(name, value, where, allow_none=True)),
        Option("rank_pattern", dict, {}, "PEFT-style {regex: rank}",
               check=lambda name, value, where: O.check_pattern_dict(name, value, O.check_positive_int, where,
                                                                     "{'q_proj': 16}")),
        Option("alpha_pattern", dict, {}, "PEFT-style {regex: alpha}",
               check=lambda name, value, where: O.check_pattern_dict(name, value, _check_alpha, where,
                                                                     "{'q_proj': 32}")),
        Option("use_rslora", bool, False, "scale = alpha / sqrt(r) (rsLoRA, arXiv 2312.03732)"),
        Option("dropout", float, 0.0, "adapter dropout probability, on in train(), off in eval(); saved as a "
               "boolean mask, never a copy of x", check=O.check_probability),
        Option("init", (str, bool), "kaiming", "'kaiming' or 'gaussian' init of A, or 'lors' (A = the top-r right "
               "singular vectors of the mean weight gradient on calibration= batches); B starts at 0. PEFT's: False "
               "(A and B both kaiming-uniform, not the identity: for tests), 'pissa' / 'pissa_niter_N' (A, B from "
               "the top-r SVD of W) and 'olora' (from W = QR): these two train against the residual W - s·BA, a "
               "private copy, and save_adapter writes a plain rank-2r LoRA for the original W",
               check=lambda name, value, where: peft_init.check_init(name, value, where, INITS)),
        Option("layers_to_transform", (int, list, type(None)), None,
               "PEFT's: adapt only the layers with these indices (with a list of target_modules)",
               check=lambda name, value, where: peft_init.check_layer_options(value, None, None, where)),
        Option("layers_pattern", (str, list, type(None)), None,
               "PEFT's: the name(s) before the layer index in module paths ('layers', 'h'); default: the first "
               "numbered segment",
               check=lambda name, value, where: peft_init.check_layer_options(0, value, None, where)),
        Option("lora_bias", bool, False, "PEFT's: B gets a trainable bias (starts at 0), scaled by s like B A; "
               "merging adds s·b to the layer's bias"),
        Option("fan_in_fan_out", (bool, type(None)), None,
               "PEFT's: the weight is stored (in, out); lorafx reads the layout from the layer and warns, as PEFT "
               "does, where it differs", check=lambda name, value, where: None if value is None
               else O.check_bool(name, value, where)),
        Option("adapter_dtype", (str, torch.dtype, type(None)), None,
               "dtype of A and B ('float32', 'bfloat16', ...; None: the weight's); the adapter products run in it, "
               "the result is rounded to the input's dtype once", check=_check_adapter_dtype),
        Option("autocast_adapter_dtype", bool, False,
               "PEFT's option: adapters on float16/bfloat16 weights in float32 (PEFT's default is True, lorafx's "
               "False: adapters in the weight's dtype)"),
        Option("use_dora", bool, False,
               "DoRA (arXiv 2402.09353), PEFT's option: each adapted linear's rows rescaled to a trained magnitude "
               "m / ||W + s·B·A||, m starting at that norm (linear, convolution and embedding layers)"),
        Option("target_parameters", (list, type(None)), None,
               "PEFT's target_parameters: names of 2-d parameters used directly (x @ self.weight) to adapt as "
               "W + s·B A where they are read ('module.param', PEFT's suffix rule)", check=_check_parameters),
    )

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)
        if self.target_modules is None and not self.target_parameters:  # PEFT: None adapts parameters only
            put("target_modules", ALL_LINEAR)
        super().__post_init__()  # validate the options as given, then normalise them
        put("r", int(self.r))
        put("alpha", float(self.alpha))
        put("dropout", float(self.dropout))
        put("seed", None if self.seed is None else int(self.seed))
        put("target_modules", _as_tuple(self.target_modules))
        if isinstance(self.layers_to_transform, (list, tuple, set, frozenset)):
            put("layers_to_transform", tuple(sorted(self.layers_to_transform)))
        if isinstance(self.layers_pattern, (list, tuple)):
            put("layers_pattern", tuple(self.layers_pattern))
        if self.init is True:
            put("init", "kaiming")
        put("exclude_modules", _as_tuple(self.exclude_modules))
        put("target_parameters", _as_tuple(self.target_parameters) or None)
        put("rank_pattern", {k: int(v) for k, v in self.rank_pattern.items()})
        put("alpha_pattern", {k: float(v) for k, v in self.alpha_pattern.items()})
        if self.adapter_dtype is not None:
            dtype = _DTYPES[self.adapter_dtype.replace("torch.", "")] if isinstance(self.adapter_dtype, str) \
                else self.adapter_dtype
            put("adapter_dtype", str(dtype).split(".")[-1])  # its name: 'float32'

    def validate(self) -> None:
        where = "InsertLoRA: "
        O.check_positive_int("r", self.r, where)
        O.check_positive_real("alpha", self.alpha, where, _ALPHA_WHY)
        O.check_modules("target_modules", self.target_modules, where, allow_none=True)
        _check_parameters("target_parameters", self.target_parameters, where)
        if not self.target_modules and not self.target_parameters:
            raise ValueError(f"InsertLoRA: target_modules is empty (got {self.target_modules!r}); pass module names, "
                             "e.g. target_modules=['q_proj', 'v_proj'], a regex or 'all-linear' (or "
                             "target_parameters=[...] to adapt parameters only)")
        O.check_modules("exclude_modules", self.exclude_modules, where, allow_none=True)
        O.check_pattern_dict("rank_pattern", self.rank_pattern, O.check_positive_int, where, "{'q_proj': 16}")
        O.check_pattern_dict("alpha_pattern", self.alpha_pattern,
                             lambda name, v, w: O.check_positive_real(name, v, w, _ALPHA_WHY), where,
                             "{'q_proj': 32}")
        O.check_bool("use_rslora", self.use_rslora, where)
        O.check_probability("dropout", self.dropout, where)
        peft_init.check_init("init", self.init, where, INITS)
        peft_init.check_layer_options(self.layers_to_transform, self.layers_pattern, self.target_modules, where)
        O.check_bool("lora_bias", self.lora_bias, where)
        if self.use_dora and (self.lora_bias or peft_init.is_residual_init(self.init)):
            what = "lora_bias=True" if self.lora_bias else f"init={self.init!r}"
            raise ValueError(f"{where}use_dora=True with {what} is not implemented in lorafx (PEFT refuses DoRA with "
                             f"lora_bias too); drop one of them")
        if self.lora_bias and self.init not in ("kaiming", "gaussian", False):
            raise ValueError(f"{where}lora_bias=True works with init 'kaiming', 'gaussian' or False (as in PEFT), "
                             f"got init={self.init!r}; pass lora_bias=False or another init")
        O.check_seed("seed", self.seed, where)
        O.check_bool("freeze", self.freeze, where)
        _check_adapter_dtype("adapter_dtype", self.adapter_dtype, where)
        O.check_bool("autocast_adapter_dtype", self.autocast_adapter_dtype, where)
        O.check_bool("use_dora", self.use_dora, where)
        if self.adapter_dtype is not None and self.autocast_adapter_dtype:
            raise ValueError(f"{where}adapter_dtype={self.adapter_dtype!r} and autocast_adapter_dtype=True both choose "
                             "the adapters' dtype; pass one of them")

    def dtype_for(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The adapters' dtype on a weight of ``weight_dtype``."""
        if self.adapter_dtype is not None:
            return _DTYPES[self.adapter_dtype]
        if self.autocast_adapter_dtype and weight_dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return weight_dtype

    def site_config(self, site: LinearSite, allocation: Optional[Dict[str, int]] = None) -> Tuple[int, float]:
        name = pattern_name(site)
        r = allocation[site.module] if allocation is not None else pattern_value(name, self.rank_pattern, self.r)
        alpha = float(pattern_value(name, self.alpha_pattern, self.alpha))
        return r, alpha

    # -- rewriting ----------------------------------------------------------------
    def _make_adapters(self, weight: torch.Tensor, site: Site, r: int, gen, lors=None, deferred=None,
                       residual=None) -> Dict[str, torch.nn.Parameter]:
        """The site's adapter tensors (``OpKind.adapter_init``: A and B = 0 for a linear) as
        Parameters, drawn in order from ``gen``.  On the meta device they stay empty and their
        draws are appended to ``deferred`` (``lorafx.materialize`` replays them).  init=False
        draws every tensor (a "zeros" rule becomes kaiming-uniform: nn.Linear's default, fan-in r
        for B, PEFT's rule); a residual init (PiSSA, OLoRA) takes A and B from ``residual``."""
        dtype, device = self.dtype_for(weight.dtype), weight.device
        init = "kaiming" if self.init is False or peft_init.is_residual_init(self.init) else self.init
        out = {}
        for name, (shape, rule) in kind_named(site.kind).adapter_init(site, r, init).items():
            if self.init is False and rule == "zeros":
                rule = "kaiming"
            if device.type == "meta":
                value = torch.empty(shape, dtype=dtype, device=device)
                deferred.append((f"{site.module}.{name}", tuple(shape), rule, r))
            elif residual is not None and name in ("lora_A", "lora_B"):
                value = residual[0 if name == "lora_A" else 1].to(dtype=dtype, device=device)
            elif lors is not None and name == "lora_A":
                value = lors[site.module][:r].to(dtype)
            else:
                value = draw_A(shape, rule, r, gen).to(dtype=dtype, device=device)
            out[name] = torch.nn.Parameter(value)
        return out

    def _make_bias(self, weight: torch.Tensor, site: Site, r: int, gen) -> torch.nn.Parameter:
        """B's bias (lora_bias=True): 0, or with init=False uniform ±1/sqrt(r) (nn.Linear's bias rule)."""
        b = torch.zeros(site.out_features, dtype=self.dtype_for(weight.dtype), device=weight.device)
        if self.init is False and not b.is_meta:
            b.copy_((torch.rand(site.out_features, generator=gen, dtype=torch.float32) * 2 - 1) / math.sqrt(r))
        return torch.nn.Parameter(b)

    def _make_magnitude(self, gm, site: Site, A: torch.Tensor, B: torch.Tensor, scale: float):
        """DoRA's magnitude m = ||W + s·ΔW|| (PEFT's init: its DoRA kind's ``initial_magnitude``, in PEFT's
        shape), in the adapters' dtype."""
        W = get_attr(gm, site.weight.target).detach()
        with torch.no_grad():
            n = DORA_KIND_OF[site.kind].initial_magnitude(W, A.detach(), B.detach(), scale, site.weight_transposed)
        return torch.nn.Parameter(n.to(A.dtype))

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        found = [s for s in find_adapter_sites(gm) if not is_saved_module(gm, s.module)]  # modules_to_save wins (PEFT)
        sites = select_linear_sites(gm, found, self.target_modules, self.exclude_modules) if self.target_modules else []
        sites = self._in_layers(sites)  # PEFT's layers_to_transform (target_modules only)
        if self.target_parameters:  # PEFT's target_parameters: bare parameters, adapted where they are read
            sites = _with_parameter_sites(gm, sites, self.target_parameters, self.dropout)
        _refuse_kind_limits(sites)
        allocation = graph_record(gm).allocation  # AllocateRanks' ranks: sites without one get no adapter
        if allocation is not None:
            _refuse_unallocated_kinds(sites)
            sites = [s for s in sites if allocation.get(s.module, 0) > 0]
        _refuse_shared_weights(gm, [s for s in sites if s.kind != PARAMETER.name])  # (parameter_sites checks those)
        if self.use_dora:
            _refuse_dora_on_other_layers(sites)
        configs = [self.site_config(s, allocation) for s in sites]  # validate all before touching the graph
        self._check_peft_options(gm, ctx, sites, configs)
        above = [(s, r) for s, (r, _) in zip(sites, configs)
                 if r > min(s.extra.get("fan_in", s.in_features), s.out_features)]  # (a conv: in · kernel size)
        if above:
            if self.init == "lors":
                s, r = above[0]
                raise ValueError(f"InsertLoRA: init='lors' takes A from the top-r singular vectors of the weight "
                                 f"gradient, but rank {r} for {s.module} exceeds min(in, out) = "
                                 f"{min(s.in_features, s.out_features)}; use r <= that or init='kaiming'")
            ctx.decide("rank_above_limit_warned", lambda: _warn_rank_above_limit(above))  # once, not per capture
        if self.init == "lors":
            other = next((s for s in sites if s.kind != LINEAR.name), None)
            if other is not None:
                raise ValueError(f"InsertLoRA: init='lors' initialises linear adapters from the weight gradient, but "
                                 f"target_modules also selects {other.module!r} ({other.layer}); leave it out or use "
                                 "init='kaiming'")
        seed = self.seed if self.seed is not None else ctx.decide("seed", ctx.draw_seed)  # replayed per capture
        gen = torch.Generator().manual_seed(seed)
        lors = ctx.decide("lors_init", lambda: lors_directions(gm, ctx, sites, configs, seed)) \
            if self.init == "lors" else None
        residuals = ctx.decide("residual_init", lambda: self._residuals(gm, sites, configs, seed)) \
            if peft_init.is_residual_init(self.init) else {}
        if self.freeze:
            freeze_base(gm)
        made: Dict[str, Dict[str, str]] = {}
        deferred: List[Tuple[str, Tuple[int, ...], str, int]] = []
        replaced: Dict[torch.fx.Node, torch.fx.Node] = {}  # a site's node -> its adapter node (a site fed by one)
        train = graph_record(gm).training is not False
        for site, (r, alpha) in zip(sites, configs):
            kind = DORA_KIND_OF[site.kind] if self.use_dora else kind_named(site.kind)
            scale = alpha / math.sqrt(r) if self.use_rslora else alpha / r
            residual = residuals.get(site.module)
            if site.module not in made:  # a module called twice shares its adapter
                weight = get_attr(gm, site.weight.target)
                tensors = self._make_adapters(weight, site, r, gen, lors, deferred, residual)
                if self.lora_bias:
                    tensors["lora_bias"] = self._make_bias(weight, site, r, gen)
                if self.use_dora:  # m = ||W + s·B A|| from the drawn A and B
                    tensors[MAGNITUDE] = self._make_magnitude(gm, site, tensors["lora_A"], tensors["lora_B"], scale)
                for name, value in tensors.items():
                    set_parameter(gm, f"{site.module}.{name}", value)
                made[site.module] = {name: f"{site.module}.{name}" for name in tensors}
                if residual is not None:  # the frozen W becomes a private residual: the model's W is untouched
                    set_parameter(gm, site.weight.target, torch.nn.Parameter(residual[2], requires_grad=False))
                    for name, value in (("lora_A0", tensors["lora_A"]), ("lora_B0", tensors["lora_B"])):
                        owner, attr = owner_and_name(gm, f"{site.module}.{name}")
                        owner.register_buffer(attr, value.detach().clone())  # the init, for save_adapter
                        made[site.module][name] = f"{site.module}.{name}"
            paths = made[site.module]
            bias_path = site.bias.target if isinstance(site.bias, torch.fx.Node) and site.bias.op == "get_attr" else None
            record = LoraRecord(site=site.module, weight=site.weight.target, lora_A=paths["lora_A"],
                                lora_B=paths["lora_B"], r=r, alpha=alpha, scale=scale, in_features=site.in_features,
                                out_features=site.out_features, bias=bias_path, dropout=self.dropout,
                                weight_transposed=site.weight_transposed, kind=kind.name, layer=site.layer,
                                magnitude=paths.get(MAGNITUDE), lora_bias=paths.get("lora_bias"),
                                lora_A0=paths.get("lora_A0"), lora_B0=paths.get("lora_B0"))
            x = replaced.get(site.x, site.x)
            replaced[site.node] = kind.insert(gm, site, record, x, train=train, created_by=self.name)
        gm.graph.eliminate_dead_code()
        if deferred:
            graph_record(gm).deferred_init += (DeferredInit(seed, tuple(deferred)),)
        trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
        info = {
            "adapter_sites": len(sites),
            "adapted_modules": len(made),
            "trainable_params": trainable,
            "total_params": sum(p.numel() for p in gm.parameters()),
            "rank_pattern": {s.module: c[0] for s, c in zip(sites, configs)},
            "sites_by_layer": dict(Counter(s.layer for s in {s.module: s for s in sites}.values())),
        }
        return PassResult(gm, True, info)

    # -- PEFT's options ---------------------------------------------------------------
    def _in_layers(self, sites):
        """``sites`` in the layers ``layers_to_transform`` keeps (PEFT's rule, ``peft_init``)."""
        if self.layers_to_transform is None or not sites:
            return sites
        kept = [s for s in sites if peft_init.in_selected_layers(s.module, self.target_modules,
                                                                 self.layers_to_transform, self.layers_pattern)]
        if not kept:
            found = sorted({i for i in (peft_init.layer_index(s.module, self.layers_pattern) for s in sites)
                            if i is not None})
            raise ValueError(
                f"InsertLoRA: layers_to_transform={self.layers_to_transform!r}"
                + (f" (layers_pattern={self.layers_pattern!r})" if self.layers_pattern else "")
                + f" keeps none of the {len(sites)} module(s) target_modules matched "
                f"(e.g. {sites[0].module}); their layer indices: {found or 'none found'}. Pass indices among those"
                + ("" if found else ", or a layers_pattern naming the segment before the index (e.g. 'layers')"))
        return kept

    def _check_peft_options(self, gm, ctx: CompileContext, sites, configs) -> None:
        """Refuse what PiSSA/OLoRA cannot do here; warn once where fan_in_fan_out disagrees with a layout."""
        if self.init is False and self.lora_bias and any(get_attr(gm, s.weight.target).is_meta for s in sites):
            raise ValueError("InsertLoRA: init=False with lora_bias=True draws B's bias, which lorafx.materialize "
                             "does not replay; compile with real weights, or use init='kaiming' on the meta device")
        # lora_bias needs a kind that adds B's bias (``supports_lora_bias``: lora_linear, lora_conv); PiSSA/OLoRA
        # factorise a 2-d (out, in) weight: linear layers only
        other = next((s for s in sites if (peft_init.is_residual_init(self.init) and s.kind != LINEAR.name)
                      or (self.lora_bias and not kind_named(s.kind).supports_lora_bias)), None)
        if other is not None:
            what = "lora_bias=True" if self.lora_bias else f"init={self.init!r}"
            raise ValueError(f"InsertLoRA: lorafx does not implement {what} for {other.layer} layers, and "
                             f"target_modules selects {other.module!r} ({other.layer}); leave it out "
                             f"(exclude_modules) or drop {what}")
        if self.fan_in_fan_out is not None:
            wrong = [s for s in sites if s.weight_transposed != self.fan_in_fan_out]
            if wrong:
                ctx.decide("fan_in_fan_out_warned", lambda: _warn_fan_in_fan_out(wrong, self.fan_in_fan_out))
        if not peft_init.is_residual_init(self.init):
            return
        where = f"InsertLoRA: init={self.init!r}"
        if graph_record(gm).allocation is not None:
            raise ValueError(f"{where} replaces the frozen weights by residuals of the rank-r factors, which a rank "
                             "allocation (rank_budget=..., ReallocateRanks) would have to redo at other ranks; use "
                             "rank_pattern for per-layer ranks, or init='kaiming' with rank_budget")
        if graph_record(gm).sparsity:
            raise ValueError(f"{where} replaces the frozen weights by residuals, which would not keep the zeros "
                             "of pruned weights (sparsity=...); use init='kaiming' with sparsity")
        if any(get_attr(gm, s.weight.target).is_meta for s in sites):
            raise ValueError(f"{where} needs the weights' values (they are on the meta device); load them first, "
                             "or use init='kaiming'")
        for s, (r, _) in zip(sites, configs):
            if r > min(s.in_features, s.out_features):
                raise ValueError(f"{where} takes A and B from a rank-r factorisation of W, but rank {r} for "
                                 f"{s.module} exceeds min(in, out) = {min(s.in_features, s.out_features)}; use "
                                 "r <= that (rank_pattern) or init='kaiming'")

    def _residuals(self, gm, sites, configs, seed: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """{module: (A, B, residual weight)} of a PiSSA/OLoRA init (one per module, from its source weight)."""
        out = {}
        for s, (r, alpha) in zip(sites, configs):
            if s.module not in out:
                scale = alpha / math.sqrt(r) if self.use_rslora else alpha / r
                out[s.module] = peft_init.residual_init(get_attr(gm, s.weight.target), r, scale, self.init,
                                                        transposed=s.weight_transposed, seed=seed)
        return out


def _warn_fan_in_fan_out(wrong, flag: bool) -> bool:
    log.warning("lorafx: fan_in_fan_out=%s but %d adapted layer(s) store their weight the other way (e.g. %s, "
                "%s); lorafx uses each layer's own layout, as PEFT does after its warning", flag, len(wrong),
                wrong[0].module, "(in, out): a Conv1D" if wrong[0].weight_transposed else "(out, in): an nn.Linear")
    return True


def lors_directions(gm: torch.fx.GraphModule, ctx: CompileContext, sites, configs, seed: int) -> Dict[str, torch.Tensor]:
    """{module: the top-r right singular vectors (r, in) of its mean weight gradient} for
    init="lors" (float32; a randomised SVD, seeded, for matrices over 2048 on their short side)."""
    if ctx.calibration is None:
        raise ValueError("init='lors' initialises A from the weight gradient on calibration data: pass "
                         "calibration=[batch, ...] (batches of the model's inputs, with labels or a causal LM's "
                         "input_ids), or use init='kaiming'")
    if any(get_attr(gm, s.weight.target).is_meta for s in sites):
        raise ValueError("init='lors' needs the weights' values (they are on the meta device); load them first, "
                         "or use init='kaiming'")
    ranks = {}
    for site, (r, _) in zip(sites, configs):
        ranks[site.module] = max(r, ranks.get(site.module, 0))
    unique_sites = list({s.module: s for s in sites}.values())
    candidates = [Candidate(s.module, "linear", s.in_features, s.out_features, weight=s.weight.target,
                            transposed=s.weight_transposed) for s in unique_sites]
    grads = mean_weight_gradients(gm, ctx, candidates, seed=seed, max_batches=LORS_BATCHES)
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module, G in grads.items():
            r = ranks[module]
            if min(G.shape) > 2048:
                _, _, V = torch.svd_lowrank(G, q=min(r + 10, min(G.shape)), niter=4)
                out[module] = V[:, :r].t().contiguous().float()
            else:
                out[module] = torch.linalg.svd(G, full_matrices=False).Vh[:r].contiguous().float()
    return out


# use_dora=True: the DoRA kind built on each LoRA kind's sites
DORA_KIND_OF = {LINEAR.name: DORA, CONV.name: DORA_CONV, EMBEDDING.name: DORA_EMBEDDING}


def _refuse_dora_on_other_layers(sites) -> None:
    """use_dora with a selected site no DoRA kind adapts (a target_parameters parameter) is refused,
    naming it (nothing is built)."""
    other = [s for s in sites if s.kind not in DORA_KIND_OF]
    if other:
        shown = ", ".join(f"{s.module!r} ({s.layer})" for s in other[:6]) + (
            f" and {len(other) - 6} more" if len(other) > 6 else "")
        raise ValueError(f"InsertLoRA: use_dora=True adapts linear, convolution and embedding layers, but "
                         f"{len(other)} other site(s) are selected: {shown}; nothing was compiled. Leave them out "
                         "of target_modules (or add them to exclude_modules) and target_parameters, or compile "
                         "without use_dora")


def _warn_rank_above_limit(above) -> bool:
    site, r = above[0]
    log.warning("lorafx: %d adapter(s) have a rank above min(in, out) of their layer (e.g. r=%d on %s, %d -> %d); "
                "PEFT accepts this and so does lorafx, but B·A then has rank at most min(in, out): the extra rank "
                "adds parameters, not capacity", len(above), r, site.module, site.in_features, site.out_features)
    return True


def _module_types(gm: torch.fx.GraphModule) -> Dict[str, str]:
    """{module path: class name} of every module the graph's nodes ran in (nn_module_stack)."""
    out: Dict[str, str] = {}
    for n in gm.graph.nodes:
        for path, mtype in (n.meta.get("nn_module_stack") or {}).values():
            name = mtype if isinstance(mtype, str) else getattr(mtype, "__qualname__", str(mtype))
            out.setdefault(path, name.rsplit(".", 1)[-1])
    return out


def target_name(site) -> str:
    """The module name ``target_modules`` selects ``site`` by: its module's, or for the projections of an
    nn.MultiheadAttention the attention module's (PEFT adapts both when it is named)."""
    return site.extra.get("target", site.module)


def pattern_name(site) -> str:
    """The name rank_pattern/alpha_pattern keys are matched against: the module's, for a
    target_parameters site the parameter's ('module.param'), and for an nn.MultiheadAttention's
    projections the attention's (``target_name``), as PEFT matches them."""
    return f"{site.module}.{site.extra['parameter']}" if site.kind == PARAMETER.name else target_name(site)


def _with_parameter_sites(gm: torch.fx.GraphModule, sites, names, dropout: float = 0.0) -> List[Site]:
    """``sites`` and the sites of the parameters ``names`` selects, in graph order; refuses a
    parameter whose module target_modules also adapts (PEFT would stack two adapters on it),
    and dropout (an adapted parameter has no input to drop, as PEFT says too)."""
    params = PARAMETER.parameter_sites(gm, names)
    if dropout > 0:
        raise ValueError(f"InsertLoRA: dropout={dropout:g} cannot apply to target_parameters ({params[0].module}."
                         f"{params[0].extra['parameter']}): the adapter changes the parameter, not an input it could "
                         "drop (PEFT refuses lora_dropout there too); compile with dropout=0")
    taken = {s.weight.target: s for s in sites}
    modules = {s.module: s for s in sites}
    for p in params:
        clash = taken.get(p.weight.target) or modules.get(p.module)
        if clash is not None:
            raise ValueError(f"InsertLoRA: {p.module}.{p.extra['parameter']} is named by target_parameters and its "
                             f"module {clash.module!r} ({clash.layer}) by target_modules; adapt it one way: leave it "
                             "out of one of them")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted([*sites, *params], key=lambda s: order[s.node])


def _refuse_kind_limits(sites) -> None:
    """A selected site its kind cannot adapt as PEFT does (``refuse(site)``, where a kind has it:
    an embedding with max_norm) is an error naming it, before anything is built."""
    for s in sites:
        why = getattr(kind_named(s.kind), "refuse", lambda site: None)(s)
        if why:
            raise ValueError(f"InsertLoRA: {why}; nothing was compiled")


def find_adapter_sites(gm: torch.fx.GraphModule) -> List[Site]:
    """Every site some registered op kind adapts (``OpKind.find_sites`` of the kinds with a
    ``layer``), in graph order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found = [s for kind in kinds() if kind.layer for s in kind.find_sites(gm)]
    return sorted(found, key=lambda s: order[s.node])


def _refuse_unallocated_kinds(sites) -> None:
    """AllocateRanks scores linear layers only: a selected site of another kind would silently get no adapter."""
    other = [s for s in sites if s.kind != LINEAR.name or s.layer == "MultiheadAttention"]  # (PEFT: one rank for both)
    if other:
        shown = ", ".join(unique(f"{target_name(s)!r} ({s.layer})" for s in other)[:4])
        raise ValueError(f"InsertLoRA: rank_budget allocates ranks to linear layers only, but target_modules also "
                         f"selects {shown}; leave them out of target_modules (or add them to exclude_modules), "
                         "or compile without rank_budget")


def _refuse_unadaptable(gm: torch.fx.GraphModule, sites, target_modules, exclude_modules, where: str) -> None:
    """No silent partial adaptation: every module with parameters that ``target_modules`` names
    and lorafx cannot adapt (an embedding, a convolution, a norm, a container such as an
    attention block, an nn.MultiheadAttention) is an error naming it, its kind and what to
    do, before anything is built.  Parameter-free modules (activations) are ignored."""
    linear = {s.module for s in sites} | {target_name(s) for s in sites}  # every adaptable site
    holding = set()  # modules holding parameters, themselves or below (a parameter-free act_fn is never an adapter site)
    for name, _ in gm.named_parameters():
        parts = name.split(".")[:-1]
        holding.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    bad = [(path, mtype) for path, mtype in _module_types(gm).items()
           if path in holding and path not in linear and module_matches(path, target_modules)
           and not module_matches(path, exclude_modules) and not is_saved_module(gm, path)]
    if not bad:
        return
    shown = ", ".join(f"{p!r} ({t})" for p, t in bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
    inside = unique(s.module for s in sites if any(s.module.startswith(p + ".") for p, _ in bad) and s.module in linear)
    hint = (f", or name the linear layers inside them ({', '.join(unique(m.rsplit('.', 1)[-1] for m in inside)[:8])})"
            if inside else "")
    raise ValueError(
        f"{where}: target_modules={target_modules!r} names {len(bad)} module(s) lorafx cannot adapt: {shown}. "
        f"lorafx adapts these layer types: {', '.join(adaptable_layers())}; the others are not supported yet, "
        "and nothing was compiled. Remove them from target_modules"
        f"{hint}")


def adaptable_layers() -> List[str]:
    """The layer types some registered op kind adapts ("Linear (nn.Linear, transformers' Conv1D)", ...)."""
    names = {"Linear": "Linear (nn.Linear, transformers' Conv1D, nn.MultiheadAttention's projections)"}
    return unique(names.get(k.layer, k.layer) for k in kinds() if k.layer)


def select_linear_sites(gm: torch.fx.GraphModule, sites, target_modules, exclude_modules,
                        where: str = "InsertLoRA") -> list:
    """The linear sites ``target_modules`` selects ("all-linear": every linear but the model's
    output layer) and ``exclude_modules`` does not exclude.  Raises if none is selected, or if
    ``target_modules`` names a module lorafx cannot adapt (never a silent partial adaptation) or a
    selected site its kind cannot adapt as PEFT does (``Site.extra["problem"]``: a dilated convolution,
    a cross-attention; "all-linear" leaves those alone with a warning).  An nn.MultiheadAttention's
    two projections are selected by the attention's name (``target_name``)."""
    outputs = set(graph_record(gm).output_modules)
    if target_modules != ALL_LINEAR:
        _refuse_unadaptable(gm, sites, target_modules, exclude_modules, where)
    chosen = []
    for s in sites:
        name = target_name(s)
        if target_modules == ALL_LINEAR:  # PEFT's all-linear: linear layers only, not the output layer
            ok = s.kind == LINEAR.name and s.module not in outputs
        else:
            ok = module_matches(name, target_modules)
            if not ok and name != s.module and module_matches(s.module, target_modules):
                raise ValueError(
                    f"{where}: target_modules={target_modules!r} names {s.module!r}, a projection of the "
                    f"{s.layer} {name!r}, which runs it inside its own forward (never calling out_proj's, so PEFT's "
                    "adapter on out_proj alone never runs): PEFT adapts the input and output projections together "
                    f"when the attention module is named. Target {name!r} instead (nothing was compiled)")
        if ok and not module_matches(name, exclude_modules):
            chosen.append(s)
    problems = [s for s in chosen if s.extra.get("problem")]
    if problems and target_modules == ALL_LINEAR:  # not named by the user: left alone, said once
        log.warning("lorafx: %s: all-linear leaves %s unadapted: %s", where,
                    ", ".join(unique(f"{target_name(s)} ({s.layer})" for s in problems)[:5]), problems[0].extra["problem"])
        chosen, problems = [s for s in chosen if not s.extra.get("problem")], []
    if problems:
        s = problems[0]
        raise ValueError(f"{where}: cannot adapt {target_name(s)!r} ({s.layer}): {s.extra['problem']}. Leave it out "
                         "of target_modules (or add it to exclude_modules); nothing was compiled")
    if not chosen:
        names = unique(s.module for s in sites)
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise ValueError(
            f"{where}: target_modules={target_modules!r} matched no linear layer (nor another layer lorafx adapts). "
            f"Adaptable modules in this model: {shown or 'none'}"
        )
    return chosen


def shared_weight_user(gm: torch.fx.GraphModule, sites) -> Optional[Tuple[LinearSite, str]]:
    """``(site, the other user's module or node name)`` for the first site whose weight another
    module also reads (tied weights, such as an lm_head tied to the input embedding), or None."""
    ours: Dict[str, set] = {}
    for s in sites:
        ours.setdefault(s.weight.target, set()).add(s.node)
    first = {}
    for s in sites:
        first.setdefault(s.weight.target, s)
    for target, site_nodes in ours.items():
        module = node_module(next(iter(site_nodes)))
        for getter in gm.graph.find_nodes(op="get_attr", target=target):
            for user in getter.users:
                wrapper_ok = user.op == "call_function" and user.users and set(user.users) <= site_nodes
                if (user in site_nodes or wrapper_ok) and node_module(user) in (module, ""):
                    continue
                return first[target], node_module(user) or user.name
    return None


def _refuse_shared_weights(gm: torch.fx.GraphModule, sites) -> None:
    """Refuse a site whose weight another module also uses: a merged adapter could not be
    written back into the source model without changing the other module too."""
    shared = shared_weight_user(gm, sites)
    if shared is not None:
        site, other = shared
        module, target = site.module, site.weight.target
        raise ValueError(
            f"InsertLoRA: {module}'s weight ({target}) is also used by {other} (tied weights, e.g. "
            "tie_word_embeddings=True): a merged adapter could not be saved into the source model without "
            f"changing {other} too. Leave {module} out of target_modules (or add it to exclude_modules), "
            "or untie the weights first (config.tie_word_embeddings=False and give "
            f"{module} its own copy of the weight)")


def freeze_base(gm: torch.nn.Module) -> int:
    """Replace every parameter by a frozen one sharing its storage (the caller's
    model keeps its own Parameter objects and flags).  Returns how many.  The
    parameters of the graph record's ``saved_modules`` (modules_to_save) stay as they are."""
    seen: Dict[int, torch.nn.Parameter] = {}
    count = 0
    saved = graph_record(gm).saved_modules if isinstance(gm, torch.fx.GraphModule) else ()
    kept = {id(p) for path in saved for p in gm.get_submodule(path).parameters()}
    for module in gm.modules():
        for name, p in list(module._parameters.items()):
            if p is None or id(p) in kept:
                continue
            if id(p) not in seen:
                seen[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=False)
                count += 1
            module._parameters[name] = seen[id(p)]
    return count
