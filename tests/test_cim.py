"""The compute-in-memory lowering: partition, programmed chips, noisy simulation and HaLoRA."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorafx
from conftest import Warnings, ids, randomise_lora_B
from lorafx.dialect import RRAM, SRAM_ADAPTER, kind_of
from lorafx.dialect.cim import lora_sram, quantize_tokens, rram_linear
from lorafx.meta import PlacementRecord, graph_record
from lorafx.passes.halora import loss_output
from lorafx.testing import lora_configs, models, outputs_and_grads

PARTS = {"rram", "sram", "host"}


def _llama(tiny_model):
    return tiny_model("llama")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_placed_once(gm):
    """Every node carries exactly one placement, on a known part; RRAM ops on rram, adapters on sram."""
    for node in gm.graph.nodes:
        recs = [r for r in node.meta.get("lorafx", {}).values() if isinstance(r, PlacementRecord)]
        assert len(recs) == 1 and recs[0].target in PARTS, (node.name, recs)
        if kind_of(node) is RRAM:
            assert recs[0].target == "rram", node.name
        elif kind_of(node) is not None:
            assert recs[0].target == "sram", node.name


def _batch(n=2, seq=8, seed=0):
    x = ids(n, seq, seed=seed)
    return {"input_ids": x, "labels": x}


# -- the ops ---------------------------------------------------------------------------------------

def test_rram_linear_equals_linear_without_noise_and_reads_the_programmed_weight():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, generator=g)
    b = torch.randn(5, dtype=torch.float64, generator=g)
    assert torch.equal(rram_linear(x, w, b), torch.nn.functional.linear(x, w, b))
    wt = w.t().contiguous()  # GPT-2's Conv1D layout, computed as addmm(b, x, W) like the graph it replaces
    assert torch.equal(rram_linear(x, wt, b, transposed=True), torch.addmm(b, x.reshape(-1, 6), wt).view(3, 4, 5))
    p = w + 0.1
    y = rram_linear(x, w, b, p)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, p, b))
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, torch.ones(3, 4, 5, dtype=torch.float64) @ p)  # dx = dy·W̃


def test_quantisation_levels_and_straight_through_gradient():
    x = torch.tensor([[0.1, -0.5, 1.0, 0.33]], dtype=torch.float64)
    q = quantize_tokens(x, 3)  # 3 levels each side of 0: steps of 1/3
    torch.testing.assert_close(q, torch.tensor([[0.0, -2 / 3, 1.0, 1 / 3]], dtype=torch.float64))
    assert torch.equal(quantize_tokens(x, 0), x)
    w = torch.eye(4, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    y = rram_linear(xr, w, None, None, 3, 0)
    torch.testing.assert_close(y.detach(), q)
    (dx,) = torch.autograd.grad(y.sum(), xr)
    assert torch.equal(dx, torch.ones_like(x))


def test_lora_sram_matches_reference_with_gradients():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    base = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    bb = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    torch.autograd.gradcheck(lambda *t: lora_sram(*t, 1.5), (x, base, a, bb))
    ref = base + 1.5 * torch.nn.functional.linear(torch.nn.functional.linear(x, a), bb)
    torch.testing.assert_close(lora_sram(x, base, a, bb, 1.5), ref)


# -- compile end to end ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow),
                                    pytest.param("bert", marks=pytest.mark.slow)])
def test_cim_compiles_end_to_end(tiny_model, family):
    model = tiny_model(family)
    before = _state(model)
    x = ids(2, 8)
    cm = lorafx.compile(model, target="cim", example_kwargs={"input_ids": x}, noise_sigma=0.05)
    _assert_placed_once(cm.graph_module)
    cm.eval()
    with torch.no_grad():
        out = cm(input_ids=x)
    assert torch.isfinite(out.logits).all()
    placement = graph_record(cm.graph_module).placement
    assert placement["rram"]["tiles"] > 0 and placement["sram"]["params"] > 0
    assert placement["estimate"]["baseline"]["joules"] > 0
    text = str(cm.report())
    assert "compute-in-memory partition" in text and "digital (" in text and "chip / digital" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    if family == "llama":  # every linear on RRAM, every adapter on SRAM
        gm = cm.graph_module
        rram = [n for n in gm.graph.nodes if kind_of(n) is RRAM]
        sram = [n for n in gm.graph.nodes if kind_of(n) is SRAM_ADAPTER]
        assert len(sram) == len(cm.lora_records()) == 14  # 2 layers x 7 projections
        assert len(rram) == 15  # every projection and the LM head
        assert not any(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)
        tiles = sum(r.tiles for n in gm.graph.nodes for r in [n.meta["lorafx"]["PlacementRecord"]])
        assert tiles == graph_record(gm).placement["rram"]["tiles"]


@settings(max_examples=5)
@given(case=models(), cfg=lora_configs(), tile=st.sampled_from([2, 4, 64]))
def test_partition_invariants_and_noise_free_lowering_equals_the_input_graph(case, cfg, tile):
    """Each node placed once; tiles counted per weight; with noise off the lowered graph gives the
    input graph's outputs and gradients, in training and inference mode."""
    cpu = lorafx.compile(case.model, example_kwargs=case.inputs, **cfg)
    cim = lorafx.compile(case.model, target="cim", example_kwargs=case.inputs, noise=None, **cfg)
    randomise_lora_B(cpu.graph_module, seed=3)
    randomise_lora_B(cim.graph_module, seed=3)
    _assert_placed_once(cim.graph_module)
    names = [n for n, p in cpu.named_parameters() if p.requires_grad]
    for mode in (True, False):
        cpu.train(mode), cim.train(mode)
        out_a, g_a = outputs_and_grads(cpu, case.inputs, param_names=names)
        out_b, g_b = outputs_and_grads(cim, case.inputs, param_names=names)
        for a, b in zip(out_a + g_a, out_b + g_b):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    _assert_placed_once(cim._variants[next(k for k in cim._variants if k[1] is False)])


def test_capacity_is_checked_before_anything_is_built(tiny_model):
    model = _llama(tiny_model)
    before = _state(model)
    x = {"input_ids": ids(2, 8)}
    with pytest.raises(ValueError, match=r"need \d+ RRAM tiles.*chip has 1:.*rram_tiles=\d+"):
        lorafx.compile(model, target="cim", example_kwargs=x, rram_tiles=1)
    with pytest.raises(ValueError, match=r"adapters need .* KiB of SRAM.*sram_kib="):
        lorafx.compile(model, target="cim", example_kwargs=x, sram_kib=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("options, match", [
    ({"noise_sigma": -0.1}, "noise_sigma must be a number >= 0"),
    ({"adc_bits": 0}, "adc_bits must be an int from 1 to 32"),
    ({"dac_bits": 0}, "dac_bits must be an int from 1 to 32"),
    ({"noise": "gaussian-ish"}, "unknown noise"),
    ({"chip": "nope"}, "unknown chip .nope.; choose one of"),
    ({"halora": {"mode": "dual", "lamda": 1}}, "unknown setting"),
    ({"halora": {"mode": "twice"}}, "mode must be one of"),
    ({"noise": None, "halora": {"mode": "dual"}}, "chip has no noise"),
])
def test_bad_configurations_are_refused_with_the_fix(tiny_model, options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lorafx.compile(_llama(tiny_model), target="cim", example_kwargs={"input_ids": ids(2, 8)}, **options)


def test_unknown_and_part_targets_are_refused(tiny_model):
    with pytest.raises(ValueError, match=r"unknown target 'cimm' \(did you mean 'cim'\?\)"):
        lorafx.compile(_llama(tiny_model), target="cimm")
    with pytest.raises(ValueError, match="'rram'.*not compiled for on its own.*target='cim'"):
        lorafx.compile(_llama(tiny_model), target="rram")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        lorafx.hw_targets.RRAMTarget(preset="nope")


# -- the programmed chip ---------------------------------------------------------------------------

def _rram_weights(cm):
    from lorafx.passes.program_chip import rram_weights
    return rram_weights(cm.graph_module)


def _chip(cm):
    return {k: v.clone() for k, v in cm.graph_module.named_buffers() if k.startswith("lorafx_chip_")}


@pytest.mark.slow  # test_replay_reuses_the_same_chip_and_reprogram_samples_a_new_one covers reprogram by default
def test_seeded_chip_is_reproducible_and_differs_across_seeds(tiny_model):
    model = _llama(tiny_model)
    x = {"input_ids": ids(2, 8)}
    a = lorafx.compile(model, target="cim", example_kwargs=x, noise_sigma=0.1, noise_seed=7)
    b = lorafx.compile(model, target="cim", example_kwargs=x, noise_sigma=0.1, noise_seed=7)
    ca, cb = _chip(a), _chip(b)
    assert len(ca) == 15 and all(torch.equal(ca[k], cb[k]) for k in ca)
    other = lorafx.hw_targets.sample_chip({k: a.get_parameter(k) for k in _rram_weights(a)},
                                          lorafx.hw_targets.noise_model("additive", 0.1), 8)
    assert all(not torch.equal(ca["lorafx_chip_" + k.replace(".", "_")], v) for k, v in other.items())
    for cm in (a, b):
        cm.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(**x).logits, b(**x).logits, rtol=0, atol=0)
    assert not any(n.startswith("lorafx_chip_") for n in a.state_dict())  # not part of the model's state


def test_replay_reuses_the_same_chip_and_reprogram_samples_a_new_one(tiny_model, monkeypatch):
    import lorafx.hw_targets.cim as cim_target
    samples = []
    sample = cim_target.sample_chip
    monkeypatch.setattr(cim_target, "sample_chip", lambda *a: samples.append(1) or sample(*a))
    model = _llama(tiny_model)
    x = ids(2, 8)
    cm = lorafx.compile(model, target="cim", example_kwargs={"input_ids": x}, noise_sigma=0.1).eval()
    chip = _chip(cm)
    with torch.no_grad():
        first = cm(input_ids=x).logits
        other = cm(input_ids=x, attention_mask=torch.ones_like(x)).logits  # a new call signature: a replay
    assert sum(not training for _, training in cm._variants) == 2
    torch.testing.assert_close(other, first)
    assert samples == [1]  # one chip, sampled at compile: the replays read it again
    assert all(torch.equal(chip[k], v) for k, v in _chip(cm).items())
    cm.reprogram(1)
    with torch.no_grad():
        moved = cm(input_ids=x).logits
    assert not torch.allclose(moved, first)
    cm.reprogram(0)
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=x).logits, first, rtol=0, atol=0)
    with pytest.raises(ValueError, match="compile it with target='cim' and a noise model"):
        lorafx.compile(model, target="cim", example_kwargs={"input_ids": x}, noise=None).reprogram(1)


def test_training_reads_ideal_weights_and_inference_reads_the_chip(tiny_model):
    model = _llama(tiny_model)
    x = ids(2, 8)
    cpu = lorafx.compile(model, example_kwargs={"input_ids": x}, seed=0)
    cim = lorafx.compile(model, target="cim", example_kwargs={"input_ids": x}, noise_sigma=0.2, seed=0,
                         halora=False)
    cpu.train(), cim.train()
    torch.testing.assert_close(cim(input_ids=x).logits, cpu(input_ids=x).logits)
    cpu.eval(), cim.eval()
    with torch.no_grad():
        assert not torch.allclose(cim(input_ids=x).logits, cpu(input_ids=x).logits, atol=1e-3)


# -- HaLoRA ----------------------------------------------------------------------------------------

def test_loss_output_is_found(tiny_model):
    model = _llama(tiny_model)
    with_labels = lorafx.capture(model, (), _batch())
    without = lorafx.capture(model, (), {"input_ids": ids(2, 8)})
    assert loss_output(with_labels) == 0 and loss_output(without) is None


STUCK_AT_ZERO = "stuck_at(p=1,on_fraction=0)"  # every cell stuck off: a deterministic "noise"


@pytest.fixture(scope="module")
def plain_stuck(tiny_model):
    """Plain LoRA on a chip whose cells are all stuck at 0, B randomised: (model, batch, ideal loss,
    loss on the chip)."""
    batch = _batch()
    plain = lorafx.compile(_llama(tiny_model), target="cim", example_kwargs=batch, noise=STUCK_AT_ZERO,
                           halora=False, seed=0)
    randomise_lora_B(plain.graph_module, seed=1)
    plain.train()
    ideal = plain(**batch).loss.detach()
    plain.eval()
    with torch.no_grad():
        chip = plain(**batch).loss
    return batch, ideal, chip


def test_dual_objective_is_the_mix_of_ideal_and_noisy_losses(tiny_model, plain_stuck):
    """With stuck-at-zero noise on every cell the noisy path is deterministic: the HaLoRA loss is
    (1-λ)·(ideal loss) + λ·(the loss on the programmed chip, which is that same noise)."""
    batch, ideal, chip = plain_stuck
    dual = lorafx.compile(_llama(tiny_model), target="cim", example_kwargs=batch, noise=STUCK_AT_ZERO,
                          halora={"mode": "dual", "noise_weight": 0.25}, seed=0)
    randomise_lora_B(dual.graph_module, seed=1)
    dual.train()
    mixed = dual(**batch).loss
    torch.testing.assert_close(mixed, 0.75 * ideal + 0.25 * chip)
    # one extra forward: every RRAM linear of the training graph is there twice, and each weight sampled once
    train_gm = dual._variants[next(k for k in dual._variants if k[1] is True)]
    rram = [n for n in train_gm.graph.nodes if kind_of(n) is RRAM]
    samples = [n for n in train_gm.graph.nodes if n.target is torch.ops.lorafx.rram_program.default]
    assert len(rram) == 2 * 15 and len(samples) == 15
    _assert_placed_once(train_gm)
    mixed.backward()
    assert all(p.grad is not None for p in dual.trainable_parameters().values())
    dual.eval()  # inference: a single path
    with torch.no_grad():
        dual(**batch)
    eval_gm = dual._variants[next(k for k in dual._variants if k[1] is False)]
    assert sum(kind_of(n) is RRAM for n in eval_gm.graph.nodes) == 15
    assert not any(n.target is torch.ops.lorafx.rram_program.default for n in eval_gm.graph.nodes)


def test_spectral_penalty_is_added_to_the_loss(tiny_model, plain_stuck):
    batch, ideal, _ = plain_stuck  # training graphs read the ideal weights, whatever the chip
    spec = lorafx.compile(_llama(tiny_model), target="cim", example_kwargs=batch, noise=STUCK_AT_ZERO, seed=0,
                          halora={"mode": "spectral", "mu": 0.5})
    randomise_lora_B(spec.graph_module, seed=1)
    spec.train()
    penalty = sum(torch.linalg.matrix_norm(rec_a @ rec_a.t(), 2) + torch.linalg.matrix_norm(rec_b.t() @ rec_b, 2)
                  for rec_a, rec_b in ((spec.get_parameter(r.lora_A), spec.get_parameter(r.lora_B))
                                       for r in spec.lora_records().values()))
    torch.testing.assert_close(spec(**batch).loss, ideal + 0.5 * penalty)


def test_fresh_noise_every_step(tiny_model):
    model = _llama(tiny_model)
    batch = _batch()
    cm = lorafx.compile(model, target="cim", example_kwargs=batch, noise_sigma=0.2).train()
    torch.manual_seed(0)
    a = cm(**batch).loss
    b = cm(**batch).loss
    torch.manual_seed(0)
    c = cm(**batch).loss
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_halora_warns_when_a_training_graph_has_no_loss(tiny_model):
    with Warnings() as records:
        model = _llama(tiny_model).train()  # compiled in training mode: its first graph is a training graph
        lorafx.compile(model, target="cim", example_kwargs={"input_ids": ids(2, 8)}, noise_sigma=0.1)
    assert any("computes no loss" in r.getMessage() and "labels=" in r.getMessage() for r in records)


@pytest.mark.slow  # the Trainer path of plain adapters is in test_trainer.py
def test_halora_trains_with_the_transformers_trainer(tiny_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _llama(tiny_model)
    cm = lorafx.compile(model, target="cim", example_kwargs=_batch(), noise_sigma=0.1, seed=0)
    before = {k: v.detach().clone() for k, v in cm.trainable_parameters().items()}
    data = [{"input_ids": ids(1, 8, seed=i)[0], "labels": ids(1, 8, seed=i)[0]} for i in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1)
    trainer = transformers.Trainer(model=cm, args=args, train_dataset=data)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [k for k, v in cm.trainable_parameters().items() if not torch.equal(v, before[k])]
    assert changed  # the adapters trained, with HaLoRA's loss, and no loss term added by hand
    train_gm = cm._variants[next(k for k in cm._variants if k[1] is True)]
    assert any(n.target is torch.ops.lorafx.rram_program.default for n in train_gm.graph.nodes)


# -- inspection ------------------------------------------------------------------------------------

def test_printed_graph_and_drawing_colour_nodes_by_part(tiny_model, tmp_path):
    cm = lorafx.compile(_llama(tiny_model), target="cim", example_kwargs={"input_ids": ids(2, 8)})
    text = cm.graph_report()
    assert "@rram" in text and "@sram" in text and "@host" in text
    coloured = cm.graph_report(colour=True)
    assert "\033[33m" in coloured and "\033[31m" in coloured and "\033[34m" in coloured
    pytest.importorskip("matplotlib")
    path = lorafx.draw(cm.graph_module, str(tmp_path / "g.svg"))
    svg = open(path).read()
    assert "#e67e22" in svg and "RRAM crossbars" in svg


def test_cli_compile_target_cim_prints_the_partition_and_draws(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from lorafx.cli import main
    out = tmp_path / "o"
    assert main(["compile", "--model", "tiny-gpt2", "--target", "cim", "--noise-sigma", "0.05", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "compute-in-memory partition" in printed and "chip / digital" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "cim"
    assert "#e67e22" in (out / "graph.svg").read_text()


def test_cli_hardware_flags_need_target_cim(tmp_path, capsys):
    from lorafx.cli import main
    assert main(["compile", "--noise-sigma", "0.1", "--out", str(tmp_path / "o")]) == 2
    assert "--target cim" in capsys.readouterr().err


@pytest.mark.slow
def test_lorafx_tiny_compiles_for_cim():
    from lorafx.eval import harness
    model, tok = harness.load_frozen()
    x = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    cm = lorafx.compile(model, target="cim", example_kwargs={"input_ids": x, "labels": x.clone()}, noise_sigma=0.1)
    _assert_placed_once(cm.graph_module)
    cm.train()
    loss = cm(input_ids=x, labels=x.clone()).loss  # HaLoRA's dual objective
    loss.backward()
    cm.eval()
    with torch.no_grad():
        assert torch.isfinite(cm(input_ids=x).logits).all()


def test_the_readme_documents_the_cim_options_and_presets():
    import os
    from lorafx.hw_targets import CIMTarget, chips
    from lorafx.options import options_table
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert options_table([("target 'cim'", CIMTarget.options)]) in readme, (
        "regenerate the README's cim options table: python -c \"import lorafx; from lorafx.hw_targets import "
        "CIMTarget; print(lorafx.options.options_table([(\\\"target 'cim'\\\", CIMTarget.options)]))\"")
    assert chips.citation_table() in readme, "regenerate the README's hardware table: chips.citation_table()"
