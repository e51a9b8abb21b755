"""capture(): equals eager for every supported family, dynamic dims, clear errors."""
import pytest
import torch
from hypothesis import given

import lorafx
from lorafx.passes import set_training_mode
from lorafx.testing import assert_equivalent, models

from conftest import HF_FAMILIES, ids


def _outputs(out):
    return out.to_tuple() if hasattr(out, "to_tuple") else (out,)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_capture_equals_eager(family, tiny_model):
    model = tiny_model(family).eval()
    vocab = model.config.vocab_size
    gm = lorafx.capture(model, (ids(2, 16, vocab),))
    set_training_mode(gm, False)
    assert model.training is False and model.config.use_cache in (True, False)
    for batch, seq in [(3, 23), (1, 5), (2, 16)]:
        x = ids(batch, seq, vocab, seed=batch * seq)
        got, want = _outputs(gm(input_ids=x)), _outputs(model(input_ids=x))
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_capture_equals_eager_gradients(family, tiny_model):
    """Backward through the captured graph gives the eager parameter gradients."""
    model = tiny_model(family, torch.float64).eval()
    x = ids(2, 12, model.config.vocab_size)
    gm = lorafx.capture(model, (x,))
    set_training_mode(gm, False)
    names = [n for n, _ in model.named_parameters()][1:6]
    assert_equivalent(model, gm, {"input_ids": ids(3, 9, model.config.vocab_size)}, param_names=names,
                      rtol=1e-9, atol=1e-10)


@given(models())
def test_capture_equals_eager_plain_modules(case):
    gm = lorafx.capture(case.model, example_kwargs=case.inputs)
    assert_equivalent(case.model, gm, case.inputs)
    # a different batch size runs on the same graph
    bigger = {k: torch.cat([v, v[:1]]) for k, v in case.inputs.items()}
    assert_equivalent(case.model, gm, bigger)


def test_batch_of_one_gives_dynamic_batch(tiny_model):
    model = tiny_model("llama").eval()
    gm = lorafx.capture(model, (ids(1, 8),))
    assert sorted(lorafx.graph_record(gm).dims.values()) == ["batch", "seq"]
    x = ids(3, 40)
    torch.testing.assert_close(gm(input_ids=x).logits, model(input_ids=x).logits)


def test_positional_inputs_bind_to_names(tiny_model):
    model = tiny_model("llama").eval()
    gm = lorafx.capture(model, (ids(2, 8),))
    assert lorafx.graph_record(gm).inputs == ("input_ids",)


def test_capture_restores_the_model(tiny_model):
    model = tiny_model("bert").eval()
    model.config.use_cache = True
    lorafx.capture(model, (ids(2, 8),))
    assert model.training is False and all(not m.training for m in model.modules())
    assert model.config.use_cache is True


def test_meta_device_capture():
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=96)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    gm = lorafx.capture(model, (torch.empty(1, 8, dtype=torch.long, device="meta"),))
    out = gm(input_ids=torch.empty(3, 5, dtype=torch.long, device="meta"))
    assert out.logits.shape == (3, 5, 96) and out.logits.device.type == "meta"


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_uncapturable_model_names_the_construct():
    with pytest.raises(lorafx.CaptureError, match=r"(?s)DataDependent.*if x.sum\(\) > 0.*what to try"):
        lorafx.capture(DataDependent(), (torch.randn(2, 4),))


def test_capture_needs_inputs():
    with pytest.raises(lorafx.CaptureError, match="needs example inputs"):
        lorafx.capture(torch.nn.Linear(2, 2))


def test_wrong_inputs_are_named():
    with pytest.raises(lorafx.CaptureError, match="do not match"):
        lorafx.capture(torch.nn.Linear(2, 2), (torch.randn(2, 2), torch.randn(2, 2)))
