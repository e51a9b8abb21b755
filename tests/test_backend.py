"""backend="inductor": the rewritten graph runs under torch.compile(fullgraph=True)."""
import pytest
import torch

import lorafx
from lorafx.testing import MLP

from conftest import ids


def test_inductor_backend_matches_eager_and_trains():
    torch.manual_seed(0)
    model = MLP([8, 16, 4]).eval()
    x = torch.randn(5, 8)
    eager = lorafx.compile(model, example_inputs=(x,), r=2, seed=1)
    fast = lorafx.compile(model, example_inputs=(x,), r=2, seed=1, backend="inductor")
    with torch.no_grad():
        for name, p in fast.trainable_parameters().items():
            p.add_(0.1)
            eager.trainable_parameters()[name].copy_(p)
    torch.testing.assert_close(fast(x), eager(x), rtol=1e-5, atol=1e-5)
    fast(torch.randn(9, 8)).sum().backward()  # another batch size, same compiled graph
    assert all(p.grad is not None for p in fast.trainable_parameters().values())


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'tvm-ish'"):
        lorafx.compile(MLP([2, 2]), example_inputs=(torch.randn(2, 2),), backend="tvm-ish")


@pytest.mark.slow
def test_inductor_fullgraph_on_llama(tiny_model):
    model = tiny_model("llama")
    x = ids(2, 16)
    cm = lorafx.compile(model, example_kwargs={"input_ids": x, "labels": x}, r=4, backend="inductor")
    loss = cm(input_ids=x, labels=x).loss
    loss.backward()
    ref = model(input_ids=x, labels=x).loss
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
