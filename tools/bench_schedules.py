#!/usr/bin/env python
"""Time every RunLoRA schedule of ``lorafx.lora_linear`` over LLaMA-family shapes and
check how often SelectSchedule's choice is (nearly) the fastest.

    python tools/bench_schedules.py [--shapes 512x512,512x1376,...] [--ranks 8,16,64,256]
        [--tokens 16,64,256,1024,4096,16384] [--max-gflop 40] [--prune 2] [--repeats 5]
        [--max-repeats 15] [--threads 1] [--clock cpu|wall] [--keep-xa] [--byte-weight auto|X]
        [--no-time-criterion] [--csv out.csv] [--png out.png] [--all]

For each point (n in, m out, rank r, b tokens) every candidate schedule (f1/f2 x
b1/b3/b4/b5; with ``--keep-xa`` the ``k`` forms instead) runs forward + backward
(x, A, B need gradients, W frozen, no bias) in interleaved rounds (order rotated each
round); the median over the rounds is its time.  Reported: the fraction of points where
the schedule chosen by

* ``criterion="flops"``: ``SelectSchedule``'s sympy FLOP rule (``best_rule``),
* ``flops+bytes``: the same with a bytes term weighted by the machine balance
  (``--byte-weight auto`` measures FLOP/s of a large sgemm over byte/s of a large copy),
* ``criterion="time"``: SelectSchedule's own measurements (a separate run of
  ``time_schedules``) at every other token count of the sweep, the rule interpolating
  (geometric midpoints) to the counts in between,

runs within 5% of the fastest measured schedule (target >= 90% for "flops").  The
flops pick is also timed a second time under another label (``pick#control``): how
often those two measurements of the *same* schedule differ by more than 5% is the
noise floor of the comparison (an A/A test), printed next to the agreement.

Cost control.  Candidates with more than ``--prune`` (default 2) times the FLOPs of
the cheapest schedule at a point are not timed (they count as not fastest; b3/b4 at
small r are 2-100x the work) -- ``--prune 0`` times everything.  Points whose timed
candidates together exceed ``--max-gflop`` GFLOP per round are skipped (default 40,
so a default run takes about 10 minutes on 2 busy cores; the schedules' crossovers,
b ~ nm/(n+m) and b ~ m, are only affordable for the smaller layers).  Rounds:
``--repeats`` (default 5), raised up to ``--max-repeats`` (15) for cheap points.  ``--all`` sweeps
the wide grid (n, m up to 8192 / 28672, LLaMA-2 7B-70B layers) with no cap.
Default: 1 thread and process CPU time (a clean work measure on a shared machine);
``--threads 2 --clock wall`` times with both cores.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

DEFAULT_SHAPES = "512x512,512x1376,1376x512,1024x1024,1024x2816,2816x1024,2048x2048,4096x4096"
WIDE_SHAPES = ("512x512,512x1376,1376x512,1024x1024,1024x2816,2816x1024,2048x2048,2048x5632,5632x2048,"
               "4096x4096,4096x11008,11008x4096,8192x8192,8192x28672,28672x8192")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shapes", default=None, help=f"comma-separated NxM (in x out); default {DEFAULT_SHAPES}")
    p.add_argument("--ranks", default="8,16,64,256")
    p.add_argument("--tokens", default="16,64,256,1024,4096,16384")
    p.add_argument("--max-gflop", type=float, default=40.0,
                   help="skip points whose timed candidates exceed this many GFLOP per round (0: no cap)")
    p.add_argument("--prune", type=float, default=2.0,
                   help="do not time candidates above this multiple of the least FLOPs (0: time all)")
    p.add_argument("--repeats", type=int, default=5, help="rounds per point (at least)")
    p.add_argument("--max-repeats", type=int, default=15, help="rounds for cheap points (at most)")
    p.add_argument("--round-gflop", type=float, default=3.0,
                   help="cheap points get max(repeats, min(max-repeats, round-gflop*15 / work)) rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default=None, help="default: cpu with 1 thread, else wall")
    p.add_argument("--keep-xa", action="store_true", help="compare the 'k' (XA-saving) schedules instead")
    p.add_argument("--byte-weight", default="auto", help="FLOPs per byte for the flops+bytes model ('auto': measure)")
    p.add_argument("--no-time-criterion", action="store_true", help="skip criterion='time'")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--all", action="store_true", help="the wide grid, no FLOP cap")
    p.add_argument("--csv", default="bench_schedules.csv")
    p.add_argument("--png", default="bench_schedules.png")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.shapes is None:
        args.shapes = WIDE_SHAPES if args.all else DEFAULT_SHAPES
    if args.all:
        args.max_gflop = 0.0
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    args.ranks = [int(v) for v in args.ranks.split(",") if v]
    args.tokens = sorted(int(v) for v in args.tokens.split(",") if v)
    args.clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    return args


def machine_balance(clock: str) -> dict:
    """FLOP/s of a 1024^3 sgemm and byte/s of a 64 MB copy (read + write), medians of 5."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x = torch.randn(16 * 1024 * 1024)
    y = torch.empty_like(x)

    def med(f):
        f()
        ts = []
        for _ in range(5):
            t0 = now()
            f()
            ts.append(now() - t0)
        return statistics.median(ts)

    flops = 2 * 1024 ** 3 / med(lambda: a.mm(b))
    bw = 2 * x.numel() * 4 / med(lambda: y.copy_(x))
    return {"flop_per_s": flops, "byte_per_s": bw, "balance": flops / bw}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import lorafx  # noqa: F401
    from lorafx import schedules as S

    names = S.candidates(keep_xa=args.keep_xa)
    if args.byte_weight == "auto":
        mb = machine_balance(args.clock)
        byte_weight = mb["balance"]
        print(f"machine: {mb['flop_per_s'] / 1e9:.1f} GFLOP/s sgemm, {mb['byte_per_s'] / 1e9:.1f} GB/s copy, "
              f"balance {byte_weight:.1f} FLOP/byte")
    else:
        byte_weight = float(args.byte_weight)
    print(f"{args.threads} thread(s), {args.clock} clock, {args.repeats} rounds; candidates {', '.join(names)}")

    def timed(n, m, r, b):
        flops = {s: float(sum(S.lora_flops(s, b, n, m, r))) for s in names}
        least = min(flops.values())
        keep = [s for s in names if not args.prune or flops[s] <= args.prune * least]
        return keep, sum(flops[s] for s in keep) / 1e9

    def rounds(gflop):
        return max(args.repeats, min(args.max_repeats, int(args.round_gflop * 15 / max(gflop, 1e-9))))

    points = []
    for (n, m) in args.shapes:
        for r in args.ranks:
            if r > min(n, m):
                continue
            for b in args.tokens:
                keep, gflop = timed(n, m, r, b)
                if args.max_gflop and gflop > args.max_gflop:
                    continue
                points.append((n, m, r, b, keep, gflop))
    total = sum(g * (rounds(g) + 1) for *_, g in points)
    print(f"{len(points)} points (of {len(args.shapes) * len(args.ranks) * len(args.tokens)}; cap "
          f"{args.max_gflop or 'none'} GFLOP per round, prune {args.prune or 'off'}); {total:.0f} GFLOP to time")

    rules, rules_bytes, rules_time = {}, {}, {}
    rows = []
    t_start = time.perf_counter()
    for i, (n, m, r, b, keep, gflop) in enumerate(points):
        key = (n, m, r)
        if key not in rules:
            rules[key] = S.best_rule(n, m, r, names=names)
            rules_bytes[key] = S.best_rule(n, m, r, names=names, byte_weight=byte_weight)
        pick = S.resolve(rules[key], b).name
        control = f"{pick}#control"
        secs = S.time_schedules(keep + [control], b, n, m, r, repeats=rounds(gflop), clock=args.clock,
                                seed=args.seed + i)
        noise = abs(secs[control] / secs[pick] - 1)
        secs.pop(control)
        fastest = min(secs, key=secs.get)
        row = {"n": n, "m": m, "r": r, "tokens": b, "gflop_per_round": round(gflop, 4), "rounds": rounds(gflop),
               "fastest": fastest, "fastest_ms": secs[fastest] * 1e3, "control_diff": noise}
        for crit, rule in (("flops", rules[key]), ("flops_bytes", rules_bytes[key])):
            s_ = S.resolve(rule, b).name
            row[f"{crit}_pick"] = s_
            row[f"{crit}_ratio"] = secs[s_] / secs[fastest] if s_ in secs else float("inf")
        for s_ in names:
            row[f"ms_{s_}"] = secs[s_] * 1e3 if s_ in secs else float("nan")
        rows.append(row)
        print(f"[{i + 1}/{len(points)} {time.perf_counter() - t_start:.0f}s] n={n} m={m} r={r} b={b}: fastest "
              f"{fastest} {secs[fastest] * 1e3:.2f} ms; flops -> {row['flops_pick']} {row['flops_ratio']:.3f}x "
              f"(A/A {noise:.1%}); flops+bytes -> {row['flops_bytes_pick']} {row['flops_bytes_ratio']:.3f}x",
              flush=True)

    if not args.no_time_criterion:
        # SelectSchedule(criterion="time"): its own measurements at every other token count of the sweep
        measured_counts = args.tokens[::2]
        for row in rows:
            key = (row["n"], row["m"], row["r"])
            if key not in rules_time:
                winners = []
                for t in measured_counts:
                    keep, gflop = timed(*key, t)
                    if args.max_gflop and gflop > args.max_gflop:
                        continue
                    secs = S.time_schedules(keep, t, *key, repeats=args.repeats, clock=args.clock,
                                            seed=args.seed + 10_000 + t)
                    winners.append((t, min(secs, key=secs.get)))
                if not winners:
                    winners = [(row["tokens"], row["fastest"])]
                rules_time[key] = S.rule_from_measurements(winners)
            pick = S.resolve(rules_time[key], row["tokens"]).name
            row["time_pick"] = pick
            ms = row[f"ms_{pick}"]
            row["time_ratio"] = ms / row["fastest_ms"] if ms == ms else float("inf")
        print(f"time criterion measured; {time.perf_counter() - t_start:.0f}s in all")

    tol = 1.0 + args.tolerance
    print()
    summary = {}
    for crit in ("flops", "flops_bytes", "time"):
        col = f"{crit}_ratio"
        vals = [row[col] for row in rows if col in row]
        if not vals:
            continue
        ok = sum(v <= tol for v in vals)
        summary[crit] = ok / len(vals)
        worst = max(vals)
        label = {"flops": 'criterion="flops"', "flops_bytes": f"flops + {byte_weight:.1f}*bytes",
                 "time": 'criterion="time"'}[crit]
        print(f"{label:<24} within {args.tolerance:.0%} of fastest at {ok}/{len(vals)} points "
              f"({ok / len(vals):.1%}); median ratio {statistics.median(vals):.3f}, worst {worst:.3f}")
    noise = [row["control_diff"] for row in rows]
    aa = sum(v <= args.tolerance for v in noise)
    print(f"{'A/A noise floor':<24} the pick timed twice agrees within {args.tolerance:.0%} at {aa}/{len(noise)} "
          f"points ({aa / max(len(noise), 1):.1%}); median difference {statistics.median(noise):.1%}")
    summary["aa"] = aa / max(len(noise), 1)
    contested = [row for row in rows if not (row["fastest"] == row["flops_pick"] == "f1b1")]
    ok = sum(row["flops_ratio"] <= tol for row in contested)
    print(f"{'flops, contested points':<24} {ok}/{len(contested)} (points where the pick or the fastest is "
          f"not f1b1)")
    by_rank = {}
    for row in rows:
        by_rank.setdefault(row["r"], []).append(row["flops_ratio"] <= tol)
    print("flops criterion by rank: " + ", ".join(f"r={k}: {sum(v)}/{len(v)}" for k, v in sorted(by_rank.items())))

    if args.csv and rows:
        fields = list(rows[0].keys()) + [k for k in ("time_pick", "time_ratio") if k not in rows[0]]
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}")
    if args.png and rows:
        plot(rows, names, args, summary)
        print(f"wrote {args.png}")
    return summary


def plot(rows, names, args, summary):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["n"], r["m"]) for r in rows})
    ranks = sorted({r["r"] for r in rows})
    fig, axes = plt.subplots(len(ranks), 1, figsize=(11, 2.6 * len(ranks)), squeeze=False)
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(names)}
    for ax, rk in zip(axes[:, 0], ranks):
        sub = [r for r in rows if r["r"] == rk]
        labels = []
        for j, row in enumerate(sorted(sub, key=lambda r: (r["n"], r["m"], r["tokens"]))):
            labels.append(f"{row['n']}x{row['m']}\nb={row['tokens']}")
            for s in names:
                if row[f"ms_{s}"] == row[f"ms_{s}"]:  # not pruned
                    ax.scatter(j, row[f"ms_{s}"] / row["fastest_ms"], color=colors[s], s=10,
                               label=s if j == 0 else None)
            ax.scatter(j, min(row["flops_ratio"], 3.0), marker="x", color="k", s=40,
                       label="flops pick" if j == 0 else None)
        ax.axhline(1 + args.tolerance, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=5, rotation=90)
        ax.set_ylabel(f"r={rk}\ntime / fastest")
        ax.set_ylim(0.95, min(3.0, max(2.0, ax.get_ylim()[1])))
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], ls="", marker="o", ms=4, color=colors[s], label=s) for s in names]
    handles.append(Line2D([], [], ls="", marker="x", ms=7, color="k", label="flops pick"))
    axes[0, 0].legend(handles=handles, fontsize=6, ncol=5, loc="upper right")
    labels = {"flops": "flops", "flops_bytes": "flops+bytes", "time": "time", "aa": "A/A noise"}
    fig.suptitle("lora_linear schedules: fwd+bwd time / fastest (x = SelectSchedule, flops criterion); within "
                 f"{args.tolerance:.0%}: " + ", ".join(f"{labels[k]} {v:.0%}" for k, v in summary.items()), fontsize=9)
    fig.tight_layout()
    fig.savefig(args.png, dpi=130)


if __name__ == "__main__":
    main(sys.argv[1:])
