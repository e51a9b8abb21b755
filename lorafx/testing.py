"""Testing helpers: hypothesis strategies for models and LoRA configs, and
``assert_equivalent`` for checking that a rewrite preserves outputs and gradients.

A property test of a pass (here InsertLoRA, which keeps outputs and input gradients
while B = 0):

    >>> import copy, lorafx
    >>> from hypothesis import given, settings
    >>> from lorafx.passes import InsertLoRA
    >>> from lorafx.testing import assert_equivalent, lora_configs, models
    >>> @settings(max_examples=2, deadline=None)
    ... @given(models(), lora_configs())
    ... def test_insert_lora(case, config):
    ...     gm = lorafx.capture(case.model, example_kwargs=case.inputs)
    ...     after = InsertLoRA(**config)(copy.deepcopy(gm)).graph_module
    ...     assert_equivalent(gm, after, case.inputs)
    >>> test_insert_lora()

Every strategy draws small float64 models so that equivalence can be checked
tightly.  Models are built from a drawn seed, so a failing example replays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

__all__ = ["ModelCase", "mlp_models", "residual_models", "attention_models", "models", "lora_configs",
           "assert_equivalent", "outputs_and_grads", "MLP", "ResidualBlock", "AttentionBlock"]


class MLP(nn.Module):
    def __init__(self, widths: Sequence[int], bias: bool = True, act: str = "gelu"):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:]))
        self.act = act

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = getattr(F, self.act)(x)
        return x


class ResidualBlock(nn.Module):
    """x + down(act(up(norm(x)))), repeated ``depth`` times, then a head."""

    def __init__(self, dim: int, hidden: int, depth: int = 1, bias: bool = True, out: int = 3):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.ups = nn.ModuleList(nn.Linear(dim, hidden, bias=bias) for _ in range(depth))
        self.downs = nn.ModuleList(nn.Linear(hidden, dim, bias=bias) for _ in range(depth))
        self.head = nn.Linear(dim, out, bias=bias)

    def forward(self, x):
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            x = x + down(F.silu(up(norm(x))))
        return self.head(x)


class AttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention plus an MLP, over (batch, seq, dim) inputs."""

    def __init__(self, dim: int, heads: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        self.up_proj = nn.Linear(dim, 2 * dim, bias=bias)
        self.down_proj = nn.Linear(2 * dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, s, d = x.shape
        h = self.norm1(x)
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
        att = F.scaled_dot_product_attention(split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)),
                                             is_causal=True)
        x = x + self.drop(self.o_proj(att.transpose(1, 2).reshape(b, s, d)))
        return x + self.down_proj(F.gelu(self.up_proj(self.norm2(x))))


@dataclass
class ModelCase:
    """A drawn model with example inputs (keyword arguments of its forward)."""

    model: nn.Module
    inputs: Dict[str, torch.Tensor]
    description: str

    def __repr__(self) -> str:
        return f"ModelCase({self.description})"


def _input(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _built(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return factory().double()


@st.composite
def mlp_models(draw, max_width: int = 12, max_depth: int = 3) -> ModelCase:
    depth = draw(st.integers(1, max_depth))
    widths = draw(st.lists(st.integers(2, max_width), min_size=depth + 1, max_size=depth + 1))
    bias = draw(st.booleans())
    act = draw(st.sampled_from(["gelu", "relu", "silu", "tanh"]))
    seed = draw(st.integers(0, 2**16))
    batch = draw(st.integers(2, 5))
    model = _built(lambda: MLP(widths, bias, act), seed)
    return ModelCase(model, {"x": _input(seed + 1, batch, widths[0])}, f"MLP{widths} bias={bias} {act}")


@st.composite
def residual_models(draw, max_dim: int = 12) -> ModelCase:
    dim = draw(st.integers(2, max_dim))
    hidden = draw(st.integers(2, 2 * max_dim))
    depth = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    batch, seq = draw(st.integers(2, 4)), draw(st.integers(2, 6))
    model = _built(lambda: ResidualBlock(dim, hidden, depth, bias), seed)
    return ModelCase(model, {"x": _input(seed + 1, batch, seq, dim)},
                     f"Residual(dim={dim}, hidden={hidden}, depth={depth}, bias={bias})")


@st.composite
def attention_models(draw) -> ModelCase:
    heads = draw(st.integers(1, 3))
    dim = heads * draw(st.integers(2, 4))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    batch, seq = draw(st.integers(2, 3)), draw(st.integers(2, 6))
    model = _built(lambda: AttentionBlock(dim, heads, bias), seed)
    return ModelCase(model, {"x": _input(seed + 1, batch, seq, dim)},
                     f"Attention(dim={dim}, heads={heads}, bias={bias})")


def models() -> st.SearchStrategy[ModelCase]:
    """Any of the small random models above."""
    return st.one_of(mlp_models(), residual_models(), attention_models())


@st.composite
def lora_configs(draw, max_rank: int = 2, dropout: bool = False) -> Dict[str, Any]:
    """Keyword options for InsertLoRA / lorafx.compile (ranks fit every drawn model)."""
    cfg = {
        "r": draw(st.integers(1, max_rank)),
        "alpha": draw(st.sampled_from([1.0, 2.0, 8.0, 16.0])),
        "use_rslora": draw(st.booleans()),
        "init": draw(st.sampled_from(["kaiming", "gaussian"])),
        "seed": draw(st.integers(0, 2**16)),
    }
    if dropout:
        cfg["dropout"] = draw(st.sampled_from([0.0, 0.1, 0.5]))
    return cfg


# -- equivalence ---------------------------------------------------------------------------
Inputs = Union[Sequence[Any], Dict[str, Any]]


def _leaves(out) -> list:
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def outputs_and_grads(model: nn.Module, inputs: Inputs, *, grads: bool = True, seed: int = 0,
                      param_names: Sequence[str] = ()) -> Tuple[list, list]:
    """Run ``model`` on copies of ``inputs``; returns (output leaves, gradients of a fixed
    random projection of the outputs w.r.t. the floating inputs and the named parameters)."""
    args, kwargs = (list(inputs), {}) if not isinstance(inputs, dict) else ([], dict(inputs))
    float_inputs = []

    def prep(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and grads:
            v = v.detach().clone().requires_grad_(True)
            float_inputs.append(v)
        return v

    args = [prep(a) for a in args]
    kwargs = {k: prep(v) for k, v in kwargs.items()}
    params = dict(model.named_parameters())
    chosen = [params[n] for n in param_names]
    out = _leaves(model(*args, **kwargs))
    if not grads:
        return [o.detach() for o in out], []
    gen = torch.Generator().manual_seed(seed)
    total = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)).sum()
                for o in out if o.is_floating_point() and o.requires_grad)
    targets = float_inputs + chosen
    if not isinstance(total, torch.Tensor) or not targets:
        return [o.detach() for o in out], []
    gs = torch.autograd.grad(total, targets, allow_unused=True)
    return [o.detach() for o in out], [g if g is not None else torch.zeros_like(t) for g, t in zip(gs, targets)]


def assert_equivalent(before: nn.Module, after: nn.Module, inputs: Inputs, *, grads: bool = True,
                      param_names: Sequence[str] = (), rtol: float = 1e-6, atol: float = 1e-8,
                      msg: str = "") -> None:
    """Assert both modules give allclose outputs and, if ``grads``, allclose gradients
    w.r.t. the floating inputs (and the parameters named in ``param_names``, which
    must exist in both)."""
    out_a, g_a = outputs_and_grads(before, inputs, grads=grads, param_names=param_names)
    out_b, g_b = outputs_and_grads(after, inputs, grads=grads, param_names=param_names)
    where = f" ({msg})" if msg else ""
    assert len(out_a) == len(out_b), f"output count differs: {len(out_a)} vs {len(out_b)}{where}"
    for i, (a, b) in enumerate(zip(out_a, out_b)):
        assert a.shape == b.shape, f"output {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}{where}"
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"output {i}{where}: {m}")
    for i, (a, b) in enumerate(zip(g_a, g_b)):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"gradient {i}{where}: {m}")
