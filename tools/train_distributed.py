#!/usr/bin/env python
"""Train a lorafx-compiled model with PyTorch's own data-parallel engines: DDP or FSDP2.

    torchrun --nproc-per-node 2 tools/train_distributed.py --strategy ddp   --steps 5
    torchrun --nproc-per-node 2 tools/train_distributed.py --strategy fsdp2 --steps 5
    python tools/train_distributed.py --strategy fsdp2 --steps 5            # one process, same code
    torchrun --nproc-per-node 8 tools/train_distributed.py --strategy fsdp2 --device cuda --bf16 \\
        --model /path/to/hf-folder --batch 64 --seq 512 --steps 100

Every rank builds the same model (a built-in model of ``lorafx.models``: by default
``lorafx-tiny``, the pretrained tiny LLaMA shipped with lorafx, whose loss visibly falls in
a few steps; the random-init ones are drawn from ``--seed``; or a local Hugging Face folder), compiles it with ``lorafx.compile`` and wraps
the compiled model, unchanged, in ``torch.nn.parallel.DistributedDataParallel`` or FSDP2's
``torch.distributed.fsdp.fully_shard``.  The backend is nccl for ``--device cuda`` and
gloo on the CPU.  The data are synthetic and learnable (each sequence counts up from a
random start in a random stride, modulo the vocabulary), split across ranks by
``torch.utils.data.DistributedSampler``: each rank gets ``--batch / world size`` sequences a
step.  Rank 0 prints the loss of every step (averaged over the ranks: the loss of the
global batch) and saves the adapters in PEFT's format (``--out``).

What it shows (lorafx's side of distributed training):

* DDP all-reduces only the adapters' gradients; the frozen base weights, which the compiled
  model shares with the source model, are not broadcast (``CompiledModel`` lists them in
  ``_ddp_params_and_buffers_to_ignore``, so DDP never writes into the user's model).  Every
  rank must therefore build the same base: this script checks it before training.
* FSDP2 shards the compiled model as one group (``fully_shard(cm)``; a lorafx graph never
  calls its submodules, so per-layer ``fully_shard`` is refused with that explanation).  Its
  adapters are DTensors: they are gathered on every rank with
  ``get_model_state_dict(..., StateDictOptions(full_state_dict=True, cpu_offload=True))``
  and saved on rank 0 with ``lorafx.save_adapter(cm, folder, tensors=full)``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, Dataset, DistributedSampler  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lorafx  # noqa: E402
from lorafx.models import BUILTIN_MODELS, load_model  # noqa: E402


class CountingSequences(Dataset):
    """``n`` sequences of ``seq`` tokens, ``token[t] = (start + t * stride) % vocab``, with
    ``start`` and ``stride`` (1..7) drawn per sequence from ``seed``: the same on every rank."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 8, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(seq)) % vocab

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ids[i]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    p.add_argument("--model", default="lorafx-tiny",
                   help=f"a built-in model ({', '.join(BUILTIN_MODELS)}) or a local Hugging Face folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="global batch: sequences per step over all ranks")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--samples", type=int, default=512, help="sequences in the synthetic data set")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0, help="model weights, adapter init and data")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 base weights and adapters (for the GPU path)")
    p.add_argument("--out", default="adapter_distributed", help="folder rank 0 saves the adapter to ('' = no save)")
    p.add_argument("--json", default=None, help="rank 0 writes the losses and timings here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq < 2:
        p.error("--steps and --batch must be at least 1 and --seq at least 2")
    return args


def init_distributed(device: str) -> tuple:
    """``(rank, world_size, local_rank)`` of a process group on nccl (cuda) or gloo (cpu); a
    process not started by torchrun forms a group of one on a free local port."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to this process")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def check_same_base(cm: torch.nn.Module, device: torch.device) -> None:
    """Refuse to train when the ranks' frozen base weights differ (a checksum per tensor, compared
    with a min and a max all-reduce): DDP does not broadcast them (they are the user's model's
    storage) and FSDP2 shards what each rank holds, so different bases would train silently apart."""
    frozen = [p for p in cm.parameters() if not p.requires_grad]
    sums = torch.stack([p.detach().double().sum() for p in frozen]).to(device)
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise SystemExit("the ranks built different base weights: load one checkpoint (or build from one seed) "
                         "on every rank")


def main(argv=None) -> int:
    args = parse(argv)
    rank, world, local_rank = init_distributed(args.device)
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the world size {world}")
    try:
        model, example = load_model(args.model, seed=args.seed)
        model.to(device=device, dtype=torch.bfloat16 if args.bf16 else None)
        vocab = model.config.vocab_size
        ids = example["input_ids"].to(device)
        start = time.perf_counter()
        cm = lorafx.compile(model, example_kwargs={"input_ids": ids, "labels": ids}, r=args.r, alpha=args.alpha,
                            seed=args.seed)
        compile_s = time.perf_counter() - start
        cm.train()
        check_same_base(cm, device)
        trainable = sum(p.numel() for p in cm.trainable_parameters().values())
        if args.strategy == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(cm, device_ids=[local_rank] if device.type == "cuda"
                                                                else None)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            wrapped = fully_shard(cm, mesh=init_device_mesh(device.type, (world,)))
        say(f"{args.strategy} on {world} process(es), backend {dist.get_backend()}, device {device.type}, "
            f"{'bfloat16' if args.bf16 else 'float32'}; model {args.model}, {trainable:,} trainable parameters "
            f"(r={args.r}); compiled in {compile_s:.1f} s; global batch {args.batch} x {args.seq} tokens")

        data = CountingSequences(args.samples, args.seq, vocab, args.seed)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                     drop_last=True)
        loader = DataLoader(data, batch_size=args.batch // world, sampler=sampler, drop_last=True)
        opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=args.lr)
        losses, times, epoch = [], [], 0
        batches = iter(())
        for step in range(args.steps):
            batch = next(batches, None)
            if batch is None:
                sampler.set_epoch(epoch)
                epoch += 1
                batches = iter(loader)
                batch = next(batches)
            batch = batch.to(device)
            t0 = time.perf_counter()
            loss = wrapped(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)  # the loss of the global batch: every rank holds the same number of tokens
            mean /= world
            times.append(time.perf_counter() - t0)
            losses.append(mean.item())
            say(f"step {step:4d}  loss {losses[-1]:.6f}  {times[-1] * 1000:.0f} ms")

        if args.out:
            if args.strategy == "fsdp2":  # the adapters are DTensor shards: gather them on every rank
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
                full = get_model_state_dict(cm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if rank == 0:
                    lorafx.save_adapter(cm, args.out, tensors=full)
            elif rank == 0:
                cm.save_adapter(args.out)
            say(f"saved the adapter (PEFT format) to {args.out}")
        if rank == 0 and args.json:
            with open(args.json, "w") as f:
                json.dump({"strategy": args.strategy, "world_size": world, "backend": dist.get_backend(),
                           "device": device.type, "bf16": args.bf16, "model": args.model, "losses": losses,
                           "step_seconds": times, "compile_seconds": compile_s, "trainable_params": trainable},
                          f, indent=2)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
