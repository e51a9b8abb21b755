"""HeteroLoRA on the evaluation suite: rank allocation by zero-cost proxies vs uniform ranks.

    python tools/heterolora_table.py                       # every method, 3 seeds, 4 tasks, 2 processes
    python tools/heterolora_table.py --methods uniform,snip --seeds 0 --tasks add_words --steps 30   # a smoke run

Every method fine-tunes lorafx-tiny (``lorafx.eval``) with the same recipe and the same
trainable-parameter budget: that of uniform r=8 on ``q_proj,v_proj`` (the reference).
The proxy methods may spend it on any linear (``rank_budget=<that many parameters>``):

* ``uniform``: r=8 on q_proj and v_proj (the reference itself);
* ``constant``: every linear scored alike, so the budget is shared evenly (graded);
* ``random``, ``random-topk``: seeded random scores (the baseline of the paper);
* ``<proxy>`` and ``<proxy>-topk`` for grad_norm, snip, fisher and synflow: graded ranks
  (``allocation="graded"``) or the paper's on/off rule (``allocation="topk"``, r=8);
* ``<proxy>+shortcuts``: graded, with the shortcut sites competing for the same budget
  (grad_norm, snip, and the random and constant controls);
* ``uniform-all``: r=8 on every linear, a larger budget (reported for scale, not compared).

The proxies score on 4 training batches of the task (``harness.calibration_batches``).
Prints mean ± sample std over seeds (of each seed's mean over tasks) per method, the
per-task means, and the proxy time as a share of the fine-tuning time; writes
``<out>/heterolora.json`` and ``<out>/heterolora.png``.  Each cell runs in its own
process slot with one thread, so the numbers do not depend on ``--jobs``; ``--resume``
reuses the cells an earlier run with the same recipe left in ``<out>/heterolora.json``
(a cell is deterministic, so this gives the same table as running it again).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

REFERENCE = {"r": 8, "target_modules": ["q_proj", "v_proj"]}
PROXY_NAMES = ("grad_norm", "snip", "fisher", "synflow")


def method_options(name: str, budget: int) -> dict:
    """The lorafx.compile options of a method (see the module docstring)."""
    if name == "uniform":
        return dict(REFERENCE)
    if name == "uniform-all":
        return {"r": 8}
    shortcuts = name.endswith("+shortcuts")
    base = name[:-len("+shortcuts")] if shortcuts else name
    topk = base.endswith("-topk")
    proxy = base[:-len("-topk")] if topk else base
    options = {"rank_budget": budget, "proxy": proxy, "allocation": "topk" if topk else "graded"}
    if shortcuts:
        options["shortcuts"] = True
    return options


def all_methods():
    names = ["uniform", "constant", "random", "random-topk"]
    for p in PROXY_NAMES:
        names += [p, f"{p}-topk"]
    names += ["grad_norm+shortcuts", "snip+shortcuts", "random+shortcuts", "constant+shortcuts", "uniform-all"]
    return names


# -- one cell, in a worker process ---------------------------------------------------------------------

_BASE = {}


def _worker_init():
    torch.set_num_threads(1)
    from lorafx.eval import harness
    _BASE["model"], _BASE["tok"] = harness.load_frozen()


def run_cell(method: str, task: str, seed: int, budget: int, steps: int, batch_size: int, lr: float,
             n_test: int) -> dict:
    from lorafx.eval import harness
    base, tok = _BASE["model"], _BASE["tok"]
    options = method_options(method, budget)
    t0 = time.perf_counter()
    with harness.seeded(seed):
        if "rank_budget" in options:
            options["calibration"] = harness.calibration_batches(task, tok, batch_size=batch_size, seed=seed)
        cm = harness.make_model(base, "lora", alpha=16, seed=seed, **options)
        compile_seconds = time.perf_counter() - t0
        alloc = next((r for r in cm.report().passes if r.name == "AllocateRanks"), None)
        fit = harness.finetune(cm, task, tok, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=False)
        result = harness.evaluate(cm, task, tok, n=n_test)
    trainable = sum(p.numel() for p in cm.parameters() if p.requires_grad)
    row = {"method": method, "task": task, "seed": seed, "accuracy": result["accuracy"], "trainable": trainable,
           "train_seconds": fit["seconds"], "compile_seconds": compile_seconds,
           "allocate_seconds": alloc.seconds if alloc is not None else 0.0,
           "final_loss": sum(fit["losses"][-10:]) / len(fit["losses"][-10:])}
    if alloc is not None:
        row["ranks"] = {k: v for k, v in alloc.info["ranks"].items() if v}
    return row


# -- aggregation ----------------------------------------------------------------------------------------

def summarise(rows, methods, tasks, seeds):
    from lorafx.eval import harness
    cell = {(r["method"], r["task"], r["seed"]): r for r in rows}
    out = {}
    for m in methods:
        shares = [cell[(m, t, s)]["allocate_seconds"] / cell[(m, t, s)]["train_seconds"] for t in tasks for s in seeds]
        out[m] = {**harness.seed_summary(cell, m, tasks, seeds),
                  "trainable": statistics.median(cell[(m, t, s)]["trainable"] for t in tasks for s in seeds),
                  "allocate_share_median": statistics.median(shares), "allocate_share_max": max(shares)}
    return out


def format_table(summary, methods, tasks, budget, budget_all) -> str:
    w = max(len(m) for m in methods) + 2
    head = f"{'method':<{w}}{'mean ± std':>14}{'range':>14}" + "".join(f"{t:>14}" for t in tasks) + \
        f"{'trainable':>11}{'proxy/ft':>10}"
    lines = [f"budget: {budget:,} trainable parameters (uniform r=8 on q_proj,v_proj); "
             f"r=8 on every linear: {budget_all:,}", head, "-" * len(head)]
    for m in methods:
        s = summary[m]
        cells = "".join(f"{s['tasks'][t]['mean']:>8.1f}±{s['tasks'][t]['std']:<5.1f}" for t in tasks)
        share = f"{100 * s['allocate_share_median']:.1f}%" if s["allocate_share_median"] else "-"
        lines.append(f"{m:<{w}}{s['mean']:>8.1f} ± {s['std']:<4.1f}{s['min']:>7.1f}-{s['max']:<6.1f}{cells}"
                     f"{int(s['trainable']):>11,}{share:>10}")
    return "\n".join(lines)


def plot(summary, methods, path, title, colours=None, reference="uniform") -> bool:
    """A horizontal bar per method (mean ± std over seeds, the mean written beside it), a dashed
    line at ``reference``'s mean; ``colours``: one per method (default: this table's)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'lorafx[draw]')")
        return False
    means = [summary[m]["mean"] for m in methods]
    stds = [summary[m]["std"] for m in methods]
    fig, ax = plt.subplots(figsize=(7, 0.36 * len(methods) + 1.3))
    if colours is None:
        colours = ["#888888" if m.startswith("uniform") else "#d62728" if "shortcuts" in m else
                   "#1f77b4" if "topk" not in m else "#9ecae1" for m in methods]
    ax.barh(range(len(methods)), means, xerr=stds, color=colours, capsize=2)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    ax.invert_yaxis()
    for i in range(len(methods)):
        ax.text(means[i] + stds[i] + 0.5, i, f"{means[i]:.1f}", va="center", fontsize=7)
    ax.set_xlim(0, max(m + d for m, d in zip(means, stds)) * 1.1)
    if reference in summary:
        ax.axvline(summary[reference]["mean"], color="#444444", lw=0.8, ls="--")
    ax.set_xlabel("mean held-out accuracy (%), ± sample std over seeds")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    from lorafx.eval import cells as C
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(all_methods()))
    C.add_arguments(ap, out="heterolora_out")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    known = set(all_methods()) | {f"{p}+shortcuts" for p in PROXY_NAMES + ("random", "constant")} | \
        {f"{p}-topk+shortcuts" for p in PROXY_NAMES + ("random", "constant")}
    unknown = [m for m in methods if m not in known]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(all_methods())} (and <proxy>+shortcuts)")

    from lorafx.eval import harness
    from lorafx.eval.tasks import get_task
    for t in tasks:
        get_task(t)
    base, _ = harness.load_pretrained()
    budget = sum(p.numel() for p in harness.make_model(base, "lora", **REFERENCE).parameters() if p.requires_grad)
    budget_all = sum(p.numel() for p in harness.make_model(base, "lora", r=8).parameters() if p.requires_grad)
    cells = [(m, t, s) for s in seeds for t in tasks for m in methods]
    recipe = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "n_test": args.n_test,
              "budget": budget, "torch": torch.__version__}
    saved = os.path.join(args.out, "heterolora.json")
    rows, todo = C.pending(cells, [saved], recipe, args.resume)
    print(f"{len(todo)} fine-tuning runs ({len(methods)} methods x {len(tasks)} tasks x {len(seeds)} seeds), "
          f"{args.steps} steps each, {args.jobs} processes; budget {budget:,} parameters")
    start = time.perf_counter()

    def report(i, row):
        print(f"[{i}/{len(todo)}] {row['method']:<20} {row['task']:<12} seed {row['seed']}  "
              f"{row['accuracy']:5.1f}%  train {row['train_seconds']:.0f}s  "
              f"allocate {row['allocate_seconds']:.2f}s", flush=True)

    rows, failed = C.run(todo, run_cell, lambda c: (*c, budget, args.steps, args.batch_size, args.lr, args.n_test),
                         jobs=args.jobs, initializer=_worker_init, rows=rows, on_row=report)
    if C.report_failures(failed):
        return 1
    seconds = time.perf_counter() - start
    summary = summarise(rows, methods, tasks, seeds)
    print()
    print(format_table(summary, methods, tasks, budget, budget_all))
    print(f"\n{len(todo)} runs in {seconds / 60:.1f} min" + (f" ({len(cells) - len(todo)} reused)" if len(todo) < len(cells) else ""))
    os.makedirs(args.out, exist_ok=True)
    config = {"tasks": tasks, "seeds": seeds, "methods": methods, **recipe, "alpha": 16,
              "budget_all_linear_r8": budget_all, "jobs": args.jobs}
    with open(os.path.join(args.out, "heterolora.json"), "w") as f:
        json.dump({"config": config, "summary": summary, "rows": sorted(rows, key=lambda r: (r["method"], r["task"],
                                                                                            r["seed"])),
                   "seconds": seconds}, f, indent=1)
    png = os.path.join(args.out, "heterolora.png")
    if plot(summary, methods, png, f"lorafx-tiny, {len(tasks)} tasks, {len(seeds)} seeds, budget {budget:,} params"):
        print(f"wrote {png}")
    print(f"wrote {os.path.join(args.out, 'heterolora.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
