"""Run a sweep's cells: skip the finished ones, run the rest here or on Ray, store each as it finishes.

What this module is: `execute(cells, out, loader, ...)`. Cells whose records are already in ``out``
are skipped (a rerun computes only what is missing); the rest run one after another in this process
(default, the model loaded once), or on Ray (`workers` > 0 or `ray_address`, ray_pool.py), and each
finished cell is written by this process the moment it comes back, so a crash loses only the cells in
flight. A failed cell is noted under ``out/failed`` and the sweep goes on; a rerun tries it again.
A tqdm bar on stderr shows cells done, left and the ETA.

What it is not: the work of a cell (cells.run_cell) or the Ray plumbing (ray_pool.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import store
from .cells import Cell, try_cell


@dataclass
class Outcome:
    """What one `execute` call did."""

    planned: int
    skipped: int
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # first line of each failure, in order
    workers: list[dict] = field(default_factory=list)  # Ray only: where each worker loaded its model


def execute(
    cells: Sequence[Cell],
    out: str | Path,
    loader: Callable,
    *,
    workers: int = 0,
    ray_address: str | None = None,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: int = 1,
    runtime_env: dict | None = None,
    progress: bool = True,
) -> Outcome:
    """Run every cell of `cells` that `out` does not hold yet; returns counts, time and errors.

    Parameters
    ----------
    cells : from cells.plan (duplicates by key run once).
    out : the results folder (created; store.py's layout).
    loader : zero-argument callable returning a LoadedModel (cells.ModelSpec, or a picklable function);
        each worker calls it once.
    workers : 0 runs here; N > 0 starts a local Ray instance with N workers for this run, or with
        `ray_address` ("auto", "ray://host:10001", ...) N workers on that cluster (0 there: as many as
        its GPUs / `gpus_per_worker`, or CPUs / `cpus_per_worker`, allow).
    gpus_per_worker, cpus_per_worker : Ray resources of each worker (its model lives on its GPUs).
    runtime_env : Ray runtime environment (default on a cluster: ship this d2o_core to the workers).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unique = list({c.key: c for c in cells}.values())
    finished = store.finished_keys(out)
    todo = [c for c in unique if c.key not in finished]
    outcome = Outcome(planned=len(unique), skipped=len(unique) - len(todo))
    if not todo:
        return outcome
    start = time.perf_counter()
    bar = tqdm(
        total=len(unique), initial=outcome.skipped, desc="sweep", unit="cell", file=sys.stderr,
        dynamic_ncols=True, disable=not progress,
    )  # fmt: skip
    bar.set_postfix_str(f"left {len(todo)}")

    def finish(cell: Cell, record: dict | None, failure: dict | None) -> None:
        if record is not None:
            store.write_record(out, record)
            outcome.done += 1
        else:
            store.write_failure(out, cell.key, cell.settings, failure)
            outcome.failed += 1
            outcome.errors.append(failure["error"])
        left = len(todo) - outcome.done - outcome.failed
        bar.set_postfix_str(f"left {left}" + (f", failed {outcome.failed}" if outcome.failed else ""))
        bar.update(1)

    try:
        if workers or ray_address:
            from . import ray_pool  # noqa: PLC0415 - Ray is optional and heavy

            outcome.workers = ray_pool.run(
                todo, finish, loader, workers=workers, address=ray_address,
                gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, runtime_env=runtime_env,
            )  # fmt: skip
        else:
            lm, samples = loader(), {}
            for cell in todo:
                finish(cell, *try_cell(lm, cell, samples))
    finally:
        bar.close()
        outcome.seconds = time.perf_counter() - start
    return outcome
