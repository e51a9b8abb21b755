#!/usr/bin/env python
"""Where one adapter's time goes: the base GEMMs, each rank-r product, and the op's fixed cost.

    python tools/bench_rank_products.py [--tokens 1024] [--n 512] [--m 512] [--rank 8]
        [--threads 1] [--rounds 200]

Times, interleaved in random order for ``--rounds`` rounds (median reported):

* the frozen floor's two GEMMs for a linear, x·Wᵀ (forward) and dy·W (dX);
* every rank-r product an f2b5 step runs (two merges W + s·B·A, z = dy·B, xa = x·Aᵀ recomputed,
  dA = zᵀ·x, dB = dyᵀ·xa), each in its r-row form (A·xᵀ, Bᵀ·dyᵀ: ``lorafx.dialect.linear`` below
  ``COLUMN_RANK``) and its r-column form (x·Aᵀ, dy·B: from ``COLUMN_RANK``);
* the fixed cost of one ``lorafx.lora_linear`` forward + backward at a tiny shape, beside
  the same for PEFT's three ``F.linear`` calls: through ``lorafx.eager.fast_op`` (what a
  compiled model runs eagerly) and through ``torch.ops.lorafx.lora_linear`` (the custom op's
  dispatcher path, which export and ``torch.compile`` see), beside PEFT's formula (the three
  ``F.linear`` calls alone: a lower bound of PEFT) and PEFT's ``lora.Linear`` module (what a PEFT
  model runs per adapter), when peft is installed.  ``--fixed-only`` times just these.

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
import lorafx  # noqa: E402,F401  (registers torch.ops.lorafx.lora_linear)


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
    p.add_argument("--fixed-only", action="store_true", help="only the fixed cost of one adapter")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(0)
    if not args.fixed_only:
        rank_products(args)
    fixed_cost(args)
    return 0


def rank_products(args) -> None:
    """The base GEMMs and the rank-r products of an f2b5 step, r-row and r-column forms."""
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



def fixed_cost(args) -> dict:
    """One adapter's forward + backward at a tiny shape (4 x 16 tokens, r=2), where only the
    host's per-call overhead counts: lorafx's fast eager path, its custom op, PEFT's formula."""
    from lorafx.eager import fast_op
    xs = torch.randn(4, 16, requires_grad=True)
    Ws, As, Bs = torch.randn(16, 16), torch.randn(2, 16, requires_grad=True), torch.randn(16, 2, requires_grad=True)
    dys = torch.randn(4, 16)
    lin = torch.nn.functional.linear
    rule = "f1b1|257:f2b1|513:f2b5"
    fast = fast_op(torch.ops.lorafx.lora_linear.default)

    def eager():
        return torch.autograd.grad(fast(xs, Ws, None, As, Bs, 2.0, None, 0.0, rule), [xs, As, Bs], dys)

    def op():
        y = torch.ops.lorafx.lora_linear(xs, Ws, None, As, Bs, 2.0, None, 0.0, rule)
        return torch.autograd.grad(y, [xs, As, Bs], dys)

    def peft():
        return torch.autograd.grad(lin(xs, Ws) + 2.0 * lin(lin(xs, As), Bs), [xs, As, Bs], dys)

    timed = {"lorafx (eager fast path)": eager, "lorafx (torch.ops custom op)": op, "PEFT (3 x F.linear)": peft}
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        PeftLinear = None
    if PeftLinear is not None:
        base = torch.nn.Linear(16, 16, bias=False)
        with torch.no_grad():
            base.weight.copy_(Ws)
        layer = PeftLinear(base, "default", LoraConfig(r=2, lora_alpha=4), r=2, lora_alpha=4)  # scale 2, as above
        layer.requires_grad_(False)
        pa, pb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            pa.copy_(As)
            pb.copy_(Bs)
        pa.requires_grad_(True)
        pb.requires_grad_(True)

        def peft_module():
            return torch.autograd.grad(layer(xs), [xs, pa, pb], dys)

        timed["PEFT (lora.Linear module)"] = peft_module
    fixed = median_ms(timed, max(args.rounds, 1000))
    print(f"fixed cost of one adapter's forward + backward (4 x 16 tokens, r=2, {args.threads} thread(s), "
          f"median of {max(args.rounds, 1000)} rounds):")
    for k, v in fixed.items():
        print(f"  {k:<30} {v * 1e3:6.1f} µs")
    for peft_name in ("PEFT (3 x F.linear)", "PEFT (lora.Linear module)"):
        if peft_name in fixed:
            print(f"{peft_name} / lorafx: eager fast path {fixed[peft_name] / fixed['lorafx (eager fast path)']:.3f}x, "
                  f"custom op {fixed[peft_name] / fixed['lorafx (torch.ops custom op)']:.3f}x (>1: lorafx cheaper)")
    return fixed


if __name__ == "__main__":
    sys.exit(main())
