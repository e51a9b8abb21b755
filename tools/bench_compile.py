#!/usr/bin/env python
"""PEFT under torch.compile vs lorafx with backend="inductor", on the LLaMA benchmark model.

    python tools/bench_compile.py [--preset default|launch] [--rank 8] [--layers 4] [--hidden 512]
        [--batch 4] [--seq 256] [--steps 20] [--warmup 2] [--threads T] [--device cpu|cuda]
        [--dtype float32|bfloat16|float16] [--json out.json]

Two numbers per mode:

first step  wall time of the first training step (forward with labels, backward,
            AdamW step), which includes torch.compile's tracing and inductor's code
            generation for forward and backward.  Each mode runs this in a fresh
            subprocess with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR set to a
            new temporary folder, FX graph cache off), so neither benefits from the
            other's compiled kernels.  lorafx's own capture + passes time is reported
            beside it (setup).
steady step median step time after warm-up; both modes live in one process and run
            round-robin, one step each per round, so machine noise hits both alike.
            On CUDA every timed step ends with a synchronize.

``--device``/``--dtype`` place the model (and the first-step subprocesses) on that device
in that dtype; PEFT keeps its default ``autocast_adapter_dtype=True`` (float32 adapters in a
bfloat16 model) as a user of ``torch.compile(peft_model)`` gets it.

peft:   torch.compile(peft.get_peft_model(model, LoraConfig(r, 2r, q,k,v,o,gate,up,down)))
lorafx: lorafx.compile(model, r, alpha=2r, same targets, backend="inductor")
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import (TARGETS, add_model_args, apply_preset, build_base, make_train_step,  # noqa: E402
                              trainable)

MODES = ("peft", "lorafx")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--first-step-only", choices=MODES, default=None, help=argparse.SUPPRESS)
    return apply_preset(p.parse_args(argv))


def build(mode: str, base, ids, r: int):
    """(model, step function, setup seconds) for one compiled mode."""
    t0 = time.perf_counter()
    if mode == "peft":
        import peft
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), lora_dropout=0.0)
        model = peft.get_peft_model(copy.deepcopy(base), cfg).train()
        runner = torch.compile(model)
    else:
        import lorafx
        model = lorafx.compile(copy.deepcopy(base), example_kwargs={"input_ids": ids, "labels": ids}, r=r,
                               alpha=2 * r, target_modules=list(TARGETS), seed=0, backend="inductor").train()
        runner = model
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)
    return model, make_train_step(runner, ids, opt), time.perf_counter() - t0


def first_step(args, mode: str) -> dict:
    """Run in a fresh subprocess with an empty inductor cache; returns its timings."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                   TORCHINDUCTOR_AUTOGRAD_CACHE="0")
        cmd = [sys.executable, os.path.abspath(__file__), "--first-step-only", mode,
               *[f"--{k}={getattr(args, k)}" for k in ("rank", "layers", "hidden", "intermediate", "heads",
                                                        "vocab", "batch", "seq", "seed", "device", "dtype")]]
        if args.threads:
            cmd.append(f"--threads={args.threads}")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"first-step run of {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    base = build_base(args, device, getattr(torch, args.dtype))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
    if args.first_step_only:
        model, step, setup = build(args.first_step_only, base, ids, args.rank)
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        print(json.dumps({"setup_s": setup, "first_step_s": time.perf_counter() - t0}))
        return None

    print(f"LlamaForCausalLM {args.layers} layers, hidden {args.hidden}, batch {args.batch} x seq {args.seq}, "
          f"LoRA r={args.rank}; {args.device} {args.dtype}, {torch.get_num_threads()} threads")
    first = {}
    for mode in MODES:
        print(f"  first step of {mode} (fresh process, empty inductor cache) ...", flush=True)
        first[mode] = first_step(args, mode)

    steps = {mode: build(mode, base, ids, args.rank)[1] for mode in MODES}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {mode: [] for mode in MODES}
    from tqdm.auto import tqdm
    for i in tqdm(range(args.steps), desc="steady", leave=False):
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
            sync()
            t0 = time.perf_counter()
            steps[mode]()
            sync()
            times[mode].append(time.perf_counter() - t0)
    result = {
        "args": vars(args),
        "first_step": first,
        "steady_median_ms": {m: 1e3 * statistics.median(t) for m, t in times.items()},
    }
    med = result["steady_median_ms"]
    result["peft_over_lorafx_steady"] = med["peft"] / med["lorafx"]
    result["peft_over_lorafx_first"] = first["peft"]["first_step_s"] / first["lorafx"]["first_step_s"]
    print(f"\n{'mode':<8}{'setup s':>9}{'first step s':>14}{'steady ms':>11}")
    for m in MODES:
        print(f"{m:<8}{first[m]['setup_s']:>9.1f}{first[m]['first_step_s']:>14.1f}{med[m]:>11.1f}")
    print(f"PEFT / lorafx: steady step {result['peft_over_lorafx_steady']:.3f}x, "
          f"first step {result['peft_over_lorafx_first']:.2f}x "
          f"(first step + lorafx setup: "
          f"{first['peft']['first_step_s'] / (first['lorafx']['first_step_s'] + first['lorafx']['setup_s']):.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
