"""The user's model and files are never corrupted, and bad input gets a clear error.

Each test names the failure it guards against (issue: reliability).  The
adapter-file and option-validation cases live in test_reliability_adapter_io.py
and test_reliability_options.py; the state-machine test in test_reliability_state.py.
"""
import copy
import pickle
import threading

import pytest
import torch
import torch.nn as nn
import transformers as T

import lorafx
from conftest import ids


class KeywordModel(nn.Module):
    """A small model whose optional keyword inputs each change the captured graph."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, a=None, b=None, c=None, d=None):
        h = self.up(x)
        for extra in (a, b, c, d):
            if extra is not None:
                h = h + extra
        return self.down(self.drop(torch.relu(h)))


def snapshot(model):
    """Everything lorafx could change on a model: tensors (values and identity), flags, modes, config."""
    return {
        "tensors": {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grads": {k: p.grad for k, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "config": copy.deepcopy(model.config.to_dict()) if hasattr(model, "config") else None,
        "forward": model.__dict__.get("forward"),
    }


def assert_unchanged(model, snap):
    for key, (obj, value) in snap["tensors"].items():
        now = model.state_dict(keep_vars=True)[key]
        assert now is obj, f"{key} was replaced"
        assert type(now.data) is torch.Tensor and torch.equal(now.detach(), value), f"{key} was written"
    assert {k: p.requires_grad for k, p in model.named_parameters()} == snap["requires_grad"]
    assert all(p.grad is snap["grads"][k] for k, p in model.named_parameters())
    assert [m.training for m in model.modules()] == snap["modes"]
    if snap["config"] is not None:
        assert model.config.to_dict() == snap["config"]
    assert model.__dict__.get("forward") is snap["forward"]


def tiny_llama(tie=False, layers=1):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=96, tie_word_embeddings=tie)
    return T.LlamaForCausalLM(cfg), cfg


def randomise_adapters(cm, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# -- 1. concurrent first calls ------------------------------------------------------------------------

def _first_calls_at_once(cm, calls):
    errors, barrier = [], threading.Barrier(len(calls))

    def run(kwargs):
        try:
            barrier.wait()
            cm(**kwargs)
        except Exception as e:  # noqa: BLE001 - collected and asserted on
            errors.append(e)

    threads = [threading.Thread(target=run, args=(kw,)) for kw in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_first_calls_all_succeed_and_leave_the_model_unchanged():
    """4 threads make first calls with 4 new keyword sets at once, 20 trials."""
    torch.manual_seed(0)
    model = KeywordModel()
    x = torch.randn(3, 8)
    extra = torch.randn(3, 16)
    snap = snapshot(model)
    for trial in range(20):
        cm = lorafx.compile(model, example_inputs=(x,), r=2, seed=trial)
        calls = [{"x": x, name: extra} for name in ("a", "b", "c", "d")]
        errors = _first_calls_at_once(cm, calls)
        assert errors == [], f"trial {trial}: {errors}"
        assert len(cm._variants) == 5
        assert_unchanged(model, snap)


@pytest.mark.parametrize("trials", [pytest.param(2, id="2-trials", marks=pytest.mark.slow),
                                    pytest.param(20, id="20-trials", marks=pytest.mark.slow)])
def test_concurrent_first_calls_on_a_transformers_model(trials):
    model, _ = tiny_llama()
    x = ids(2, 8)
    snap = snapshot(model)
    for trial in range(trials):
        cm = lorafx.compile(model, example_inputs=(x,), r=2, seed=trial)
        calls = [{"input_ids": x, "labels": x}, {"input_ids": x, "attention_mask": torch.ones_like(x)},
                 {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)},
                 {"input_ids": x, "position_ids": torch.arange(8).expand(2, 8)}]
        assert _first_calls_at_once(cm, calls) == []
        assert_unchanged(model, snap)
    assert model(input_ids=x).logits.dtype == torch.float32  # real tensors, not FakeTensors


def test_a_capture_that_fails_at_call_time_leaves_the_model_unchanged_and_talks_about_the_call():
    class Picky(KeywordModel):
        def forward(self, x, a=None, b=None, c=None, d=None):
            if a is not None and a.sum() > 0:  # data-dependent branch: export fails
                return self.down(self.up(x))
            return super().forward(x)

    torch.manual_seed(0)
    model = Picky()
    x = torch.randn(3, 8)
    cm = lorafx.compile(model, example_inputs=(x,), r=2)
    snap = snapshot(model)
    with pytest.raises(lorafx.CaptureError) as info:
        cm(x, a=torch.ones(3, 16))
    assert "call inputs" in str(info.value) and "example inputs" not in str(info.value)
    assert_unchanged(model, snap)
    assert torch.is_grad_enabled()
    cm(x)  # the compiled model still works


# -- 2./3. state dicts and merged state ---------------------------------------------------------------

def test_load_state_dict_never_writes_into_the_users_weights():
    model, _ = tiny_llama()
    x = ids(2, 8)
    snap = snapshot(model)
    a = lorafx.compile(model, example_inputs=(x,), r=4, seed=0)
    b = lorafx.compile(model, example_inputs=(x,), r=4, seed=1)
    randomise_adapters(a, 0)
    a.eval(), b.eval()
    expected = a(input_ids=x).logits
    a.merge()
    b.load_state_dict(a.state_dict())  # a merged model's state dict: the unmerged base + adapters
    torch.testing.assert_close(b(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
    assert_unchanged(model, snap)
    # a state dict with other base weights: b takes private copies of the changed ones
    changed = {k: (v + 1.0 if k.endswith("q_proj.weight") else v) for k, v in b.state_dict().items()}
    b.load_state_dict(changed)
    assert_unchanged(model, snap)
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(b.state_dict()[q], model.state_dict()[q] + 1.0)
    assert b.state_dict()["model.layers.0.self_attn.k_proj.weight"].data_ptr() == \
        model.state_dict()["model.layers.0.self_attn.k_proj.weight"].data_ptr()  # unchanged ones stay shared


def test_load_state_dict_while_merged_gives_the_new_adapters():
    model, _ = tiny_llama()
    x = ids(2, 8)
    a = lorafx.compile(model, example_inputs=(x,), r=4, seed=0)
    b = lorafx.compile(model, example_inputs=(x,), r=4, seed=0)
    randomise_adapters(a, 1)
    randomise_adapters(b, 2)
    a.eval(), b.eval()
    expected = b(input_ids=x).logits
    a.merge()
    a.load_state_dict(b.state_dict())
    assert a.merged
    torch.testing.assert_close(a(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
    a.unmerge()
    torch.testing.assert_close(a(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)


def test_training_while_merged_is_refused_with_the_fix():
    model, _ = tiny_llama()
    x = ids(2, 8)
    cm = lorafx.compile(model, example_inputs=(x,), r=4).merge()
    cm.train()
    with pytest.raises(RuntimeError, match=r"unmerge\(\)"):
        cm(input_ids=x, labels=x)
    with torch.no_grad():
        cm(input_ids=x)  # inference while merged is fine
    cm.eval()
    cm(input_ids=x)
    cm.unmerge().train()
    cm(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in cm.trainable_parameters().values())


# -- 5. tied embeddings, strict loading --------------------------------------------------------------

def test_an_adapter_on_a_tied_lm_head_is_refused():
    model, _ = tiny_llama(tie=True)
    with pytest.raises(ValueError, match="tie_word_embeddings") as info:
        lorafx.compile(model, example_inputs=(ids(2, 8),), r=4, target_modules=["q_proj", "lm_head"])
    assert "exclude_modules" in str(info.value)


def test_adapters_on_two_linears_sharing_one_weight_are_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    for targets in ("all-linear", ["a"]):  # both adapted, or one
        with pytest.raises(ValueError, match="also used by"):
            lorafx.compile(Shared(), example_inputs=(torch.randn(2, 8),), r=2, target_modules=targets)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_merged_weights_load_strictly_and_exactly_into_the_source_architecture(tie):
    model, cfg = tiny_llama(tie=tie)
    x = ids(2, 8)
    cm = lorafx.compile(model, example_inputs=(x,), r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    randomise_adapters(cm, 3)
    cm.eval()
    expected = cm(input_ids=x).logits
    for state in (cm.merged_state_dict(), cm.merge_and_unload().state_dict()):
        fresh = T.LlamaForCausalLM(cfg).eval()
        fresh.load_state_dict(state, strict=True)
        torch.testing.assert_close(fresh(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
        if tie:
            assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    unloaded = cm.merge_and_unload()
    unloaded.load_state_dict(unloaded.state_dict(), strict=True)  # and back into itself


# -- 7. models users pass -----------------------------------------------------------------------------

def test_a_peft_model_is_refused_with_what_to_do():
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    wrapped = peft.get_peft_model(base, peft.LoraConfig(target_modules=["0"], r=2))
    with pytest.raises(TypeError, match="wrapped by PEFT") as info:
        lorafx.compile(wrapped, example_inputs=(torch.randn(2, 8),))
    assert "load_adapter" in str(info.value) and "merge_and_unload" in str(info.value)


def test_compiling_a_compiled_model_is_refused_with_what_to_do():
    cm = lorafx.compile(KeywordModel(), example_inputs=(torch.randn(2, 8),), r=2)
    with pytest.raises(TypeError, match="already compiled") as info:
        lorafx.compile(cm, example_inputs=(torch.randn(2, 8),))
    assert "cm.source_model" in str(info.value)


class BatchNormModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.bn, self.down = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.down(self.bn(self.up(x)))


def test_a_batch_norm_model_compiles_in_eval_mode_and_switches_modes_like_eager():
    torch.manual_seed(0)
    model = BatchNormModel()
    x = torch.randn(6, 4)
    model.train()
    model(x)  # non-trivial running statistics
    model.eval()
    snap = snapshot(model)
    bn = torch.ops.aten.batch_norm.default
    assert lorafx.capture(model, (x,)).graph.find_nodes(op="call_function", target=bn)[0].args[5] is False
    cm = lorafx.compile(model, example_inputs=(x,), r=2)
    eager = copy.deepcopy(model)
    torch.testing.assert_close(cm(x), eager(x))  # eval: running statistics
    cm.train(), eager.train()
    torch.testing.assert_close(cm(x), eager(x))  # train: batch statistics, running ones updated
    cm.eval(), eager.eval()
    torch.testing.assert_close(cm(x), eager(x))  # eval again: the updated running statistics
    assert not torch.equal(eager.bn.running_mean, model.bn.running_mean)
    assert_unchanged(model, snap)  # ... updated in the compiled model's own copies, never the user's


def test_pickling_a_compiled_model_points_to_save_adapter(tmp_path):
    cm = lorafx.compile(KeywordModel(), example_inputs=(torch.randn(2, 8),), r=2)
    for save in (lambda: pickle.dumps(cm), lambda: torch.save(cm, tmp_path / "cm.pt")):
        with pytest.raises(TypeError, match="save_adapter") as info:
            save()
        assert "merged_state_dict" in str(info.value)
    twin = copy.deepcopy(cm)  # deepcopy still works
    x = torch.randn(2, 8)
    cm.eval(), twin.eval()
    torch.testing.assert_close(twin(x), cm(x))


# -- 8. inputs of the wrong rank ----------------------------------------------------------------------

def test_inputs_of_the_wrong_rank_get_a_clear_error():
    model, _ = tiny_llama()
    x = ids(2, 8)
    cm = lorafx.compile(model, example_inputs=(x,), r=2)
    with pytest.raises(ValueError, match=r"'input_ids' has 1 dim.*unsqueeze\(0\)"):
        cm(input_ids=x[0])
    with pytest.raises(ValueError, match=r"'input_ids' has 1 dim"):  # also on a new signature, before capture
        cm(input_ids=x[0], labels=x[0])
    cm(input_ids=x[:1])  # batch 1 is fine
