#!/usr/bin/env python
"""Time one LoRA training step: frozen-model floor vs PEFT vs lorafx, in one process.

    python tools/bench_train_step.py [--preset default|launch] [--rank 8] [--layers 4] [--hidden 512]
        [--intermediate 1376] [--heads 8] [--vocab 8000] [--batch 4] [--seq 256] [--steps 60] [--warmup 3]
        [--threads T] [--device cpu|cuda] [--dtype float32|bfloat16]
        [--modes floor,peft,peft_native,lorafx] [--floor exact|embeds] [--json out.json] [--no-check]
        [--no-memory] [--no-progress] [--lorafx-passes SPEC[;SPEC...]] [--dora]

A LLaMA-shaped ``transformers.LlamaForCausalLM`` is built from a config (random
init, fixed seed, sdpa attention, no KV cache) and deep-copied once per mode, so
every mode starts from the same base weights.  One "step" is: forward with
``labels`` -> loss, ``loss.backward()``, ``AdamW.step()``, ``zero_grad(set_to_none=True)``.

Modes
-----
floor   the frozen base model (every parameter requires_grad=False), backpropagated
        with no weight gradient and no optimizer (there is nothing to update).  This
        is the physical floor of any LoRA step: LoRA adds only the adapter matmuls
        and the (tiny) AdamW update on top of it.  Where backward starts:
        --floor exact (default): forward hooks turn the outputs of the target
            linears whose input needs no grad (layer 0's q/k/v) into leaves that
            require grad -- exactly where a LoRA adapter makes gradients start -- so
            backward goes through every layer (attention and MLP of layer 0
            included) and does all the base-model work a LoRA step needs, no more.
        --floor embeds: ``inputs_embeds`` (the embedding output) is the leaf, so
            backward goes down to the inputs; this also computes layer 0's q/k/v
            input gradients and input-norm backward, which LoRA does not need
            (about 1.5% too much work at the default size).
peft    ``peft.get_peft_model(copy, LoraConfig(r, lora_alpha=2r, target_modules=
        [q,k,v,o,gate,up,down]_proj, lora_dropout=0))`` + AdamW on its trainable params.
        PEFT's default ``autocast_adapter_dtype=True`` keeps the adapters in float32
        when the model is in bfloat16/float16 (the adapter products then run in fp32).
peft_native
        the same with ``autocast_adapter_dtype=False``: adapters in the model's dtype,
        like lorafx's.  Timed by default when --dtype is not float32 (in float32 it is
        the same model as ``peft``).
lorafx  ``lorafx.compile(copy, example_kwargs={input_ids, labels}, r, alpha=2r,
        target_modules=[same], dropout=0)`` + AdamW on its trainable params.

DoRA (``--dora``): ``peft`` and ``lorafx`` both train weight-decomposed adapters
(``use_dora=True``, Liu et al. 2024): PEFT forms the merged weight W + s·B A of every
adapted layer each step to take its row norms; lorafx's ``lora_dora`` op takes them
from W Aᵀ and A Aᵀ without it.  The check also copies PEFT's magnitude vectors into
lorafx, and the table adds each mode's min-max step time.

Presets (``--preset``) set the model shape; explicit shape options override them:
``default`` is the shape above (hidden 512, 4 layers, batch 4 x seq 256, vocab 8000);
``launch`` is a launch-bound model (hidden 64, intermediate 176, 4 heads, 2 layers,
vocab 512, batch 1 x seq 8) whose every GEMM takes microseconds, so a step's time is
the per-op overhead on the host: Python, dispatch, autograd and launches.

Choosing lorafx's passes (``--lorafx-passes``)
----------------------------------------------
A SPEC edits the pass list ``lorafx.compile`` runs by default: ``default`` (no
change), or comma-separated items ``+Name`` (add the pass ``lorafx.passes.Name()``
after the default rewrites, before AnnotateCost and SetTrainingMode), ``-Name``
(drop a default pass) or ``Name`` (same as ``+Name``); names are the pass classes
or their snake_case file names (``causal_mask``, ``recompute_inputs``,
``fuse_siblings``), e.g. ``--lorafx-passes -RecomputeInputs,+FuseSiblings``.
Several SPECs separated by ``;`` build several lorafx modes, timed interleaved
with the others: the first configures the ``lorafx`` row, each further one adds a
row ``lorafx[SPEC]`` (checked against PEFT like ``lorafx``), e.g.
``--lorafx-passes "default;-CausalMaskToIsCausal;+FuseSiblings"``.

Before timing, a correctness check runs (skip with ``--no-check``): with B = 0 the
three losses agree; then PEFT's lora_B are set to random values and every A/B is
copied from PEFT into lorafx, and the losses and all adapter gradients of PEFT and
lorafx must be allclose.  The adapters stay equal for the timing run, so both
LoRA modes do the same arithmetic on the same values.

Timing is round-robin: each round runs one step of every mode, with the order
rotated every round, so machine noise hits all modes alike.  Reported: median
(and p10/p90) wall-clock step time per mode, the ratio to the floor ("vs floor":
of the medians; "paired": the median over rounds of the step / the floor's step
in the same round, which cancels slow phases of a shared machine), and
PEFT/lorafx (of the step times, and of the time each spends above the floor).
"cpu ms" is the median process CPU time of a step (all threads): on a busy
machine it is less disturbed than wall time, since time spent descheduled does
not count (run with --threads 1 to make it a clean work measure; with several
threads it also counts OpenMP spin-waiting).

Peak memory (``--no-memory`` skips it)
--------------------------------------
peak = resident + transient, measured on one (post-warm-up) step of each mode:

* resident: bytes of the distinct tensor storages the mode holds when the step
  starts -- model parameters and buffers (the frozen base weights plus adapters),
  AdamW state (exp_avg, exp_avg_sq, step), and any ``.grad``.  Storages shared
  between tensors are counted once.
* transient (CPU): the high-water mark of the running sum of every allocation
  minus every free that PyTorch's CPU allocator makes during the step, read from
  ``torch.profiler.profile(profile_memory=True)`` allocation events in time order
  (activations, saved tensors, logits, gradients -- including gradients of the
  adapters -- and all kernel temporaries).  Allocations are exact byte counts,
  so on CPU the number is deterministic (identical from run to run, and with 1 or
  2 threads); before measuring, the script checks the probe on a known sequence
  of allocations (peak 20000 B) and skips memory if it disagrees.  Memory that
  is not allocated through PyTorch's allocator (BLAS scratch, Python objects) is
  not counted.
* transient (CUDA): ``torch.cuda.max_memory_allocated()`` minus
  ``torch.cuda.memory_allocated()`` at the start of the step (after
  ``reset_peak_memory_stats``).

Also reported per mode: "saved MB", the bytes of the distinct non-parameter
storages that autograd saves for backward during the forward, counted with
``torch.autograd.graph.saved_tensors_hooks``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # silence the profiler's start/stop log lines

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_MODES = ("floor", "peft", "peft_native", "lorafx")
PEFT_MODES = ("peft", "peft_native")
PRESETS = {
    "default": dict(layers=4, hidden=512, intermediate=1376, heads=8, vocab=8000, batch=4, seq=256),
    "launch": dict(layers=2, hidden=64, intermediate=176, heads=4, vocab=512, batch=1, seq=8),
}
MB = 1024.0 * 1024.0


# ----------------------------------------------------------------------------- setup
def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model-shape options shared by the benchmarks in tools/ (``--preset`` fills the
    ones not given; see ``apply_preset``)."""
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="model shape: default (hidden 512, 4 layers, 4x256 tokens) or launch (hidden 64, "
                        "2 layers, 1x8 tokens: per-op overhead dominates); shape options override it")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (alpha = 2r)")
    for name in PRESETS["default"]:
        p.add_argument(f"--{name}", type=int, default=None, help=f"default: the preset's ({PRESETS['default'][name]} "
                                                                   f"in the default preset)")


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the shape options left unset from ``args.preset``."""
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def parse_args(argv=None) -> argparse.Namespace:
    parts = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description="\n\n".join([parts[0]] + parts[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--steps", type=int, default=60, help="timed rounds (one step of every mode per round)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--modes", default=None,
                   help="comma-separated subset of floor,peft,peft_native,lorafx (default: all; peft_native "
                        "only when --dtype is not float32)")
    p.add_argument("--floor", default="exact", choices=["exact", "embeds"],
                   help="where the floor's backward starts: at layer 0's q/k/v outputs (exact, default) "
                        "or at inputs_embeds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON here")
    p.add_argument("--no-check", action="store_true", help="skip the PEFT == lorafx correctness check")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--dora", action="store_true",
                   help="DoRA: PEFT and lorafx with use_dora=True (weight-decomposed adapters)")
    p.add_argument("--lorafx-passes", default=None, metavar="SPEC[;SPEC...]",
                   help="edit lorafx's default pass list: 'default' or items +Name / -Name (comma-separated); "
                        "several ';'-separated SPECs add modes lorafx[SPEC] (see the notes below)")
    args = apply_preset(p.parse_args(argv))
    if args.modes is None:
        args.modes = ",".join(m for m in ALL_MODES if m != "peft_native" or args.dtype != "float32")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad or not modes:
        p.error(f"--modes: unknown mode(s) {bad}; choose from {','.join(ALL_MODES)}")
    args.modes = [m for m in ALL_MODES if m in modes]
    specs = [x.strip() for x in (args.lorafx_passes or "").split(";") if x.strip()]
    if specs and "lorafx" not in args.modes:
        p.error("--lorafx-passes needs the lorafx mode")
    args.lorafx_specs = specs
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.hidden % args.heads:
        p.error("--hidden must be divisible by --heads")
    return args


def build_base(args, device, dtype):
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 128), use_cache=False, attn_implementation="sdpa",
        attention_dropout=0.0,
    )
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Mode:
    """One benchmarked configuration: a model, a step function and its optimizer."""

    def __init__(self, name: str, model: torch.nn.Module, step: Callable[[], torch.Tensor],
                 optimizer: Optional[torch.optim.Optimizer], setup_seconds: float):
        self.name = name
        self.model = model
        self.step = step
        self.optimizer = optimizer
        self.setup_seconds = setup_seconds
        self.times: List[float] = []
        self.cpu_times: List[float] = []
        self.last_loss: Optional[float] = None
        self.memory: Dict[str, int] = {}


def trainable(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_floor(base, ids, kind: str = "exact") -> Mode:
    """The frozen base model, backpropagated without any weight gradient.

    ``exact``: every target linear whose input does not require grad (layer 0's
    q/k/v) gets a forward hook that turns its output into a leaf requiring grad --
    exactly where a LoRA adapter makes gradients start -- so backward does all the
    base-model work a LoRA step needs and nothing else.  ``embeds``: the embedding
    output is the leaf, so backward also runs layer 0's q/k/v input gradients and
    input norm (a floor that is slightly too high).
    """
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()
    leaves: List[torch.Tensor] = []

    def start_grad(module, inputs, output):
        if torch.is_grad_enabled() and not inputs[0].requires_grad and not output.requires_grad:
            output = output.detach().requires_grad_(True)
            leaves.append(output)
            return output
        return None

    if kind == "exact":
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                module.register_forward_hook(start_grad)

    def step():
        leaves.clear()
        if kind == "exact":
            loss = model(input_ids=ids, labels=ids).loss
        else:
            emb = embed(ids).detach().requires_grad_(True)  # leaf: backward goes all the way down to it
            loss = model(inputs_embeds=emb, labels=ids).loss
        loss.backward()
        leaves.clear()
        return loss.detach()

    return Mode("floor", model, step, None, time.perf_counter() - t0)


def make_train_step(model, ids, opt):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def make_peft(base, ids, r, name: str = "peft", dora: bool = False) -> Mode:
    """PEFT's LoRA (DoRA with ``dora``); ``peft_native`` passes ``autocast_adapter_dtype=False``
    (adapters in the model's dtype instead of float32)."""
    import peft
    t0 = time.perf_counter()
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), lora_dropout=0.0, use_dora=dora)
    model = peft.get_peft_model(copy.deepcopy(base), cfg, autocast_adapter_dtype=(name != "peft_native"))
    model.train()
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)
    return Mode(name, model, make_train_step(model, ids, opt), opt, time.perf_counter() - t0)


def make_lorafx(base, ids, r, spec: Optional[str] = None, name: str = "lorafx", dora: bool = False) -> Mode:
    import lorafx
    t0 = time.perf_counter()
    source = copy.deepcopy(base)
    kwargs = {"input_ids": ids, "labels": ids}
    options = dict(r=r, alpha=2 * r, target_modules=list(TARGETS), dropout=0.0)
    if dora:
        options["use_dora"] = True
    if spec is not None and spec != "default":  # the default pipeline, edited
        model = lorafx.compile(source, example_kwargs=kwargs, seed=0,
                               passes=edit_passes(lorafx.default_passes(**options), spec))
    else:
        model = lorafx.compile(source, example_kwargs=kwargs, seed=0, **options)
    model.train()
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)
    return Mode(name, model, make_train_step(model, ids, opt), opt, time.perf_counter() - t0)


def _pass_class(token: str):
    import lorafx.passes as P
    from lorafx.pipeline import Pass
    camel = "".join(w[:1].upper() + w[1:] for w in token.split("_")) if "_" in token or token.islower() else token
    classes = {n: c for n, c in vars(P).items() if isinstance(c, type) and issubclass(c, Pass)}
    for n, c in classes.items():
        module = c.__module__.rsplit(".", 1)[-1]
        if n in (token, camel) or token == module:
            return c
    raise SystemExit(f"--lorafx-passes: unknown pass {token!r}; known: {', '.join(sorted(classes))}")


def edit_passes(passes: list, spec: str) -> list:
    """The default pass list edited by ``spec`` (see --lorafx-passes); added passes go before
    the pass that provides ``"cost"`` (AnnotateCost)."""
    passes = list(passes)
    for item in (x.strip() for x in spec.split(",")):
        if not item or item == "default":
            continue
        remove = item.startswith("-")
        cls = _pass_class(item.lstrip("+-"))
        if remove:
            if not any(type(p) is cls for p in passes):
                raise SystemExit(f"--lorafx-passes: {cls.__name__} is not in the default pipeline")
            passes = [p for p in passes if type(p) is not cls]
        elif not any(type(p) is cls for p in passes):
            at = next((i for i, p in enumerate(passes) if "cost" in p.provides), len(passes))
            passes.insert(at, cls())
    return passes


# ----------------------------------------------------------------------------- checks
_PEFT_NAMES = {"lora_magnitude": "lora_magnitude_vector"}  # lorafx's DoRA magnitude -> PEFT's module


def _peft_name(site: str, which: str) -> str:
    return f"base_model.model.{site}.{_PEFT_NAMES.get(which, which)}.default.weight"


def adapter_pairs(peft_model, fx_model):
    """[(name, peft_param, lorafx_param)] for every adapter matrix, matched by module path."""
    peft_params = dict(peft_model.named_parameters())
    pairs = []
    for name, p in fx_model.trainable_parameters().items():
        site, which = name.rsplit(".", 1)
        q = peft_params.get(_peft_name(site, which))
        if q is None or q.shape != p.shape:
            raise SystemExit(f"check: lorafx adapter {name} {tuple(p.shape)} has no PEFT counterpart "
                             f"{_peft_name(site, which)}")
        pairs.append((name, q, p))
    n_peft = sum(1 for p in peft_params.values() if p.requires_grad)
    if n_peft != len(pairs):
        raise SystemExit(f"check: PEFT has {n_peft} adapter matrices, lorafx {len(pairs)}")
    return pairs


def _compare_adapter_grads(label: str, ref_pairs, pairs, tol) -> float:
    """Max relative error of ``pairs``' adapter gradients against ``ref_pairs``' (compared in
    float32: PEFT keeps float32 adapters in a bfloat16 model by default)."""
    worst = 0.0
    for (name, q, _), (_, _, p) in zip(ref_pairs, pairs):
        if q.grad is None or p.grad is None:
            raise SystemExit(f"check failed: {label}: no gradient for {name}")
        want, got = q.grad.float(), p.grad.float()
        scale = want.abs().max().item() or 1.0
        err = (want - got).abs().max().item() / scale
        worst = max(worst, err)
        if not torch.allclose(want, got, rtol=tol["rtol"] * 10, atol=tol["grad_atol"] * scale):
            raise SystemExit(f"check failed: {label}: gradient of {name} differs from PEFT's (max rel err {err:.2e})")
    return worst


def check_equal_work(modes: Dict[str, Mode], ids, seed: int, dtype) -> dict:
    """Losses agree at B = 0; with equal (random) A/B, every LoRA mode agrees with PEFT
    (``peft``, else ``peft_native``) in loss and adapter grads."""
    result: dict = {}
    # grad_atol: a fraction of the largest gradient entry.  In bfloat16 the adapter products
    # round at 2^-8 and sum over every token, so adapter gradients of PEFT's float32 adapters
    # and lorafx's bfloat16 ones differ by a few percent of that entry at the default shape.
    tol = (dict(rtol=1e-4, atol=1e-5, grad_atol=1e-5) if dtype == torch.float32
           else dict(rtol=2e-2, atol=2e-2, grad_atol=6e-2))
    with torch.no_grad():
        losses = {}
        for name in ("floor", *PEFT_MODES, "lorafx"):
            if name in modes:
                losses[name] = modes[name].model(input_ids=ids, labels=ids).loss.item()
    ref = next(iter(losses.values()))
    result["losses_B0"] = losses
    for name, v in losses.items():
        if not math.isclose(v, ref, rel_tol=tol["rtol"], abs_tol=tol["atol"]):
            raise SystemExit(f"check failed: with B = 0 the {name} loss {v} != {ref}")
    ref_name = next((n for n in PEFT_MODES if n in modes), None)
    if ref_name is None or "lorafx" not in modes:
        return result

    pm = modes[ref_name].model
    ref_pairs = adapter_pairs(pm, modes["lorafx"].model)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, q, _ in ref_pairs:
            if name.endswith("lora_B"):
                q.copy_(torch.randn(q.shape, generator=gen) * 0.02)
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    losses = {ref_name: loss.item()}
    worst = {}
    others = [n for n in modes if n != ref_name and n != "floor"]  # peft_native, lorafx, lorafx[SPEC]...
    for name in others:
        model = modes[name].model
        pairs = (adapter_pairs(model, modes["lorafx"].model) if name in PEFT_MODES
                 else adapter_pairs(pm, model))
        with torch.no_grad():  # the same A/B as the reference PEFT model's
            for (_, q, _), (_, a, b) in zip(ref_pairs, pairs):
                (a if name in PEFT_MODES else b).copy_(q)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses[name] = loss.item()
        if not math.isclose(losses[name], losses[ref_name], rel_tol=tol["rtol"], abs_tol=tol["atol"]):
            raise SystemExit(f"check failed: {ref_name} loss {losses[ref_name]} != {name} loss {losses[name]}")
        if name in PEFT_MODES:  # pairs are (name, this PEFT's param, lorafx's): compare this PEFT's
            pairs = [(n, a, a) for n, a, _ in pairs]
        worst[name] = _compare_adapter_grads(name, ref_pairs, pairs, tol)
    for name in (ref_name, *others):
        modes[name].optimizer.zero_grad(set_to_none=True)
    result["reference"] = ref_name
    result["losses_equal_AB"] = losses
    result["max_rel_grad_err"] = worst
    return result


# ----------------------------------------------------------------------------- memory
def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr()), s.nbytes()


def resident_bytes(mode: Mode) -> int:
    """Distinct storages held when a step starts: params, buffers, grads, optimizer state."""
    seen: Dict[tuple, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            k, n = _storage_key(t)
            seen[k] = n

    for p in mode.model.parameters():
        add(p)
        add(p.grad)
    for b in mode.model.buffers():
        add(b)
    source = mode.model.__dict__.get("_source")  # a CompiledModel keeps its source model alive
    if source is not None:  # (its weights are shared, except those FoldLoRAIntoBase copied)
        for t in (*source.parameters(), *source.buffers()):
            add(t)
    if mode.optimizer is not None:
        for state in mode.optimizer.state.values():
            for v in state.values():
                add(v)
    return sum(seen.values())


def _allocation_events(prof):
    """(time_ns, bytes) for every allocator event the profiler recorded (frees are negative)."""
    from torch._C._profiler import _EventType
    out = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            out.append((node.start_time_ns, node.extra_fields.alloc_size, str(node.extra_fields.device)))
        stack.extend(node.children)
    out.sort(key=lambda e: e[0])
    return out


def transient_peak_cpu(step) -> int:
    from torch.profiler import ProfilerActivity, profile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    running = peak = 0
    for _, nbytes, dev in _allocation_events(prof):
        if dev.startswith("cpu"):
            running += nbytes
            peak = max(peak, running)
    return peak


def validate_cpu_probe() -> None:
    """The profiler-based measure must return the exact high-water mark of a known sequence."""
    def known():
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B live
        b = torch.empty(2000, dtype=torch.float32)  # 12000
        del a                                       # 8000
        c = torch.empty(3000, dtype=torch.float32)  # 20000 <- peak
        del b, c                                    # 0
        d = torch.ones(10, 10).mm(torch.ones(10, 10))  # 400 + 400 + 400 = 1200 live at most
        del d
    got = transient_peak_cpu(known)
    if got != 20000:
        raise RuntimeError(f"profiler memory probe measured {got} B for a known 20000 B peak")


def transient_peak_cuda(step, device) -> int:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def saved_bytes(mode: Mode) -> int:
    """Bytes of distinct non-parameter storages saved for backward during one step."""
    params = {_storage_key(t)[0] for t in list(mode.model.parameters()) + list(mode.model.buffers())}
    seen: Dict[tuple, int] = {}

    def pack(t):
        k, n = _storage_key(t)
        if k not in params:
            seen[k] = n
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mode.step()
    return sum(seen.values())


def measure_memory(modes: Dict[str, Mode], device) -> bool:
    if device.type != "cuda":
        try:
            validate_cpu_probe()
        except Exception as e:  # private profiler API changed, or the probe disagrees
            print(f"peak memory skipped: {type(e).__name__}: {e}", file=sys.stderr)
            return False
    for mode in modes.values():
        gc.collect()
        mode.memory["resident"] = resident_bytes(mode)
        if device.type == "cuda":
            mode.memory["transient"] = transient_peak_cuda(mode.step, device)
        else:
            mode.memory["transient"] = transient_peak_cpu(mode.step)
        mode.memory["peak"] = mode.memory["resident"] + mode.memory["transient"]
        mode.memory["saved"] = saved_bytes(mode)
    return True


# ----------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rounds(modes: List[Mode], rounds: int, device, record: bool, desc: str, progress: bool):
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=rounds, desc=desc, unit="round", leave=False, dynamic_ncols=True)
    n = len(modes)
    for i in range(rounds):
        order = modes[i % n:] + modes[:i % n]  # rotate so no mode always runs first
        for mode in order:
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            loss = mode.step()
            sync(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            mode.last_loss = float(loss)
            if record:
                mode.times.append(dt)
                mode.cpu_times.append(dc)
            del loss
        if bar is not None:
            if record:
                bar.set_postfix_str("  ".join(f"{m.name} {statistics.median(m.times) * 1e3:.0f}ms" for m in modes),
                                    refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()


def percentile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ----------------------------------------------------------------------------- report
def summarize(args, modes: Dict[str, Mode], check: dict, env: dict) -> dict:
    rows = {}
    floor = modes.get("floor")
    floor_ms = statistics.median(floor.times) * 1e3 if floor else None
    floor_peak = floor.memory.get("peak") if floor else None
    for name, m in modes.items():
        med = statistics.median(m.times) * 1e3
        row = {
            "median_ms": med, "mean_ms": statistics.fmean(m.times) * 1e3, "min_ms": min(m.times) * 1e3,
            "p10_ms": percentile(m.times, 0.1) * 1e3, "p90_ms": percentile(m.times, 0.9) * 1e3,
            "vs_floor": med / floor_ms if floor_ms else None,
            # median over rounds of (this mode's step / the floor's step in the same round)
            "vs_floor_paired": statistics.median(t / f for t, f in zip(m.times, floor.times)) if floor else None,
            "cpu_median_ms": statistics.median(m.cpu_times) * 1e3,
            "times_ms": [t * 1e3 for t in m.times],
            "cpu_times_ms": [t * 1e3 for t in m.cpu_times],
            "setup_s": m.setup_seconds, "last_loss": m.last_loss,
            "trainable_params": sum(p.numel() for p in trainable(m.model)),
        }
        if m.memory:
            row["memory_bytes"] = dict(m.memory)
            row["peak_mb"] = m.memory["peak"] / MB
            if floor_peak:
                row["peak_over_floor_mb"] = (m.memory["peak"] - floor_peak) / MB
                row["peak_vs_floor"] = m.memory["peak"] / floor_peak
        rows[name] = row
    out = {"config": {k: v for k, v in vars(args).items()}, "env": env, "check": check, "modes": rows}
    for peft_name in PEFT_MODES:  # "peft_over_lorafx", "peft_native_over_lorafx", ...
        if peft_name not in rows or "lorafx" not in rows:
            continue
        key = f"{peft_name}_over_lorafx"
        out[key] = rows[peft_name]["median_ms"] / rows["lorafx"]["median_ms"]
        out[f"{key}_paired"] = statistics.median(
            p / q for p, q in zip(modes[peft_name].times, modes["lorafx"].times))
        if floor_ms:
            extra_p, extra_f = rows[peft_name]["median_ms"] - floor_ms, rows["lorafx"]["median_ms"] - floor_ms
            out[f"{key}_above_floor"] = extra_p / extra_f if extra_f > 0 else None
        if "memory_bytes" in rows[peft_name] and "memory_bytes" in rows["lorafx"]:
            out[f"{key}_peak_memory"] = rows[peft_name]["memory_bytes"]["peak"] / rows["lorafx"]["memory_bytes"]["peak"]
    return out


def print_table(summary: dict) -> None:
    rows = summary["modes"]
    has_mem = all("peak_mb" in r for r in rows.values())
    ranges = summary["config"].get("dora")
    head = ["mode", "median ms", "p10-p90 ms"] + (["min-max ms"] if ranges else []) + ["vs floor", "paired", "cpu ms"]
    if has_mem:
        head += ["peak MB", "vs floor", "saved MB"]
    table = [head]
    for name, r in rows.items():
        line = [name, f"{r['median_ms']:.1f}", f"{r['p10_ms']:.0f}-{r['p90_ms']:.0f}"]
        if ranges:
            line.append(f"{min(r['times_ms']):.0f}-{max(r['times_ms']):.0f}")
        line += [f"{r['vs_floor']:.3f}x" if r["vs_floor"] else "-",
                f"{r['vs_floor_paired']:.3f}x" if r.get("vs_floor_paired") else "-", f"{r['cpu_median_ms']:.0f}"]
        if has_mem:
            over = r.get("peak_over_floor_mb")
            line += [f"{r['peak_mb']:.1f}",
                     (f"+{over:.1f} MB ({(r['peak_vs_floor'] - 1) * 100:+.1f}%)" if over is not None else "-"),
                     f"{r['memory_bytes']['saved'] / MB:.1f}"]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    print(fmt(table[0]))
    print(fmt(["-" * w for w in widths]))
    for row in table[1:]:
        print(fmt(row))
    for peft_name, label in (("peft", "PEFT"), ("peft_native", "PEFT (autocast_adapter_dtype=False)")):
        key = f"{peft_name}_over_lorafx"
        if key not in summary:
            continue
        print(f"\n{label} / lorafx step time: {summary[key]:.3f}x"
              + (" (>1: lorafx faster)" if summary[key] >= 1 else " (<1: lorafx slower)")
              + f"; paired per round: {summary[key + '_paired']:.3f}x")
        above = summary.get(f"{key}_above_floor")
        if above is not None:
            print(f"{label} / lorafx time above the floor: {above:.3f}x")
        if f"{key}_peak_memory" in summary:
            print(f"{label} / lorafx peak memory: {summary[key + '_peak_memory']:.3f}x")


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    dtype = getattr(torch, args.dtype)
    import transformers
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "device": str(device), "cpu_count": os.cpu_count(),
           "platform": platform.platform()}
    try:
        import peft
        env["peft"] = peft.__version__
    except ImportError:
        if any(m in args.modes for m in PEFT_MODES):
            raise SystemExit("peft is not installed: pip install peft (or --modes floor,lorafx)")
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)

    print(f"LlamaForCausalLM: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.heads} heads, vocab {args.vocab}; batch {args.batch} x seq {args.seq}; "
          f"{'DoRA' if args.dora else 'LoRA'} r={args.rank} "
          f"alpha={2 * args.rank} on {','.join(TARGETS)}")
    print(f"device {device} {args.dtype}, {env['threads']} threads, torch {env['torch']}, "
          f"transformers {env['transformers']}, peft {env.get('peft', '-')}")

    base = build_base(args, device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    makers = {"floor": lambda: make_floor(base, ids, args.floor),
              "peft": lambda: make_peft(base, ids, args.rank, dora=args.dora),
              "peft_native": lambda: make_peft(base, ids, args.rank, "peft_native", dora=args.dora),
              "lorafx": lambda: make_lorafx(base, ids, args.rank, args.lorafx_specs[0] if args.lorafx_specs else None,
                                            dora=args.dora)}
    names = list(args.modes)
    for spec in args.lorafx_specs[1:]:  # further --lorafx-passes SPECs: one more lorafx mode each
        name = f"lorafx[{spec}]"
        makers[name] = lambda spec=spec, name=name: make_lorafx(base, ids, args.rank, spec, name, dora=args.dora)
        names.append(name)
    modes: Dict[str, Mode] = {}
    for name in names:
        modes[name] = makers[name]()
        print(f"  built {name:<11} in {modes[name].setup_seconds:.1f}s "
              f"({sum(p.numel() for p in trainable(modes[name].model)):,} trainable params)")
    del base

    check = {}
    if not args.no_check:
        check = check_equal_work(modes, ids, args.seed, dtype)
        msg = "check: losses at B=0 agree"
        if "losses_equal_AB" in check:
            l, ref = check["losses_equal_AB"], check["reference"]
            msg += (f"; with equal random A/B, {ref} loss {l[ref]:.6f} == "
                    + ", ".join(f"{n} {v:.6f}" for n, v in l.items() if n != ref)
                    + ", adapter grads max rel err "
                    + ", ".join(f"{n} {v:.1e}" for n, v in check["max_rel_grad_err"].items()))
        print(msg)

    order = list(modes.values())
    progress = not args.no_progress
    run_rounds(order, args.warmup, device, record=False, desc="warm-up", progress=progress)
    has_memory = not args.no_memory and measure_memory(modes, device)
    gc.collect()
    gc.freeze()  # keep the cyclic GC from scanning the models during timed steps
    run_rounds(order, args.steps, device, record=True, desc="timing", progress=progress)
    gc.unfreeze()

    summary = summarize(args, modes, check, env)
    print(f"\n{args.steps} timed rounds after {args.warmup} warm-up rounds, interleaved round-robin:\n")
    print_table(summary)
    if has_memory:
        what = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                else "profiler allocation high-water mark")
        print(f"\npeak MB = resident (params, buffers, grads, AdamW state) + transient ({what}) of one step; "
              "saved MB = non-parameter tensors saved for backward")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {args.json}")
    return summary


if __name__ == "__main__":
    main()
