"""InsertLoRA and CompiledModel: identity at init, merge, options, training, errors."""
import copy
import math
import re

import pytest
import torch
from hypothesis import given

import lorafx
from lorafx.graph_utils import get_attr
from lorafx.testing import MLP, assert_equivalent, lora_configs, models

from conftest import HF_FAMILIES, ids, randomise_lora_B


# -- properties ------------------------------------------------------------------------------
@given(models(), lora_configs())
def test_zero_init_lora_is_identity(case, config):
    model = case.model.eval()
    cm = lorafx.compile(model, example_kwargs=case.inputs, **config).eval()
    assert_equivalent(model, cm, case.inputs, msg=repr(case))


@given(models(), lora_configs())
def test_merged_equals_unmerged(case, config):
    cm = lorafx.compile(case.model.eval(), example_kwargs=case.inputs, **config).eval()
    randomise_lora_B(cm, config["seed"], scale=0.1)
    before = {k: v.detach().clone() for k, v in cm.state_dict().items()}
    unmerged = copy.deepcopy(cm)
    cm.merge()
    assert_equivalent(unmerged, cm, case.inputs, grads=False, msg=repr(case))
    plain = cm.merge_and_unload()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert not any(n.target == torch.ops.lorafx.lora_linear.default for n in plain.graph.nodes)
    assert_equivalent(unmerged, plain, case.inputs, grads=False, msg=repr(case))
    cm.unmerge()
    for k, v in cm.state_dict().items():  # unmerge restores the weights bit for bit
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_zero_init_identity_every_family(family, tiny_model):
    model = tiny_model(family).eval()
    vocab = model.config.vocab_size
    cm = lorafx.compile(model, example_inputs=(ids(2, 16, vocab),), r=4).eval()
    assert cm.report().adapter_sites > 0
    x = ids(3, 11, vocab, seed=5)
    want, got = model(input_ids=x), cm(input_ids=x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
def test_zero_init_identity_input_gradients(family, tiny_model):
    """Gradients w.r.t. the embedded input (the base input) are unchanged at B = 0."""
    model = tiny_model(family, torch.float64).eval()
    emb = model.get_input_embeddings()(ids(2, 10, model.config.vocab_size)).detach()
    cm = lorafx.compile(model, example_kwargs={"inputs_embeds": emb}, r=2).eval()
    assert_equivalent(model, cm, {"inputs_embeds": emb}, rtol=1e-9, atol=1e-10)


# -- options ---------------------------------------------------------------------------------
def _llama(tiny_model):
    return tiny_model("llama").eval()


def test_target_modules_list_and_regex(tiny_model):
    model = _llama(tiny_model)
    cm = lorafx.compile(model, r=2, target_modules=["q_proj", "v_proj"])
    assert sorted({s.rsplit(".", 1)[-1] for s in cm.lora_records()}) == ["q_proj", "v_proj"]
    cm = lorafx.compile(model, r=2, target_modules=r".*layers\.1\.mlp\..*")
    assert sorted(cm.lora_records()) == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]


def test_all_linear_skips_the_output_layer(tiny_model):
    cm = lorafx.compile(_llama(tiny_model), r=2)
    assert "lm_head" not in cm.lora_records() and len(cm.lora_records()) == 14


def test_rank_and_alpha_patterns_and_rslora(tiny_model):
    cm = lorafx.compile(_llama(tiny_model), r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={r"layers\.0\.self_attn\.q_proj": 2}, alpha_pattern={"v_proj": 32})
    recs = cm.lora_records()
    q0, v1 = recs["model.layers.0.self_attn.q_proj"], recs["model.layers.1.self_attn.v_proj"]
    assert (q0.r, q0.alpha, q0.scale) == (2, 8.0, 4.0)
    assert (v1.r, v1.alpha, v1.scale) == (4, 32.0, 8.0)
    assert get_attr(cm, q0.lora_A).shape == (2, 32) and get_attr(cm, q0.lora_B).shape == (32, 2)
    rs = lorafx.compile(_llama(tiny_model), r=4, alpha=8, use_rslora=True).lora_records()
    assert all(math.isclose(r.scale, 8 / 2) for r in rs.values())


def test_only_adapters_train_with_readable_names(tiny_model):
    model = _llama(tiny_model)
    cm = lorafx.compile(model, r=2)
    names = sorted(cm.trainable_parameters())
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    assert "model.layers.0.self_attn.q_proj.lora_A" in cm.state_dict()
    assert all(p.requires_grad for p in model.parameters()), "the user's model must not be frozen in place"


def test_biases_are_kept():
    torch.manual_seed(0)
    model = MLP([6, 5, 4], bias=True).double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    cm = lorafx.compile(model, example_inputs=(x,), r=2)
    node = next(n for n in cm.graph_module.graph.nodes if n.target == torch.ops.lorafx.lora_linear.default)
    assert node.args[2] is not None and node.args[2].target == "layers.0.bias"
    assert_equivalent(model, cm, (x,))


def test_gaussian_init_and_seed_are_reproducible(tiny_model):
    a = lorafx.compile(_llama(tiny_model), r=2, init="gaussian", seed=7)
    b = lorafx.compile(_llama(tiny_model), r=2, init="gaussian", seed=7)
    for (na, pa), (nb, pb) in zip(a.trainable_parameters().items(), b.trainable_parameters().items()):
        assert na == nb and torch.equal(pa, pb)
    A = a.trainable_parameters()["model.layers.0.self_attn.q_proj.lora_A"]
    assert abs(A.std().item() - 1 / 2) < 0.2  # N(0, 1/r)


# -- bad input -------------------------------------------------------------------------------
def test_unmatched_targets_list_the_linears(tiny_model):
    with pytest.raises(ValueError, match=r"matched no linear layer.*model\.layers\.0\.self_attn\.q_proj"):
        lorafx.compile(_llama(tiny_model), target_modules=["nope"])


@pytest.mark.parametrize("r", [0, -1])
def test_bad_rank_is_refused(r, tiny_model):
    with pytest.raises(ValueError, match="r must be a positive int"):
        lorafx.compile(_llama(tiny_model), r=r)


def test_rank_above_min_in_out_is_accepted_with_one_warning(tiny_model):
    """PEFT accepts r > min(in, out) (adapters in the wild use it): so does lorafx, warning once per
    compile (not again for a new call signature); B = 0 keeps the identity; init='lors' is refused."""
    from conftest import Warnings
    model = _llama(tiny_model)
    x = ids(2, 6)
    with Warnings() as records:
        cm = lorafx.compile(model, example_inputs=(x,), r=2, rank_pattern={"k_proj": 40})
        cm(input_ids=x, labels=x)  # a second signature: replayed, no second warning
    assert len(records) == 1 and "rank above min(in, out)" in records[0].getMessage()
    assert "r=40 on model.layers.0.self_attn.k_proj" in records[0].getMessage()
    assert cm.lora_records()["model.layers.0.self_attn.k_proj"].r == 40
    assert torch.equal(cm(input_ids=x).logits, model(input_ids=x).logits)
    with pytest.raises(ValueError, match="init='lors'.*rank 40 .* exceeds min\\(in, out\\) = 16"):
        lorafx.compile(model, example_inputs=(x,), r=2, rank_pattern={"k_proj": 40}, init="lors",
                       calibration=[{"input_ids": x}])


class _Mixed(torch.nn.Module):
    """A linear beside an embedding, a convolution, an nn.MultiheadAttention and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.conv = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = torch.nn.LayerNorm(8)
        self.pre = torch.nn.Linear(8, 8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.emb(x)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.norm(self.mha(h, h, h, need_weights=False)[0])
        return self.fc(self.pre(h))


@pytest.mark.parametrize("targets,named", [(["norm", "fc"], "'norm' (LayerNorm)"),
                                           (["conv", "norm", "mha"], "'norm' (LayerNorm)"),
                                           (r"(norm|fc)", "'norm' (LayerNorm)")])
def test_targets_lorafx_cannot_adapt_are_refused_naming_them(targets, named, tiny_model):
    """No silent partial adaptation: naming a module lorafx cannot adapt (a norm) beside layers it adapts
    is an error naming the module and its kind, before anything is compiled."""
    torch.manual_seed(0)
    model = _Mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 10, (2, 5))
    with pytest.raises(ValueError, match=re.escape(named) + ".*not supported yet.*nothing was compiled"):
        lorafx.compile(model, example_inputs=(x,), r=2, target_modules=targets)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"name the linear layers inside them \(q_proj, k_proj, v_proj, o_proj"):
        lorafx.compile(_llama(tiny_model), r=2, target_modules=["self_attn"])


def test_all_linear_adapts_multihead_attention_but_no_convolution():
    """all-linear (PEFT's: linear layers) adapts an nn.MultiheadAttention's two projections (its packed
    in_proj is a linear) and leaves convolutions and embeddings alone."""
    torch.manual_seed(0)
    x = torch.randint(0, 10, (2, 5))
    cm = lorafx.compile(_Mixed(), example_inputs=(x,), r=2, target_modules="all-linear")
    assert set(cm.lora_records()) == {"mha", "mha.out_proj", "pre", "fc"}  # (pre feeds fc directly: both adapted)
    x2 = torch.randint(0, 10, (3, 4))
    torch.testing.assert_close(cm(x2), cm.source_model(x2))  # B = 0: the identity (up to kernel rounding)


def test_unknown_option_and_target(tiny_model):
    with pytest.raises(TypeError, match="unknown option.*'rank'.*known options"):
        lorafx.compile(_llama(tiny_model), rank=4)
    with pytest.raises(ValueError, match="'sram'.*not compiled for on its own.*target='cim'"):
        lorafx.compile(_llama(tiny_model), target="sram")
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        lorafx.compile(_llama(tiny_model), target="tpu")
    with pytest.raises(ValueError, match="dropout"):
        lorafx.compile(_llama(tiny_model), dropout=1.5)


def test_plain_module_needs_example_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        lorafx.compile(MLP([3, 3]))


# -- train / eval ----------------------------------------------------------------------------
def test_train_eval_switches_dropout_like_the_original(tiny_model):
    model = tiny_model("bert").eval()
    x = ids(2, 12)
    cm = lorafx.compile(model, example_inputs=(x,), r=2, dropout=0.3)
    assert cm.training is False
    a, b = cm(input_ids=x).logits, cm(input_ids=x).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, model(input_ids=x).logits)  # B = 0: identity in eval
    cm.train()
    randomise_lora_B(cm, scale=0.1)
    c, d = cm(input_ids=x).logits, cm(input_ids=x).logits
    assert not torch.allclose(c, d), "dropout must be active in train()"
    assert model.training is False, "the user's model keeps its mode"
    cm.eval()
    torch.testing.assert_close(cm(input_ids=x).logits, cm(input_ids=x).logits)


def test_training_loop_reduces_loss_and_leaves_the_model_alone(tiny_model):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = ids(4, 16)
    cm = lorafx.compile(model, example_inputs=(x,), r=4).train()
    opt = torch.optim.AdamW(cm.trainable_parameters().values(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = cm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    cm.merge()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} of the user's model changed"


def test_new_input_signature_shares_adapters(tiny_model):
    cm = lorafx.compile(_llama(tiny_model), example_inputs=(ids(2, 8),), r=2)
    randomise_lora_B(cm, scale=0.1)
    x = ids(2, 8)
    logits = cm(input_ids=x).logits
    out = cm(input_ids=x, labels=x)  # captured once more, bound to the same parameters
    torch.testing.assert_close(out.logits, logits)
    assert len(cm._variants) == 2 and out.loss.requires_grad
    cm.merge()
    torch.testing.assert_close(cm(input_ids=x, labels=x).logits, logits, rtol=1e-5, atol=1e-5)


def test_report_lists_passes(tiny_model):
    cm = lorafx.compile(_llama(tiny_model), r=2)
    rep = cm.report()
    names = [p.name for p in rep.passes]
    assert "InsertLoRA" in names and names[-1] == "SetTrainingMode"
    assert rep.adapter_sites == 14 and rep.trainable_params == sum(p.numel() for p in cm.trainable_parameters().values())
    text = str(rep)
    assert "InsertLoRA" in text and "trainable params" in text
    assert "lora(r=2" in cm.graph_report()


@pytest.mark.parametrize("options", [{}, {"schedule_keep_xa": True}])
def test_unmerge_restores_the_graph_exactly(options, tiny_model):
    cm = lorafx.compile(_llama(tiny_model), example_inputs=(ids(2, 8),), r=2, **options).eval()
    randomise_lora_B(cm, scale=0.1)
    x = ids(3, 9)
    before_text, before = cm.graph_report(), cm(input_ids=x).logits
    cm.merge()
    assert not any(str(n.target).startswith("lorafx.") for n in cm.graph_module.graph.nodes)
    torch.testing.assert_close(cm(input_ids=x).logits, before, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    assert cm.graph_report() == before_text  # schedules and later rewrites come back too
    assert torch.equal(cm(input_ids=x).logits, before)
