#!/usr/bin/env python
"""Time one sparse-LoRA training step: lorafx (LoRS) vs an SQFT-style baseline vs dense PEFT, in one process.

    python tools/bench_sparse.py [--preset default|launch] [--rank 8] [--layers 4] [--hidden 512]
        [--intermediate 1376] [--heads 8] [--vocab 8000] [--batch 4] [--seq 256] [--steps 10] [--warmup 3]
        [--repeats 3] [--patterns unstructured,2:4] [--threads T] [--json out.json] [--no-check] [--no-progress]

The LLaMA-shaped model of ``tools/bench_train_step.py`` (random init, fixed seed, float32,
CPU) is pruned to 50% zeros once per pattern (``--patterns``: ``unstructured`` and ``2:4``
by default) with ``lorafx.prune(base, 0.5, method="magnitude", pattern=...)`` on every
q,k,v,o,gate,up,down projection.  Magnitude pruning needs no calibration data (Wanda
would), and the step time does not depend on which weights are zero: every mode runs
dense kernels on the pruned weights.  The pruned model is deep-copied once per mode.  One
step is: forward with ``labels`` -> loss, ``loss.backward()``, ``AdamW.step()``,
``zero_grad(set_to_none=True)``; LoRA r = --rank, alpha = 2r, no dropout.

Modes (for each pattern)
------------------------
floor   the frozen pruned model, backpropagated with no weight gradient and no optimizer,
        backward starting where LoRA's gradients start (``make_floor`` of bench_train_step).
sqft    an SQFT-style sparse LoRA written here: every target ``nn.Linear`` is replaced by a
        module computing ``F.linear(x, W + mask * (s * B @ A), bias)`` through plain
        autograd, ``mask = (W != 0)`` a bool buffer registered once (as SQFT keeps the model
        sparse by masking the adapter product).  Autograd then keeps the dense fused
        weight of every layer (m x n) from forward to backward, and its weight gradient
        dyᵀx (m x n) is formed in backward.  PEFT's init (A kaiming-uniform, B = 0).
peft    plain dense PEFT LoRA on the pruned model (``make_peft``): the speed reference of a
        LoRA step (merging it would destroy the sparsity).
lorafx_surrogate, lorafx_exact
        ``lorafx.compile(pruned, sparsity="keep", sparse_grad=..., r, alpha=2r,
        target_modules=[same], dropout=0)`` + AdamW: ``lora_linear_sparse`` ops that save
        only x, W, A, B and rebuild M = 1[W != 0] from W's zeros.  ``exact`` masks the m x n
        gradient G = dyᵀx (the same gradient as sqft); ``surrogate`` uses LoRS's
        straight-through rank-r products and forms no m x n product in backward.

Before timing, a check runs (skip with ``--no-check``): with B = 0 every mode's loss
equals the floor's; then random B (and sqft's A) are copied into both lorafx modes, the
losses must agree, lorafx_exact's adapter gradients must be allclose to sqft's (the script
aborts otherwise), and the relative difference of lorafx_surrogate's gradients (which
differ by design: the part of G on pruned entries) is reported.

Timing is round-robin, as in bench_train_step: each round runs one step of every mode of
every pattern, the order rotated each round.  ``--warmup`` rounds run once, then the timing
is repeated ``--repeats`` times with fresh rounds (``--steps`` each).  Every ratio is
computed per run in two ways -- "paired" (the median over rounds of the ratio of the two
modes' steps in the same round) and "of medians" -- and reported as the median of the
runs' values and their range (min-max).  The per-mode table pools the rounds of all runs.
"m x n cost" is lorafx_exact's step minus lorafx_surrogate's (paired per round), in ms and
in % of the surrogate step: the measured price of forming and masking G.

Peak memory is bench_train_step's ``measure_memory`` on one post-warm-up step of each mode:
resident (params, buffers -- sqft's masks included --, grads, AdamW state) + transient (the
profiler's allocation high-water mark); deterministic on CPU.  "over floor" is a mode's
peak minus its pattern's floor peak.  Acceptance targets (printed PASS/MISS, never tuned):
lorafx peak-over-floor / sqft's <= 0.6 (both grad modes); surrogate / sqft step time
<= 0.85; surrogate / peft <= 1.1; exact / sqft <= 1.0.

Run time: one round is a step of each of the 10 modes (about 6 s on this project's 2-core
machine).  The default ``--steps`` is 10, not bench_train_step's 60: the default run took
230 s on a quiet machine and 12 minutes with other jobs sharing it.  Use ``--steps 20`` or
more on a quiet machine for tighter ratios.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_step as bts  # noqa: E402  (sets KINETO_LOG_LEVEL before importing torch)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_train_step import MB, TARGETS, Mode, percentile  # noqa: E402

MODES = ("floor", "sqft", "peft", "lorafx_surrogate", "lorafx_exact")
SPARSITY = 0.5
# (key, label, numerator, denominator, target): step-time ratios, judged <= target
TIME_RATIOS = [
    ("surrogate_over_sqft", "lorafx_surrogate / sqft step time", "lorafx_surrogate", "sqft", 0.85),
    ("surrogate_over_peft", "lorafx_surrogate / peft step time", "lorafx_surrogate", "peft", 1.1),
    ("exact_over_sqft", "lorafx_exact / sqft step time", "lorafx_exact", "sqft", 1.0),
]
MEMORY_TARGET = 0.6  # lorafx peak-over-floor / sqft peak-over-floor


# ----------------------------------------------------------------------------- the SQFT baseline
class SqftLinear(torch.nn.Module):
    """y = x (W + M ⊙ (s·B A))ᵀ + bias through plain autograd, M = 1[W != 0] a bool buffer."""

    def __init__(self, linear: torch.nn.Linear, r: int, alpha: float):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # frozen, shared with nothing else
        self.register_buffer("mask", linear.weight.detach() != 0)
        w = linear.weight
        self.lora_A = torch.nn.Parameter(torch.empty(r, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_B = torch.nn.Parameter(torch.zeros(w.shape[0], r, dtype=w.dtype, device=w.device))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init
        self.scale = alpha / r

    def forward(self, x):
        return F.linear(x, self.weight + self.mask * (self.scale * self.lora_B @ self.lora_A), self.bias)


def make_sqft(pruned, ids, r: int, seed: int) -> Mode:
    t0 = time.perf_counter()
    model = copy.deepcopy(pruned)
    torch.manual_seed(seed)
    sites = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]
    for name, linear in sites:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SqftLinear(linear, r, 2 * r))
    model.train()
    opt = torch.optim.AdamW(bts.trainable(model), lr=1e-4)
    return Mode("sqft", model, bts.make_train_step(model, ids, opt), opt, time.perf_counter() - t0)


def make_lorafx_sparse(pruned, ids, r: int, grad: str) -> Mode:
    import lorafx
    from lorafx.dialect.registry import args_of
    t0 = time.perf_counter()
    model = lorafx.compile(copy.deepcopy(pruned), example_kwargs={"input_ids": ids, "labels": ids.clone()},
                           sparsity="keep", sparse_grad=grad, r=r, alpha=2 * r, target_modules=list(TARGETS),
                           dropout=0.0, seed=0)
    op = torch.ops.lorafx.lora_linear_sparse.default
    nodes = [n for n in model.graph_module.graph.nodes if n.op == "call_function" and n.target == op]
    sites = sum(1 for name, m in pruned.named_modules()
                if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS)
    modes = {args_of(n).as_dict()["grad"] for n in nodes}
    if len(nodes) != sites or modes != {grad}:
        raise SystemExit(f"lorafx_{grad}: expected {sites} lora_linear_sparse ops with grad={grad!r}, "
                         f"found {len(nodes)} with grad modes {sorted(modes)}")
    model.train()
    opt = torch.optim.AdamW(bts.trainable(model), lr=1e-4)
    return Mode(f"lorafx_{grad}", model, bts.make_train_step(model, ids, opt), opt, time.perf_counter() - t0)


def build_pattern(base, ids, pattern: str, args) -> Dict[str, Mode]:
    import lorafx
    t0 = time.perf_counter()
    pruned = lorafx.prune(base, SPARSITY, method="magnitude", pattern=pattern, example_kwargs={"input_ids": ids})
    zeros = numel = 0
    for name, m in pruned.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            zeros += int((m.weight == 0).sum())
            numel += m.weight.numel()
    print(f"  pruned {pattern}: {zeros / numel:.1%} zeros in the target weights "
          f"({time.perf_counter() - t0:.1f}s, magnitude: no calibration)")
    makers = {"floor": lambda: bts.make_floor(pruned, ids, "exact"),
              "sqft": lambda: make_sqft(pruned, ids, args.rank, args.seed),
              "peft": lambda: bts.make_peft(pruned, ids, args.rank),
              "lorafx_surrogate": lambda: make_lorafx_sparse(pruned, ids, args.rank, "surrogate"),
              "lorafx_exact": lambda: make_lorafx_sparse(pruned, ids, args.rank, "exact")}
    modes = {}
    for name in MODES:
        modes[name] = makers[name]()
        modes[name].name = f"{name}[{pattern}]"
        print(f"    built {name:<16} in {modes[name].setup_seconds:.1f}s "
              f"({sum(p.numel() for p in bts.trainable(modes[name].model)):,} trainable params)")
    return modes


# ----------------------------------------------------------------------------- check
def adapters(model) -> Dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def check(modes: Dict[str, Mode], ids, seed: int) -> dict:
    rtol, atol = 1e-4, 1e-5
    with torch.no_grad():
        losses0 = {name: m.model(input_ids=ids, labels=ids).loss.item() for name, m in modes.items()}
    for name, v in losses0.items():
        if not math.isclose(v, losses0["floor"], rel_tol=rtol, abs_tol=atol):
            raise SystemExit(f"check failed: with B = 0 the {name} loss {v} != the floor's {losses0['floor']}")
    ref = adapters(modes["sqft"].model)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    losses, grads = {}, {}
    for name in ("sqft", "lorafx_exact", "lorafx_surrogate"):
        params = adapters(modes[name].model)
        if name != "sqft":
            if set(params) != set(ref) or any(params[n].shape != ref[n].shape for n in ref):
                raise SystemExit(f"check: {name}'s adapters do not match sqft's: "
                                 f"{sorted(set(params) ^ set(ref))[:4]}")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(ref[n])
        loss = modes[name].model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {n: p.grad.detach().clone() for n, p in params.items()}
        if not math.isclose(losses[name], losses["sqft"], rel_tol=rtol, abs_tol=atol):
            raise SystemExit(f"check failed: with equal A/B the {name} loss {losses[name]} != sqft's {losses['sqft']}")
    result = {"losses_B0": losses0, "losses_equal_AB": losses}
    for name in ("lorafx_exact", "lorafx_surrogate"):
        worst, diff2, ref2 = 0.0, 0.0, 0.0
        for n, want in grads["sqft"].items():
            got = grads[name][n]
            scale = want.abs().max().item() or 1.0
            err = (want - got).abs().max().item() / scale
            worst = max(worst, err)
            diff2 += float((want - got).pow(2).sum())
            ref2 += float(want.pow(2).sum())
            if name == "lorafx_exact" and not torch.allclose(got, want, rtol=rtol * 10, atol=atol * scale):
                raise SystemExit(f"check failed: lorafx_exact's gradient of {n} differs from sqft's (max rel err "
                                 f"{err:.2e}); both should be the exact masked gradient s·Bᵀ(M⊙G), s·(M⊙G)Aᵀ")
        result[f"{name}_max_rel_grad_err"] = worst
        result[f"{name}_rel_l2_grad_diff"] = math.sqrt(diff2 / ref2) if ref2 else 0.0
    for m in modes.values():
        if m.optimizer is not None:
            m.optimizer.zero_grad(set_to_none=True)
    return result


# ----------------------------------------------------------------------------- statistics
def spread(values: List[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def paired(a: List[float], b: List[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def of_medians(a: List[float], b: List[float]) -> float:
    return statistics.median(a) / statistics.median(b)


def summarize_pattern(modes: Dict[str, Mode], runs: List[Dict[str, List[float]]], cpu: Dict[str, List[float]],
                      has_memory: bool) -> dict:
    pooled = {m: [t for run in runs for t in run[m]] for m in MODES}
    floor_peak = modes["floor"].memory.get("peak")
    rows = {}
    for m in MODES:
        ts = pooled[m]
        row = {"median_ms": statistics.median(ts) * 1e3, "p10_ms": percentile(ts, 0.1) * 1e3,
               "p90_ms": percentile(ts, 0.9) * 1e3, "vs_floor": of_medians(ts, pooled["floor"]),
               "vs_floor_paired": paired(ts, pooled["floor"]), "cpu_median_ms": statistics.median(cpu[m]) * 1e3,
               "times_ms_per_run": [[t * 1e3 for t in run[m]] for run in runs], "last_loss": modes[m].last_loss,
               "trainable_params": sum(p.numel() for p in bts.trainable(modes[m].model))}
        if has_memory:
            row["memory_bytes"] = dict(modes[m].memory)
            row["peak_mb"] = modes[m].memory["peak"] / MB
            row["peak_over_floor_mb"] = (modes[m].memory["peak"] - floor_peak) / MB
        rows[m] = row
    out = {"modes": rows, "ratios": {}}
    if has_memory:
        sqft_over = rows["sqft"]["peak_over_floor_mb"]
        for grad in ("surrogate", "exact"):
            value = rows[f"lorafx_{grad}"]["peak_over_floor_mb"] / sqft_over if sqft_over > 0 else None
            out["ratios"][f"memory_{grad}_over_sqft"] = {
                "label": f"lorafx_{grad} / sqft peak over floor", "value": value, "target": MEMORY_TARGET,
                "pass": value is not None and value <= MEMORY_TARGET}
        masks = sum(b.numel() * b.element_size() for n, b in modes["sqft"].model.named_buffers() if n.endswith("mask"))
        out["sqft_mask_mb"] = masks / MB
    for key, label, num, den, target in TIME_RATIOS:
        p = spread([paired(run[num], run[den]) for run in runs])
        q = spread([of_medians(run[num], run[den]) for run in runs])
        out["ratios"][key] = {"label": label, "paired": p, "of_medians": q, "target": target,
                              "pass_paired": p["median"] <= target, "pass_of_medians": q["median"] <= target}
    ms = spread([statistics.median((e - s) * 1e3 for e, s in zip(run["lorafx_exact"], run["lorafx_surrogate"]))
                 for run in runs])
    pct = spread([(paired(run["lorafx_exact"], run["lorafx_surrogate"]) - 1) * 100 for run in runs])
    out["mn_product_cost"] = {"ms": ms, "pct_of_surrogate": pct}
    return out


# ----------------------------------------------------------------------------- report
def _table(rows: List[List[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(fmt(rows[0]))
    print(fmt(["-" * w for w in widths]))
    for r in rows[1:]:
        print(fmt(r))


def _range(s: dict, f: str = "{:.3f}") -> str:
    return f"{f.format(s['median'])} [{f.format(s['min'])}-{f.format(s['max'])}]"


def print_pattern(pattern: str, summary: dict, gflop_g: float) -> None:
    rows = summary["modes"]
    has_mem = all("peak_mb" in r for r in rows.values())
    head = ["mode", "median ms", "p10-p90 ms", "vs floor", "paired", "cpu ms"]
    head += ["peak MB", "over floor", "saved MB"] if has_mem else []
    table = [head]
    for m, r in rows.items():
        line = [m, f"{r['median_ms']:.1f}", f"{r['p10_ms']:.0f}-{r['p90_ms']:.0f}", f"{r['vs_floor']:.3f}x",
                f"{r['vs_floor_paired']:.3f}x", f"{r['cpu_median_ms']:.0f}"]
        if has_mem:
            line += [f"{r['peak_mb']:.1f}", "-" if m == "floor" else f"+{r['peak_over_floor_mb']:.1f} MB",
                     f"{r['memory_bytes']['saved'] / MB:.1f}"]
        table.append(line)
    print(f"\n== {SPARSITY:.0%} {pattern} (magnitude) ==")
    _table(table)
    print("\nacceptance (time: median of the runs [min-max]; PASS/MISS on the median):")
    for key, v in summary["ratios"].items():
        if key.startswith("memory_"):
            shown = f"{v['value']:.3f}" if v["value"] is not None else "n/a"
            print(f"  {v['label']:<42} {shown:<44} target <= {v['target']:<4} {'PASS' if v['pass'] else 'MISS'}")
        else:
            both = f"paired {_range(v['paired'])}, of medians {_range(v['of_medians'])}"
            verdict = f"{'PASS' if v['pass_paired'] else 'MISS'} / {'PASS' if v['pass_of_medians'] else 'MISS'}"
            print(f"  {v['label']:<42} {both:<44} target <= {v['target']:<4} {verdict}")
    if "sqft_mask_mb" in summary:
        print(f"  (sqft's peak over floor includes {summary['sqft_mask_mb']:.1f} MB of bool mask buffers)")
    c = summary["mn_product_cost"]
    print(f"m x n product (exact - surrogate, paired per round): {_range(c['ms'], '{:.1f}')} ms = "
          f"{_range(c['pct_of_surrogate'], '{:.1f}')} % of the surrogate step "
          f"(G = dyᵀx is {gflop_g:.2f} GFLOP per step)")


def parse_args(argv=None) -> argparse.Namespace:
    parts = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description="\n\n".join([parts[0]] + parts[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bts.add_model_args(p)
    p.add_argument("--steps", type=int, default=10, help="timed rounds per run (one step of every mode per round)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds before the first run")
    p.add_argument("--repeats", type=int, default=3, help="timing runs (fresh rounds each); ratios: median and range")
    p.add_argument("--patterns", default="unstructured,2:4", help="comma-separated sparsity patterns (50%% each)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON here")
    p.add_argument("--no-check", action="store_true", help="skip the loss / adapter-gradient check")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = bts.apply_preset(p.parse_args(argv))
    args.patterns = [x.strip() for x in args.patterns.split(",") if x.strip()]
    if not args.patterns:
        p.error("--patterns: give at least one pattern")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1 and --warmup >= 0")
    if args.hidden % args.heads:
        p.error("--hidden must be divisible by --heads")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    import peft
    import transformers
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "platform": platform.platform()}
    print(f"LlamaForCausalLM: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.heads} heads, vocab {args.vocab}; batch {args.batch} x seq {args.seq}; LoRA r={args.rank} "
          f"alpha={2 * args.rank} on {','.join(TARGETS)}; {SPARSITY:.0%} sparsity, {', '.join(args.patterns)}")
    print(f"cpu float32, {env['threads']} threads, torch {env['torch']}, transformers {env['transformers']}, "
          f"peft {env['peft']}")
    t_start = time.perf_counter()
    base = bts.build_base(args, device, torch.float32)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    modes = {pattern: build_pattern(base, ids, pattern, args) for pattern in args.patterns}
    mn = sum(m.weight.numel() for name, m in base.named_modules()
             if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS)
    gflop_g = 2 * args.batch * args.seq * mn / 1e9
    del base

    checks = {}
    if not args.no_check:
        for pattern, group in modes.items():
            c = checks[pattern] = check(group, ids, args.seed)
            print(f"check {pattern}: losses at B=0 agree; with equal random A/B losses agree "
                  f"({c['losses_equal_AB']['sqft']:.6f}), lorafx_exact grads == sqft's (max rel err "
                  f"{c['lorafx_exact_max_rel_grad_err']:.1e}); lorafx_surrogate grads differ by "
                  f"{c['lorafx_surrogate_rel_l2_grad_diff']:.1%} (relative L2; max entry "
                  f"{c['lorafx_surrogate_max_rel_grad_err']:.1%} of the largest)")

    flat = [m for group in modes.values() for m in group.values()]
    progress = not args.no_progress
    bts.run_rounds(flat, args.warmup, device, record=False, desc="warm-up", progress=progress)
    has_memory = bts.measure_memory({m.name: m for m in flat}, device)
    runs = {pattern: [] for pattern in modes}
    cpu = {pattern: {name: [] for name in MODES} for pattern in modes}
    for k in range(args.repeats):
        for m in flat:
            m.times, m.cpu_times = [], []
        gc.collect()
        gc.freeze()  # keep the cyclic GC from scanning the models during timed steps
        bts.run_rounds(flat, args.steps, device, record=True, desc=f"run {k + 1}/{args.repeats}", progress=progress)
        gc.unfreeze()
        for pattern, group in modes.items():
            runs[pattern].append({name: list(m.times) for name, m in group.items()})
            for name, m in group.items():
                cpu[pattern][name] += m.cpu_times

    summary = {"config": vars(args), "env": env, "check": checks, "patterns": {}}
    print(f"\n{args.repeats} run(s) of {args.steps} timed rounds after {args.warmup} warm-up rounds, "
          f"all {len(flat)} modes interleaved round-robin; table: all runs pooled")
    for pattern, group in modes.items():
        summary["patterns"][pattern] = s = summarize_pattern(group, runs[pattern], cpu[pattern], has_memory)
        print_pattern(pattern, s, gflop_g)
    if has_memory:
        print("\npeak MB = resident (params, buffers, grads, AdamW state) + transient (profiler allocation "
              "high-water mark) of one step; over floor = peak - the floor's; saved MB = non-parameter tensors "
              "saved for backward")
    summary["wall_s"] = time.perf_counter() - t_start
    print(f"total {summary['wall_s']:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {args.json}")
    return summary


if __name__ == "__main__":
    main()
