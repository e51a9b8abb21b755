"""HaLoRA on the evaluation suite: accuracy of lorafx-tiny's adapters on noisy RRAM chips.

    python tools/cim_table.py                       # LoRA vs HaLoRA (dual, spectral, both), 3 seeds, 5 chips, 15 min
    python tools/cim_table.py --modes dual --seeds 0 --tasks add --steps 10 --chips 2   # a smoke run

Every cell (method, task, training seed) starts from the shipped lorafx-tiny
(``lorafx.eval``), compiled with ``target="cim"``: frozen weights on RRAM, LoRA r=8 on
every linear but the output layer in SRAM, fine-tuned with the recipe of
``tools/heterolora_table.py`` (150 steps, batch 32, lr 3e-3), then evaluated on
``--chips`` programmed chips (``cm.reprogram(chip)``, chips 0..N-1) per noise setting:

* ``lora``: plain LoRA (``halora=False``), trained on the ideal weights (training graphs read
  them), then evaluated at every noise setting and on an ideal chip (``noise=None``);
* ``halora-<mode>@<setting>``: ``halora={"mode": mode}`` compiled with that setting's
  noise (the dual objective draws fresh noise of it every step), evaluated on chips of
  the same setting and on an ideal chip (σ = 0).

Noise settings: additive Gaussian noise σ·max|W| per layer (``noise="additive"``) at the
``--sigmas``, and the conductance-level preset ``--preset``.  The additive σ is also given
relative to std(W) (lorafx-tiny's mean max|W|/std(W) over its RRAM weights).

Prints, per setting, mean ± sample std over training seeds (of each seed's mean over tasks
and chips) of every method, the gain of each HaLoRA mode over plain LoRA, and plain LoRA's
drop from the ideal chip; writes ``<out>/cim.json`` and the plot ``<out>/cim.png``
(accuracy against σ).  ``--resume`` reuses the cells an earlier run with the same recipe
left in ``<out>`` (``cim.partial.json`` is written after every cell).
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

MODES = ("dual", "spectral", "both")
R, ALPHA = 8, 16
IDEAL = "ideal"

_BASE = {}


def _worker_init():
    torch.set_num_threads(1)
    from lorafx.eval import harness
    _BASE["model"], _BASE["tok"] = harness.load_frozen()


def settings_of(sigmas, preset):
    """{label: (noise, noise_sigma)} of the evaluated noise settings."""
    out = {f"additive {s:g}": ("additive", s) for s in sigmas}
    if preset:
        out[preset] = (preset, None)
    return out


def _compiled(noise, sigma, halora, seed):
    from lorafx.eval import harness
    return harness.make_model(_BASE["model"], "lora", r=R, alpha=ALPHA, seed=seed, target="cim", noise=noise,
                              noise_sigma=sigma, halora=halora)


def _copy_adapters(src, dst):
    with torch.no_grad():
        for name, p in src.trainable_parameters().items():
            dst.get_parameter(name).copy_(p)


def _accuracy_on_chips(trained, noise, sigma, chips, task, n_test, seed):
    """Accuracy of ``trained``'s adapters on ``chips`` chips of (noise, sigma) (one ideal chip if noise is None)."""
    from lorafx.eval import harness
    model = _compiled(noise, sigma, False, seed)
    _copy_adapters(trained, model)
    model.eval()
    accs = []
    for chip in (range(chips) if noise is not None else [0]):
        if noise is not None:
            model.reprogram(chip)
        accs.append(harness.evaluate(model, task, _BASE["tok"], n=n_test)["accuracy"])
    return accs


def run_cell(method, task, seed, steps, batch_size, lr, n_test, chips, settings, noise_weight=0.5, mu=1e-3):
    from lorafx.eval import harness
    row = {"method": method, "task": task, "seed": seed, "accuracy": {}}
    t0 = time.perf_counter()
    with harness.seeded(seed):
        if method == "lora":
            model = _compiled(None, None, False, seed)
            evaluated = dict(settings)
        else:
            mode, label = method[len("halora-"):].split("@", 1)
            noise, sigma = settings[label]
            model = _compiled(noise, sigma, {"mode": mode, "noise_weight": noise_weight, "mu": mu}, seed)
            evaluated = {label: settings[label]}
        fit = harness.finetune(model, task, _BASE["tok"], steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                               progress=False)
        row.update(train_seconds=fit["seconds"], final_loss=statistics.fmean(fit["losses"][-10:]))
        row["accuracy"][IDEAL] = _accuracy_on_chips(model, None, None, 1, task, n_test, seed)
        for label, (noise, sigma) in evaluated.items():
            row["accuracy"][label] = _accuracy_on_chips(model, noise, sigma, chips, task, n_test, seed)
    row["seconds"] = time.perf_counter() - t0
    return row


# -- aggregation -------------------------------------------------------------------------------------

def _per_seed(rows, method, label, tasks, seeds):
    cell = {(r["method"], r["task"], r["seed"]): r for r in rows}
    return [statistics.fmean(statistics.fmean(cell[(method, t, s)]["accuracy"][label]) for t in tasks)
            for s in seeds]


def _stats(values):
    from lorafx.eval import harness
    mean, std = harness.spread(values)
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "per_seed": values}


def summarise(rows, settings, modes, tasks, seeds):
    """{setting: {"lora": stats, "halora-<mode>": stats, "lora_ideal": ..., "<mode>_ideal": ..., ...}}"""
    out = {}
    lora_ideal = _stats(_per_seed(rows, "lora", IDEAL, tasks, seeds))
    for label in settings:
        s = {"lora": _stats(_per_seed(rows, "lora", label, tasks, seeds)), "lora_ideal": lora_ideal}
        s["lora_drop"] = lora_ideal["mean"] - s["lora"]["mean"]
        chip_std = [statistics.stdev(r["accuracy"][label]) for r in rows if r["method"] == "lora"
                    and len(r["accuracy"][label]) > 1]
        s["lora_chip_std"] = statistics.fmean(chip_std) if chip_std else 0.0
        for mode in modes:
            method = f"halora-{mode}@{label}"
            noisy = _per_seed(rows, method, label, tasks, seeds)
            ideal = _per_seed(rows, method, IDEAL, tasks, seeds)
            s[mode] = _stats(noisy)
            s[f"{mode}_ideal"] = _stats(ideal)
            s[f"{mode}_gain"] = s[mode]["mean"] - s["lora"]["mean"]
            s[f"{mode}_gain_per_seed"] = [a - b for a, b in zip(noisy, s["lora"]["per_seed"])]
            s[f"{mode}_ideal_vs_lora"] = s[f"{mode}_ideal"]["mean"] - lora_ideal["mean"]
        out[label] = s
    return out


def format_table(summary, modes) -> str:
    head = (f"{'noise (eval = train)':<24}{'LoRA':>14}{'LoRA drop':>11}"
            + "".join(f"{'HaLoRA ' + m:>18}{'gain':>8}{'at σ=0':>9}" for m in modes))
    lines = [head, "-" * len(head)]
    for label, s in summary.items():
        line = f"{label:<24}{s['lora']['mean']:>7.1f} ± {s['lora']['std']:<4.1f}{s['lora_drop']:>11.1f}"
        for m in modes:
            line += (f"{s[m]['mean']:>11.1f} ± {s[m]['std']:<4.1f}{s[m + '_gain']:>+8.1f}"
                     f"{s[m + '_ideal_vs_lora']:>+9.1f}")
        lines.append(line)
    first = next(iter(summary.values()))
    lines.append(f"{'ideal chip (σ = 0)':<24}{first['lora_ideal']['mean']:>7.1f} ± {first['lora_ideal']['std']:<4.1f}")
    return "\n".join(lines)


def weight_ratio() -> float:
    """lorafx-tiny's mean max|W| / std(W) over the weights the cim target puts on RRAM."""
    model = _BASE["model"]
    ratios = [float(m.weight.abs().max() / m.weight.std()) for m in model.modules()
              if isinstance(m, torch.nn.Linear)]
    return statistics.fmean(ratios)


def plot(summary, settings, modes, path, title, ratio) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    additive = [label for label, (noise, _) in settings.items() if noise == "additive"]
    xs = [0.0] + [settings[label][1] for label in additive]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    first = next(iter(summary.values()))
    series = [("LoRA", "lora", "#222222", "--", "s")]
    styles = {"dual": ("#1f77b4", "-", "o"), "spectral": ("#ff7f0e", ":", "^"), "both": ("#2ca02c", "-.", "v")}
    series += [(f"HaLoRA {m}", m, *styles.get(m, ("#333333", "-", "o"))) for m in modes]
    for name, key, colour, line, marker in series:
        ys = [first["lora_ideal"]["mean"]] + [summary[label][key]["mean"] for label in additive]
        es = [first["lora_ideal"]["std"]] + [summary[label][key]["std"] for label in additive]
        if key != "lora":  # each HaLoRA point at σ trained at σ; σ = 0 is plain LoRA's ideal chip
            ys, es, x = ys[1:], es[1:], xs[1:]
        else:
            x = xs
        ax.errorbar(x, ys, yerr=es, marker=marker, linestyle=line, capsize=3, label=name, color=colour, alpha=0.85)
    ax.set_xlabel("additive RRAM noise σ / max|W| (per layer)")
    ax.set_ylabel("accuracy (%), mean ± std over seeds")
    ax.set_title(title, fontsize=9)
    secondary = ax.secondary_xaxis("top", functions=(lambda v: v * ratio, lambda v: v / ratio))
    secondary.set_xlabel("σ / std(W)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def show(summary, settings, modes, config, out) -> None:
    """Print the table and its notes; draw ``<out>/cim.png``."""
    ratio, sigmas = config["max_over_std"], [s for noise, s in settings.values() if noise == "additive"]
    print(format_table(summary, modes))
    print(f"\nadditive σ is relative to max|W| per layer; lorafx-tiny's mean max|W|/std(W) is {ratio:.2f}, so σ = "
          + ", ".join(f"{s:g}" for s in sigmas) + " x max|W| is " + ", ".join(f"{s * ratio:.2f}" for s in sigmas)
          + " x std(W)")
    print(f"each figure: mean ± std over {len(config['seeds'])} training seeds of the mean over "
          f"{len(config['tasks'])} tasks ({', '.join(config['tasks'])}) and {config['chips']} chips; HaLoRA trained at "
          "the setting it is evaluated at; 'at σ=0': its accuracy on an ideal chip minus plain LoRA's")
    png = os.path.join(out, "cim.png")
    if plot(summary, settings, modes, png, f"lorafx-tiny on RRAM (cim target), LoRA r={R}, {len(config['tasks'])} "
                                          f"tasks, {len(config['seeds'])} seeds, {config['chips']} chips", ratio):
        print(f"wrote {png}")


def replot(out) -> int:
    with open(os.path.join(out, "cim.json")) as f:
        saved = json.load(f)
    config = saved["config"]
    settings = {k: tuple(v) for k, v in config["settings"].items()}
    show(saved["summary"], settings, config["modes"], config, out)
    return 0


def main(argv=None) -> int:
    from lorafx.eval import cells as C
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"HaLoRA modes: a comma list of {', '.join(MODES)}")
    # where plain LoRA on lorafx-tiny loses 10 to 90 points (a zero-shot probe on 'add': about 25, 55 and 75)
    ap.add_argument("--sigmas", default="0.1,0.15,0.2", help="additive σ / max|W| of the noise settings")
    ap.add_argument("--preset", default="rram_milo2021", help="a conductance-level noise preset ('' for none)")
    ap.add_argument("--chips", type=int, default=5, help="programmed chips evaluated per noise setting")
    ap.add_argument("--noise-weight", type=float, default=0.5, help="HaLoRA's λ (the noisy loss's weight)")
    ap.add_argument("--mu", type=float, default=1e-3, help="HaLoRA's μ (the spectral penalty's weight)")
    ap.add_argument("--replot", action="store_true", help="print the table and redraw the plot of <out>/cim.json")
    C.add_arguments(ap, out="cim_out")
    ap.set_defaults(tasks="add")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    sigmas = [float(s) for s in args.sigmas.split(",") if s]
    if any(m not in MODES for m in modes):
        ap.error(f"unknown mode(s) {[m for m in modes if m not in MODES]}; modes: {', '.join(MODES)}")
    from lorafx.eval.tasks import get_task
    from lorafx.hw_targets import noise_model
    for t in tasks:
        get_task(t)
    if args.preset:
        noise_model(args.preset)
    settings = settings_of(sigmas, args.preset)
    if args.replot:
        return replot(args.out)
    methods = ["lora"] + [f"halora-{m}@{label}" for label in settings for m in modes]
    cells = [(m, t, s) for s in seeds for t in tasks for m in methods]
    recipe = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "n_test": args.n_test,
              "chips": args.chips, "settings": {k: list(v) for k, v in settings.items()}, "r": R, "alpha": ALPHA,
              "noise_weight": args.noise_weight, "mu": args.mu, "torch": torch.__version__}
    saved = os.path.join(args.out, "cim.json")
    partial = os.path.join(args.out, "cim.partial.json")
    rows, todo = C.pending(cells, [saved, partial], recipe, args.resume)
    print(f"{len(todo)} cells ({len(methods)} methods x {len(tasks)} tasks x {len(seeds)} seeds), {args.steps} "
          f"steps each, {args.chips} chips per setting, {args.jobs} processes; LoRA r={R} alpha={ALPHA}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()

    def report(i, row):
        accs = ", ".join(f"{k}: {statistics.fmean(v):.1f}" for k, v in row["accuracy"].items())
        print(f"[{i}/{len(todo)}] {row['method']:<28} {row['task']:<10} seed {row['seed']}  {accs}  "
              f"({row['seconds']:.0f}s)", flush=True)

    def report_failure(i, cell, error):
        print(f"[{i}/{len(todo)}] {cell[0]:<28} {cell[1]:<10} seed {cell[2]}  FAILED: {error}", flush=True)

    rows, failed = C.run(todo, run_cell, lambda c: (*c, args.steps, args.batch_size, args.lr, args.n_test,
                                                    args.chips, settings, args.noise_weight, args.mu),
                         jobs=args.jobs, initializer=_worker_init, rows=rows, partial=partial, recipe=recipe,
                         on_row=report, on_failure=report_failure)
    seconds = time.perf_counter() - start
    if C.report_failures(failed, partial):
        return 1
    _worker_init()
    ratio = weight_ratio()
    summary = summarise(rows, settings, modes, tasks, seeds)
    config = {"tasks": tasks, "seeds": seeds, "modes": modes, **recipe, "jobs": args.jobs, "max_over_std": ratio}
    print()
    show(summary, settings, modes, config, args.out)
    print(f"\n{len(todo)} cells in {seconds / 60:.1f} min")
    with open(saved, "w") as f:
        json.dump({"config": config, "summary": summary,
                   "rows": sorted(rows, key=lambda r: (r["method"], r["task"], r["seed"])), "seconds": seconds},
                  f, indent=1)
    print(f"wrote {saved}")
    if os.path.exists(partial):
        os.remove(partial)
    return 0


if __name__ == "__main__":
    sys.exit(main())
