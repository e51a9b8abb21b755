"""InlineGradModeRegions keeps outputs and gradients and unblocks torch.compile."""
import pytest
import torch

import lorafx
from lorafx.passes import InlineGradModeRegions, set_training_mode
from lorafx.testing import assert_equivalent

from conftest import ids

WRAP = torch.ops.higher_order.wrap_with_set_grad_enabled


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_inlining_preserves_outputs_and_gradients(family, tiny_model):
    model = tiny_model(family, torch.float64).eval()
    gm = lorafx.capture(model, (ids(2, 8),))
    set_training_mode(gm, False)
    assert any(n.target is WRAP for n in gm.graph.nodes)
    import copy
    before = copy.deepcopy(gm)
    result = InlineGradModeRegions()(gm)
    assert result.info["inlined_regions"] >= 1
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
