"""The leaderboard: mean score per policy configuration and budget, per task and averaged, with cost.

What this module is: `board(df)` (store.frame's cell rows -> one row per model, configuration,
budget and task, plus task "average": the mean of the task means, so each task counts once), the
text tables the CLI prints, and the `leaderboard` subcommand:

    python -m d2o_core leaderboard runs/ --html board.html

``--html`` writes one offline HTML file (plotly.js inlined once) drawn by ui/leaderboard_html.py, which
this command imports lazily: d2o_core itself never imports plotly or gradio.

What it is not: running anything (sweep_cli.py) or figure code (ui/figures/leaderboard.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from ..policies import POLICIES
from ..run_summary import html_writer
from . import store

AVERAGE = "average"
BOARD_COLUMNS = (
    "model",
    "config",
    "policy",
    "budget",
    "task",
    "score",
    "kv_mb",
    "tokens_per_second",
    "cells",
)


def config_order(configs) -> list[str]:
    """The full cache first, then by policy in registry order, then by label."""
    names = list(POLICIES)
    family = lambda label: next((i for i, n in enumerate(names) if label.split("(")[0] == n), len(names))
    return sorted(dict.fromkeys(configs), key=lambda c: (family(c), len(c), c))


def _order(df: pd.DataFrame) -> pd.DataFrame:
    """Configurations in `config_order`, budgets ascending, the average before the tasks."""
    rank = {c: i for i, c in enumerate(config_order(df["config"]))}
    ranks = {"config": lambda s: s.map(rank), "task": lambda s: s != AVERAGE}
    return df.sort_values(
        ["model", "config", "budget", "task"], key=lambda s: ranks.get(s.name, lambda x: x)(s)
    )


def board(df: pd.DataFrame) -> pd.DataFrame:
    """Per (model, config, budget): the mean score, KV MB and tokens/s of each task and their average.

    Returns BOARD_COLUMNS; `cells` counts the records behind each row (for "average": over all tasks).
    """
    if df.empty:
        return pd.DataFrame(columns=list(BOARD_COLUMNS))
    keys = ["model", "config", "policy", "budget"]
    per_task = (
        df.groupby([*keys, "task"], sort=False, dropna=False)
        .agg(
            score=("score", "mean"),
            kv_mb=("kv_mb", "mean"),
            tokens_per_second=("tokens_per_second", "mean"),
            cells=("key", "count"),
        )
        .reset_index()
    )
    means = {k: (k, "mean") for k in ("score", "kv_mb", "tokens_per_second")}
    average = (
        per_task.groupby(keys, sort=False, dropna=False)
        .agg(**means, cells=("cells", "sum"))
        .reset_index()
        .assign(task=AVERAGE)
    )
    out = pd.concat([average, per_task], ignore_index=True)[list(BOARD_COLUMNS)]
    return _order(out).reset_index(drop=True)


def _pivot(table: pd.DataFrame, value: str, models: int) -> pd.DataFrame:
    rows = ["model", "config"] if models > 1 else ["config"]
    wide = table.pivot_table(index=rows, columns="budget", values=value, sort=False)
    wide = wide[sorted(wide.columns)]
    wide.columns = [f"{b:.0%}" for b in wide.columns]
    return wide.reset_index()


def tables(b: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Titled text tables: average score, KV MB and tokens/s by budget, then the score per task."""
    models, average = b["model"].nunique(), b[b["task"] == AVERAGE]
    tasks = [t for t in dict.fromkeys(b["task"]) if t != AVERAGE]
    out = {f"Score averaged over {len(tasks)} task(s), by budget": _pivot(average, "score", models)}
    out["KV cache MB (final), by budget"] = _pivot(average, "kv_mb", models)
    out["Decode tokens/s, by budget"] = _pivot(average, "tokens_per_second", models)
    per_task = b[b["task"] != AVERAGE].pivot_table(
        index=["model", "config", "budget"] if models > 1 else ["config", "budget"],
        columns="task", values="score", sort=False,
    )  # fmt: skip
    out["Score per task"] = per_task.reset_index()
    return out


def print_tables(b: pd.DataFrame, file=None) -> None:
    fmt: Callable[[float], str] = lambda x: f"{x:.3g}"
    for title, table in tables(b).items():
        print(f"\n{title}\n{table.to_string(index=False, float_format=fmt, na_rep='–')}", file=file)


def cmd_leaderboard(args) -> int:
    records = store.load_records(*args.paths)
    df = store.frame(records)
    print(f"{len(df)} cells: {df['model'].nunique()} model(s), {df['task'].nunique()} task(s), "
          f"{df['config'].nunique()} policy configuration(s)")  # fmt: skip
    print_tables(board(df))
    if args.csv:
        df.to_csv(args.csv, index=False)
        print(f"\nwrote {args.csv}", file=sys.stderr)
    if args.jsonl:
        with open(args.jsonl, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(
            f"wrote {args.jsonl} ({len(records)} records; the page's Budget sweep tab opens it)",
            file=sys.stderr,
        )
    if args.html:
        leaderboard_html = html_writer("leaderboard_html", "leaderboard_html")
        title = args.title or f"Leaderboard: {', '.join(map(str, args.paths))}"
        Path(args.html).write_text(leaderboard_html(df, title), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    """Add the `leaderboard` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "leaderboard", help="score against budget per policy configuration, from sweep results"
    )
    p.add_argument("paths", nargs="+", help="sweep --out folders, record files or a records .jsonl")
    p.add_argument("--html", default=None, help="write the leaderboard as one offline HTML file here")
    p.add_argument("--title", default=None, help="the HTML page's title")
    p.add_argument("--csv", default=None, help="write every cell as one tidy CSV row here")
    p.add_argument("--jsonl", default=None, help="write every record into one JSONL file (for the page)")
    p.set_defaults(func=cmd_leaderboard)
