#!/usr/bin/env python
"""Draw the plan of a big LLaMA-shaped model without its weights, and time the drawing.

    python tools/draw_plan.py [--shape 8b|70b] [--layers N] [--target cpu|cim] [--no-fold] [--out docs/plan_8b.svg]

Builds the model on the meta device (``lorafx.models.llama3_shape``), compiles it with a
weight-free rank allocation (``rank_budget=1.0, proxy="constant"``), then writes the folded drawing (``lorafx.draw``:
one decoder layer in full, every other layer one box with its adapter sites, ranks and,
for ``--target cim``, parts) to ``--out`` and the HTML view (``lorafx.to_html``) beside it
(same stem, ``.html``).  Prints the seconds and bytes of each file.  Shapes:

    8b   hidden 4096, intermediate 14336, heads 32, kv heads 8, vocab 128256, 32 layers
    70b  hidden 8192, intermediate 28672, heads 64, kv heads 8, vocab 128256, 80 layers
"""
from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("8b", "70b"), default="8b")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's number of layers")
    parser.add_argument("--target", default="cpu", help="compile target (cpu or cim; default cpu)")
    parser.add_argument("--out", default="plan.svg", help="the drawing (.svg, .png or .pdf; default plan.svg)")
    parser.add_argument("--no-fold", action="store_true", help="draw every node (fold=False)")
    args = parser.parse_args(argv)

    import torch

    import lorafx
    from lorafx.models import llama3_shape

    model = llama3_shape(args.shape, args.layers)
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    start = time.perf_counter()
    cm = lorafx.compile(model, target=args.target, example_kwargs={"input_ids": ids}, rank_budget=1.0,
                        proxy="constant", seed=0)
    gm = cm.graph_module
    print(f"{args.shape} shape, {model.config.num_hidden_layers} layers, target {args.target}: "
          f"{len(gm.graph.nodes)} nodes, {len(cm.lora_records())} adapters, compiled in "
          f"{time.perf_counter() - start:.1f}s")
    html = os.path.splitext(args.out)[0] + ".html"
    draw = (lambda g, p: lorafx.draw(g, p, fold=False)) if args.no_fold else lorafx.draw
    for path, write, what in ((args.out, draw, "draw"), (html, lorafx.to_html, "to_html")):
        start = time.perf_counter()
        write(gm, path)
        print(f"{what:8s} {path}: {time.perf_counter() - start:.2f}s, {os.path.getsize(path):,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
