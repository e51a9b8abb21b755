"""Saved-activation bytes and step time of a compiled LLaMA with and without activation checkpointing.

    python tools/bench_checkpointing.py --hidden 256 --layers 4 --batch 4 --seq 256

Builds a random-init LLaMA from a config (no download), compiles it with lorafx (r=8, default
passes), and for each mode runs training steps on one batch, reporting the bytes autograd
saves for backward (``torch.autograd.graph.saved_tensors_hooks``; storages counted once,
parameters and buffers left out -- with non-reentrant checkpointing this includes every
checkpointed layer's inputs), the median step time, and the largest difference between the
two modes' adapter gradients.
"""
import argparse
import statistics
import time

import torch


def saved_bytes(cm, batch):
    alive = {t.untyped_storage().data_ptr() for t in [*cm.parameters(), *cm.buffers()]}
    seen, total = set(), [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in alive and ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    cm.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = cm(**batch).loss
    loss.backward()
    return total[0], {n: p.grad.clone() for n, p in cm.trainable_parameters().items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=0, help="intermediate size (default 2.6875 x hidden)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers as T

    import lorafx

    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.inter or int(args.hidden * 2.6875),
                        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                        num_key_value_heads=max(1, args.hidden // 64), vocab_size=8000)
    model = T.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 8000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    cm = lorafx.compile(model, example_inputs=(ids[:2, :16],), r=8, seed=0)
    with torch.no_grad():
        for name, p in cm.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    cm.train()
    cm(**batch).loss.backward()  # capture the labelled signature first (not under the measuring hooks)
    results = {}
    for mode in ("off", "on"):
        if mode == "on":
            cm.gradient_checkpointing_enable()
        nbytes, grads = saved_bytes(cm, batch)
        times = []
        for _ in range(args.steps):
            cm.zero_grad(set_to_none=True)
            start = time.perf_counter()
            cm(**batch).loss.backward()
            times.append(time.perf_counter() - start)
        results[mode] = (nbytes, statistics.median(times), grads)
        print(f"checkpointing {mode:3}: saved {nbytes / 2**20:8.1f} MiB, step {results[mode][1] * 1000:7.0f} ms "
              f"(median of {args.steps})")
    diff = max((results["on"][2][k] - results["off"][2][k]).abs().max().item() for k in results["on"][2])
    print(f"saved bytes on/off: {results['on'][0] / results['off'][0]:.3f}; step time on/off: "
          f"{results['on'][1] / results['off'][1]:.2f}; max |grad difference|: {diff:.2e}")


if __name__ == "__main__":
    main()
