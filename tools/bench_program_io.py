#!/usr/bin/env python
"""Save and load a whole compiled program: file sizes, seconds, and bit-identical logits.

    python tools/bench_program_io.py [--out /tmp/lorafx-program]

LLaMA-shaped model (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000, fp32),
``lorafx.compile(..., r=8)`` on every projection, one call with ``labels`` (a second call
signature), then ``cm.save_program(out)`` and ``lorafx.load_program(out)``; prints the size of
every file, the save and load seconds, and whether the loaded model's logits at a new shape
(3 x 100) equal the compiled model's bit for bit.  ``--out`` is replaced.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("/tmp", "lorafx-program"))
    args = p.parse_args(argv)

    import torch
    import transformers as T

    import lorafx

    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8, vocab_size=8000)
    model = T.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 8000, (2, 64))
    cm = lorafx.compile(model, example_inputs=(ids,), r=8, seed=0)
    cm(input_ids=ids, labels=ids)  # a second call signature (the training loss)
    shutil.rmtree(args.out, ignore_errors=True)
    start = time.perf_counter()
    cm.save_program(args.out)
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = lorafx.load_program(args.out)
    load_s = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in [*cm.parameters(), *cm.buffers()])
    print(f"parameters + buffers {weights / 2 ** 20:.1f} MiB; save {save_s:.1f} s, load {load_s:.1f} s")
    for name in sorted(os.listdir(args.out)):
        print(f"  {name:28s} {os.path.getsize(os.path.join(args.out, name)) / 2 ** 20:8.2f} MiB")
    with torch.no_grad():
        x = torch.randint(0, 8000, (3, 100))
        same = torch.equal(cm(input_ids=x).logits, loaded(input_ids=x).logits)
    print("identical logits at 3 x 100:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
