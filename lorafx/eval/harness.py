"""Fine-tune and evaluate the tiny pretrained decoder on the tasks of ``lorafx.eval.tasks``.

    from lorafx.eval import harness
    model, tok = harness.load_pretrained()                 # the shipped checkpoint, offline
    cm = harness.make_model(model, "lora", r=8)            # lorafx.compile (or "peft", "zero-shot")
    harness.finetune(cm, "max", tok, steps=300)            # tqdm bar; fixed seed
    harness.evaluate(cm, "max", tok)                       # {"accuracy": ..., "n": ..., ...}
    harness.run(tasks=["max"], methods=["zero-shot", "lora"])   # the whole table

A model is anything called as ``model(input_ids=..., labels=...)`` that returns ``.loss`` and
``.logits``: the transformers model itself, a lorafx ``CompiledModel`` (captured once with
exactly these keyword inputs, so evaluation never re-captures) or a PEFT model.  Batches are
right-padded and carry no attention mask: with a causal model, padding after a sequence
cannot change its logits.  Generation is greedy and batched without a KV cache: every step
runs the model on the whole prefix and reads each row's logits at that row's own length.

Everything is seeded (``seed`` picks the training examples, the adapter init and the
order of batches); with one thread the same call gives the same numbers.
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .tasks import Example, Task, get_task

__all__ = ["METHODS", "CHECKPOINT", "checkpoint_folder", "load_pretrained", "make_model", "finetune",
           "evaluate", "generate", "score_choices", "run", "table", "encode", "collate", "seeded", "FINETUNE_DEFAULTS",
           "calibration_batches", "load_frozen", "spread", "seed_summary"]

METHODS = ("zero-shot", "lora", "peft")
CHECKPOINT = "lorafx-tiny"
IGNORE = -100
# the baseline table's fine-tuning recipe (tools/eval_table.py)
FINETUNE_DEFAULTS = {"steps": 300, "batch_size": 32, "lr": 3e-3, "r": 8, "alpha": 16, "n_test": 256, "seed": 0}


def checkpoint_folder(name: str = CHECKPOINT) -> str:
    """The folder of a checkpoint shipped in ``lorafx/eval/checkpoints/``."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", name)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"no checkpoint at {folder}; regenerate it with tools/pretrain_tiny.py")
    return folder


def load_pretrained(folder: Optional[str] = None):
    """``(model, tokenizer)`` from a local folder (default: the shipped ``lorafx-tiny``), offline,
    the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = folder or checkpoint_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tok


def load_frozen(folder: Optional[str] = None):
    """``load_pretrained`` with every parameter frozen (the base the table tools adapt)."""
    base, tok = load_pretrained(folder)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, tok


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch and ``random`` for the block; the global RNG states are restored after."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def _task(task: Union[str, Task]) -> Task:
    return get_task(task) if isinstance(task, str) else task


# -- encoding ------------------------------------------------------------------------------

def encode(tokenizer, ex: Example, answer: Optional[str] = None) -> Tuple[List[int], List[int]]:
    """``(input_ids, labels)`` of ``<bos> prompt answer <eos>``; labels are -100 on the prompt."""
    prompt = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
    ans = tokenizer(ex.answer if answer is None else answer, add_special_tokens=False)["input_ids"]
    ans = ans + [tokenizer.eos_token_id]
    return prompt + ans, [IGNORE] * len(prompt) + ans


def collate(seqs: Sequence[List[int]], labels: Sequence[List[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: pads get ``pad_id`` and label -100."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(l)] = torch.tensor(l)
    return ids, lab


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    # labels keep the call signature of training (a CompiledModel captured once).  A separate
    # tensor: torch.export binds aliased example inputs to one graph input.
    return model(input_ids=ids, labels=ids.clone()).logits


# -- evaluation ----------------------------------------------------------------------------

@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 128) -> List[str]:
    """Greedy continuation of each prompt up to ``<eos>`` or ``max_new_tokens``, batched."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: List[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[start:start + batch_size]]
        b = len(enc)
        lengths = torch.tensor([len(e) for e in enc])
        ids = torch.full((b, int(lengths.max()) + max_new_tokens), pad, dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, :len(e)] = torch.tensor(e)
        new = torch.full((b, max_new_tokens), pad, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        rows = torch.arange(b)
        for t in range(max_new_tokens):
            logits = _logits(model, ids[:, :int(lengths.max())])
            nxt = logits[rows, lengths - 1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new[:, t] = nxt
            ids[rows[~done], lengths[~done]] = nxt[~done]
            lengths = lengths + (~done).long()
            done = done | (nxt == eos)
            if bool(done.all()):
                break
        for row in new.tolist():
            row = row[:row.index(eos)] if eos in row else row
            out.append(tokenizer.decode([i for i in row if i != pad], skip_special_tokens=True))
    return out


@torch.no_grad()
def score_choices(model, tokenizer, examples: Sequence[Example], batch_size: int = 128) -> List[int]:
    """For each example, the index of the choice with the highest summed log-likelihood
    (choice tokens and ``<eos>``) after the prompt."""
    flat = [(i, c) for i, ex in enumerate(examples) for c in range(len(ex.choices))]
    scores = torch.empty(len(flat))
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        pairs = [encode(tokenizer, examples[i], examples[i].choices[c]) for i, c in chunk]
        ids, lab = collate([p[0] for p in pairs], [p[1] for p in pairs], tokenizer.pad_token_id)
        logp = torch.log_softmax(_logits(model, ids)[:, :-1].float(), -1)
        target = lab[:, 1:]
        mask = target != IGNORE
        tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores[start:start + len(chunk)] = (tok * mask).sum(-1)
    best, pos = [], 0
    for ex in examples:
        k = len(ex.choices)
        best.append(int(scores[pos:pos + k].argmax()))
        pos += k
    return best


def evaluate(model, task: Union[str, Task], tokenizer, *, n: int = FINETUNE_DEFAULTS["n_test"],
             seed: Optional[int] = None, batch_size: int = 128, keep: int = 5) -> Dict[str, Any]:
    """Accuracy (percent) on ``n`` held-out test examples of ``task`` (exact match of the greedy
    answer, or the best-scoring choice), with the first ``keep`` predictions."""
    task = _task(task)
    examples = task.examples("test", n, seed=seed)
    was_training = model.training
    model.eval()
    try:
        if task.kind == "choice":
            picks = score_choices(model, tokenizer, examples, batch_size)
            preds = [ex.choices[k] for ex, k in zip(examples, picks)]
        else:
            preds = generate(model, tokenizer, [ex.prompt for ex in examples], task.max_new_tokens, batch_size)
    finally:
        model.train(was_training)
    correct = [p == ex.answer for p, ex in zip(preds, examples)]
    return {"accuracy": 100.0 * sum(correct) / len(examples), "n": len(examples),
            "samples": [{"prompt": ex.prompt, "answer": ex.answer, "prediction": p}
                        for ex, p in list(zip(examples, preds))[:keep]]}


# -- models and fine-tuning ---------------------------------------------------------------------

def make_model(base: torch.nn.Module, method: str, *, r: int = 8, alpha: int = 16, seed: int = 0,
               **lora_options):
    """The model ``method`` evaluates: ``"zero-shot"`` is ``base`` itself; ``"lora"`` is
    ``lorafx.compile(base, r=r, alpha=alpha)`` on every linear but the output layer; ``"peft"``
    is PEFT's ``get_peft_model`` on a copy of ``base`` with the same adapter sites.  ``base``
    is never modified."""
    if method == "zero-shot":
        return base.eval()
    if method == "lora":
        import lorafx
        ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
        labels = ids.clone()  # not the same tensor: torch.export would bind both names to one input
        was_training = base.training
        base.train()
        try:
            return lorafx.compile(base, example_kwargs={"input_ids": ids, "labels": labels}, r=r, alpha=alpha,
                                  seed=seed, **lora_options)
        finally:
            base.train(was_training)
    if method == "peft":
        from peft import LoraConfig, get_peft_model
        with seeded(seed):
            model = get_peft_model(copy.deepcopy(base), LoraConfig(
                r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM",
                **lora_options))
        return model
    raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")


def finetune(model, task: Union[str, Task], tokenizer, *, steps: int = FINETUNE_DEFAULTS["steps"],
             batch_size: int = FINETUNE_DEFAULTS["batch_size"], lr: float = FINETUNE_DEFAULTS["lr"],
             warmup: float = 0.1, seed: int = 0, progress: bool = True, desc: Optional[str] = None,
             clip: float = 1.0) -> Dict[str, Any]:
    """Train the trainable parameters of ``model`` on ``steps`` batches of ``task``'s train split
    (loss on the answer tokens only), AdamW with linear warm-up and linear decay.  Returns
    ``{"losses": [...], "seconds": ..., "steps": ...}``; the model is left in eval mode."""
    task = _task(task)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (compile it with lorafx or wrap it with PEFT)")
    examples = task.examples("train", steps * batch_size, seed=seed)
    encoded = [encode(tokenizer, ex) for ex in examples]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n_warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / n_warm if s < n_warm else max(0.0, (steps - s) / max(1, steps - n_warm)))
    losses: List[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=desc or f"finetune {task.name}", unit="step", leave=False)
    start = time.perf_counter()
    model.train()
    with seeded(seed):
        for step in range(steps):
            chunk = encoded[step * batch_size:(step + 1) * batch_size]
            ids, lab = collate([c[0] for c in chunk], [c[1] for c in chunk], tokenizer.pad_token_id)
            loss = model(input_ids=ids, labels=lab).loss
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start, "steps": steps}


def calibration_batches(task: Union[str, Task], tokenizer, *, batches: int = 4,
                        batch_size: int = FINETUNE_DEFAULTS["batch_size"], seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """``batches`` training batches of ``task`` as ``{"input_ids", "labels"}`` dicts, for
    ``lorafx.compile(..., calibration=...)`` (drawn with their own seed, so they are not the
    first fine-tuning batches)."""
    task = _task(task)
    examples = task.examples("train", batches * batch_size, seed=seed + 7919)
    encoded = [encode(tokenizer, ex) for ex in examples]
    out = []
    for b in range(batches):
        chunk = encoded[b * batch_size:(b + 1) * batch_size]
        ids, lab = collate([c[0] for c in chunk], [c[1] for c in chunk], tokenizer.pad_token_id)
        out.append({"input_ids": ids, "labels": lab})
    return out


# -- the table -----------------------------------------------------------------------------

def run(folder: Optional[str] = None, *, tasks: Optional[Iterable[str]] = None,
        methods: Iterable[str] = ("zero-shot", "lora"), steps: int = FINETUNE_DEFAULTS["steps"],
        batch_size: int = FINETUNE_DEFAULTS["batch_size"], lr: float = FINETUNE_DEFAULTS["lr"],
        r: int = FINETUNE_DEFAULTS["r"], alpha: int = FINETUNE_DEFAULTS["alpha"],
        n_test: int = FINETUNE_DEFAULTS["n_test"], seed: int = FINETUNE_DEFAULTS["seed"],
        progress: bool = True, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Evaluate every (task, method): ``zero-shot`` evaluates the base model; ``lora`` and
    ``peft`` fine-tune a fresh adapter per task for ``steps`` steps and then evaluate.

    Returns ``{"config": ..., "results": {task: {method: {"accuracy", "n", "train_seconds",
    "final_loss", "samples"}}}, "mean": {method: accuracy}, "seconds": ...}``."""
    from .tasks import DEFAULT_TASKS
    tasks = list(tasks or DEFAULT_TASKS)
    methods = list(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; methods: {', '.join(METHODS)}")
    for t in tasks:
        get_task(t)
    start = time.perf_counter()
    base, tok = load_pretrained(folder)
    for p in base.parameters():
        p.requires_grad_(False)
    result = table(tasks, methods, seed=seed, log=log,
                   make=lambda m: make_model(base, m, r=r, alpha=alpha, seed=seed),
                   fit=lambda model, t, desc: finetune(model, t, tok, steps=steps, batch_size=batch_size, lr=lr,
                                                       seed=seed, progress=progress, desc=desc),
                   score=lambda model, t: evaluate(model, t, tok, n=n_test))
    config = {"model": folder or CHECKPOINT, "tasks": tasks, "methods": methods, "steps": steps,
              "batch_size": batch_size, "lr": lr, "r": r, "alpha": alpha, "n_test": n_test, "seed": seed,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    return {"config": config, **result, "seconds": time.perf_counter() - start}


def table(tasks: Sequence[str], methods: Sequence[str], *, make: Callable[[str], Any],
          fit: Callable[[Any, str, str], Dict[str, Any]], score: Callable[[Any, str], Dict[str, Any]],
          seed: int, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Every (task, method) cell: ``make(method)`` builds a fresh model, ``fit(model, task, desc)``
    fine-tunes it (not for ``"zero-shot"``), ``score(model, task)`` evaluates it; all under
    ``seeded(seed)``.  Returns ``{"results": {task: {method: row}}, "mean": {method: accuracy}}``."""
    results: Dict[str, Dict[str, Any]] = {t: {} for t in tasks}
    for t in tasks:
        for m in methods:
            t0 = time.perf_counter()
            with seeded(seed):
                model = make(m)
                row: Dict[str, Any] = {}
                if m != "zero-shot":
                    losses = fit(model, t, f"{m} {t}")
                    last = losses["losses"][-10:]
                    row.update(train_seconds=losses["seconds"], final_loss=sum(last) / len(last))
                row.update(score(model, t))
            row["seconds"] = time.perf_counter() - t0
            results[t][m] = row
            log(f"{t:<12} {m:<10} {row['accuracy']:6.1f}%  ({row['seconds']:.0f}s)")
            del model
    mean = {m: sum(results[t][m]["accuracy"] for t in tasks) / len(tasks) for m in methods}
    return {"results": results, "mean": mean}


def spread(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    import statistics
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_summary(cell: Dict[Tuple[str, str, int], Dict[str, Any]], method: str, tasks: Sequence[str],
                 seeds: Sequence[int]) -> Dict[str, Any]:
    """A method's accuracy over seeds: mean ± sample std of each seed's mean over ``tasks``,
    their min/max, the per-seed means and each task's mean ± std over seeds.  ``cell`` maps
    (method, task, seed) to a row with an ``"accuracy"``."""
    import statistics
    per_seed = [statistics.fmean(cell[(method, t, s)]["accuracy"] for t in tasks) for s in seeds]
    mean, std = spread(per_seed)
    return {"mean": mean, "std": std, "min": min(per_seed), "max": max(per_seed), "per_seed": per_seed,
            "tasks": {t: dict(zip(("mean", "std"), spread([cell[(method, t, s)]["accuracy"] for s in seeds])))
                      for t in tasks}}
