"""Noise models for weights programmed onto RRAM (and other analog) crossbars.

HaLoRA (Wu et al., "HaLoRA: Hardware-aware Low-Rank Adaptation for Large Language
Models Based on Hybrid Compute-in-Memory Architecture", arXiv 2502.19747, 2025) puts
the frozen weights on noisy RRAM and the LoRA branches on exact SRAM, and leaves the
form of the RRAM noise open.  This module makes it a choice: every model is a frozen
dataclass subclassing :class:`NoiseModel`, and ``model.sample(weight, generator)``
returns one programmed copy of a weight (layout ``(out, in)``: a crossbar column is
one output feature, i.e. one ROW of the weight).

Models (``NOISE_MODELS``; each has one *main level*, what ``with_sigma`` replaces):

==================  ========================================================  ==============
name                what ``sample`` does                                      main level
==================  ========================================================  ==============
``additive``        W + σ·max|W|·N(0,1); max|W| per layer or per column       ``sigma``
``multiplicative``  W·(1 + σ·N(0,1))                                          ``sigma``
``conductance``     differential pair G+/G−, ``levels`` levels in             ``prog_sigma``
                    [g_min, g_max], programming + read noise, clip at 0
``drift``           W·(t/t0)^(−ν), ν ~ N(ν_mean, ν_std) ≥ 0 per device,       ``nu_std``
                    optional global drift compensation
``stuck_at``        each entry stuck off (0) or on (±max|W|) with prob. p     ``p``
``pcm``             IBM aihwkit's ``PCMLikeNoiseModel`` (formulas re-derived)  ``prog_scale``
``rram_wan2022``    IBM aihwkit's ``ReRamWan2022NoiseModel`` (idem)            ``noise_scale``
``chain``           several models applied in order                           first model's
==================  ========================================================  ==============

Presets (``NOISE_PRESETS``, cited in ``PRESET_SOURCES``):

* ``additive``: σ = 0.02 per layer, the noise level of HaLoRA's headline results.
* ``pcm``: aihwkit 1.1.0 ``PCMLikeNoiseModel`` defaults (Nandakumar et al., ICECS 2019;
  Joshi et al., Nat. Commun. 11, 2473, 2020): g_max = 25 µS, programming noise
  σ_prog(ĝ) = (0.26348 + 1.9650ĝ − 1.1731ĝ²)·g_max/25 µS, 1/f read noise with
  t_read = 250 ns, drift ν(ĝ) fit with t0 = 20 s, global drift compensation (aihwkit's
  ``InferenceRPUConfig`` default), read at aihwkit's default ``t_inference = 0``.
* ``rram_wan2022``: aihwkit 1.1.0 ``ReRamWan2022NoiseModel`` (Wan et al., "A
  compute-in-memory chip based on resistive random-access memory", Nature 608, 504,
  2022): σ(ĝ) a 4th-order polynomial in µS fitted at g_max = 40 µS, at t = 1 s.
* ``rram_milo2021``: a plain ``conductance`` model from Milo et al., "Optimized
  programming algorithms for multilevel RRAM in hardware neural networks", IRPS 2021:
  HfO2 1T1R RRAM, 9-level weights (= 5 levels per device of a differential pair),
  σ_G(G) = 4.782321 − 0.009107·G µS over 50–225 µS (the linear fit to the paper's
  Fig. 4, IGVVA-100, in Sandia's CrossSim ``RRAM_Milo.py``); no read noise given.

Everything is computed in float32 (float64 for float64 weights), never in place;
randomness comes only from the ``torch.Generator`` passed in.  ``sample_chip`` seeds
one generator per weight from ``sha256(f"{seed}:{name}")``, so a chip is reproducible
and independent of dict order.  The formulas above come from the cited papers and
from reading aihwkit's source; the code is this module's own.
"""
from __future__ import annotations

import difflib
import hashlib
import math
import numbers
from dataclasses import dataclass, fields, replace
from collections.abc import Iterable
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch

__all__ = [
    "NoiseModel", "AdditiveNoise", "MultiplicativeNoise", "ConductanceNoise", "DriftNoise",
    "StuckAtNoise", "PCMNoise", "ReRAMWan2022Noise", "ChainNoise",
    "NOISE_MODELS", "NOISE_PRESETS", "PRESET_SOURCES",
    "parse_noise", "noise_model", "sample_chip",
]


# --------------------------------------------------------------------------- checks

def _kind(value: Any) -> str:
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


def _number(where: str, name: str, value: Any, *, example: str, lo: float = 0.0,
            hi: Optional[float] = None, lo_open: bool = False) -> float:
    """``value`` as a float in [lo, hi] (``lo_open``: > lo); ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}{name} must be a number, got {value!r} ({_kind(value)}); pass e.g. {name}={example}")
    v = float(value)
    rng = f"{'>' if lo_open else '>='} {lo:g}" + ("" if hi is None else f" and <= {hi:g}")
    if not math.isfinite(v) or (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{where}{name} must be a finite number {rng}, got {value!r}; pass e.g. {name}={example}")
    return v


def _integer(where: str, name: str, value: Any, *, lo: int, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where}{name} must be an int >= {lo}, got {value!r} ({_kind(value)}); pass e.g. {name}={example}")
    if value < lo:
        raise ValueError(f"{where}{name} must be an int >= {lo}, got {value!r}; pass e.g. {name}={example}")
    return int(value)


def _check_sigma(sigma: Any) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(float(sigma)) or sigma < 0:
        raise ValueError(f"sigma (the noise model's main level) must be a finite number >= 0, got {sigma!r}"
                         f"{'' if isinstance(sigma, numbers.Real) and not isinstance(sigma, bool) else ' (' + _kind(sigma) + ')'}; "
                         f"pass e.g. sigma=0.02, or sigma=None to keep the model's own level")
    return float(sigma)


# ------------------------------------------------------------------ random helpers

def _randn(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """N(0,1) drawn on the generator's device (so a CPU generator serves CUDA weights too)."""
    return torch.randn(shape, generator=gen, device=gen.device, dtype=like.dtype).to(like.device)


def _rand(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=gen.device, dtype=like.dtype).to(like.device)


def _abs_max(w: torch.Tensor) -> torch.Tensor:
    return w.abs().max()


def _pair(w: torch.Tensor, w_max: torch.Tensor) -> torch.Tensor:
    """|W|/w_max split into the positive (G+) and negative (G−) device: shape (2, *w.shape), in [0, 1]."""
    u = w / w_max
    return torch.stack([u.clamp(0, 1), (-u).clamp(0, 1)])


# ------------------------------------------------------------------------ the base

class NoiseModel:
    """Base of every noise model (subclasses are frozen dataclasses).

    Subclasses set ``name`` (the registry name), ``_level`` (the field holding the main
    level) and implement ``_sample(w, generator)`` on a float32/64 copy of the weight.
    """

    name: ClassVar[str] = "noise"
    _level: ClassVar[str] = "sigma"

    def sample(self, weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The programmed (noisy) weight: a new tensor, same shape/dtype/device as ``weight``."""
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"{self.name}: weight must be a torch.Tensor, got {_kind(weight)}")
        if weight.dim() < 1 or not weight.is_floating_point():
            raise ValueError(f"{self.name}: weight must be a floating-point tensor with at least 1 dimension "
                             f"(layout (out, in)), got shape {tuple(weight.shape)} dtype {weight.dtype}")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"{self.name}: generator must be a torch.Generator, got {_kind(generator)}; "
                             f"pass e.g. torch.Generator().manual_seed(0)")
        if weight.numel() == 0 or self.is_noiseless():
            return weight.detach().clone()
        with torch.no_grad():
            work = torch.float64 if weight.dtype == torch.float64 else torch.float32
            out = self._sample(weight.detach().to(work), generator)
        return out.to(dtype=weight.dtype, device=weight.device)

    def _sample(self, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def sigma(self) -> float:
        """The model's main noise level (what ``compile(noise_sigma=...)`` sets)."""
        return float(getattr(self, self._level))

    def with_sigma(self, sigma: float) -> "NoiseModel":
        """The same model with its main level replaced by ``sigma``."""
        return replace(self, **{self._level: _check_sigma(sigma)})

    def is_noiseless(self) -> bool:
        """True when ``sample`` returns the weight unchanged."""
        return self.sigma == 0.0

    def spec(self) -> str:
        """Canonical compact string: ``name(main=..., non-default fields...)``; ``parse_noise`` inverts it."""
        parts = []
        for f in sorted(fields(self), key=lambda f: f.name != self._level):
            value = getattr(self, f.name)
            if f.name == self._level or value != f.default:
                parts.append(f"{f.name}={_format(value)}")
        return f"{self.name}({','.join(parts)})"

    def describe(self) -> str:  # pragma: no cover - every model overrides it
        return self.spec()

    def __str__(self) -> str:
        return self.spec()


def _poly(coeff: Tuple[float, ...]) -> str:
    """``(c0, c1, c2)`` as ``"0.26 + 1.97ĝ - 1.17ĝ^2"``."""
    terms = [f"{c:g}" + ("" if i == 0 else "ĝ" if i == 1 else f"ĝ^{i}") for i, c in enumerate(coeff)]
    return " ".join([terms[0]] + [("- " + t[1:]) if t.startswith("-") else "+ " + t for t in terms[1:]])


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return "(" + ",".join(_format(v) for v in value) + ")"
    return str(value)


# ----------------------------------------------------------------------- the models

@dataclass(frozen=True)
class AdditiveNoise(NoiseModel):
    """W̃ = W + σ·max|W|·N(0,1), one max|W| per matrix (``per="layer"``) or per output
    feature (``per="column"``: a crossbar column = a row of the (out, in) weight).
    The form HaLoRA uses; σ = 0.02 is its headline level."""

    sigma: float = 0.02
    per: str = "layer"
    name: ClassVar[str] = "additive"

    def __post_init__(self):
        object.__setattr__(self, "sigma", _number("additive noise: ", "sigma", self.sigma, example="0.02"))
        if self.per not in ("layer", "column"):
            raise ValueError(f"additive noise: per must be 'layer' or 'column', got {self.per!r}; pass e.g. per='layer'")

    def _sample(self, w, gen):
        if self.per == "layer":
            scale = _abs_max(w)
        else:
            scale = w.abs().reshape(w.shape[0], -1).amax(dim=1).reshape((-1,) + (1,) * (w.dim() - 1))
        return w + self.sigma * scale * _randn(w.shape, gen, w)

    def describe(self):
        where = "per layer" if self.per == "layer" else "per output column (row of W)"
        return f"additive Gaussian, σ = {self.sigma:g}·max|W| {where}"


@dataclass(frozen=True)
class MultiplicativeNoise(NoiseModel):
    """W̃ = W·(1 + σ·N(0,1)): each entry's error proportional to its magnitude."""

    sigma: float = 0.02
    name: ClassVar[str] = "multiplicative"

    def __post_init__(self):
        object.__setattr__(self, "sigma", _number("multiplicative noise: ", "sigma", self.sigma, example="0.02"))

    def _sample(self, w, gen):
        return w * (1.0 + self.sigma * _randn(w.shape, gen, w))

    def describe(self):
        return f"multiplicative Gaussian, W·(1 + {self.sigma:g}·N(0,1))"


@dataclass(frozen=True)
class ConductanceNoise(NoiseModel):
    """A differential pair per weight: G+ holds the positive part, G− the negative part,
    g = g_min + |W|/w_max·(g_max − g_min) (w_max = max|W| per layer), the other device at
    g_min.  Each conductance is quantised to ``levels`` evenly spaced levels in
    [g_min, g_max], then programming noise N(0, σ_prog(g)) with
    σ_prog(g) = (prog_sigma + prog_slope·g/g_max)·g_max (clipped at 0) and read noise
    N(0, read_sigma·g_max) are added to every device, the conductance clipped at 0, and
    W̃ = (G+ − G−)/(g_max − g_min)·w_max.  Main level: ``prog_sigma``.  Conductances are
    in µS (only their ratios matter).  Defaults (16 levels = 4 bits/cell, σ_prog = 0.02,
    g_max = 25 µS as in aihwkit) are illustrative, not a device figure; see the
    ``rram_milo2021`` preset for a measured one."""

    prog_sigma: float = 0.02
    levels: int = 16
    read_sigma: float = 0.0
    prog_slope: float = 0.0
    g_max: float = 25.0
    g_min: float = 0.0
    name: ClassVar[str] = "conductance"
    _level: ClassVar[str] = "prog_sigma"

    def __post_init__(self):
        w = "conductance noise: "
        object.__setattr__(self, "prog_sigma", _number(w, "prog_sigma", self.prog_sigma, example="0.02"))
        object.__setattr__(self, "read_sigma", _number(w, "read_sigma", self.read_sigma, example="0.01"))
        object.__setattr__(self, "levels", _integer(w, "levels", self.levels, lo=2, example="16 (4 bits per cell)"))
        object.__setattr__(self, "prog_slope", _number(w, "prog_slope", self.prog_slope, lo=-math.inf, example="0.0"))
        object.__setattr__(self, "g_max", _number(w, "g_max", self.g_max, lo_open=True, example="25.0 (µS)"))
        object.__setattr__(self, "g_min", _number(w, "g_min", self.g_min, example="0.0 (µS)"))
        if self.g_min >= self.g_max:
            raise ValueError(f"{w}g_min must be below g_max, got g_min={self.g_min!r}, g_max={self.g_max!r}; "
                             f"pass e.g. g_min=0.0")

    def is_noiseless(self):
        return False  # quantisation to `levels` levels changes the weight even without noise

    def _sample(self, w, gen):
        w_max = _abs_max(w)
        if w_max == 0:
            return w.clone()
        span = self.g_max - self.g_min
        steps = self.levels - 1
        g = self.g_min + torch.round(_pair(w, w_max) * steps) / steps * span      # target conductances (µS)
        sig = ((self.prog_sigma + self.prog_slope * g / self.g_max) * self.g_max).clamp(min=0)
        g = g + sig * _randn(g.shape, gen, w)
        if self.read_sigma:
            g = g + self.read_sigma * self.g_max * _randn(g.shape, gen, w)
        g = g.clamp(min=0)
        return (g[0] - g[1]) / span * w_max

    def describe(self):
        slope = f" {self.prog_slope:+g}·g" if self.prog_slope else ""
        read = f", read σ = {self.read_sigma:g}·g_max" if self.read_sigma else ""
        return (f"differential conductance pair, {self.levels} levels in [{self.g_min:g}, {self.g_max:g}] µS, "
                f"programming σ = {self.prog_sigma:g}·g_max{slope}{read}")


@dataclass(frozen=True)
class DriftNoise(NoiseModel):
    """Power-law conductance drift g(t) = g(t0)·(t/t0)^(−ν) on every device (so
    W̃ = W·(t/t0)^(−ν) entry-wise), ν ~ N(nu_mean, nu_std) per device clipped at 0, no
    drift for t ≤ t0.  ``compensate`` rescales by mean|W|/mean|W̃| per matrix, the
    weight-level form of aihwkit's ``GlobalDriftCompensation`` (the default of its
    ``InferenceRPUConfig``), which undoes the mean drift, not its spread: hence the main
    level is ``nu_std``.  Defaults: t = 1 h, t0 = 20 s (aihwkit's t_0) and ν ~ N(0.049,
    0.008), aihwkit's PCM drift fit (Nandakumar et al. 2019) at full conductance."""

    nu_std: float = 0.008
    nu_mean: float = 0.049
    t: float = 3600.0
    t0: float = 20.0
    compensate: bool = True
    name: ClassVar[str] = "drift"
    _level: ClassVar[str] = "nu_std"

    def __post_init__(self):
        w = "drift noise: "
        object.__setattr__(self, "nu_std", _number(w, "nu_std", self.nu_std, example="0.008"))
        object.__setattr__(self, "nu_mean", _number(w, "nu_mean", self.nu_mean, example="0.049"))
        object.__setattr__(self, "t", _number(w, "t", self.t, example="3600.0 (seconds since programming)"))
        object.__setattr__(self, "t0", _number(w, "t0", self.t0, lo_open=True, example="20.0 (seconds)"))
        if not isinstance(self.compensate, bool):
            raise ValueError(f"{w}compensate must be True or False, got {self.compensate!r}; pass e.g. compensate=True")

    def is_noiseless(self):
        # nu_std = 0 with compensation: every device drifts by the same factor, which the
        # compensation divides out exactly (returned as the weight itself, not up to rounding)
        return self.t <= self.t0 or (self.nu_std == 0 and (self.nu_mean == 0 or self.compensate))

    def _sample(self, w, gen):
        nu = (self.nu_mean + self.nu_std * _randn(w.shape, gen, w)).clamp(min=0)
        out = w * torch.exp(-nu * math.log(self.t / self.t0))
        if self.compensate:
            mean = out.abs().mean()
            if mean > 0:
                out = out * (w.abs().mean() / mean)
        return out

    def describe(self):
        comp = ", global drift compensation" if self.compensate else ""
        return (f"power-law drift W·(t/t0)^-ν, ν ~ N({self.nu_mean:g}, {self.nu_std:g}) per device, "
                f"t = {self.t:g} s, t0 = {self.t0:g} s{comp}")


@dataclass(frozen=True)
class StuckAtNoise(NoiseModel):
    """Each entry independently faulty with probability ``p``: a fraction ``on_fraction`` of
    the faults stuck on (at g_max: ±max|W|, keeping the entry's sign, + for 0), the rest
    stuck off (0).  Main level: ``p``.  Defaults are illustrative, not a device figure."""

    p: float = 0.01
    on_fraction: float = 0.5
    name: ClassVar[str] = "stuck_at"
    _level: ClassVar[str] = "p"

    def __post_init__(self):
        w = "stuck-at noise: "
        object.__setattr__(self, "p", _number(w, "p", self.p, hi=1.0, example="0.01"))
        object.__setattr__(self, "on_fraction", _number(w, "on_fraction", self.on_fraction, hi=1.0, example="0.5"))

    def _sample(self, w, gen):
        u = _rand(w.shape, gen, w)
        on = u < self.p * self.on_fraction
        off = (u < self.p) & ~on
        stuck_on = torch.where(w < 0, -1.0, 1.0).to(w.dtype) * _abs_max(w)
        return torch.where(on, stuck_on, torch.where(off, torch.zeros_like(w), w))

    def describe(self):
        return (f"stuck-at faults on {self.p:g} of entries ({self.on_fraction:g} of them stuck on at ±max|W|, "
                f"the rest stuck off at 0)")


# PCM drift and 1/f read-noise fits as given in aihwkit 1.1.0 (inference/noise/pcm.py),
# from Nandakumar et al., ICECS 2019: ν mean/std as functions of ln(ĝ), and the 1/f
# coefficient Q_s(ĝ) = 0.0088/ĝ^0.65 (ĝ^0.65 floored at 1e-3, Q_s capped at 0.2).
_PCM_NU_MEAN = (-0.0155, 0.0244, 0.049, 0.1)     # slope on ln ĝ, offset, clip min, clip max
_PCM_NU_STD = (-0.0125, -0.0059, 0.008, 0.045)
_PCM_QS = (0.0088, 0.65, 1e-3, 0.2)
_PCM_G_FLOOR = 1e-7


@dataclass(frozen=True)
class PCMNoise(NoiseModel):
    """PCM-like noise as in aihwkit's ``PCMLikeNoiseModel`` (Nandakumar et al., ICECS 2019;
    Joshi et al., Nat. Commun. 2020), on a single differential pair with
    g = |W|/max|W|·g_max:

    * programming: g_p = max(0, g + prog_scale·σ_p(ĝ)·N), σ_p(ĝ) = Σ cᵢĝⁱ·g_max/g_ref µS;
    * drift (t = t_inference + t0 > t0): g_d = g_p·(t/t0)^(−ν), ν = |μ_ν(ĝ) + σ_ν(ĝ)·N|·drift_scale;
    * 1/f read noise: g = max(0, g_d + |g_d|·read_scale·Q_s(g_p)·√ln((t + t_read)/(2 t_read))·N);
    * with ``compensate``, W̃ is rescaled by mean|W_p|/mean|W̃| (aihwkit's global drift
      compensation, measured against the just-programmed weights).

    ``t`` is aihwkit's ``t_inference`` (seconds after programming; 0 reads at t0 = 20 s).
    Main level: ``prog_scale`` (1.0 = the measured programming noise)."""

    prog_scale: float = 1.0
    read_scale: float = 1.0
    drift_scale: float = 1.0
    t: float = 0.0
    t0: float = 20.0
    t_read: float = 250e-9
    g_max: float = 25.0
    prog_coeff: Tuple[float, ...] = (0.26348, 1.9650, -1.1731)
    g_ref: float = 25.0
    compensate: bool = True
    name: ClassVar[str] = "pcm"
    _level: ClassVar[str] = "prog_scale"

    def __post_init__(self):
        w = "pcm noise: "
        for f, ex in (("prog_scale", "1.0"), ("read_scale", "1.0"), ("drift_scale", "1.0"),
                      ("t", "3600.0 (seconds after programming)")):
            object.__setattr__(self, f, _number(w, f, getattr(self, f), example=ex))
        for f, ex in (("t0", "20.0"), ("t_read", "2.5e-07"), ("g_max", "25.0 (µS)"), ("g_ref", "25.0 (µS)")):
            object.__setattr__(self, f, _number(w, f, getattr(self, f), lo_open=True, example=ex))
        coeff = self.prog_coeff
        if isinstance(coeff, (str, bytes)) or not isinstance(coeff, Iterable):
            raise ValueError(f"{w}prog_coeff must be a sequence of numbers, got {coeff!r}; "
                             f"pass e.g. prog_coeff=(0.26348, 1.965, -1.1731)")
        coeff = tuple(_number(w, "prog_coeff", c, lo=-math.inf, example="(0.26348, 1.965, -1.1731)") for c in coeff)
        if not coeff:
            raise ValueError(f"{w}prog_coeff must not be empty; pass e.g. prog_coeff=(0.26348, 1.965, -1.1731)")
        object.__setattr__(self, "prog_coeff", coeff)
        if not isinstance(self.compensate, bool):
            raise ValueError(f"{w}compensate must be True or False, got {self.compensate!r}; pass e.g. compensate=True")

    def is_noiseless(self):
        return self.prog_scale == 0 and self.read_scale == 0 and (self.drift_scale == 0 or self.t == 0)

    def _sample(self, w, gen):
        w_max = _abs_max(w)
        if w_max == 0:
            return w.clone()
        g_max = self.g_max
        g = _pair(w, w_max) * g_max                               # target conductances (µS)
        gh = g / g_max
        sig = torch.zeros_like(g) + self.prog_coeff[0]
        power = torch.ones_like(g)
        for c in self.prog_coeff[1:]:
            power = power * gh
            sig = sig + c * power
        sig = sig * (g_max / self.g_ref)
        g_prog = (g + self.prog_scale * sig * _randn(g.shape, gen, w)).clamp(min=0)

        log_g = torch.log(gh.clamp(min=_PCM_G_FLOOR))
        mu = (_PCM_NU_MEAN[0] * log_g + _PCM_NU_MEAN[1]).clamp(_PCM_NU_MEAN[2], _PCM_NU_MEAN[3])
        sd = (_PCM_NU_STD[0] * log_g + _PCM_NU_STD[1]).clamp(_PCM_NU_STD[2], _PCM_NU_STD[3])
        nu = (mu + sd * _randn(g.shape, gen, w)).abs() * self.drift_scale

        t = self.t + self.t0
        g_drift = g_prog * torch.exp(-nu * math.log(t / self.t0)) if t > self.t0 else g_prog
        q = (_PCM_QS[0] / ((g_prog / g_max) ** _PCM_QS[1]).clamp(min=_PCM_QS[2])).clamp(max=_PCM_QS[3])
        sig_read = q * math.sqrt(math.log((t + self.t_read) / (2 * self.t_read)))
        g_final = (g_drift + g_drift.abs() * self.read_scale * sig_read * _randn(g.shape, gen, w)).clamp(min=0)

        out = (g_final[0] - g_final[1]) / g_max * w_max
        if self.compensate:
            mean = out.abs().mean()
            if mean > 0:
                out = out * (((g_prog[0] - g_prog[1]) / g_max * w_max).abs().mean() / mean)
        return out

    def describe(self):
        c = _poly(self.prog_coeff)
        comp = ", global drift compensation" if self.compensate else ""
        return (f"PCM-like (aihwkit PCMLikeNoiseModel): programming σ(ĝ) = {self.prog_scale:g}·({c})·g_max/{self.g_ref:g} µS, "
                f"1/f read noise ×{self.read_scale:g}, drift ×{self.drift_scale:g}, "
                f"read {self.t:g} s after programming (t0 = {self.t0:g} s), g_max = {self.g_max:g} µS{comp}")


# Wan et al. (Nature 2022) conductance-deviation fits as given in aihwkit 1.1.0
# (inference/noise/reram.py): σ(ĝ) = Σ cᵢ ĝⁱ µS at g_max = 40 µS, one fit per time
# after programming (seconds); coefficients in increasing powers of ĝ.
_WAN2022_COEFFS: Dict[float, Tuple[float, ...]] = {
    1.0: (0.348, 16.030, -43.853, 45.393, -16.815),
    86400.0: (0.701, 22.086, -50.773, 47.095, -16.458),
    172800.0: (0.782, 20.274, -43.507, 37.062, -11.934),
}
_WAN2022_G_REF = 40.0


@dataclass(frozen=True)
class ReRAMWan2022Noise(NoiseModel):
    """RRAM noise as in aihwkit's ``ReRamWan2022NoiseModel`` (Wan et al., Nature 2022): on a
    differential pair with g = |W|/max|W|·g_max, each device becomes
    max(0, g + noise_scale·σ_t(ĝ)·g_max/40·N), σ_t a 4th-order polynomial in µS fitted to
    the paper's conductance spread at t = 1 s, 1 day or 2 days after programming.
    (aihwkit 1.1.0 applies the 40 µS fit unscaled whatever g_max is, and defaults to
    g_max = 25 µS; here g_max defaults to the 40 µS of the fit.)  Main level: ``noise_scale``."""

    noise_scale: float = 1.0
    t: float = 1.0
    g_max: float = _WAN2022_G_REF
    name: ClassVar[str] = "rram_wan2022"
    _level: ClassVar[str] = "noise_scale"

    def __post_init__(self):
        w = "rram_wan2022 noise: "
        object.__setattr__(self, "noise_scale", _number(w, "noise_scale", self.noise_scale, example="1.0"))
        object.__setattr__(self, "g_max", _number(w, "g_max", self.g_max, lo_open=True, example="40.0 (µS)"))
        t = _number(w, "t", self.t, example="1.0")
        if t not in _WAN2022_COEFFS:
            raise ValueError(f"{w}t must be one of the fitted times {sorted(_WAN2022_COEFFS)} (seconds after "
                             f"programming: 1 s, 1 day, 2 days), got {self.t!r}; pass e.g. t=1.0")
        object.__setattr__(self, "t", t)

    def _sample(self, w, gen):
        w_max = _abs_max(w)
        if w_max == 0:
            return w.clone()
        gh = _pair(w, w_max)
        sig = torch.zeros_like(gh)
        for c in reversed(_WAN2022_COEFFS[self.t]):
            sig = sig * gh + c
        sig = sig.abs() * (self.g_max / _WAN2022_G_REF)
        g = (gh * self.g_max + self.noise_scale * sig * _randn(gh.shape, gen, w)).clamp(min=0)
        return (g[0] - g[1]) / self.g_max * w_max

    def describe(self):
        return (f"RRAM (Wan et al. 2022 via aihwkit ReRamWan2022NoiseModel): σ(ĝ) 4th-order polynomial ×{self.noise_scale:g} "
                f"at t = {self.t:g} s after programming, g_max = {self.g_max:g} µS")


@dataclass(frozen=True)
class ChainNoise(NoiseModel):
    """Several models applied in order with one generator, e.g. conductance programming,
    then drift, then stuck-at faults.  Main level: the first model's."""

    models: Tuple[NoiseModel, ...] = ()
    name: ClassVar[str] = "chain"

    def __post_init__(self):
        models = self.models
        if isinstance(models, NoiseModel) or not isinstance(models, Iterable) or isinstance(models, (str, bytes)):
            raise ValueError(f"chain noise: models must be a sequence of NoiseModel, got {models!r}; "
                             f"pass e.g. models=(ConductanceNoise(), DriftNoise())")
        models = tuple(models)
        if not models or not all(isinstance(m, NoiseModel) for m in models):
            raise ValueError(f"chain noise: models must be a non-empty sequence of NoiseModel, got {models!r}; "
                             f"pass e.g. models=(ConductanceNoise(), DriftNoise())")
        object.__setattr__(self, "models", models)

    @property
    def sigma(self) -> float:
        return self.models[0].sigma

    def with_sigma(self, sigma):
        return replace(self, models=(self.models[0].with_sigma(sigma),) + self.models[1:])

    def is_noiseless(self):
        return all(m.is_noiseless() for m in self.models)

    def _sample(self, w, gen):
        for m in self.models:
            w = m.sample(w, gen)
        return w

    def spec(self):
        return f"chain({';'.join(m.spec() for m in self.models)})"

    def describe(self):
        return " → ".join(m.describe() for m in self.models)


NOISE_MODELS: Dict[str, type] = {cls.name: cls for cls in (
    AdditiveNoise, MultiplicativeNoise, ConductanceNoise, DriftNoise, StuckAtNoise, PCMNoise, ReRAMWan2022Noise,
    ChainNoise)}

_MILO_G_MIN, _MILO_G_MAX = 50.0, 225.0          # µS, the range of the Fig. 4 data
_MILO_SIGMA_AT_0, _MILO_SLOPE = 4.782321, -0.009107   # σ_G(G) = 4.782321 − 0.009107·G (µS)

NOISE_PRESETS: Dict[str, NoiseModel] = {
    "additive": AdditiveNoise(sigma=0.02, per="layer"),
    "pcm": PCMNoise(),
    "rram_wan2022": ReRAMWan2022Noise(),
    "rram_milo2021": ConductanceNoise(prog_sigma=_MILO_SIGMA_AT_0 / _MILO_G_MAX, levels=5, read_sigma=0.0,
                                      prog_slope=_MILO_SLOPE, g_max=_MILO_G_MAX, g_min=_MILO_G_MIN),
}

PRESET_SOURCES: Dict[str, str] = {
    "additive": ("Wu et al., 'HaLoRA: Hardware-aware Low-Rank Adaptation for Large Language Models Based on Hybrid "
                 "Compute-in-Memory Architecture', arXiv 2502.19747, 2025: additive Gaussian weight noise, "
                 "sigma = 0.02 the level of its headline results"),
    "pcm": ("IBM aihwkit 1.1.0 PCMLikeNoiseModel defaults (src/aihwkit/inference/noise/pcm.py), after Nandakumar et al., "
            "'Phase-change memory models for deep learning training and inference', ICECS 2019, and Joshi et al., "
            "'Accurate deep neural network inference using computational phase-change memory', Nat. Commun. 11, 2473 "
            "(2020): g_max 25 uS, sigma_prog = (0.26348 + 1.9650 g - 1.1731 g^2) g_max/25 uS, t_read 250 ns, t0 20 s, "
            "read at t_inference = 0 (aihwkit's default), global drift compensation"),
    "rram_wan2022": ("IBM aihwkit 1.1.0 ReRamWan2022NoiseModel (src/aihwkit/inference/noise/reram.py), fitted to Wan et al., "
                     "'A compute-in-memory chip based on resistive random-access memory', Nature 608, 504-512 (2022): "
                     "sigma(g) 4th-order polynomial in uS at g_max 40 uS, t = 1 s after programming"),
    "rram_milo2021": ("Milo et al., 'Optimized programming algorithms for multilevel RRAM in hardware neural networks', "
                      "IEEE IRPS 2021 (doi 10.1109/IRPS46558.2021.9405119): HfO2 1T1R RRAM, 9-level weights = 5 levels "
                      "per device of a differential pair; programming spread sigma_G = 4.782321 - 0.009107 G uS over "
                      "50-225 uS, the linear fit to its Fig. 4 (IGVVA-100) in Sandia CrossSim "
                      "(simulator/devices/custom/RRAM_Milo.py); no read noise published there"),
}


# ------------------------------------------------------------------------- parsing

def _split_top(text: str, sep: str) -> List[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced ')'")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("unbalanced '('")
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _known() -> str:
    return f"known models: {sorted(NOISE_MODELS)}; presets: {sorted(NOISE_PRESETS)}"


def _unknown(name: str, what: str) -> ValueError:
    close = difflib.get_close_matches(name, list(NOISE_MODELS) + list(NOISE_PRESETS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown noise {what} {name!r}{hint}; {_known()}")


def _parse_value(cls: type, spec: str, key: str, text: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if text not in ("True", "False"):
                raise ValueError
            return text == "True"
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            inner = text.strip()
            if not (inner.startswith("(") and inner.endswith(")")):
                raise ValueError
            return tuple(float(x) for x in _split_top(inner[1:-1], ",") if x)
        return text
    except ValueError:
        raise ValueError(f"bad value {text!r} for {key} in noise spec {spec!r}: expected "
                         f"{type(default).__name__} like {_format(default)}") from None


def parse_noise(spec: str) -> NoiseModel:
    """The NoiseModel a ``spec()`` string names: ``"additive(sigma=0.05,per=column)"``,
    ``"chain(conductance(prog_sigma=0.01);drift(t=86400.0))"``, or a bare model or preset
    name (``"pcm"``).  ValueError, naming the known models, for anything else."""
    if not isinstance(spec, str):
        raise ValueError(f"noise spec must be a string like 'additive(sigma=0.02)', got {spec!r} ({_kind(spec)})")
    text = spec.strip()
    if text.isidentifier():
        if text in NOISE_PRESETS:
            return NOISE_PRESETS[text]
        if text == "chain":
            raise ValueError(f"noise spec {spec!r}: a chain names its models, e.g. 'chain(conductance;drift)'")
        if text in NOISE_MODELS:
            return NOISE_MODELS[text]()
        raise _unknown(text, "model")
    head, paren, rest = text.partition("(")
    head = head.strip()
    if not paren or not rest.endswith(")") or not head.isidentifier():
        raise ValueError(f"cannot parse noise spec {spec!r}: expected 'name(key=value,...)'; {_known()}")
    if head not in NOISE_MODELS:
        raise _unknown(head, "model")
    body = rest[:-1].strip()
    try:
        if head == "chain":
            parts = _split_top(body, ";")
            return ChainNoise(tuple(parse_noise(p) for p in parts if p))
        cls = NOISE_MODELS[head]
        defaults = {f.name: f.default for f in fields(cls)}
        kwargs = {}
        for item in _split_top(body, ",") if body else []:
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in defaults:
                raise ValueError(f"bad field {item!r} in noise spec {spec!r}; {head} takes {sorted(defaults)}")
            kwargs[key] = _parse_value(cls, spec, key, value.strip(), defaults[key])
        return cls(**kwargs)
    except ValueError as e:
        if "unbalanced" in str(e):
            raise ValueError(f"cannot parse noise spec {spec!r}: {e}") from None
        raise


def noise_model(noise: Any, sigma: Optional[float] = None) -> Optional[NoiseModel]:
    """Resolve ``noise`` (None, a NoiseModel, a model or preset name, or a spec string) to a
    NoiseModel, its main level replaced by ``sigma`` when given.  None gives None."""
    if sigma is not None:
        sigma = _check_sigma(sigma)
    if noise is None:
        return None
    if isinstance(noise, NoiseModel):
        model = noise
    elif isinstance(noise, str):
        key = noise.strip()
        if key in NOISE_PRESETS:
            model = NOISE_PRESETS[key]
        elif key in NOISE_MODELS or "(" in key:
            model = parse_noise(key)
        else:
            raise _unknown(noise, "model or preset")
    else:
        raise ValueError(f"noise must be None, a NoiseModel, or a model/preset name, got {noise!r} ({_kind(noise)}); "
                         f"pass e.g. noise='additive'; {_known()}")
    return model if sigma is None else model.with_sigma(sigma)


# ------------------------------------------------------------------------ the chip

def _weight_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_chip(weights: Mapping[str, torch.Tensor], model: NoiseModel, seed: int) -> Dict[str, torch.Tensor]:
    """One programmed chip: every weight sampled by ``model`` with its own CPU generator
    seeded from sha256(f"{seed}:{name}"), so the chip is reproducible, independent of
    dict order, and a weight's noise does not depend on the other weights.  A weight on the
    meta device (a plan without weights) gets an empty meta tensor: ``lorafx.materialize``
    programs the chip once the weights exist."""
    model = noise_model(model)
    if model is None:
        raise ValueError("sample_chip: model must be a NoiseModel or a model/preset name, got None")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"sample_chip: seed must be an int, got {seed!r} ({_kind(seed)}); pass e.g. seed=0")
    out = {}
    for name, weight in weights.items():
        if weight.is_meta:
            out[name] = torch.empty_like(weight)
            continue
        gen = torch.Generator(device="cpu")
        gen.manual_seed(_weight_seed(int(seed), str(name)))
        out[name] = model.sample(weight, gen)
    return out
