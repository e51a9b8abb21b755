"""The ``lorafx`` command line.

    lorafx compile --model tiny-llama --target cpu --out out/ --r 8 --alpha 16
    lorafx compile --model ./my-hf-folder --target-modules q_proj,v_proj --out out/
    lorafx models

``compile`` loads the model (a built-in name, see ``lorafx models``, or a local
Hugging Face folder), compiles it with ``lorafx.compile``, prints what every pass
did and writes to ``--out``:

* ``graph.txt``    the rewritten graph, one node a line, with lorafx metadata
* ``graph.svg``    a drawing of it, adapters in red, repeated layers folded (skipped with ``--no-draw``)
* ``graph.html``   every node nested by module, in sections that fold and unfold in a browser
* ``report.json``  the compile report plus the model, target and options
* ``passes/``      the graph after capture and after every pass

Errors (unknown model or target, bad options, a model that does not capture)
print one ``error: ...`` line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import threading
import time
from typing import List, Optional

__all__ = ["main", "build_parser", "parse_target_modules"]

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130
_REGEX_CHARS = set("*+?[](){}|^$\\")


class CLIError(Exception):
    """A user error: printed as ``error: <message>``, exit status 2."""


def parse_target_modules(text: Optional[str]):
    """``None`` -> default ("all-linear"); ``"all-linear"``; ``"q_proj,v_proj"`` -> a list
    of module names; anything with regex characters (``.*_proj``) -> a regex string."""
    if text is None:
        return None
    text = text.strip()
    if not text:
        raise CLIError("--target-modules is empty; give module names (q_proj,v_proj), a regex or all-linear")
    if text == "all-linear":
        return text
    if any(c in _REGEX_CHARS for c in text):
        try:
            re.compile(text)
        except re.error as e:
            raise CLIError(f"--target-modules {text!r} is not a valid regex: {e}") from None
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise CLIError("--target-modules is empty; give module names (q_proj,v_proj), a regex or all-linear")
    return names


# -- progress -------------------------------------------------------------------------


class _Status:
    """A one-line spinner with elapsed seconds on stderr (a plain line when not a terminal)."""

    FRAMES = "|/-\\"

    def __init__(self, message: str, stream=None):
        self.message = message
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread = None
        self._start = time.perf_counter()

    def __enter__(self):
        self._start = time.perf_counter()
        if self.tty:
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        else:
            print(f"{self.message} ...", file=self.stream, flush=True)
        return self

    def _spin(self):
        i = 0
        while not self._stop.wait(0.1):
            elapsed = time.perf_counter() - self._start
            self.stream.write(f"\r{self.FRAMES[i % 4]} {self.message} ... {elapsed:.1f}s\x1b[K")
            self.stream.flush()
            i += 1

    def done(self, text: Optional[str] = None):
        """Stop spinning and print ``text`` (default: the message and the time taken)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        elapsed = time.perf_counter() - self._start
        line = text or f"{self.message}: done in {elapsed:.1f}s"
        if self.tty:
            self.stream.write("\r\x1b[K")
        print(line, file=self.stream, flush=True)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.done()
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            if self.tty:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
        return False


def _stop_at_pipeline(status: _Status):
    """An instrument that ends the capture spinner when the pipeline starts."""
    from lorafx.pipeline import Instrument

    class _CaptureDone(Instrument):
        def before_pipeline(self, gm):
            status.done(f"captured {len(gm.graph.nodes)} nodes in {time.perf_counter() - status._start:.1f}s")

    return _CaptureDone()


# -- commands ---------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _adapter_summary(cm) -> str:
    records = cm.lora_records()
    kinds = collections.Counter(site.rsplit(".", 1)[-1] for site in records)
    ranks = sorted({rec.r for rec in records.values()})
    scales = sorted({rec.scale for rec in records.values()})
    parts = ", ".join(f"{k} x{v}" for k, v in kinds.items())
    return (f"{len(records)} adapted modules ({parts}); rank {'/'.join(map(str, ranks))}, "
            f"scale {'/'.join(f'{s:g}' for s in scales)}")


def cmd_models(args, out=None) -> int:
    from lorafx.models import BUILTIN_MODELS, DEFAULT_MODEL
    out = out or sys.stdout
    width = max(len(n) for n in BUILTIN_MODELS)
    print("built-in models (lorafx compile --model NAME; or pass a local Hugging Face folder):", file=out)
    for name, (description, _) in BUILTIN_MODELS.items():
        mark = "*" if name == DEFAULT_MODEL else " "
        print(f" {mark} {name.ljust(width)}  {description}", file=out)
    print("(* default)", file=out)
    return EXIT_OK


def cmd_overhead(args, out=None) -> int:
    """The least FLOP overhead of LoRA over the frozen floor (lorafx.schedules.min_lora_overhead)."""
    from lorafx.schedules import min_lora_overhead
    out = out or sys.stdout
    shape = dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, batch=args.batch,
                 seq=args.seq, vocab=args.vocab)
    print(f"LLaMA-shaped: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"vocab {args.vocab}, {args.batch} x {args.seq} tokens; LoRA on q,k,v,o,gate,up,down", file=out)
    for rank in args.rank or [8, 64]:
        if rank > min(args.hidden, args.intermediate):
            raise CLIError(f"--rank {rank} is larger than the smallest layer dimension "
                           f"({min(args.hidden, args.intermediate)})")
        d = min_lora_overhead(rank, **shape)
        print(f"r={rank}: adapter-gradient bound {d['bound_over_linear_floor']:.1%} of the linear floor "
              f"({d['bound_over_floor']:.1%} of the floor with attention + LM head); best implemented "
              f"schedules {d['best_over_linear_floor']:.1%} / {d['best_over_floor']:.1%}; {d['best_schedules']}",
              file=out)
    return EXIT_OK


def _hardware_options(args) -> dict:
    """The cim target's options given on the command line."""
    out = {}
    if args.noise is not None:
        out["noise"] = None if args.noise.lower() == "none" else args.noise
    for name in ("noise_sigma", "noise_seed", "adc_bits", "dac_bits", "rram_tiles", "sram_kib", "chip"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    if args.halora is not None:
        out["halora"] = False if args.halora == "off" else {"mode": args.halora}
    return out


def cmd_compile(args, out=None) -> int:
    out = out or sys.stdout
    import lorafx
    from lorafx.hw_targets import get_target
    from lorafx.models import load_model, resolve_model

    # Validate everything cheap before the (slow) load and capture.
    options = {"r": args.r, "alpha": args.alpha, "dropout": args.dropout}
    if args.rank_budget is not None:
        options.update(rank_budget=args.rank_budget, proxy=args.proxy, allocation=args.allocation)
    if args.shortcuts:
        options["shortcuts"] = True
    if args.sparsity is not None:
        options.update(sparsity=args.sparsity, sparsity_method=args.sparsity_method,
                       sparsity_pattern=args.sparsity_pattern, sparse_grad=args.sparse_grad)
    modules = parse_target_modules(args.target_modules)
    if modules is not None:
        options["target_modules"] = modules
    hardware = _hardware_options(args)
    if hardware and args.target != "cim":
        raise CLIError(f"{', '.join('--' + k.replace('_', '-') for k in hardware)} set(s) the cim target: "
                       "add --target cim")
    options.update(hardware)
    try:
        target = get_target(args.target, **hardware)
    except (ValueError, TypeError) as e:
        raise CLIError(_one_line(e)) from None
    try:  # against the declarations, then by building every pass of the pipeline
        lorafx.default_passes(target, fold_a=args.fold_a, **options)
    except (ValueError, TypeError) as e:
        raise CLIError(re.sub(r"^(lorafx\.default_passes|lorafx\.compile|InsertLoRA|AllocateRanks|PruneWeights): ", "", _one_line(e))) from None
    try:
        resolve_model(args.model)
    except ValueError as e:
        raise CLIError(_one_line(e)) from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out} exists and is not a folder")

    with _Status(f"loading {args.model}") as status:
        try:
            model, example_kwargs = load_model(args.model, seed=args.seed)
        except (ValueError, ImportError, OSError) as e:
            raise CLIError(_one_line(e)) from None
        n_params = sum(p.numel() for p in model.parameters())
        status.done(f"loaded {args.model}: {type(model).__name__}, {n_params:,} parameters "
                    f"in {time.perf_counter() - status._start:.1f}s")

    os.makedirs(args.out, exist_ok=True)
    passes_dir = os.path.join(args.out, "passes")
    if os.path.isdir(passes_dir):  # stale dumps from an earlier run would be mixed in
        for name in os.listdir(passes_dir):
            if re.fullmatch(r"\d\d_.*\.(txt|svg)", name):
                os.remove(os.path.join(passes_dir, name))
    shape = "x".join(str(d) for d in example_kwargs["input_ids"].shape)
    with _Status(f"capturing {type(model).__name__} with torch.export (input_ids {shape})") as status:
        try:
            # the per-pass bar only on a terminal: piped, tqdm's carriage returns garble logs
            # Wanda scores weights on data: the CLI has the example batch only
            calibration = [example_kwargs] if options.get("sparsity_method") == "wanda" else None
            cm = lorafx.compile(model, target=target.name, example_kwargs=example_kwargs, progress=status.tty,
                                calibration=calibration,
                                instruments=[_stop_at_pipeline(status), lorafx.DumpGraphs(passes_dir)],
                                fold_a=args.fold_a, seed=args.seed, **options)
        except (lorafx.CaptureError, lorafx.PassError, ValueError, TypeError, NotImplementedError) as e:
            raise CLIError(_one_line(e)) from None

    report = cm.report()
    shown_modules = modules if modules is not None else "all-linear"
    modules_text = ",".join(shown_modules) if isinstance(shown_modules, list) else shown_modules
    print(file=out)
    print(f"model    {args.model} ({type(model).__name__}, {n_params:,} parameters)", file=out)
    print(f"target   {target.name}", file=out)
    budget = (f" rank_budget={args.rank_budget} proxy={args.proxy} allocation={args.allocation}"
              if args.rank_budget is not None else "")
    sparse = (f" sparsity={args.sparsity} sparsity_method={args.sparsity_method} sparsity_pattern="
              f"{args.sparsity_pattern} sparse_grad={args.sparse_grad}" if args.sparsity is not None else "")
    print(f"options  r={args.r} alpha={args.alpha:g} target_modules={modules_text} "
          f"dropout={args.dropout:g} seed={args.seed}{budget}" + (" shortcuts" if args.shortcuts else "") + sparse
          + "".join(f" {k}={v}" for k, v in hardware.items()), file=out)
    print(file=out)
    print(str(report), file=out)
    print(f"adapters {_adapter_summary(cm)}", file=out)
    total = report.capture_seconds + sum(r.seconds for r in report.passes)
    print(f"time     {total:.2f}s (capture {report.capture_seconds:.2f}s, passes "
          f"{total - report.capture_seconds:.2f}s)", file=out)

    files = {}
    files["graph.txt"] = os.path.join(args.out, "graph.txt")
    with open(files["graph.txt"], "w") as f:
        f.write(cm.graph_report() + "\n")
    files["graph.html"] = lorafx.to_html(cm.graph_module, os.path.join(args.out, "graph.html"))
    if not args.no_draw:
        files["graph.svg"] = os.path.join(args.out, "graph.svg")
        with _Status("drawing graph.svg"):
            try:
                lorafx.draw(cm.graph_module, files["graph.svg"],
                            title=f"{args.model} on {target.name}: {len(cm.graph_module.graph.nodes)} nodes, "
                                  f"{report.adapter_sites} LoRA adapters "
                                  + (f"(rank_budget={args.rank_budget}, proxy={args.proxy}; bar width = rank)"
                                     if args.rank_budget is not None else f"(r={args.r})"))
            except ImportError as e:
                raise CLIError(f"{_one_line(e)} (or pass --no-draw)") from None
    files["report.json"] = os.path.join(args.out, "report.json")
    files["passes/"] = passes_dir
    data = {
        "model": args.model,
        "model_class": type(model).__name__,
        "target": target.name,
        "options": {"r": args.r, "alpha": args.alpha, "target_modules": shown_modules,
                    "dropout": args.dropout, "seed": args.seed,
                    **({"rank_budget": args.rank_budget, "proxy": args.proxy, "allocation": args.allocation}
                       if args.rank_budget is not None else {}),
                    **({"shortcuts": True} if args.shortcuts else {})},
        "example_inputs": {k: list(v.shape) for k, v in example_kwargs.items()},
        **json.loads(report.to_json()),
        "files": {k: os.path.relpath(v, args.out) for k, v in files.items()},
    }
    with open(files["report.json"], "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")

    dumps = sorted(os.listdir(passes_dir))
    print(file=out)
    print(f"wrote {os.path.abspath(args.out)}/", file=out)
    for key, path in files.items():
        extra = f"  ({len(dumps)} files: {', '.join(dumps)})" if key == "passes/" else ""
        print(f"  {key.ljust(12)} {path}{extra}", file=out)
    return EXIT_OK


# -- parser -----------------------------------------------------------------------------


def _budget(text: str):
    """--rank-budget: an int (parameters) or a float (a multiple of uniform r=8)."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of parameters (24576) or a multiple of uniform "
                                             f"r=8 (1.5), got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _sparsity(text: str):
    """--sparsity: a fraction in [0, 1) or 'keep'."""
    if text == "keep":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) (0.5) or 'keep', got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump; status 2 like every other user error
        raise CLIError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from lorafx import __version__
    from lorafx.models import DEFAULT_MODEL
    from lorafx.passes import AllocateRanks
    from lorafx.passes.allocate_ranks import ALLOCATIONS
    from lorafx.passes.score_sites import PROXIES

    parser = _Parser(prog="lorafx", description="lorafx: a torch.fx compiler for LoRA fine-tuning.")
    parser.add_argument("--version", action="version", version=f"lorafx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("compile", help="compile a model and write its graph, drawing and report",
                       description="Capture a model, insert LoRA adapters, lower to a target and write "
                                   "graph.txt, graph.svg, graph.html, report.json and passes/ to --out.")
    c.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a built-in model (see `lorafx models`) or a local Hugging Face folder "
                        f"(default {DEFAULT_MODEL})")
    c.add_argument("--target", default="cpu", help="hardware target (default cpu)")
    c.add_argument("--out", default="lorafx-out", help="output folder (default ./lorafx-out)")
    c.add_argument("--r", "--rank", dest="r", type=_positive_int, default=8, help="LoRA rank (default 8)")
    c.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha / r (default 16)")
    c.add_argument("--target-modules", default=None,
                   help="comma-separated module names (q_proj,v_proj), a regex matching the whole module "
                        "name (.*attn.*), or all-linear (the default: every linear but the output layer)")
    c.add_argument("--dropout", type=float, default=0.0, help="adapter dropout probability (default 0)")
    c.add_argument("--fold-a", action="store_true",
                   help="fold A into the frozen weight's buffer: one GEMM for x W^T and x A^T (FoldLoRAIntoBase)")
    c.add_argument("--rank-budget", type=_budget, default=None,
                   help="allocate ranks from a zero-cost proxy under this many trainable parameters (an int), or "
                        "a multiple of uniform r=8 on the allowed linears (a float, e.g. 1.0) (AllocateRanks)")
    c.add_argument("--proxy", default=AllocateRanks.proxy, choices=PROXIES,
                   help=f"the proxy --rank-budget scores sites with (default {AllocateRanks.proxy})")
    c.add_argument("--allocation", default=AllocateRanks.allocation, choices=ALLOCATIONS,
                   help="graded: ranks in proportion to the scores; topk: the best sites at rank --r "
                        f"(default {AllocateRanks.allocation})")
    c.add_argument("--shortcuts", action="store_true",
                   help="add LoRA-adapted shortcut connections on the residual adds (InsertShortcuts)")
    c.add_argument("--sparsity", type=_sparsity, default=None,
                   help="prune the frozen linears to this share of zeros (0.5), or 'keep' the zeros a pruned model "
                        "has; their adapters become sparse LoRA ops that keep the zeros (LoRS)")
    c.add_argument("--sparsity-method", default="magnitude", choices=("magnitude", "wanda"),
                   help="how --sparsity scores weights (default magnitude; wanda scores on the example batch)")
    c.add_argument("--sparsity-pattern", default="unstructured",
                   help="unstructured (default) or N:M, e.g. 2:4 (then --sparsity 0.5)")
    c.add_argument("--sparse-grad", default="exact", choices=("exact", "surrogate"),
                   help="adapter gradient on pruned weights (default exact; surrogate: LoRS's straight-through form)")
    cim = c.add_argument_group("compute-in-memory (--target cim)")
    cim.add_argument("--noise", default=None,
                     help="RRAM noise model or preset (additive, multiplicative, conductance, pcm, rram_wan2022, "
                          "...; 'none' for ideal weights; default additive)")
    cim.add_argument("--noise-sigma", type=float, default=None, help="the noise model's level (additive: σ / max|W|)")
    cim.add_argument("--noise-seed", type=int, default=None, help="seed of the programmed chip (default 0)")
    cim.add_argument("--halora", default=None, choices=("dual", "spectral", "both", "off"),
                     help="HaLoRA training objective (default dual)")
    cim.add_argument("--adc-bits", type=_positive_int, default=None, help="quantise crossbar outputs (default exact)")
    cim.add_argument("--dac-bits", type=_positive_int, default=None, help="quantise crossbar inputs (default exact)")
    cim.add_argument("--rram-tiles", type=_positive_int, default=None, help="the chip's crossbar tiles (default: as needed)")
    cim.add_argument("--sram-kib", type=float, default=None, help="the chip's SRAM for adapters, KiB (default: no limit)")
    cim.add_argument("--chip", default=None, help="hardware preset (default 'default')")
    c.add_argument("--no-draw", action="store_true", help="do not write graph.svg")
    c.add_argument("--seed", type=int, default=0, help="seed for built-in model weights and adapter init (default 0)")
    c.set_defaults(func=cmd_compile)

    o = sub.add_parser("overhead", help="the least FLOP overhead any LoRA schedule allows over the frozen floor",
                       description="Print, from the cost model's formulas, the least LoRA overhead over the "
                                   "frozen-model floor on a LLaMA-shaped model (defaults: the benchmark shape).")
    o.add_argument("--rank", type=_positive_int, action="append", help="LoRA rank (repeat; default 8 and 64)")
    for name, default in (("hidden", 512), ("intermediate", 1376), ("layers", 4), ("batch", 4), ("seq", 256),
                          ("vocab", 8000)):
        o.add_argument(f"--{name}", type=_positive_int, default=default, help=f"(default {default})")
    o.set_defaults(func=cmd_overhead)

    m = sub.add_parser("models", help="list the built-in models", description="List the built-in models.")
    m.set_defaults(func=cmd_models)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help / --version
            return int(e.code or 0)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return EXIT_ERROR
        return args.func(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
