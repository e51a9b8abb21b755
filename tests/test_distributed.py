"""A CompiledModel trains unchanged under PyTorch's data-parallel engines.

Two gloo processes on the CPU wrap a compiled tiny LLaMA in DistributedDataParallel or in
FSDP2's ``fully_shard``; each takes half of the global batch.  Their losses, adapter
gradients and adapters after AdamW steps must equal one process training on the whole
batch, the frozen base weights must not move, and the source model must stay untouched
(values and version counters: DDP's broadcast must not write into it).  One launch of two
ranks (fresh interpreters: forking a process whose thread pools are running is unsafe)
runs both engines, while the test process trains the single-process reference.

Tolerances: the runs differ only in the order of floating-point sums (each rank's mean over
half the tokens, then the average over ranks, against one mean over all tokens), a few
float32 ulps per step, which AdamW's division by sqrt(v) can enlarge where a gradient is
small.  Measured here: losses 4.8e-7 apart (of 4.5), gradients 1.1e-7, adapters 1.7e-6
after 3 steps at lr 1e-2.  We assert rtol=1e-5, atol=1e-6 (losses, gradients) and atol=1e-5
(adapters), 6-100x above those and far below the lr-sized (1e-2) steps that a wrong
gradient, a missed all-reduce or a double-counted batch half would give.
"""
from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lorafx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD, STEPS, BATCH, SEQ, LR = 2, 3, 4, 16, 1e-2
STRATEGIES = ("ddp", "fsdp2")
SPAWN_TIMEOUT_S = 180


def _build():
    """(source model, compiled model in train mode, global batch): the same on every process."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96))
    ids = torch.randint(0, 96, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    cm = lorafx.compile(model, example_kwargs={"input_ids": ids[:2], "labels": ids[:2]}, r=4, seed=0)
    return model, cm.train(), ids


def _full(t):
    """A plain tensor of ``t``'s global value (a DTensor shard is gathered: a collective)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def _train(wrapped, cm, ids, mean_loss=lambda loss: loss):
    """AdamW steps of ``wrapped`` on ``ids``: (losses, adapter gradients per step, adapters after)."""
    names = [n for n, p in cm.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    losses, grads = [], []
    for _ in range(STEPS):
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(mean_loss(loss.detach().clone()).item())
        params = dict(cm.named_parameters())
        grads.append({n: _full(params[n].grad) for n in names})
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = dict(cm.named_parameters())
    return losses, grads, {n: _full(params[n]) for n in names}


def _source_state(model):
    return {n: (t._version, t.detach().clone(), t.requires_grad) for n, t in
            [*model.named_parameters(), *model.named_buffers()]}


def _worker(rank: int, ids: torch.Tensor, store: str, out: str) -> None:
    """One rank: for each engine, build and compile the model, wrap it, train on this rank's half
    of ``ids``, save the results to ``out``."""
    faulthandler.enable(all_threads=True)  # a crash of a rank names where it happened
    torch.set_num_threads(1)
    models = {s: _build()[:2] for s in STRATEGIES}  # one per engine: each wraps its own
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        for strategy in STRATEGIES:
            model, cm = models[strategy]
            before = _source_state(model)
            base = {n: p.detach().clone() for n, p in cm.named_parameters() if not p.requires_grad}
            if strategy == "ddp":
                wrapped = torch.nn.parallel.DistributedDataParallel(cm)
            else:
                from torch.distributed.fsdp import fully_shard
                wrapped = fully_shard(cm)
            half = BATCH // WORLD
            mine = ids[rank * half:(rank + 1) * half]

            def mean_loss(loss):
                dist.all_reduce(loss)
                return loss / WORLD

            losses, grads, adapters = _train(wrapped, cm, mine, mean_loss)
            params, after = dict(cm.named_parameters()), _source_state(model)
            result = {
                "losses": losses, "grads": grads, "adapters": adapters,
                "base_moved": [n for n, v in base.items() if not torch.equal(_full(params[n]), v)],
                "base_grads": [n for n in base if params[n].grad is not None],
                "source_changed": [n for n, (version, value, flag) in before.items()
                                   if after[n][0] != version or not torch.equal(after[n][1], value)
                                   or after[n][2] != flag],
                "ignored_by_ddp": sorted(getattr(wrapped, "parameters_to_ignore", ())),
                "frozen_names": sorted(base),
            }
            if strategy == "fsdp2":
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
                try:  # the shards alone: refused, naming the fix
                    cm.save_adapter(os.path.join(out, f"refused{rank}"))
                except ValueError as e:
                    result["refusal"] = str(e)
                full = get_model_state_dict(cm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if rank == 0:
                    lorafx.save_adapter(cm, os.path.join(out, "fsdp2_adapter"), tensors=full)
            else:
                if rank == 0:
                    cm.save_adapter(os.path.join(out, "ddp_adapter"))
                # then FSDP2 on a submodule: the graph never calls it, so it is refused, naming the fix
                from torch.distributed.fsdp import fully_shard
                fully_shard(cm.get_submodule("model.layers.0"))
                try:
                    cm(input_ids=mine, labels=mine)
                except RuntimeError as e:
                    result["per_layer_refusal"] = str(e)
            torch.save(result, os.path.join(out, f"{strategy}{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs():
    """{strategy: [rank 0's results, rank 1's]}, the single-process reference and the output folder."""
    _, cm, ids = _build()
    with tempfile.TemporaryDirectory() as out:
        store = os.path.join(out, "store")
        ctx = mp.start_processes(_worker, args=(ids, store, out), nprocs=WORLD, join=False, start_method="spawn")
        reference = _train(cm, cm, ids)  # one process, the global batch (while the ranks run)
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.terminate()
                pytest.fail(f"the {WORLD} gloo processes did not finish within {SPAWN_TIMEOUT_S} s")
        results = {s: [torch.load(os.path.join(out, f"{s}{r}.pt"), weights_only=False) for r in range(WORLD)]
                   for s in STRATEGIES}
        yield results, reference, out


def _check_matches_single_process(results, reference, out, strategy):
    ref_losses, ref_grads, ref_adapters = reference
    assert all(g.abs().sum() > 0 for g in ref_grads[-1].values())  # every adapter gets a gradient: not vacuous
    for rank, res in enumerate(results[strategy]):
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
        assert set(res["grads"][0]) == set(ref_grads[0])
        for step, (got, want) in enumerate(zip(res["grads"], ref_grads)):
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"rank {rank} step {step} {name}: {m}")
        for name, want in ref_adapters.items():
            torch.testing.assert_close(res["adapters"][name], want, rtol=0, atol=1e-5)
        assert res["base_moved"] == [] and res["base_grads"] == []  # frozen: no update, no gradient
        assert res["source_changed"] == []  # values, version counters and flags of the user's model
    # rank 0 saved the (full) adapters in PEFT's format
    from safetensors.torch import load_file
    saved = load_file(os.path.join(out, f"{strategy}_adapter", "adapter_model.safetensors"))
    assert len(saved) == len(ref_adapters)
    for name, want in ref_adapters.items():
        key = "base_model.model." + name.replace("lora_A", "lora_A.weight").replace("lora_B", "lora_B.weight")
        torch.testing.assert_close(saved[key], want, rtol=0, atol=1e-5)


def test_ddp_matches_single_process(runs):
    results, reference, out = runs
    _check_matches_single_process(results, reference, out, "ddp")
    # DDP never broadcasts the base tensors shared with the source model (it would write into it)
    for res in results["ddp"]:
        assert set(res["frozen_names"]) <= set(res["ignored_by_ddp"])
        # fully_shard on a submodule of a compiled model is refused, naming it and the fix
        assert "model.layers.0" in res["per_layer_refusal"] and "fully_shard(cm)" in res["per_layer_refusal"]


def test_fsdp2_matches_single_process(runs):
    results, reference, out = runs
    _check_matches_single_process(results, reference, out, "fsdp2")
    for res in results["fsdp2"]:  # saving the shards is refused, naming how to gather them
        assert "DTensor" in res["refusal"] and "get_model_state_dict" in res["refusal"]
        assert "full_state_dict=True" in res["refusal"]
    assert not any(os.path.exists(os.path.join(out, f"refused{r}")) for r in range(WORLD))


def _run_script(tmp_path, name, nproc, *args):
    """Run tools/train_distributed.py (under torchrun for ``nproc`` > 1); its JSON report."""
    script = os.path.join(ROOT, "tools", "train_distributed.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    report, out = tmp_path / f"{name}.json", tmp_path / name
    cmd = [*launch, script, *args, "--batch", "4", "--seq", "16", "--out", str(out), "--json", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step    1  loss" in proc.stdout  # rank 0 prints every step
    return json.loads(report.read_text()), out


@pytest.mark.slow
def test_train_distributed_script(tmp_path):
    """The worked example: torchrun with 2 processes (FSDP2 and DDP) trains, prints per-step losses
    and saves a PEFT adapter on rank 0; one plain process runs the same script and, on the same
    global batches (DistributedSampler splits each one), gives the same losses."""
    from safetensors.torch import load_file
    runs = {name: _run_script(tmp_path, name, nproc, "--strategy", strategy, "--steps", "2")
            for name, nproc, strategy in [("fsdp2_2", 2, "fsdp2"), ("ddp_2", 2, "ddp"), ("fsdp2_1", 1, "fsdp2")]}
    for name, (report, out) in runs.items():
        assert report["world_size"] == int(name[-1]) and report["backend"] == "gloo" and len(report["losses"]) == 2
        saved = load_file(out / "adapter_model.safetensors")
        assert saved and all(torch.isfinite(t).all() for t in saved.values())
        assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in saved.items())  # trained
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    for name in ("ddp_2", "fsdp2_1"):  # the same global batches give the same losses
        torch.testing.assert_close(torch.tensor(runs[name][0]["losses"]), torch.tensor(runs["fsdp2_2"][0]["losses"]),
                                   rtol=1e-5, atol=1e-6)
    # DDP and FSDP2 average the same two halves: the same adapters (one process sums the batch in
    # another order, which AdamW's first, sign-like steps can enlarge where a gradient is ~0)
    first = load_file(runs["fsdp2_2"][1] / "adapter_model.safetensors")
    for key, t in load_file(runs["ddp_2"][1] / "adapter_model.safetensors").items():
        torch.testing.assert_close(t, first[key], rtol=0, atol=1e-6)
