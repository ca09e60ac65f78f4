"""Sweep cells as Ray tasks: one actor per worker holds its model; the driver keeps every worker busy.

What this module is: `run(cells, finish, loader, ...)`, called by executor.execute. It starts a local
Ray instance for the run (``workers`` > 0, no address: ``ray.init(address="local", num_cpus=...)``,
bound to this machine's loopback, usage stats off, no dashboard) or joins a cluster (``address`` or
the ``RAY_ADDRESS`` variable; this d2o_core is shipped to the workers with Ray's ``py_modules`` unless
a runtime environment is given). Each worker is an actor that calls ``loader()`` once (a model larger
than one GPU uses ``device_map="auto"`` over the actor's GPUs) and then runs cells; two cells are in
flight per worker so it never waits for the driver. Each result goes to ``finish(cell, record,
failure)`` on the driver as it arrives. A worker that dies (out of memory, a lost node) is replaced;
its cells in flight run once more elsewhere, then count as failed.

What it is not: the cell's work (cells.py) or storage (store.py). Ray is imported here only, lazily;
without it a sentence says how to install it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .cells import Cell, ModelSpec, try_cell

INSTALL = "pip install 'd2o-cache-explorer[ray]' (or pip install ray)"
IN_FLIGHT = 2  # cells queued per worker
RETRIES = 1  # runs more of a cell whose worker died under it


class CellWorker:
    """A Ray actor's body (ray.remote wraps it at run time): the model, loaded once, and a sample cache."""

    def __init__(self, loader: Callable, threads: int | None):
        import torch  # noqa: PLC0415

        if threads:
            torch.set_num_threads(threads)
        self.lm, self.samples = loader(), {}

    def ready(self) -> dict:
        return {
            "model": self.lm.name,
            "device": str(self.lm.device),
            "node": platform.node(),
            "pid": os.getpid(),
        }

    def run(self, cell: Cell) -> tuple:
        return try_cell(self.lm, cell, self.samples)


def import_ray():
    """The `ray` module, or a ValueError saying how to install it."""
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        raise ValueError(f"Running cells on Ray needs Ray: {INSTALL}.") from None
    return ray


def connect(workers: int, address: str | None, cpus_per_worker: int, runtime_env: dict | None):
    """(ray, started_here): a local instance for this run, or the cluster at `address`."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None and "ray" not in sys.modules:
        # A local instance for one run listens on loopback only (Ray's own switch, read at import).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = import_ray()
    common = dict(include_dashboard=False, log_to_driver=False)
    if ray.is_initialized():
        return ray, False
    if address is None:
        ray.init(address="local", num_cpus=workers * cpus_per_worker, runtime_env=runtime_env, **common)
        return ray, True
    package = str(Path(__file__).resolve().parents[1])  # this d2o_core, as the cluster's workers import it
    env = runtime_env if runtime_env is not None else {"py_modules": [package]}
    ray.init(address=address, runtime_env=env, **common)
    return ray, False


def _worker_count(ray, workers: int, gpus: float, cpus: int, local: bool) -> int:
    """`workers`, or as many as the cluster's GPUs (or CPUs) allow; too few GPUs is said, not waited on."""
    resources = ray.cluster_resources()
    have = resources.get("GPU", 0)
    if not workers:
        workers = int(have // gpus) if gpus else int(resources.get("CPU", 1) // cpus)
        if workers < 1:
            raise ValueError(f"The Ray cluster has {have:g} GPUs: not enough for one worker of {gpus:g}.")
    if gpus and workers * gpus > have:
        message = f"{workers} workers x {gpus:g} GPUs need {workers * gpus:g} GPUs; Ray sees {have:g}."
        if local:
            raise ValueError(message + " Ask for fewer workers or GPUs per worker.")
        print(f"warning: {message} Waiting for the cluster to add them.", file=sys.stderr)
    return workers


def _loader_for(loader: Callable, gpus: float) -> Callable:
    """A ModelSpec on GPUs loads on CUDA; over several GPUs with device_map="auto"."""
    if isinstance(loader, ModelSpec) and gpus > 0:
        return dataclasses.replace(
            loader,
            device=loader.device or "cuda",
            device_map=loader.device_map or ("auto" if gpus > 1 else None),
        )
    return loader


def run(
    cells: Sequence[Cell],
    finish: Callable[[Cell, dict | None, dict | None], None],
    loader: Callable,
    *,
    workers: int = 0,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: int = 1,
    runtime_env: dict | None = None,
) -> list[dict]:
    """Run `cells` on Ray workers, calling `finish` for each as it returns; returns the workers' facts."""
    ray, started = connect(workers, address, cpus_per_worker, runtime_env)
    from ray.exceptions import RayActorError  # noqa: PLC0415

    actor_class = ray.remote(CellWorker).options(
        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0, max_task_retries=0
    )
    threads = cpus_per_worker if not gpus_per_worker else None
    loader = _loader_for(loader, gpus_per_worker)
    actors: list = []
    try:
        n = min(_worker_count(ray, workers, gpus_per_worker, cpus_per_worker, started), len(cells))
        actors = [actor_class.remote(loader, threads) for _ in range(n)]
        ready = [a.ready.remote() for a in actors]
        try:  # the first worker to load its model says whether it can; the others get cells meanwhile
            ray.get(ray.wait(ready, num_returns=1)[0][0])
        except RayActorError as exc:
            raise ValueError(f"A Ray worker could not load the model: {exc}") from None
        queue = list(reversed(cells))  # pop() takes them in order
        attempts: dict[str, int] = {}
        pending: dict = {}  # object ref -> (cell, actor)
        replacements = 2 * n

        def submit(actor) -> None:
            while queue and sum(1 for _, a in pending.values() if a is actor) < IN_FLIGHT:
                cell = queue.pop()
                pending[actor.run.remote(cell)] = (cell, actor)

        for actor in actors:
            submit(actor)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            cell, actor = pending.pop(ref)
            try:
                record, failure = ray.get(ref)
            except RayActorError as exc:  # the worker died with this cell in flight
                attempts[cell.key] = attempts.get(cell.key, 0) + 1
                if attempts[cell.key] <= RETRIES:
                    queue.append(cell)
                else:
                    finish(
                        cell, None, {"error": f"its Ray worker died twice under it ({exc})", "traceback": ""}
                    )
                if actor in actors:
                    actors.remove(actor)
                    if replacements > 0:
                        replacements -= 1
                        actors.append(actor_class.remote(loader, threads))
                if not actors:
                    raise RuntimeError(f"Every Ray worker died; the last error: {exc}") from None
                for a in actors:
                    submit(a)
                continue
            finish(cell, record, failure)
            submit(actor)
        facts = []
        for ref in ready:
            try:
                facts.append(ray.get(ref, timeout=0))
            except Exception:  # noqa: BLE001 - a worker that died or never started has no facts
                pass
        return facts
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
