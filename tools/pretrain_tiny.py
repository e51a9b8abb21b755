"""Pretrain the tiny LLaMA of the evaluation suite (``lorafx-tiny``) from scratch, deterministically.

    OMP_NUM_THREADS=1 python tools/pretrain_tiny.py                       # writes the shipped checkpoint
    OMP_NUM_THREADS=1 python tools/pretrain_tiny.py --out /tmp/tiny       # regenerate elsewhere
    OMP_NUM_THREADS=1 python tools/pretrain_tiny.py --check 300           # 2 min: same losses as the shipped run?

The corpus is generated on the fly (``lorafx.eval.pretrain.corpus_batches``): ten skills
(arithmetic, comparison, sorting, copy/reverse/length, key-value lookup, boolean logic),
held-out test problems excluded.  One thread, fixed seeds and
``torch.use_deterministic_algorithms(True)``: the same arguments on the same machine, torch
build and transformers release give a bit-identical checkpoint (``--check`` tests that).
Progress is printed every ``--log-every`` steps; every ``--eval-every`` steps each skill and
each downstream task is evaluated zero-shot on held-out problems.  The folder gets ``config.json``, ``model.safetensors``, the tokenizer files and
``pretrain_info.json`` (recipe, seconds, final evaluation).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lorafx.eval import harness  # noqa: E402
from lorafx.eval.pretrain import MODEL_CONFIG, TRAIN_CONFIG, corpus_batches, model_config  # noqa: E402
from lorafx.eval.tasks import PRETRAIN_SKILLS, TASKS  # noqa: E402
from lorafx.eval.tokenizer import build_tokenizer  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "lorafx", "eval", "checkpoints", harness.CHECKPOINT)


def quick_eval(model, tok, n: int, downstream: bool = True) -> dict:
    """Zero-shot accuracy (%) of every pretraining skill (and downstream task) on ``n`` held-out problems."""
    out = {}
    groups = (("skill", PRETRAIN_SKILLS), ("task", TASKS)) if downstream else (("skill", PRETRAIN_SKILLS),)
    for group, tasks in groups:
        for name, task in tasks.items():
            out[f"{group}/{name}"] = harness.evaluate(model, task, tok, n=n, keep=0)["accuracy"]
    return out


def _same_loss(entry: dict, recorded: list) -> bool:
    """Is a logged loss equal to the recorded one at the same step?  Prints the verdict on a difference."""
    match = [h for h in recorded if h["step"] == entry["step"]]
    if not match:
        print(f"check: the reference has no loss logged at step {entry['step']} (use its --log-every)")
        return False
    if match[0]["loss"] != entry["loss"]:
        print(f"check FAILED at step {entry['step']}: loss {entry['loss']!r}, recorded {match[0]['loss']!r}; this "
              f"machine or software stack (torch, transformers) does not regenerate the reference bit for bit, so "
              f"its zero-shot numbers may differ by a few points per task")
        return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: the shipped checkpoint)")
    for k, v in TRAIN_CONFIG.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=1000, help="evaluate the skills every N steps (0: never)")
    ap.add_argument("--eval-n", type=int, default=64, help="held-out examples per skill at each evaluation")
    ap.add_argument("--final-eval-n", type=int, default=256)
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="run only the first N steps of the recipe, write nothing, and compare the logged losses "
                         "with the history recorded in --reference (exit 1 at the first difference): a quick test "
                         "that this machine and software stack regenerate that checkpoint bit for bit")
    ap.add_argument("--reference", default=DEFAULT_OUT,
                    help="the checkpoint folder whose pretrain_info.json --check compares against (default: shipped)")
    args = ap.parse_args(argv)
    if args.check < 0 or args.check > args.steps:
        ap.error(f"--check must be between 1 and --steps ({args.steps}), got {args.check}")
    reference = None
    if args.check:
        info_path = os.path.join(args.reference, "pretrain_info.json")
        if not os.path.exists(info_path):
            ap.error(f"--check needs {info_path} (a folder written by this script)")
        with open(info_path) as f:
            reference = json.load(f)
        ours = {k: getattr(args, k) for k in TRAIN_CONFIG}
        if reference["recipe"] != ours:
            ap.error(f"--check: the recipe differs from the reference's {reference['recipe']}; run with its options")

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)

    tok = build_tokenizer()
    cfg = model_config(len(tok))
    model = __import__("transformers").LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"lorafx-tiny: LLaMA {MODEL_CONFIG['num_hidden_layers']} layers, hidden {MODEL_CONFIG['hidden_size']}, "
          f"vocab {len(tok)}, {n_params:,} parameters; {args.steps} steps x {args.batch_size} x {args.seq_len} "
          f"tokens, {args.threads} thread(s)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * frac))

    batches = corpus_batches(tok, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    history = []
    start = time.perf_counter()
    run_loss, run_n, tokens, eval_seconds = 0.0, 0, 0, 0.0
    model.train()
    for step in range(args.check or args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, lab = next(batches)
        loss = model(input_ids=ids, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run_loss += float(loss.detach())
        run_n += 1
        tokens += int((ids != tok.pad_token_id).sum())
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            el = time.perf_counter() - start
            print(f"step {done:6d}/{args.steps}  loss {run_loss / run_n:.4f}  lr {lr_at(step):.2e}  "
                  f"{tokens / el:,.0f} tok/s  elapsed {el / 60:.1f} min  eta {el / done * (args.steps - done) / 60:.1f} min",
                  flush=True)
            history.append({"step": done, "loss": run_loss / run_n, "seconds": el})
            run_loss, run_n = 0.0, 0
            if reference is not None and not _same_loss(history[-1], reference["history"]):
                return 1
        if args.eval_every and done % args.eval_every == 0 and done != args.steps and not args.check:
            t0 = time.perf_counter()
            acc = quick_eval(model, tok, args.eval_n, downstream=False)
            eval_seconds += time.perf_counter() - t0
            print("  eval (skills, %) " + "  ".join(f"{k.split('/')[1]}={v:.0f}" for k, v in acc.items()), flush=True)
            history[-1]["eval"] = acc
            model.train()
    seconds = time.perf_counter() - start
    if args.check:
        print(f"check passed: the losses of the first {args.check} steps equal {args.reference}'s recorded history "
              f"bit for bit ({len(history)} logged values)")
        return 0
    model.eval()
    print(f"pretraining took {seconds / 60:.1f} min ({eval_seconds / 60:.1f} of them in evaluation)", flush=True)

    def save(final):
        os.makedirs(args.out, exist_ok=True)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(args.out, safe_serialization=True)
        tok.save_pretrained(args.out)
        info = {"recipe": {k: getattr(args, k) for k in TRAIN_CONFIG}, "model": MODEL_CONFIG,
                "parameters": n_params, "seconds": seconds, "eval_seconds": eval_seconds, "threads": args.threads,
                "torch": torch.__version__, "transformers": transformers.__version__, "final_eval": {"n": args.final_eval_n, "accuracy": final},
                "history": history}
        with open(os.path.join(args.out, "pretrain_info.json"), "w") as f:
            json.dump(info, f, indent=1)

    save({})  # the weights first: the final evaluation only adds numbers
    final = quick_eval(model, tok, args.final_eval_n) if args.final_eval_n else {}
    if final:
        print(f"zero-shot accuracy (%) on {args.final_eval_n} held-out problems each:")
        for k, v in final.items():
            print(f"  {k:<20} {v:5.1f}")
        save(final)
    print(f"wrote {args.out} (total {(time.perf_counter() - start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
