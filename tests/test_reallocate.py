"""Dynamic rank allocation while training (lorafx/reallocate.py: lorafx.ReallocateRanks)."""
import copy
import json
import math
import os

import pytest
import torch

import lorafx
import lorafx.reallocate as R
from lorafx.graph_utils import get_attr
from lorafx.passes.score_sites import Candidate

from conftest import ids


def _compile(model, **options):
    x = ids(2, 8)
    options.setdefault("seed", 0)
    options.setdefault("rank_budget", 1.0)
    batch = {"input_ids": x, "labels": x.clone()}
    return lorafx.compile(model, example_kwargs=batch, **options), batch


def _train(cm, opt, batch, steps):
    losses = []
    for _ in range(steps):
        loss = cm(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _logits(cm, batch):
    was = cm.training
    cm.eval()
    with torch.no_grad():
        out = cm(**batch).logits
    cm.train(was)
    return out


def _force(monkeypatch, cm, ranks):
    """Make the next reallocations of ``cm`` give these sites these ranks (the others keep theirs)."""
    current = _ranks(cm)
    monkeypatch.setattr(R, "_allocate_keeping", lambda sites, scores, budget, keep, rule: {
        s.name: ranks.get(s.name, current.get(s.name, 0)) for s in sites})


def _ranks(cm):
    return {site: rec.r for site, rec in cm.lora_records().items()}


def _adapters(cm, site):
    rec = cm.lora_records()[site]
    return get_attr(cm, rec.lora_A), get_attr(cm, rec.lora_B)


def _optimizer_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _randomise_B(cm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cm.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# -- the moves themselves ------------------------------------------------------------------------

def test_grow_and_shrink_adapter():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
    A2, B2 = R.grow_adapter(A, B, 7, torch.Generator().manual_seed(1))
    assert A2.shape == (7, 12) and B2.shape == (10, 7)
    assert torch.equal(A2[:4], A) and torch.equal(B2[:, :4], B) and not B2[:, 4:].any()
    assert A2[4:].abs().max() <= 1 / 12 ** 0.5  # kaiming-uniform bound 1/sqrt(in)
    s = 2.5
    A3, B3 = R.shrink_adapter(A, B, s, 2)
    assert A3.shape == (2, 12) and B3.shape == (10, 2)
    U, S, Vh = torch.linalg.svd(s * B.double() @ A.double())
    best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
    assert torch.allclose(s * B3.double() @ A3.double(), best, atol=1e-5)
    assert torch.allclose(B3.norm(dim=0), A3.norm(dim=1), rtol=1e-5)  # the singular values split evenly
    A4, B4 = R.shrink_adapter(A, B, s, 4)  # to the same rank: the same product
    assert torch.allclose(B4 @ A4, B @ A, atol=1e-5)


def test_the_alpha_keeps_the_scale():
    exact = 0
    for scale in (16 / 3, 0.1, 2.0, 1e-3 / 7):
        for r in range(1, 40):
            for rslora in (False, True):
                div = r ** 0.5 if rslora else r
                got = R._alpha_for(scale, r, rslora) / div
                assert abs(got - scale) <= math.ulp(scale)
                exact += got == scale
    assert exact >= 0.9 * 4 * 39 * 2


def test_allocation_keeps_adapted_sites_within_the_budget():
    sites = [Candidate(f"s{i}", "linear", 16, 16, weight=f"s{i}.weight") for i in range(5)]
    scores = {"s0": 10.0, "s1": 5.0, "s2": 0.0, "s3": 0.0, "s4": 1.0}
    for allocation in ("graded", "topk"):
        rule = lorafx.passes.AllocateRanks(rank_budget=320, allocation=allocation, r=4)
        plain = R.allocate(sites, scores, 320, allocation=allocation, rank=4)
        assert plain["s2"] == 0 and plain["s3"] == 0  # what the compile's rule alone gives
        ranks = R._allocate_keeping(sites, scores, 320, {"s2", "s4"}, rule)
        assert ranks["s2"] >= 1 and ranks["s4"] >= 1 and ranks["s3"] == 0
        assert sum(r * 32 for r in ranks.values()) <= 320


# -- on a compiled model --------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, pytest.param({"fold_a": True}, marks=pytest.mark.slow)], ids=["default", "fold_a"])
def test_growth_keeps_the_function_the_adam_state_and_the_other_parameters(tiny_model, monkeypatch, options):
    model = tiny_model("llama")
    source = {k: v.clone() for k, v in model.state_dict().items()}
    cm, batch = _compile(model, rank_budget=0.125, allocation="topk", r=2, **options)
    ranks = _ranks(cm)
    unadapted = [n for n in cm.decisions["AllocateRanks#0:allocation"]["ranks"] if n not in ranks]
    grow, keep, new = list(ranks)[0], list(ranks)[1], unadapted[0]
    unchanged = {site: _adapters(cm, site) for site in ranks if site != grow}
    opt = torch.optim.Adam(cm.parameters(), lr=1e-2)
    _train(cm, opt, batch, 2)
    cm(**batch).loss.backward()  # grads present: the unchanged sites keep theirs
    opt.step()
    before = _logits(cm, batch)
    old_A, old_B = _adapters(cm, grow)
    old_state = {k: v.clone() for k, v in opt.state[old_A].items()}
    old_state_B = opt.state[old_B]["exp_avg"].clone()
    kept_A = _adapters(cm, keep)[0]
    kept_state = opt.state[kept_A]
    scale = cm.lora_records()[grow].scale
    rng = torch.get_rng_state()

    _force(monkeypatch, cm, {grow: 5, new: 3})
    realloc = lorafx.ReallocateRanks(cm, opt, every=1, seed=0)
    assert realloc.step() == {grow: (2, 5), new: (0, 3)}

    assert torch.equal(torch.get_rng_state(), rng)
    assert _ranks(cm) == {**ranks, grow: 5, new: 3}
    # the function is unchanged (up to BLAS rounding: the rank-r products now sum over 5 terms)
    assert torch.allclose(_logits(cm, batch), before, rtol=0, atol=1e-6)
    A, B = _adapters(cm, grow)
    assert torch.equal(A[:2], old_A) and torch.equal(B[:, :2], old_B) and not B[:, 2:].any()
    rec = cm.lora_records()[grow]
    assert abs(rec.scale - scale) <= math.ulp(scale) and rec.alpha == R._alpha_for(scale, 5, False)
    # Adam's state: the kept slice carried, the new rows / columns zero, the step kept
    state = opt.state[A]
    assert torch.equal(state["exp_avg"][:2], old_state["exp_avg"]) and not state["exp_avg"][2:].any()
    assert torch.equal(state["exp_avg_sq"][:2], old_state["exp_avg_sq"]) and not state["exp_avg_sq"][2:].any()
    assert torch.equal(opt.state[B]["exp_avg"][:, :2], old_state_B) and not opt.state[B]["exp_avg"][:, 2:].any()
    assert float(state["step"]) == float(old_state["step"])
    # unchanged sites: the very same Parameters, state and grads; replaced ones hold no grad
    assert all(a is b for site, pair in unchanged.items() for a, b in zip(_adapters(cm, site), pair))
    assert opt.state[kept_A] is kept_state
    assert kept_A.grad is not None and old_A.grad is None and A.grad is None
    # the optimizer holds exactly the model's parameters (the base ones too); a new site has no state yet
    assert {id(p) for p in _optimizer_params(opt)} == {id(p) for p in cm.parameters()}
    assert all(p not in opt.state for p in _adapters(cm, new))
    assert not _adapters(cm, new)[1].any()
    # the source model is untouched
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    losses = _train(cm, opt, batch, 3)
    assert losses[-1] < losses[0]
    if options.get("fold_a"):  # A is still the view of the folded [W; A] buffer the graph reads
        folded = [b for n, b in cm.named_buffers() if n.startswith(grow) and n.endswith("_lorafx_folded")]
        assert folded and torch.equal(folded[0][-5:], _adapters(cm, grow)[0])


def test_shrink_is_the_truncated_svd_and_resets_the_state(tiny_model, monkeypatch):
    cm, batch = _compile(tiny_model("llama"), rank_budget=1.0, allocation="topk", r=4)
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-2)
    _randomise_B(cm)
    _train(cm, opt, batch, 1)
    site = next(iter(cm.lora_records()))
    A, B = _adapters(cm, site)
    s = cm.lora_records()[site].scale
    U, S, Vh = torch.linalg.svd(s * B.detach().double() @ A.detach().double())
    best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
    compiled_scores = cm.decisions["AllocateRanks#0:allocation"]["scores"]
    _force(monkeypatch, cm, {site: 2})
    realloc = lorafx.ReallocateRanks(cm, opt, every=1, calibration=[{"input_ids": ids(3, 6, seed=5)}])
    assert realloc.step() == {site: (4, 2)}
    scores = realloc.history[0].scores  # snip at the trained weights, on the calibration batch
    assert scores.keys() == compiled_scores.keys() and scores != compiled_scores
    assert all(math.isfinite(v) and v > 0 for v in scores.values())
    A2, B2 = _adapters(cm, site)
    assert A2.shape[0] == 2 and abs(cm.lora_records()[site].scale - s) <= math.ulp(s)
    assert torch.allclose(s * B2.double() @ A2.double(), best, atol=1e-6)
    assert A2 not in opt.state and B2 not in opt.state  # reset: the basis changed
    assert A not in opt.state and not any(p is A for p in _optimizer_params(opt))
    assert {id(p) for p in _optimizer_params(opt)} == {id(p) for p in cm.parameters()}
    before = A2.detach().clone()
    _train(cm, opt, batch, 1)
    assert not torch.equal(A2, before)  # the optimizer steps the new Parameter


@pytest.mark.slow  # growth, shrink and the budget are each tested by default above
def test_real_reallocations_stay_within_the_budget_and_training_goes_on(tiny_model):
    cm, batch = _compile(tiny_model("llama"), rank_budget=0.5, proxy="random")
    budget = next(r.info["budget"] for r in cm.report().passes if r.name == "AllocateRanks")
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-2)
    realloc = lorafx.ReallocateRanks(cm, opt, every=2, seed=1)
    adapted, moved = set(_ranks(cm)), []
    for step in range(4):
        loss = cm(**batch).loss
        loss.backward()
        before = {n: p.detach().clone() for n, p in cm.trainable_parameters().items()}
        if step == 2:  # after a move: the gradients reach the new Parameters, and the optimizer steps them
            assert all(cm.trainable_parameters()[n].grad is not None for n in moved)
        opt.step()
        opt.zero_grad()
        if step == 2:
            assert all(not torch.equal(cm.trainable_parameters()[n], before[n]) for n in moved)
        moves = realloc.step()
        assert (moves is None) == (step % 2 == 0)
        if moves is not None:
            ranks = _ranks(cm)
            assert moves and adapted <= set(ranks)  # a site with an adapter never drops to 0
            adapted = set(ranks)
            moved = [f"{site}.lora_{ab}" for site in moves for ab in "AB"]
            used = sum(p.numel() for p in cm.trainable_parameters().values())
            assert used == realloc.history[-1].used <= budget
            assert {id(p) for p in _optimizer_params(opt)} == {id(p) for p in cm.parameters()}
    assert [h.step for h in realloc.history] == [2, 4]
    assert len(cm._variants) == 1
    losses = _train(cm, opt, batch, 5)  # after a large move the loss may rise for a step, then falls
    assert losses[-1] < losses[0]


def test_a_seed_makes_reallocation_deterministic(tiny_model):
    cm, batch = _compile(tiny_model("llama"), rank_budget=0.5, proxy="snip")
    results = []
    for _ in range(2):
        run = copy.deepcopy(cm)
        opt = torch.optim.AdamW(run.parameters(), lr=5e-2)
        _train(run, opt, batch, 2)
        realloc = lorafx.ReallocateRanks(run, opt, every=1, seed=7, proxy="random")
        realloc.step()
        results.append((realloc.history[-1].ranks, {n: p.detach().clone() for n, p in run.named_parameters()}))
    (ranks1, params1), (ranks2, params2) = results
    assert ranks1 == ranks2 and realloc.history[-1].moves
    assert params1.keys() == params2.keys() and all(torch.equal(params1[n], params2[n]) for n in params1)


def test_a_saved_adapter_after_moves_loads_in_peft_and_lorafx(tiny_model, monkeypatch, tmp_path):
    from peft import PeftModel

    model = tiny_model("llama")
    cm, batch = _compile(model, rank_budget=0.25, allocation="topk", r=4)
    _randomise_B(cm)
    ranks = _ranks(cm)
    first, second = list(ranks)[:2]
    unadapted = [n for n in cm.decisions["AllocateRanks#0:allocation"]["ranks"] if n not in ranks]
    _force(monkeypatch, cm, {first: 7, second: 1, unadapted[0]: 2})
    lorafx.ReallocateRanks(cm, None, every=1, seed=0).step()
    _randomise_B(cm, seed=1)
    scales = {s: rec.scale for s, rec in cm.lora_records().items()}
    cm.save_adapter(str(tmp_path))
    config = json.load(open(os.path.join(tmp_path, "adapter_config.json")))
    assert config["rank_pattern"] and config["alpha_pattern"]
    expected = _logits(cm, batch)
    loaded = lorafx.load_adapter(model, str(tmp_path), example_kwargs=batch)
    assert {s: rec.scale for s, rec in loaded.lora_records().items()} == scales
    assert torch.allclose(_logits(loaded, batch), expected, atol=1e-6)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, expected, atol=1e-5)


def test_shortcut_adapters_keep_their_ranks(tiny_model):
    cm, batch = _compile(tiny_model("llama"), rank_budget=1.0, proxy="random", shortcuts=True)
    budget = next(r.info["budget"] for r in cm.report().passes if r.name == "AllocateRanks")
    shortcuts = {n: p for n, p in cm.trainable_parameters().items() if n.startswith("lorafx_shortcuts.")}
    assert shortcuts
    decided = dict(cm.decisions["AllocateRanks#0:allocation"]["ranks"])
    realloc = lorafx.ReallocateRanks(cm, None, every=1, seed=5)
    assert realloc.step()
    after = cm.decisions["AllocateRanks#0:allocation"]["ranks"]
    assert {n: r for n, r in after.items() if n.startswith("shortcuts.")} == \
        {n: r for n, r in decided.items() if n.startswith("shortcuts.")}
    assert all(cm.trainable_parameters()[n] is p for n, p in shortcuts.items())
    assert sum(p.numel() for p in cm.trainable_parameters().values()) <= budget


def test_errors_name_the_fix(tiny_model):
    model = tiny_model("llama")
    plain, _ = _compile(model, rank_budget=None, r=2)
    with pytest.raises(ValueError, match="rank_budget"):
        lorafx.ReallocateRanks(plain, None)
    with pytest.raises(TypeError, match="rank_budget"):
        lorafx.ReallocateRanks(model, None)
    cm, batch = _compile(model, rank_budget=0.5)
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every must be a positive int"):
            lorafx.ReallocateRanks(cm, None, every=every)
    with pytest.raises(ValueError, match="unknown proxy"):
        lorafx.ReallocateRanks(cm, None, proxy="nope")
    cm.merge()
    with pytest.raises(RuntimeError, match=r"cm\.unmerge\(\)"):
        lorafx.ReallocateRanks(cm, None)
    cm.unmerge()
    realloc = lorafx.ReallocateRanks(cm, None, every=1)
    cm.merge()
    with pytest.raises(RuntimeError, match=r"cm\.unmerge\(\)"):
        realloc.step()
    with pytest.raises(RuntimeError, match=r"cm\.unmerge\(\)"):
        cm._rebuild_graphs()


class _Wrapped:
    """Like accelerate's AcceleratedOptimizer: the torch optimizer is its ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_the_trainer_callback_takes_the_model_and_optimizer_from_the_trainer(tiny_model, monkeypatch):
    from transformers import TrainerCallback

    cm, batch = _compile(tiny_model("llama"), rank_budget=0.5, proxy="random")
    opt = torch.optim.AdamW(cm.trainable_parameters().values(), lr=1e-2)
    monkeypatch.delitem(vars(R), "ReallocateRanksCallback", raising=False)  # not built yet
    assert isinstance(lorafx.ReallocateRanks(cm, opt).trainer_callback(), TrainerCallback)
    callback = lorafx.ReallocateRanksCallback(every=2, seed=3)
    assert isinstance(callback, TrainerCallback) and lorafx.ReallocateRanksCallback is R.ReallocateRanksCallback
    with pytest.raises(ValueError, match="every must be a positive int"):
        lorafx.ReallocateRanksCallback(every=0)
    for _ in range(2):  # what the Trainer passes to on_step_end, after its optimizer step and zero_grad
        _train(cm, opt, batch, 1)
        callback.on_step_end(None, None, None, model=cm, optimizer=_Wrapped(opt), lr_scheduler=None)
    history = callback.reallocator.history
    assert [h.step for h in history] == [2] and history[0].moves
    assert {id(p) for p in _optimizer_params(opt)} == {id(p) for p in cm.trainable_parameters().values()}
    assert callback.reallocator.trainer_callback().reallocator is callback.reallocator


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=12):
        self.x = ids(1, seq, seed=1).repeat(n, 1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


@pytest.mark.slow  # ~11 s, most of it importing the Trainer
def test_the_trainer_callback_reallocates_inside_a_trainer(tiny_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    x = ids(2, 12)
    cm = lorafx.compile(tiny_model("llama"), example_kwargs={"input_ids": x, "labels": x.clone()},
                        rank_budget=0.5, proxy="random", seed=0)
    callback = lorafx.ReallocateRanksCallback(every=2, seed=3)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=cm, args=args, train_dataset=_Tokens(), callbacks=[callback])
    assert trainer.train().global_step == 3
    history = callback.reallocator.history
    assert [h.step for h in history] == [2] and history[0].moves
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]  # the step after the move trains too
    opt = R._unwrap(trainer.optimizer)
    assert {id(p) for p in _optimizer_params(opt)} == {id(p) for p in cm.trainable_parameters().values()}
