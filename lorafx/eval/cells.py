"""Running the cells of a results table (method x task x seed) in worker processes, resumably.

The table tools (``tools/heterolora_table.py``, ``tools/sparse_table.py``) share this:

    ap = argparse.ArgumentParser(); cells.add_arguments(ap, out="my_out")
    done = cells.resumed([saved_json, partial_json], recipe)      # rows of earlier runs of the same recipe
    rows, failed = cells.run(todo, run_cell, cell_args, jobs=2, initializer=init, partial=partial_json,
                             recipe=recipe, on_row=print_row)

A cell's row is a dict with at least ``method``, ``task`` and ``seed``.  Each worker
process runs one cell at a time with the pool's ``initializer`` (the tools load the
checkpoint there, one thread each), so the numbers do not depend on ``jobs``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["DEFAULT_TASKS", "Cell", "add_arguments", "resumed", "pending", "run", "report_failures"]

# the four tasks with the lowest LoRA r=8 accuracy in the README's baseline table (most headroom)
DEFAULT_TASKS = ("add_words", "lookup", "logic_words", "add")
Cell = Tuple[str, str, int]  # (method, task, seed)


def add_arguments(ap: argparse.ArgumentParser, *, out: str) -> None:
    """The recipe and run options every table tool takes (``--tasks`` ... ``--resume``)."""
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-test", type=int, default=256)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    ap.add_argument("--out", default=out)
    ap.add_argument("--resume", action="store_true",
                    help="reuse the cells an earlier run with the same recipe left in --out")


def resumed(paths: Iterable[str], recipe: Dict[str, Any], log: Callable[[str], None] = print) -> Dict[Cell, dict]:
    """{cell: row} from the JSON files among ``paths`` that exist and were run with ``recipe``
    (every key of it equal in their ``config``); later files win."""
    done: Dict[Cell, dict] = {}
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            old = json.load(f)
        if all(old["config"].get(k) == v for k, v in recipe.items()):
            done.update({(r["method"], r["task"], r["seed"]): r for r in old["rows"]})
        else:
            log(f"--resume: {path} was run with another recipe; not reused")
    return done


def pending(cells: Sequence[Cell], paths: Iterable[str], recipe: Dict[str, Any], resume: bool,
            log: Callable[[str], None] = print) -> Tuple[List[dict], List[Cell]]:
    """``(rows, todo)``: with ``resume``, the rows of ``cells`` that earlier runs of ``recipe`` left
    in ``paths`` (``resumed``), and the cells still to run."""
    done = resumed(paths, recipe, log) if resume else {}
    rows = [done[c] for c in cells if c in done]
    if rows:
        log(f"--resume: {len(rows)} cells reused")
    return rows, [c for c in cells if c not in done]


def report_failures(failed: Sequence[tuple], partial: Optional[str] = None, log: Callable[[str], None] = print) -> bool:
    """Log the cells ``run`` reports as failed (and where the finished ones are); returns whether any failed."""
    if failed:
        where = f"; the finished ones are in {partial} (--resume reuses them)" if partial else ""
        log(f"\n{len(failed)} cell(s) failed{where}:")
        for method, task, seed, error in failed:
            log(f"  {method} {task} seed {seed}: {error}")
    return bool(failed)


def run(todo: Sequence[Cell], fn: Callable[..., dict], cell_args: Callable[[Cell], tuple], *, jobs: int,
        initializer: Callable[[], None], rows: Optional[List[dict]] = None, partial: Optional[str] = None,
        recipe: Optional[Dict[str, Any]] = None,
        on_row: Optional[Callable[[int, dict], None]] = None,
        on_failure: Optional[Callable[[int, Cell, str], None]] = None) -> Tuple[List[dict], List[tuple]]:
    """Run ``fn(*cell_args(cell))`` for every cell of ``todo`` in ``jobs`` spawned processes.
    Returns ``(rows, failed)``: ``rows`` (given ones first) and ``(method, task, seed, error)``
    for the cells that raised.  With ``partial``, the rows so far are written there (with
    ``recipe`` as their config, so ``resumed`` reads them) after every cell."""
    rows = list(rows or [])
    failed: List[tuple] = []
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=initializer) as pool:
        futures = {pool.submit(fn, *cell_args(cell)): cell for cell in todo}
        for i, fut in enumerate(cf.as_completed(futures), 1):
            cell = futures[fut]
            try:
                row = fut.result()
            except Exception as e:  # every failing cell is reported; the caller decides
                failed.append((*cell, f"{type(e).__name__}: {e}"))
                if on_failure is not None:
                    on_failure(i, cell, failed[-1][-1])
                continue
            rows.append(row)
            if partial is not None:
                with open(partial, "w") as f:
                    json.dump({"config": recipe or {}, "rows": rows, "failed": failed}, f, indent=1)
            if on_row is not None:
                on_row(i, row)
    return rows, failed
