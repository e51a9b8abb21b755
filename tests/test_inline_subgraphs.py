"""InlineGradModeRegions keeps outputs and gradients and unblocks torch.compile."""
import copy

import pytest
import torch

import lorafx
from lorafx.passes import InlineGradModeRegions, set_training_mode
from lorafx.testing import assert_equivalent

from conftest import ids

WRAP = torch.ops.higher_order.wrap_with_set_grad_enabled


class OldStyleRotary(torch.nn.Module):
    """The rotary embedding as transformers <= 5.23 wrote it: cos/sin under ``torch.no_grad()`` from a
    buffer, which torch.export wraps in ``wrap_with_set_grad_enabled``."""

    def __init__(self, dim=8):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)),
                             persistent=False)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)  # integer positions, like position_ids
        with torch.no_grad():
            freqs = (self.inv_freq[None, :, None].expand(x.shape[0], -1, 1) @ pos[:, None, :].to(x.dtype))
            freqs = freqs.transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        h = self.proj(x)
        return h * cos + torch.roll(h, 1, dims=-1) * sin


def test_inlining_a_no_grad_region_preserves_outputs_and_gradients():
    model = OldStyleRotary().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    gm = lorafx.capture(model, (x,))
    assert any(n.target is WRAP for n in gm.graph.nodes)
    before = copy.deepcopy(gm)
    result = InlineGradModeRegions()(gm)
    assert result.info["inlined_regions"] == 1
    assert not any(n.target is WRAP for n in gm.graph.nodes)
    assert not any(n.op == "get_attr" and n.target.startswith("submod") for n in gm.graph.nodes)
    # the region's inputs need no grad, so it is inlined as plain nodes, no grad-mode toggles
    assert not any(n.target is torch._C._set_grad_enabled for n in gm.graph.nodes)
    assert_equivalent(before, gm, {"x": torch.randn(3, 7, 8, dtype=torch.float64)},
                      param_names=["proj.weight", "proj.bias"], rtol=1e-12, atol=1e-12)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_inlining_preserves_outputs_and_gradients(family, tiny_model):
    """Whatever regions the installed transformers' rotary embedding exports (none from 5.24 on), the
    pass leaves no wrapped region and the model computes the same outputs and gradients."""
    model = tiny_model(family, torch.float64).eval()
    gm = lorafx.capture(model, (ids(2, 8),))
    set_training_mode(gm, False)
    regions = sum(n.target is WRAP for n in gm.graph.nodes)
    before = copy.deepcopy(gm)
    result = InlineGradModeRegions()(gm)
    assert result.info["inlined_regions"] == regions
    assert not any(n.target is WRAP for n in gm.graph.nodes)
    assert not any(n.op == "get_attr" and n.target.startswith("submod") for n in gm.graph.nodes)
    names = [n for n, _ in model.named_parameters()][:4]
    assert_equivalent(before, gm, {"input_ids": ids(3, 11)}, param_names=names, rtol=1e-10, atol=1e-12)
    assert torch.is_grad_enabled()


def test_region_with_grad_inputs_keeps_grad_mode():
    class NoGradInside(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            with torch.no_grad():
                frozen = self.fc(x) * 2
            return self.fc(x) + frozen

    model = NoGradInside().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    gm = lorafx.capture(model, (x,))
    assert any(n.target is WRAP for n in gm.graph.nodes)
    InlineGradModeRegions()(gm)
    assert any(n.target is torch._C._set_grad_enabled for n in gm.graph.nodes)
    assert_equivalent(model, gm, {"x": x}, param_names=["fc.weight"], rtol=1e-12, atol=1e-12)
    assert torch.is_grad_enabled()
