"""The evaluation table: zero-shot base model vs LoRA fine-tuning, per task, with the mean.

    python tools/eval_table.py                                   # lorafx-tiny: zero-shot vs lorafx LoRA r=8
    python tools/eval_table.py --methods zero-shot,lora,peft     # add PEFT's LoRA (same sites, same recipe)
    python tools/eval_table.py --suite minilm                    # all-MiniLM-L6-v2 sentence tasks (optional extra)
    python tools/eval_table.py --suite all --out eval_out

Prints a task x method table of held-out accuracy (percent), and writes
``<out>/eval_<suite>.json`` (config, per-task results with sample predictions, means,
seconds) and ``<out>/eval_<suite>.png`` (grouped bars).  Fixed seeds and one thread
(``--threads``): a rerun with the same arguments prints the same numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def format_table(result: dict, title: str = "") -> str:
    methods = result["config"]["methods"]
    tasks = result["config"]["tasks"]
    w = max(12, *(len(t) for t in tasks))
    head = f"{'task':<{w}}" + "".join(f"{m:>12}" for m in methods)
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for t in tasks:
        lines.append(f"{t:<{w}}" + "".join(f"{result['results'][t][m]['accuracy']:12.1f}" for m in methods))
    lines.append("-" * len(head))
    lines.append(f"{'mean':<{w}}" + "".join(f"{result['mean'][m]:12.1f}" for m in methods))
    return "\n".join(lines)


def plot(result: dict, path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'lorafx[draw]')")
        return False
    methods = result["config"]["methods"]
    tasks = result["config"]["tasks"] + ["mean"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 2, 3.6))
    for i, m in enumerate(methods):
        vals = [result["results"][t][m]["accuracy"] for t in tasks[:-1]] + [result["mean"][m]]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(tasks))]
        bars = ax.bar(xs, vals, width, label=m)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 109)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=len(methods))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    from lorafx.eval import harness
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=["tiny", "minilm", "all"], default="tiny",
                    help="tiny: the shipped lorafx-tiny decoder (default); minilm: all-MiniLM-L6-v2")
    ap.add_argument("--methods", default="zero-shot,lora", help="comma list of zero-shot, lora, peft")
    ap.add_argument("--tasks", default=None, help="comma list (default: every task of the suite)")
    ap.add_argument("--model", default=None, help="a local checkpoint folder for the tiny suite "
                                                   "(default: lorafx/eval/checkpoints/lorafx-tiny)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (tiny 300, minilm 60)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--n-test", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="eval_out")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    suites = ["tiny", "minilm"] if args.suite == "all" else [args.suite]
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    for suite in suites:
        if suite == "tiny":
            run, defaults, title = harness.run, harness.FINETUNE_DEFAULTS, "lorafx-tiny (LLaMA, 1.8M params)"
            extra = {"folder": args.model}
        else:
            from lorafx.eval import minilm
            run, defaults, title = minilm.run, minilm.MINILM_DEFAULTS, "all-MiniLM-L6-v2 (BERT, 22.7M params)"
            extra = {}
        tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
        if tasks and args.suite == "all":
            raise SystemExit("--tasks needs a single --suite")
        kw = {k: (getattr(args, k) if getattr(args, k) is not None else defaults[k])
              for k in ("steps", "lr", "batch_size")}
        print(f"== {title}: {', '.join(methods)}; {kw['steps']} steps x batch {kw['batch_size']}, lr {kw['lr']}, "
              f"r={args.r}, alpha={args.alpha}, {args.n_test} test examples per task, seed {args.seed}", flush=True)
        result = run(tasks=tasks, methods=methods, r=args.r, alpha=args.alpha, n_test=args.n_test, seed=args.seed,
                     progress=not args.no_progress, log=lambda s: print("  " + s, flush=True), **kw, **extra)
        result["title"] = title
        table = format_table(result, f"{title}: held-out accuracy (%)")
        print()
        print(table)
        print(f"({result['seconds'] / 60:.1f} min)\n", flush=True)
        path = os.path.join(args.out, f"eval_{suite}.json")
        with open(path, "w") as f:
            json.dump({**result, "table": table}, f, indent=1)
        png = os.path.join(args.out, f"eval_{suite}.png")
        wrote = plot(result, png, title)
        print(f"wrote {path}" + (f" and {png}" if wrote else ""))
    print(f"total {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
