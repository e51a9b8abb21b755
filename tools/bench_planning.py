#!/usr/bin/env python
"""Planning a big model without its weights: time per pass against the number of layers.

    python tools/bench_planning.py [--layers 4,8,16,32,80] [--shape 8b|70b] [--target cpu|cim]
        [--repeats 3] [--big] [--out planning_out]

Each run builds a LLaMA-3-shaped model on the meta device (``lorafx.models.llama3_shape``)
in a fresh subprocess (so its peak memory is its own), compiles it with a weight-free rank
allocation (``rank_budget=1.0, proxy="constant"``) and prints the time of capture and of every pass, plus the whole
``lorafx.compile`` call (wall) and the process's peak RSS.  Shapes:

    8b   hidden 4096, intermediate 14336, heads 32, kv heads 8, vocab 128256 (LLaMA-3-8B at 32 layers)
    70b  hidden 8192, intermediate 28672, heads 64, kv heads 8, vocab 128256 (LLaMA-3-70B at 80 layers)

``--layers`` sweeps the depth at ``--shape``'s width; ``--big`` adds the two real shapes
(8b at 32 layers, 70b at 80) with ``--repeats`` runs each, the acceptance figures (under 15 s
and 60 s, under 4 GiB).  Writes ``planning.json`` and ``planning.png`` (seconds per pass vs
layers, with a least-squares line through the total) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(shape: str, layers: int, target: str) -> dict:
    """One plan in this process: {capture, passes: {name: s}, compile_s, peak_rss_gib, ...}."""
    import resource

    import torch

    import lorafx
    from lorafx.models import llama3_shape

    model = llama3_shape(shape, layers)
    inputs = {"input_ids": torch.zeros(2, 8, dtype=torch.long, device="meta")}
    options = dict(rank_budget=1.0, proxy="constant", seed=0)
    if target == "cim":  # tiles and SRAM sized for the model: the plan, not a capacity error, is measured
        options.update(rram_tiles=10 ** 8, sram_kib=10 ** 7)
    start = time.perf_counter()
    cm = lorafx.compile(model, example_kwargs=inputs, target=target, **options)
    seconds = time.perf_counter() - start
    report = cm.report()
    allocated = sum(t.numel() * t.element_size() for t in cm.state_dict().values() if not t.is_meta)
    return {"shape": shape, "layers": layers, "target": target, "compile_s": seconds,
            "capture_s": report.capture_seconds, "passes": {r.name: r.seconds for r in report.passes},
            "nodes": report.nodes_captured, "adapter_sites": report.adapter_sites,
            "params": report.total_params, "allocated_bytes": allocated,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def run_child(shape: str, layers: int, target: str) -> dict:
    cmd = [sys.executable, __file__, "--child", shape, str(layers), target]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise SystemExit(f"planning {shape} x {layers} layers failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit(xs, ys):
    """Least-squares line y = a + b x and its R^2."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    ss = sum((y - my) ** 2 for y in ys)
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / ss if ss else 1.0
    return a, b, r2


def table(runs) -> str:
    names = ["capture"] + list(runs[0]["passes"])
    head = ["layers", "nodes"] + names + ["compile", "peak RSS"]
    rows = [[str(r["layers"]), str(r["nodes"])] + [f"{r['capture_s']:.2f}"]
            + [f"{r['passes'][n]:.2f}" for n in names[1:]] + [f"{r['compile_s']:.1f}", f"{r['peak_rss_gib']:.2f} GiB"]
            for r in runs]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot(runs, path: str, line) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["layers"] for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bottom = [0.0] * len(runs)
    for name in ["capture"] + list(runs[0]["passes"]):
        ys = [r["capture_s"] if name == "capture" else r["passes"][name] for r in runs]
        if max(ys) < 0.02 * max(r["compile_s"] for r in runs):
            continue  # too small to see
        ax.fill_between(xs, bottom, [b + y for b, y in zip(bottom, ys)], label=name, alpha=0.8, step=None)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.plot(xs, [r["compile_s"] for r in runs], "ko", label="lorafx.compile (wall)")
    a, b, r2 = line
    ax.plot([0, max(xs)], [a, a + b * max(xs)], "k--", lw=1, label=f"fit {a:.2f} + {b:.3f}·layers s (R²={r2:.3f})")
    ax.set_xlabel("decoder layers")
    ax.set_ylabel("seconds")
    ax.set_title(f"planning on the meta device ({runs[0]['shape']} width, target={runs[0]['target']})")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="4,8,16,32,80")
    p.add_argument("--shape", choices=("8b", "70b"), default="8b")
    p.add_argument("--target", default="cpu")
    p.add_argument("--repeats", type=int, default=1, help="runs per point (the median is kept)")
    p.add_argument("--big", action="store_true", help="also the 8B-shaped (32 layers) and 70B-shaped (80) plans")
    p.add_argument("--out", default="planning_out")
    p.add_argument("--child", nargs=3, metavar=("SHAPE", "LAYERS", "TARGET"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2])))
        return 0

    def median_run(shape, layers):
        runs = [run_child(shape, layers, args.target) for _ in range(max(1, args.repeats))]
        runs.sort(key=lambda r: r["compile_s"])
        best = dict(runs[len(runs) // 2])
        best["compile_s_all"] = [r["compile_s"] for r in runs]
        return best

    sweep = []
    for layers in (int(x) for x in args.layers.split(",")):
        sweep.append(median_run(args.shape, layers))
        print(f"  {args.shape} x {layers} layers: {sweep[-1]['compile_s']:.1f} s", flush=True)
    line = fit([r["layers"] for r in sweep], [r["compile_s"] for r in sweep])
    print(f"\nseconds per pass (median of {args.repeats}), {args.shape} width, target={args.target}:")
    print(table(sweep))
    print(f"\ncompile seconds = {line[0]:.2f} + {line[1]:.3f} x layers (least squares, R^2 = {line[2]:.4f})")
    big = []
    if args.big:
        for shape, layers in (("8b", 32), ("70b", 80)):
            big.append(median_run(shape, layers))
        print("\nthe real shapes (no weights allocated: every tensor stays on meta):")
        for r in big:
            runs = ", ".join(f"{s:.1f}" for s in r["compile_s_all"])
            print(f"  {r['shape']}-shaped, {r['layers']} layers, {r['params'] / 1e9:.1f}B params: "
                  f"compile {r['compile_s']:.1f} s (runs: {runs}), peak RSS {r['peak_rss_gib']:.2f} GiB, "
                  f"{r['allocated_bytes']} bytes of tensors allocated")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "planning.json"), "w") as f:
        json.dump({"sweep": sweep, "fit": dict(zip(("intercept_s", "s_per_layer", "r2"), line)), "big": big}, f,
                  indent=2)
    plot(sweep, os.path.join(args.out, "planning.png"), line)
    print(f"\nwrote {args.out}/planning.json and planning.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
