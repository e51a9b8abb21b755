#!/usr/bin/env python
"""Where one adapter's time goes: the base GEMMs, each rank-r product, and the op's fixed cost.

    python tools/bench_rank_products.py [--tokens 1024] [--n 512] [--m 512] [--rank 8]
        [--threads 1] [--rounds 200]

Times, interleaved in random order for ``--rounds`` rounds (median reported):

* the frozen floor's two GEMMs for a linear, x·Wᵀ (forward) and dy·W (dX);
* every rank-r product an f2b5 step runs (two merges W + s·B·A, z = dy·B, xa = x·Aᵀ recomputed,
  dA = zᵀ·x, dB = dyᵀ·xa), each in its r-row form (A·xᵀ, Bᵀ·dyᵀ: ``lorafx.ops`` below
  ``COLUMN_RANK``) and its r-column form (x·Aᵀ, dy·B: from ``COLUMN_RANK``);
* the fixed cost of one ``lorafx.lora_linear`` forward + backward at a tiny shape, beside
  the same for PEFT's three ``F.linear`` calls.

It prints the rank-r products' total against what their FLOPs would take at the base GEMMs'
rate: the gap is the memory traffic of the skinny products (each re-reads x or dy).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lorafx.ops  # noqa: E402,F401  (registers torch.ops.lorafx.lora_linear)


def median_ms(ops: dict, rounds: int) -> dict:
    times = {k: [] for k in ops}
    for _ in range(rounds):
        order = list(ops)
        random.shuffle(order)
        for k in order:
            t = time.perf_counter()
            ops[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--n", type=int, default=512, help="in features")
    p.add_argument("--m", type=int, default=512, help="out features")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(0)
    b, n, m, r = args.tokens, args.n, args.m, args.rank
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(b, n, generator=g), torch.randn(b, m, generator=g)
    W, A, B = torch.randn(m, n, generator=g), torch.randn(r, n, generator=g), torch.randn(m, r, generator=g)
    z, xa = torch.randn(b, r, generator=g), torch.randn(b, r, generator=g)
    z_t, xa_t = z.t().contiguous(), xa.t().contiguous()

    base = median_ms({"x·Wᵀ": lambda: x.mm(W.t()), "dy·W": lambda: dy.mm(W)}, args.rounds)
    rows = median_ms({"merge W + s·B·A": lambda: torch.addmm(W, B, A, alpha=2.0),
                      "xa = A·xᵀ": lambda: A.mm(x.t()), "z = Bᵀ·dyᵀ": lambda: B.t().mm(dy.t()),
                      "dA = z·x": lambda: z_t.mm(x), "dB = xa·dy": lambda: xa_t.mm(dy)}, args.rounds)
    cols = median_ms({"xa = x·Aᵀ": lambda: x.mm(A.t()), "z = dy·B": lambda: dy.mm(B),
                      "dA = zᵀ·x": lambda: z.t().mm(x), "dB = dyᵀ·xa": lambda: dy.t().mm(xa)}, args.rounds)

    print(f"{b} tokens, n={n}, m={m}, r={r}, {args.threads} thread(s), median of {args.rounds} rounds")
    base_ms = sum(base.values())
    for k, v in base.items():
        print(f"  base  {k:<18} {v:7.3f} ms")
    for k, v in rows.items():
        print(f"  r-row {k:<18} {v:7.3f} ms")
    for k, v in cols.items():
        print(f"  r-col {k:<18} {v:7.3f} ms")
    # an f2b5 step: two merges, z, xa, dA, dB (r-row forms, as lorafx runs them below COLUMN_RANK)
    step = 2 * rows["merge W + s·B·A"] + sum(v for k, v in rows.items() if not k.startswith("merge"))
    flops = 2 * (2 * n * m * r) + 2 * (2 * b * m * r) + 2 * (2 * b * n * r)  # merges; z, dB; xa, dA
    at_base_rate = flops / (4 * b * n * m) * base_ms
    print(f"base GEMMs {base_ms:.2f} ms; f2b5's rank-{r} products {step:.2f} ms "
          f"(their {flops / 1e6:.0f} MFLOP would take {at_base_rate:.2f} ms at the base GEMMs' rate)")

    # the fixed cost of the op: forward + backward at a tiny shape
    xs = torch.randn(4, 16, requires_grad=True)
    Ws, As, Bs = torch.randn(16, 16), torch.randn(2, 16, requires_grad=True), torch.randn(16, 2, requires_grad=True)
    dys = torch.randn(4, 16)
    lin = torch.nn.functional.linear

    def op():
        y = torch.ops.lorafx.lora_linear(xs, Ws, None, As, Bs, 2.0, None, 0.0, "f1b1|257:f2b1|513:f2b5")
        return torch.autograd.grad(y, [xs, As, Bs], dys)

    def peft():
        return torch.autograd.grad(lin(xs, Ws) + 2.0 * lin(lin(xs, As), Bs), [xs, As, Bs], dys)

    fixed = median_ms({"lorafx.lora_linear": op, "PEFT (3 x F.linear)": peft}, max(args.rounds, 1000))
    print("fixed cost of one adapter's forward + backward (4 x 16 tokens, r=2): "
          + ", ".join(f"{k} {v * 1e3:.0f} µs" for k, v in fixed.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
