"""The `sweep` subcommand: score policy configurations on tasks and your data, resumably, here or on Ray.

    python -m d2o_core sweep --data mine.jsonl --policies full,h2o,d2o --budgets 0.1,0.2,0.4 \\
        --workers 4 --out runs/
    python -m d2o_core leaderboard runs/ --html board.html

What this module is: argument parsing and printing. The grid comes from cells.plan (synthetic tasks
from ruler.py and tasks.py, rows from data.py), execution from executor.execute (skips finished
cells, stores each one as it finishes, Ray when asked), the tables from leaderboard.py. Bad input is
refused before any model loads. A run's note (command and counts) goes to ``OUT/runs/``.

What it is not: the page's fidelity sweep on one prompt (sweep.fidelity_sweep) or the README's
tables (readme_tables.py, which uses sweep.run_sweep).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ..policies import POLICIES
from . import data, executor, leaderboard, store
from .bench import split
from .cells import ModelSpec, parse_configs, plan
from .ruler import SYNTHETIC
from .scoring import METRICS


def _settings(assignments: list[str]) -> dict[str, dict]:
    from .throughput import settings_from_args  # noqa: PLC0415 - the CLI's one --set syntax

    return settings_from_args(assignments)


def cmd_sweep(args) -> int:
    configs = parse_configs(split(args.policies, str, "--policies", "full,h2o,d2o"), _settings(args.set))
    budgets = split(args.budgets, float, "--budgets", "0.1,0.2,0.4")
    default_tasks = "" if args.data else "passkey,kv"
    task_list = split(args.tasks if args.tasks is not None else default_tasks, str, "--tasks", "passkey,kv")
    lengths = split(args.lengths, int, "--lengths", "512,1024")
    depths = split(args.depths, float, "--depths", "0.1,0.5,0.9")
    examples = [ex for path in args.data for ex in data.load_jsonl(path)]
    names = split(args.model, str, "--model", "org/model-a,org/model-b") if args.model else [None]
    if args.workers < 0 or args.gpus_per_worker < 0 or args.cpus_per_worker < 1:
        raise ValueError("--workers and --gpus-per-worker are 0 or more, --cpus-per-worker 1 or more.")
    if args.workers or args.ray_address:
        from .ray_pool import import_ray  # noqa: PLC0415

        import_ray()  # says how to install Ray before anything else runs
    grid = dict(
        tasks=task_list,
        lengths=lengths,
        depths=depths,
        samples=args.samples,
        seed=args.seed,
        examples=examples,
        metric=args.metric,
        max_new_tokens=args.max_new_tokens,
        chat=not args.no_chat,
        fidelity=args.fidelity,
        dtype=args.dtype,
    )
    # D2O_MODEL is read here, so that workers on other machines load the same model.
    specs = [
        ModelSpec(name or os.environ.get("D2O_MODEL") or None, args.device, args.dtype) for name in names
    ]
    # Every model's grid is checked (and every data file read) before the first model loads.
    plans = [(spec, plan(spec.id, configs, budgets, **grid)) for spec in specs]
    keys: dict[str, int] = {}  # every planned cell's key, in plan order
    failed, note = 0, {"args": {k: v for k, v in vars(args).items() if k != "func"}, "models": []}
    for spec, cells in plans:
        print(f"model {spec.id}: {len(cells)} cells -> {args.out}", file=sys.stderr)
        outcome = executor.execute(
            cells,
            args.out,
            spec,
            workers=args.workers,
            ray_address=args.ray_address,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
        )
        keys |= {c.key: len(keys) + i for i, c in enumerate(cells)}
        failed += outcome.failed
        counts = {k: getattr(outcome, k) for k in ("planned", "skipped", "done", "failed", "seconds")}
        print(
            f"model {spec.id}: {outcome.planned} cells, {outcome.skipped} already done, "
            f"{outcome.done} computed, {outcome.failed} failed, in {outcome.seconds:.1f} s",
            file=sys.stderr,
        )
        for error in dict.fromkeys(outcome.errors):
            print(f"  failed: {error}", file=sys.stderr)
        note["models"].append({"model": spec.id, **counts, "workers": outcome.workers})
    store.write_run(args.out, note)
    if store.finished_keys(args.out) & keys.keys():
        records = sorted(
            (r for r in store.load_records(args.out) if r["key"] in keys), key=lambda r: keys[r["key"]]
        )
        df = store.frame(records)
        leaderboard.print_tables(leaderboard.board(df))
        if args.csv:
            df.to_csv(args.csv, index=False)
            print(f"\nwrote {args.csv}", file=sys.stderr)
    if failed:
        print(
            f"\n{failed} cell(s) failed (see {args.out}/failed/); the same command again retries them.",
            file=sys.stderr,
        )
    return 1 if failed else 0


def add_parser(sub, model_args: Callable) -> None:
    """Add the `sweep` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "sweep", help="score policy configurations on synthetic tasks and your data; resumable; Ray workers"
    )
    p.add_argument(
        "--tasks",
        default=None,
        help=f"comma list of {', '.join(SYNTHETIC)} (default passkey,kv, or none with --data)",
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FILE.jsonl",
        help="your rows (context, question or input, answers, id, length, metric), repeatable",
    )
    p.add_argument(
        "--metric", default="contains", help=f"score of --data rows without one: {', '.join(METRICS)}"
    )
    p.add_argument("--lengths", default="512,1024", help="synthetic prompt lengths in tokens, comma list")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths in [0, 1], comma list")
    p.add_argument(
        "--samples", type=int, default=1, help="synthetic samples (seeds) per task, length and depth"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--policies",
        default="full,streaming,h2o,d2o",
        help=f"comma list of {', '.join(POLICIES)}; a configuration as name:setting=value[:...] "
        "or name:variant, e.g. d2o:official",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="POLICY.SETTING=VALUE",
        help="a setting for every configuration of that policy",
    )
    p.add_argument(
        "--budgets", default="0.1,0.2,0.4", help="fractions in (0, 1], comma list; full runs at 1.0"
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="kv needs ~24 with the bundled model")
    p.add_argument("--no-chat", action="store_true", help="feed prompts raw, without the chat template")
    p.add_argument(
        "--fidelity",
        action="store_true",
        help="also decode the full cache beside each cell: agreement and KL (slower)",
    )
    p.add_argument("--out", default="runs", help="results folder: one JSON record per cell; reruns skip them")
    p.add_argument("--csv", default=None, help="also write this run's cells as tidy CSV rows here")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="run cells on N Ray workers (a local instance for this run, or the cluster of "
        "--ray-address); 0: here, one after another",
    )
    p.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS") or None,
        help="join this Ray cluster (default $RAY_ADDRESS), e.g. auto or ray://head:10001",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        help="GPUs per Ray worker; above 1 the model loads with device_map=auto",
    )
    p.add_argument(
        "--cpus-per-worker", type=int, default=1, help="CPUs (torch threads on CPU) per Ray worker"
    )
    model_args(p)
    p.set_defaults(func=cmd_sweep)
