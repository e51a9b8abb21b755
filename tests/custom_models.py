"""Small fixture models for the custom-model table (tests/test_custom_models.py).

One model per layer kind PEFT's LoRA adapts, each a few hundred parameters, in the
spirit of PEFT's own custom-model tests (written here): linear layers with and without
bias (one of them 20 -> 2, so PEFT's default r=8 exceeds min(in, out)), a stack of
blocks under ``layers`` (for ``layers_to_transform``), an embedding feeding linears, an
embedding feeding transformers' Conv1D (GPT-2's (in, out) weight layout, 5 -> 1),
``nn.Conv1d``, ``nn.Conv2d`` (plain and grouped), ``nn.Conv3d`` (3x3x3 and 1x1x1),
``nn.MultiheadAttention`` and a bare parameter used as ``x @ self.weight`` (PEFT's
``target_parameters``).

``MODELS`` maps the name a table row uses to ``(build, example_input)``: ``build()``
gives the model with seeded random weights, ``example_input(batch, seed)`` a batch of
inputs for it.  Every model ends in a log-softmax over 2 classes.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn

__all__ = ["MODELS", "build", "example_input"]


def _head(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x, dim=-1)


class MLP(nn.Module):
    """lin0 (10 -> 20), ReLU, lin1 (20 -> 2)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 2, bias=bias)

    def forward(self, x):
        return _head(self.lin1(torch.relu(self.lin0(x))))


class Block(nn.Module):
    """A residual pair of 10 -> 10 linears."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 10)
        self.lin1 = nn.Linear(10, 10)

    def forward(self, x):
        return x + self.lin1(torch.tanh(self.lin0(x)))


class DeepMLP(nn.Module):
    """Three blocks at ``model.layers.<i>`` (as in transformers models, where PEFT's default
    layers_pattern finds them), then out (10 -> 2)."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Block() for _ in range(3)])
        self.out = nn.Linear(10, 2)

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return _head(self.out(x))


class EmbMLP(nn.Module):
    """emb (50 tokens x 8), lin0 (8 -> 16), ReLU, mean over the sequence, lin1 (16 -> 2)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 2)

    def forward(self, ids):
        h = torch.relu(self.lin0(self.emb(ids)))
        return _head(self.lin1(h.mean(dim=1)))


class EmbConv1D(nn.Module):
    """emb (50 x 5), transformers' Conv1D (5 -> 1, weight stored (in, out)), ReLU, flatten over
    the 10 positions, lin0 (10 -> 2)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(50, 5)
        self.conv1d = Conv1D(1, 5)  # (nf=out, nx=in)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, ids):
        h = torch.relu(self.conv1d(self.emb(ids)))
        return _head(self.lin0(h.flatten(1)))


class Conv1dModel(nn.Module):
    """conv1d (3 -> 6 channels, kernel 3) over 10 steps, ReLU, flatten, lin0 (48 -> 2)."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(3, 6, 3)
        self.lin0 = nn.Linear(48, 2)

    def forward(self, x):
        return _head(self.lin0(torch.relu(self.conv1d(x)).flatten(1)))


class Conv2dModel(nn.Module):
    """conv2d (5 -> 10 channels, 3x3) on 4x4 images, ReLU, flatten, lin0 (40 -> 2)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3, bias=bias)
        self.lin0 = nn.Linear(40, 2)

    def forward(self, x):
        return _head(self.lin0(torch.relu(self.conv2d(x)).flatten(1)))


class Conv2dGroups(nn.Module):
    """conv2d (16 -> 16 channels, 3x3, 8 groups) on 4x4 images, ReLU, flatten, lin0 (64 -> 2)."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.lin0 = nn.Linear(64, 2)

    def forward(self, x):
        return _head(self.lin0(torch.relu(self.conv2d(x)).flatten(1)))


class Conv2dGroups2(nn.Module):
    """conv2d (16 -> 32 channels, 3x3, padding 1, 2 groups: out != in) on 3x3 images, lin0 (288 -> 2)."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.lin0 = nn.Linear(288, 2)

    def forward(self, x):
        return _head(self.lin0(torch.relu(self.conv2d(x)).flatten(1)))


class Conv3dModel(nn.Module):
    """conv3d (5 -> 10 channels, 3x3x3) on 3x3x3 volumes, ReLU, flatten, lin0 (10 -> 2)."""

    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        return _head(self.lin0(torch.relu(self.conv3d(x)).flatten(1)))


class Conv3d1x1(nn.Module):
    """conv3d (4 -> 6 channels, 1x1x1) on 2x2x2 volumes, ReLU, flatten, lin0 (48 -> 2)."""

    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(4, 6, 1)
        self.lin0 = nn.Linear(48, 2)

    def forward(self, x):
        return _head(self.lin0(torch.relu(self.conv3d(x)).flatten(1)))


class MHAModel(nn.Module):
    """Self-attention (nn.MultiheadAttention, embed 10, 2 heads, sequence first), lin0 (10 -> 2)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        h, _ = self.mha(x, x, x, need_weights=False)
        return _head(self.lin0(h))


class ParamLinear(nn.Module):
    """A linear written as ``x @ self.weight + self.bias``, weight stored (in, out): only PEFT's
    target_parameters reaches it."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features) / in_features ** 0.5)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class ParamMLP(nn.Module):
    """lin0 (10 -> 20), ReLU, lin1 (20 -> 2), both ParamLinear."""

    def __init__(self):
        super().__init__()
        self.lin0 = ParamLinear(10, 20)
        self.lin1 = ParamLinear(20, 2)

    def forward(self, x):
        return _head(self.lin1(torch.relu(self.lin0(x))))


def _randn(*shape):
    return lambda batch, seed: torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _ids(length, vocab=50):
    return lambda batch, seed: torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _seq_first(length, dim):
    return lambda batch, seed: torch.randn(length, batch, dim, generator=torch.Generator().manual_seed(seed))


# name -> (class or factory, inputs(batch, seed))
MODELS: Dict[str, Tuple[Callable[[], nn.Module], Callable[[int, int], torch.Tensor]]] = {
    "MLP": (MLP, _randn(10)),
    "MLPNoBias": (lambda: MLP(bias=False), _randn(10)),
    "DeepMLP": (DeepMLP, _randn(10)),
    "EmbMLP": (EmbMLP, _ids(6)),
    "EmbConv1D": (EmbConv1D, _ids(10)),
    "Conv1d": (Conv1dModel, _randn(3, 10)),
    "Conv2d": (Conv2dModel, _randn(5, 4, 4)),
    "Conv2dNoBias": (lambda: Conv2dModel(bias=False), _randn(5, 4, 4)),
    "Conv2dGroups": (Conv2dGroups, _randn(16, 4, 4)),
    "Conv2dGroups2": (Conv2dGroups2, _randn(16, 3, 3)),
    "Conv3d": (Conv3dModel, _randn(5, 3, 3, 3)),
    "Conv3d1x1": (Conv3d1x1, _randn(4, 2, 2, 2)),
    "MHA": (MHAModel, _seq_first(5, 10)),
    "ParamMLP": (ParamMLP, _randn(10)),
}


def build(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """The fixture model ``name`` with seeded random weights, in ``dtype``, in eval mode."""
    torch.manual_seed(seed)
    return MODELS[name][0]().to(dtype).eval()


def example_input(name: str, batch: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A batch of inputs for the fixture model ``name`` (token ids stay integers)."""
    x = MODELS[name][1](batch, seed)
    return x if not x.is_floating_point() else x.to(dtype)
