"""Sparse LoRA (LoRS) on the evaluation suite: lorafx's sparse adapters on a 50%-Wanda-pruned lorafx-tiny.

    python tools/sparse_table.py                          # every method, 3 seeds, 4 tasks, 2 processes
    python tools/sparse_table.py --methods all --seeds 0 --tasks add --steps 10   # a smoke run

Every cell (method, task, seed) starts from the shipped lorafx-tiny (``lorafx.eval``).  The
pruned methods share one pruned model per (task, seed): ``lorafx.prune(base, 0.5,
method="wanda")`` on 4 calibration batches of the task (``harness.calibration_batches``),
every linear but the output layer.  Methods (rows):

* ``dense-lora``: lorafx LoRA r=8 on the dense model (every linear but the output layer),
  the reference that pays no pruning;
* ``pruned-zero-shot``: the pruned model, no training;
* ``sqft``: an SQFT-style baseline written here (SparsePEFT, Muñoz et al. 2024): each linear
  lorafx would adapt becomes W + M ⊙ (s·B A) through plain autograd (M = 1[W≠0] a buffer,
  A kaiming-uniform like nn.Linear / PEFT, B = 0, s = alpha/r), in a copy of the HF model;
* ``lorafx-surrogate``, ``lorafx-exact``: ``lorafx.compile(pruned, sparsity="keep",
  sparse_grad=...)``, y = x((W + s·B A) ⊙ M)ᵀ with LoRS's straight-through adapter
  gradient or the exact masked one;
* ``lorafx-surrogate+lors``, ``lorafx-exact+lors``: with ``init="lors"`` (A from the top
  singular directions of the weight gradient on the calibration batches);
* ``dense-lora+lors``: ``init="lors"`` on the dense model, which separates the init's gain
  from the sparsity's cost.

Every adapter is r=8, alpha=16, fine-tuned with the recipe of ``tools/heterolora_table.py``
(150 steps, batch 32, lr 3e-3).  After fine-tuning, each pruned method is merged (lorafx:
``cm.merge_and_unload()``; sqft: W + M ⊙ (s·B A) here) and every pruned weight's zero
pattern is compared with the pruned model's: the "sparse after merge" column.  The merged
model's logits are also compared with the adapted model's on one batch.

Prints mean ± sample std over seeds (of each seed's mean over tasks) per method, the
per-task means, the sparsity check and the fine-tuning seconds; writes ``<out>/sparse.json``
and ``<out>/sparse.png``.  Each cell runs in its own process slot with one thread, so the
numbers do not depend on ``--jobs``; ``--resume`` reuses the cells an earlier run with the
same recipe left in ``<out>/sparse.json`` (or, from a run that was stopped or had a failing cell,
in ``<out>/sparse.partial.json``, written after every cell).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
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
import torch.nn.functional as F  # noqa: E402

METHODS = ("dense-lora", "dense-lora+lors", "pruned-zero-shot", "sqft", "lorafx-surrogate", "lorafx-exact",
           "lorafx-surrogate+lors", "lorafx-exact+lors")
LORAFX_SPARSE = {"lorafx-surrogate": {"sparse_grad": "surrogate"},
                 "lorafx-exact": {"sparse_grad": "exact"},
                 "lorafx-surrogate+lors": {"sparse_grad": "surrogate", "init": "lors"},
                 "lorafx-exact+lors": {"sparse_grad": "exact", "init": "lors"}}
R, ALPHA = 8, 16
CALIBRATION_BATCHES = 4


# -- the SQFT-style baseline ------------------------------------------------------------------------------

class SQFTLinear(torch.nn.Module):
    """y = x (W + M ⊙ (s·B A))ᵀ + b through plain autograd, M = 1[W ≠ 0] (SQFT's SparsePEFT)."""

    def __init__(self, linear: torch.nn.Linear, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # frozen, pruned
        self.bias = linear.bias
        self.register_buffer("mask", linear.weight.detach() != 0)
        self.lora_A = torch.nn.Parameter(torch.empty(r, linear.in_features, dtype=linear.weight.dtype))
        self.lora_B = torch.nn.Parameter(torch.zeros(linear.out_features, r, dtype=linear.weight.dtype))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)  # nn.Linear's / PEFT's
        self.scale = alpha / r

    def delta(self) -> torch.Tensor:
        return self.mask * (self.scale * (self.lora_B @ self.lora_A))

    def forward(self, x):
        return F.linear(x, self.weight + self.delta(), self.bias)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.delta()


def sqft_model(pruned: torch.nn.Module, paths, *, r: int, alpha: float, seed: int) -> torch.nn.Module:
    """A deep copy of ``pruned`` with an ``SQFTLinear`` in place of each linear whose weight is in
    ``paths`` (module order; A seeded by ``seed``); only the adapters are trainable."""
    model = copy.deepcopy(pruned)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    wanted = {p[:-len(".weight")] for p in paths}
    found = []
    for name, module in list(model.named_modules()):
        if name in wanted:
            if not isinstance(module, torch.nn.Linear):
                raise TypeError(f"sqft: {name} is a {type(module).__name__}, not an nn.Linear")
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, SQFTLinear(module, r, alpha, gen))
            found.append(name)
    if set(found) != wanted:
        raise RuntimeError(f"sqft: no linear for {sorted(wanted - set(found))[:3]}")
    return model


# -- one cell, in a worker process ---------------------------------------------------------------------

_BASE = {}


def _worker_init():
    torch.set_num_threads(1)
    from lorafx.eval import harness
    _BASE["model"], _BASE["tok"] = harness.load_frozen()
    _BASE["pruned"] = {}


def pruned_model(task: str, seed: int, batch_size: int, sparsity: float, pattern: str):
    """(pruned model, calibration batches, pruned weight paths) for (task, seed), cached per worker."""
    key = (task, seed, batch_size, sparsity, pattern)
    cache = _BASE["pruned"]
    if key not in cache:
        import lorafx
        from lorafx.eval import harness
        base, tok = _BASE["model"], _BASE["tok"]
        calib = harness.calibration_batches(task, tok, batches=CALIBRATION_BATCHES, batch_size=batch_size, seed=seed)
        t0 = time.perf_counter()
        pruned = lorafx.prune(base, sparsity, method="wanda", pattern=pattern, calibration=calib).eval()
        seconds = time.perf_counter() - t0
        for p in pruned.parameters():
            p.requires_grad_(False)
        dense = dict(base.named_parameters())
        paths = [n for n, p in pruned.named_parameters() if not torch.equal(p, dense[n])]
        cache.clear()  # one (task, seed) at a time: cells are submitted seed by seed, task by task
        cache[key] = (pruned, calib, paths, seconds)
    return cache[key]


def _mask_digest(weights) -> str:
    h = hashlib.sha256()
    for name, w in weights:
        h.update(name.encode())
        h.update((w == 0).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def check_merge(merged, pruned_params, paths) -> dict:
    """Compare each pruned weight's zero pattern after the merge ({path: merged weight}) with the
    pruned model's: positions (hence counts) of the zeros."""
    same = 0
    changed = lost = gained = 0
    for p in paths:
        w, w0 = merged[p], pruned_params[p]
        if torch.equal(w == 0, w0 == 0):
            same += 1
        lost += int(((w == 0) & (w0 != 0)).sum())  # kept entries that became 0
        gained += int(((w != 0) & (w0 == 0)).sum())  # pruned entries that became non-zero
        changed += int(((w != w0) & (w0 != 0)).sum())
    return {"sparse_after_merge": same == len(paths), "weights_checked": len(paths), "weights_same_pattern": same,
            "kept_became_zero": lost, "pruned_became_nonzero": gained, "kept_entries_changed": changed}


def run_cell(method: str, task: str, seed: int, steps: int, batch_size: int, lr: float, n_test: int,
             sparsity: float, pattern: str) -> dict:
    from lorafx.eval import harness
    base, tok = _BASE["model"], _BASE["tok"]
    row = {"method": method, "task": task, "seed": seed}
    t0 = time.perf_counter()
    with harness.seeded(seed):
        if method == "dense-lora":
            model = harness.make_model(base, "lora", r=R, alpha=ALPHA, seed=seed)
        elif method == "dense-lora+lors":  # the same calibration batches the pruned methods get
            calib = harness.calibration_batches(task, tok, batches=CALIBRATION_BATCHES, batch_size=batch_size,
                                                seed=seed)
            model = harness.make_model(base, "lora", r=R, alpha=ALPHA, seed=seed, init="lors", calibration=calib)
        else:
            pruned, calib, paths, prune_seconds = pruned_model(task, seed, batch_size, sparsity, pattern)
            pruned_params = dict(pruned.named_parameters())
            zeros = sum(int((pruned_params[p] == 0).sum()) for p in paths)
            total = sum(pruned_params[p].numel() for p in paths)
            row.update(prune_seconds=prune_seconds, pruned_weights=len(paths), sparsity=zeros / total,
                       mask_digest=_mask_digest((p, pruned_params[p]) for p in paths))
            if method == "pruned-zero-shot":
                model = pruned
            elif method == "sqft":
                model = sqft_model(pruned, paths, r=R, alpha=ALPHA, seed=seed)
            elif method in LORAFX_SPARSE:
                options = dict(LORAFX_SPARSE[method])
                if options.get("init") == "lors":
                    options["calibration"] = calib
                model = harness.make_model(pruned, "lora", r=R, alpha=ALPHA, seed=seed, sparsity="keep", **options)
            else:
                raise ValueError(f"unknown method {method!r}")
        row["compile_seconds"] = time.perf_counter() - t0
        if method != "pruned-zero-shot":
            fit = harness.finetune(model, task, tok, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                   progress=False)
            row.update(train_seconds=fit["seconds"], final_loss=statistics.fmean(fit["losses"][-10:]),
                       trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
        result = harness.evaluate(model, task, tok, n=n_test)
        row["accuracy"] = result["accuracy"]
        if method not in ("dense-lora", "dense-lora+lors", "pruned-zero-shot"):
            batch = calib[0]
            if method == "sqft":
                merged = {p: model.get_submodule(p[:-len(".weight")]).merged_weight() for p in paths}
                merged_model = copy.deepcopy(pruned)
                with torch.no_grad():
                    mp_ = dict(merged_model.named_parameters())
                    for p, w in merged.items():
                        mp_[p].copy_(w)
            else:
                merged_model = model.merge_and_unload()
                merged = dict(merged_model.named_parameters())
                missing = [p for p in paths if p not in merged]
                if missing:
                    raise RuntimeError(f"{method}: merge_and_unload() has no parameter {missing[:3]}")
            row.update(check_merge(merged, pruned_params, paths))
            merged_model.eval()
            with torch.no_grad():
                ids, lab = batch["input_ids"], batch["labels"]
                a = model(input_ids=ids, labels=lab).logits
                b = merged_model(input_ids=ids, labels=lab.clone()).logits
            row["merged_logits_max_diff"] = float((a - b).abs().max())
    row["seconds"] = time.perf_counter() - t0
    return row


# -- aggregation ----------------------------------------------------------------------------------------

def summarise(rows, methods, tasks, seeds):
    from lorafx.eval import harness
    cell = {(r["method"], r["task"], r["seed"]): r for r in rows}
    out = {}
    for m in methods:
        cells = [cell[(m, t, s)] for t in tasks for s in seeds]
        s = harness.seed_summary(cell, m, tasks, seeds)
        if "train_seconds" in cells[0]:
            s["train_seconds_mean"] = statistics.fmean(c["train_seconds"] for c in cells)
            s["train_seconds_median"] = statistics.median(c["train_seconds"] for c in cells)
            s["trainable"] = statistics.median(c["trainable"] for c in cells)
        if "sparsity" in cells[0]:
            s["sparsity"] = statistics.fmean(c["sparsity"] for c in cells)
        if "sparse_after_merge" in cells[0]:
            s["sparse_after_merge_cells"] = sum(bool(c["sparse_after_merge"]) for c in cells)
            s["cells"] = len(cells)
            s["weights_checked"] = sum(c["weights_checked"] for c in cells)
            s["weights_same_pattern"] = sum(c["weights_same_pattern"] for c in cells)
            s["merged_logits_max_diff"] = max(c["merged_logits_max_diff"] for c in cells)
        out[m] = s
    # every pruned method of a (task, seed) must have started from the same pruned model
    digests = {}
    for r in rows:
        if "mask_digest" in r and r["method"] in methods:
            digests.setdefault((r["task"], r["seed"]), set()).add(r["mask_digest"])
    same_masks = all(len(d) == 1 for d in digests.values())
    return out, same_masks


def format_table(summary, methods, tasks) -> str:
    w = max(len(m) for m in methods) + 2
    head = f"{'method':<{w}}{'mean ± std':>14}{'range':>14}" + "".join(f"{t:>14}" for t in tasks) + \
        f"{'sparsity':>10}{'trainable':>11}{'train s':>9}  {'sparse after merge':<30}"
    lines = [head, "-" * len(head)]
    for m in methods:
        s = summary[m]
        cells = "".join(f"{s['tasks'][t]['mean']:>8.1f}±{s['tasks'][t]['std']:<5.1f}" for t in tasks)
        spars = f"{100 * s['sparsity']:.1f}%" if "sparsity" in s else "dense"
        trainable = f"{int(s['trainable']):,}" if "trainable" in s else "-"
        train = f"{s['train_seconds_mean']:.1f}" if "train_seconds_mean" in s else "-"
        if "sparse_after_merge_cells" in s:
            ok = "yes" if s["sparse_after_merge_cells"] == s["cells"] else "NO"
            check = (f"{ok}: {s['sparse_after_merge_cells']}/{s['cells']} cells, "
                     f"{s['weights_same_pattern']}/{s['weights_checked']} weights")
        else:
            check = "-"
        lines.append(f"{m:<{w}}{s['mean']:>8.1f} ± {s['std']:<4.1f}{s['min']:>7.1f}-{s['max']:<6.1f}{cells}"
                     f"{spars:>10}{trainable:>11}{train:>9}  {check:<30}")
    return "\n".join(lines)


def plot(summary, methods, path, title) -> bool:
    from heterolora_table import plot as bars  # tools/: the same bar chart
    colours = {"dense-lora": "#888888", "dense-lora+lors": "#bbbbbb", "pruned-zero-shot": "#cccccc",
               "sqft": "#ff7f0e"}
    return bars(summary, methods, path, title, [colours.get(m, "#08519c" if "lors" in m else "#1f77b4")
                                                for m in methods], reference="dense-lora")


def main(argv=None) -> int:
    from lorafx.eval import cells as C
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="all", help=f"'all' or a comma list of: {', '.join(METHODS)}")
    ap.add_argument("--sparsity", type=float, default=0.5, help="share of each pruned weight set to 0 (Wanda)")
    ap.add_argument("--pattern", default="unstructured", help="'unstructured' or 'N:M' (then --sparsity (M-N)/M)")
    C.add_arguments(ap, out="sparse_out")
    args = ap.parse_args(argv)
    methods = list(METHODS) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)} (or 'all')")
    from lorafx.eval.tasks import get_task
    from lorafx.passes.prune_weights import parse_pattern
    for t in tasks:
        get_task(t)
    nm = parse_pattern(args.pattern)
    if nm is not None and not math.isclose(args.sparsity, (nm[1] - nm[0]) / nm[1]):
        ap.error(f"--pattern {args.pattern} prunes exactly {(nm[1] - nm[0]) / nm[1]:g}; pass that --sparsity")

    cells = [(m, t, s) for s in seeds for t in tasks for m in methods]
    recipe = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "n_test": args.n_test,
              "sparsity": args.sparsity, "pattern": args.pattern, "prune_method": "wanda",
              "calibration_batches": CALIBRATION_BATCHES, "r": R, "alpha": ALPHA, "torch": torch.__version__}
    saved = os.path.join(args.out, "sparse.json")
    partial = os.path.join(args.out, "sparse.partial.json")  # the cells finished so far (removed on success)
    rows, todo = C.pending(cells, [saved, partial], recipe, args.resume)
    print(f"{len(todo)} cells ({len(methods)} methods x {len(tasks)} tasks x {len(seeds)} seeds), "
          f"{args.steps} steps each, {args.jobs} processes; {100 * args.sparsity:g}% Wanda ({args.pattern}), "
          f"LoRA r={R} alpha={ALPHA}", flush=True)
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)

    def report(i, row):
        train = f"train {row['train_seconds']:.0f}s" if "train_seconds" in row else "no training"
        check = ""
        if "sparse_after_merge" in row:
            check = (f"  sparse after merge: {'yes' if row['sparse_after_merge'] else 'NO'} "
                     f"({row['weights_same_pattern']}/{row['weights_checked']})")
        print(f"[{i}/{len(todo)}] {row['method']:<18} {row['task']:<12} seed {row['seed']}  "
              f"{row['accuracy']:5.1f}%  {train}{check}", flush=True)

    def report_failure(i, cell, error):
        print(f"[{i}/{len(todo)}] {cell[0]:<18} {cell[1]:<12} seed {cell[2]}  FAILED: {error}", flush=True)

    rows, failed = C.run(todo, run_cell, lambda c: (*c, args.steps, args.batch_size, args.lr, args.n_test,
                                                    args.sparsity, args.pattern),
                         jobs=args.jobs, initializer=_worker_init, rows=rows, partial=partial, recipe=recipe,
                         on_row=report, on_failure=report_failure)
    seconds = time.perf_counter() - start
    if C.report_failures(failed, partial):
        return 1
    summary, same_masks = summarise(rows, methods, tasks, seeds)
    print()
    print(format_table(summary, methods, tasks))
    print(f"\nsparse after merge: every pruned weight's zero pattern after merging equals the pruned model's; "
          f"merged vs adapted logits differ by at most "
          f"{max((summary[m].get('merged_logits_max_diff', 0.0) for m in methods), default=0.0):.2g}")
    if not same_masks:
        print("WARNING: the pruned methods of a (task, seed) did not all start from the same pruned weights")
    print(f"\n{len(todo)} cells in {seconds / 60:.1f} min" + (f" ({len(cells) - len(todo)} reused)" if len(todo) < len(cells) else ""))
    config = {"tasks": tasks, "seeds": seeds, "methods": methods, **recipe, "jobs": args.jobs}
    with open(saved, "w") as f:
        json.dump({"config": config, "summary": summary, "same_pruned_masks": same_masks,
                   "rows": sorted(rows, key=lambda r: (r["method"], r["task"], r["seed"])), "seconds": seconds},
                  f, indent=1)
    png = os.path.join(args.out, "sparse.png")
    if plot(summary, methods, png, f"lorafx-tiny, {100 * args.sparsity:g}% Wanda ({args.pattern}), "
                                          f"{len(tasks)} tasks, {len(seeds)} seeds, LoRA r={R}"):
        print(f"wrote {png}")
    print(f"wrote {saved}")
    if os.path.exists(partial):
        os.remove(partial)
    return 0


if __name__ == "__main__":
    sys.exit(main())
