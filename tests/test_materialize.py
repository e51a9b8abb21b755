"""Planning on the meta device, then ``lorafx.materialize``: the result equals compiling the
loaded model directly, and a failed call leaves the plan untouched."""
import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorafx
from lorafx.materialize import materialize


def _config(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=96)
    return LlamaConfig(**{**base, **kw})


def _plan(cfg, **options):
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    meta_ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    return lorafx.compile(model, example_kwargs={"input_ids": meta_ids}, **options)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real tiny LLaMA and its save_pretrained folders: one file and sharded."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config())
    one, sharded = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("sharded")
    model.save_pretrained(one)
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert os.path.exists(sharded / "model.safetensors.index.json")
    return model, one, sharded


def _same_training_step(a, b, ids):
    """Outputs, loss, adapter gradients and one AdamW step of two compiled models agree bitwise."""
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    la, lb = a(input_ids=ids, labels=ids).loss, b(input_ids=ids, labels=ids).loss  # a new signature
    assert torch.equal(la, lb)
    la.backward(), lb.backward()
    pa, pb = a.trainable_parameters(), b.trainable_parameters()
    assert pa.keys() == pb.keys() and pa
    assert all(torch.equal(pa[k].grad, pb[k].grad) for k in pa)
    for m in (a, b):
        opt = torch.optim.AdamW(m.trainable_parameters().values(), lr=1e-2)
        opt.step()
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


@pytest.mark.parametrize("options,folder", [(dict(r=4, seed=0, fold_a=True), "one"),
                                            pytest.param(dict(rank_budget=1.0, proxy="constant", shortcuts=True, seed=3),
                                                         "sharded", marks=pytest.mark.slow)],
                         ids=["uniform+fold_a-one-file", "allocated+shortcuts-sharded"])
def test_materialize_equals_compiling_the_loaded_model(saved, options, folder):
    model, one, sharded = saved
    cm = _plan(_config(), **options)
    assert all(t.is_meta for t in cm.state_dict().values())
    assert materialize(cm, one if folder == "one" else sharded) is cm
    direct = lorafx.compile(model, example_kwargs={"input_ids": torch.zeros(2, 8, dtype=torch.long)}, **options)
    sa, sb = cm.state_dict(), direct.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    rope = "model.rotary_emb.inv_freq"  # non-persistent: rebuilt from the config, not read from the checkpoint
    assert torch.equal(cm.get_buffer(rope), direct.get_buffer(rope))
    _same_training_step(cm, direct, torch.randint(0, 96, (3, 7)))  # other batch and length than planned
    assert all(t.is_meta for t in cm.source_model.state_dict().values())  # the user's model is untouched


@pytest.mark.slow
def test_materialize_programs_the_planned_chip(saved):
    model, one, _ = saved
    options = dict(target="cim", r=4, seed=0, noise_sigma=0.1, noise_seed=5)
    cm = _plan(_config(), **options)
    materialize(cm, one)
    direct = lorafx.compile(model, example_kwargs={"input_ids": torch.zeros(2, 8, dtype=torch.long)}, **options)
    ids = torch.randint(0, 96, (2, 6))
    cm.eval(), direct.eval()
    noisy = cm(input_ids=ids).logits
    assert torch.equal(noisy, direct(input_ids=ids).logits)  # the same chip, from the recorded seed
    cm.reprogram(6)
    assert not torch.equal(cm(input_ids=ids).logits, noisy)


def test_a_tied_weight_saved_once_is_attached_to_both_names(tmp_path):
    torch.manual_seed(1)
    cfg = _config(tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    cm = materialize(_plan(cfg, r=2, seed=0, target_modules=["q_proj"]), tmp_path)
    ids = torch.randint(0, 96, (2, 5))
    assert torch.equal(cm(input_ids=ids).logits, model(input_ids=ids).logits)  # B = 0: the base model


def _planned_state(cm):
    return {k: (v.device.type, tuple(v.shape)) for k, v in cm.state_dict().items()}


def test_bad_checkpoints_are_refused_and_leave_the_plan_untouched(saved, tmp_path):
    model, one, _ = saved
    cm = _plan(_config(), r=2, seed=0)
    before = _planned_state(cm)
    other = tmp_path / "other"
    LlamaForCausalLM(_config(hidden_size=48, num_attention_heads=4)).save_pretrained(other)
    with pytest.raises(ValueError, match="planned with shape .* another configuration"):
        materialize(cm, other)
    partial = {k: v for k, v in model.state_dict().items() if "layers.1." not in k}
    with pytest.raises(ValueError, match=r"lacks \d+ weight\(s\).*model.layers.1"):
        materialize(cm, partial)
    extra = {**model.state_dict(), "model.layers.9.mlp.up_proj.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="strict=False"):
        materialize(cm, extra)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle: convert it to safetensors"):
        materialize(cm, pickled)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes((one / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        materialize(cm, corrupt)
    broken = tmp_path / "broken_index"
    broken.mkdir()
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: "model-00001-of-00002.safetensors" for k in model.state_dict()}}))
    with pytest.raises(FileNotFoundError, match="missing: copy every shard"):
        materialize(cm, broken)
    assert _planned_state(cm) == before  # every failure above left the plan as it was
    materialize(cm, one)
    with pytest.raises(ValueError, match="no tensor on the meta device"):
        materialize(cm, one)


def test_a_custom_module_names_its_unrebuildable_buffer(tmp_path):
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.register_buffer("gain", torch.full((8,), 2.0), persistent=False)

        def forward(self, x):
            return self.lin(x) * self.gain

    torch.manual_seed(0)
    real = Scaled()
    with torch.device("meta"):
        planned_model = Scaled()
    cm = lorafx.compile(planned_model, example_inputs=(torch.zeros(2, 8, device="meta"),), r=2, seed=0)
    with pytest.raises(ValueError, match=r"'gain'.*buffers=\{'gain': tensor\}"):
        materialize(cm, real.state_dict())
    materialize(cm, real.state_dict(), buffers={"gain": torch.full((8,), 2.0)})
    x = torch.randn(3, 8)
    assert torch.equal(cm(x), real(x))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cpu", "cim"])
def test_an_8b_shaped_plan_allocates_no_weight(target):
    from lorafx.models import load_model
    model, example = load_model("llama3-8b-shape")
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    options = dict(noise_sigma=0.1) if target == "cim" else {}
    cm = lorafx.compile(model, example_kwargs=example, target=target, rank_budget=1.0, proxy="constant", seed=0,
                        **options)
    assert all(t.is_meta for t in cm.state_dict().values())
    assert all(t.is_meta for t in cm.graph_module.buffers())  # the chip too: programmed by materialize
    assert cm.report().adapter_sites == 224
    if target == "cim":
        placement = lorafx.graph_record(cm.graph_module).placement
        assert placement["rram"]["tiles"] > 0 and placement["estimate"]["parts"]["rram"]["joules"] > 0
