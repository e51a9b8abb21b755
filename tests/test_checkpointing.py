"""Activation checkpointing of a CompiledModel (passes/checkpoint_layers.py): same gradients, fewer
saved bytes, every recomputation done once, no re-capture, the source model untouched."""
import copy
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorafx
from lorafx.dialect import recompute as recompute_kind
from lorafx.dialect import siblings as siblings_kind
from lorafx.graph_utils import node_module
from lorafx.passes import CheckpointLayers, InsertLoRA
from lorafx.passes.checkpoint_layers import REGION_PREFIX, Region, checkpointed
from lorafx.testing import assert_equivalent, lora_configs, models

from conftest import ids, randomise_lora_B


@pytest.fixture
def llama(llama_r4):
    """The tiny LLaMA (2 layers) compiled with the default passes (RecomputeInputs and FuseSiblings
    rewrite its adapters to rebuild their inputs), B random: a copy of conftest's llama_r4."""
    cm = copy.deepcopy(llama_r4)
    randomise_lora_B(cm, scale=0.3)
    return cm


class _Saved:
    """Bytes autograd saves for backward (storages counted once), parameters and buffers left out
    (they are alive anyway); with non-reentrant checkpointing this includes each region's inputs."""

    def __init__(self, model):
        self.alive = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.alive and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def _step(cm, x, monkeypatch):
    """(loss, adapter grads, saved bytes, input rebuilds in backward) of one training step."""
    rebuilds = []
    for module in (recompute_kind, siblings_kind):
        original = module.rebuild_input
        monkeypatch.setattr(module, "rebuild_input", lambda *a, _f=original: rebuilds.append(a[-1]) or _f(*a))
    cm.zero_grad(set_to_none=True)
    with _Saved(cm) as saved:
        loss = cm(input_ids=x, labels=x).loss
    loss.backward()
    monkeypatch.undo()
    return loss.detach(), {n: p.grad.clone() for n, p in cm.trainable_parameters().items()}, saved.bytes, rebuilds


def test_checkpointing_same_gradients_less_memory_each_recompute_once(tiny_model, llama, monkeypatch):
    cm = llama
    x = ids(2, 12, seed=5)
    graphs = {k: gm.code for k, gm in cm._variants.items()}
    source_flags = [m.gradient_checkpointing for m in cm.source_model.model.layers]
    loss0, grads0, bytes0, rebuilds0 = _step(cm, x, monkeypatch)
    assert rebuilds0  # RecomputeInputs' adapters rebuild their inputs in backward

    assert not cm.is_gradient_checkpointing
    cm.gradient_checkpointing_enable()
    assert cm.is_gradient_checkpointing and cm.is_activation_checkpointing and cm.supports_gradient_checkpointing
    gm = cm._variants[next(k for k in cm._variants if "labels" in str(k))]
    copy_gm = checkpointed(gm, cm._checkpointing)
    regions = [m for name, m in copy_gm.named_children() if name.startswith(REGION_PREFIX)]
    assert [r.module for r in regions] == ["model.layers.0", "model.layers.1"]
    runs = []
    for r in regions:
        r.register_forward_pre_hook(lambda mod, args: runs.append(mod.module))
    loss1, grads1, bytes1, rebuilds1 = _step(cm, x, monkeypatch)

    assert torch.equal(loss0, loss1)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-7)
    assert bytes1 < 0.75 * bytes0, (bytes0, bytes1)
    # each layer ran twice (forward, then once more in backward); no adapter rebuilt its input again
    assert sorted(runs) == ["model.layers.0"] * 2 + ["model.layers.1"] * 2
    assert rebuilds1 == []
    # no re-capture, the compiled model's own graphs unchanged, the source model untouched
    assert {k: g.code for k, g in cm._variants.items()} == graphs
    assert [m.gradient_checkpointing for m in cm.source_model.model.layers] == source_flags

    cm.gradient_checkpointing_disable()
    runs.clear()
    loss2, grads2, bytes2, rebuilds2 = _step(cm, x, monkeypatch)
    assert runs == [] and bytes2 == bytes0 and len(rebuilds2) == len(rebuilds0)
    with torch.no_grad():  # eval / no-grad calls never checkpoint
        cm.gradient_checkpointing_enable()
        cm(input_ids=x, labels=x)
    assert runs == []


def test_checkpoint_layers_options_and_refusals(llama):
    cm = llama
    gm = cm.graph_module
    every2 = checkpointed(gm, CheckpointLayers(every_n_layers=2))
    assert [m.module for m in every2.children() if isinstance(m, Region)] == ["model.layers.0"]
    mlp_only = checkpointed(gm, CheckpointLayers(layers=r"model\.layers\.\d+\.mlp"))
    assert [m.module for m in mlp_only.children() if isinstance(m, Region)] == ["model.layers.0.mlp",
                                                                                 "model.layers.1.mlp"]
    x = ids(2, 12, seed=2)
    with torch.no_grad():
        assert torch.equal(mlp_only(input_ids=x)[0], gm(input_ids=x)[0])
    with pytest.raises(ValueError, match="use_reentrant=False only"):
        cm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="offload=False"):
        cm.activation_checkpointing_enable(offload=True)
    with pytest.raises(ValueError, match="every_n_layers"):
        cm.gradient_checkpointing_enable(every_n_layers=0)
    with pytest.raises(ValueError, match="not supported"):
        cm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"context_fn": None})
    assert not cm.is_gradient_checkpointing  # a refused call changed nothing


@pytest.mark.slow
def test_source_model_checkpointing_carries_over(tiny_model):
    """A source model with gradient_checkpointing_enable() called exports to a flat graph (the capture
    traces through torch.utils.checkpoint); the compiled model checkpoints the same layers itself."""
    model = copy.deepcopy(tiny_model("llama"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=2)
    model.train()
    flags = [layer.gradient_checkpointing for layer in model.model.layers]
    cm = lorafx.compile(model, example_inputs=(ids(2, 12),), r=4, seed=0)
    assert cm.is_gradient_checkpointing and cm._checkpointing.every_n_layers == 2
    assert [layer.gradient_checkpointing for layer in model.model.layers] == flags == [True, False]
    x = ids(2, 12)
    cm(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in cm.trainable_parameters().values())


@pytest.mark.slow
def test_trainer_with_gradient_checkpointing(llama, tmp_path):
    from transformers import Trainer, TrainingArguments

    from test_trainer import _Labelled

    cm = llama
    before = {n: p.detach().clone() for n, p in cm.trainable_parameters().items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                             disable_tqdm=True, gradient_checkpointing=True)
    trainer = Trainer(model=cm, args=args, train_dataset=_Labelled())
    trainer.train()
    assert cm.is_gradient_checkpointing
    assert all(not torch.equal(p, before[n]) for n, p in cm.trainable_parameters().items())


@pytest.mark.slow
def test_checkpointing_under_torch_compile(tiny_model):
    """backend="inductor": the checkpointed copy compiles with fullgraph=True and gives the eager gradients."""
    model = tiny_model("llama")
    x = ids(2, 12)
    grads = []
    for backend in ("eager", "inductor"):
        cm = lorafx.compile(model, example_inputs=(ids(2, 12),), r=4, seed=0, backend=backend)
        randomise_lora_B(cm, scale=0.3)
        cm.train()
        cm.gradient_checkpointing_enable()
        cm(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in cm.trainable_parameters().items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


@settings(max_examples=8)
@given(models(), lora_configs(), st.integers(1, 2))
def test_checkpoint_layers_property(case, config, every):
    """CheckpointLayers preserves outputs and the gradients of the inputs and adapters on any
    drawn model with adapters (B random); its numbered blocks (MLP layers.N, the residual
    model's norms/ups/downs.N) become regions."""
    gm = lorafx.capture(case.model, example_kwargs=case.inputs)
    adapted = InsertLoRA(**config)(gm).graph_module
    randomise_lora_B(adapted, scale=0.3)
    result = CheckpointLayers(every_n_layers=every)(copy.deepcopy(adapted))
    numbered = any(re.search(r"\.\d+$", node_module(n) or "") for n in adapted.graph.nodes)
    assert (result.info["regions"] > 0) == numbered
    adapters = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert_equivalent(adapted, result.graph_module, case.inputs, param_names=adapters, rtol=1e-10, atol=1e-12)
