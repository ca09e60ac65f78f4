"""The leaderboard's figures: score against budget per policy configuration, with KV MB and tokens/s.

Input: `d2o_core.eval.leaderboard.board(frame)`: one row per (model, config, budget, task) with the
mean `score`, `kv_mb`, `tokens_per_second` and the `cells` behind it; task "average" is the mean of
the tasks. A configuration measured at one budget only (the full cache, at 100 %) is drawn as a
dashed level line across the budgets, so every curve can be read against it.

What it is not: I/O, aggregation or HTML (ui/leaderboard_html.py writes the page); the page's Budget
sweep tab and `python -m d2o_core leaderboard --html` draw the same figures from these functions.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..safe_text import html_text
from .common import apply_layout, empty_figure, policy_colours

CAPTIONS = {
    "overview": (
        "Averaged over tasks, against the KV budget: score, KV cache MB and decode tokens/s, one line per "
        "configuration; a dashed level is a configuration measured at one budget only (the full cache)."
    ),
    "per_task": (
        "Score against the KV budget, one panel per task (their average first), one line per configuration."
    ),
}
AVERAGE = "average"
TITLE = "Leaderboard"
_NEEDED = ("model", "config", "budget", "task", "score", "kv_mb", "tokens_per_second", "cells")
_PANELS = (
    ("score", "score (mean)", ".0%"),
    ("kv_mb", "KV cache MB (final)", None),
    ("tokens_per_second", "decode tokens/s", None),
)


def _names(board: pd.DataFrame) -> pd.Series:
    """Curve names: the configuration, with the model when the board holds several."""
    config = board["config"].astype(str)
    if board["model"].nunique() > 1:
        config = config + " · " + board["model"].astype(str)
    return config.map(html_text)


def _check(board: pd.DataFrame) -> bool:
    missing = [c for c in _NEEDED if c not in board.columns]
    if missing:
        raise ValueError(f"The leaderboard figures need columns {missing}; got {list(board.columns)}.")
    return board.empty


def _curves(fig: go.Figure, rows: pd.DataFrame, y: str, colours: dict, row: int, col: int, legend: bool):
    """One line per configuration in panel (row, col); single-budget ones as a dashed level."""
    lo, hi = rows["budget"].min(), rows["budget"].max()
    for name, part in rows.groupby("curve", sort=False):
        part = part.sort_values("budget")
        hover = [
            f"{name}<br>budget {b:.0%}<br>score {s:.3f}<br>KV {kv:.3g} MB<br>{t:.3g} tokens/s<br>{n} cells"
            for b, s, kv, t, n in part[["budget", "score", "kv_mb", "tokens_per_second", "cells"]].itertuples(
                index=False
            )
        ]
        style = dict(name=name, legendgroup=name, showlegend=legend, hovertemplate="%{text}<extra></extra>")
        line = dict(color=colours[name], width=2)
        if len(part) == 1 and hi > lo:  # one budget (the full cache): a level line across the axis
            level = part[y].iloc[0]
            trace = go.Scatter(
                x=[lo, hi],
                y=[level, level],
                text=hover * 2,
                mode="lines",
                line=line | dict(dash="dash"),
                **style,
            )
        else:
            trace = go.Scatter(
                x=part["budget"],
                y=part[y],
                text=hover,
                mode="lines+markers",
                line=line,
                marker_size=7,
                **style,
            )
        fig.add_trace(trace, row, col)


def _legend_below(fig: go.Figure, height: int) -> go.Figure:
    """The legend under the panels (above them it would cover the panel titles)."""
    fig.update_layout(legend=dict(orientation="h", x=0, xanchor="left", y=-70 / height, yanchor="top"))
    return fig.update_layout(height=height + 50, margin=dict(b=110))


def _prepared(board: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    board = board.assign(curve=_names(board))
    return board, policy_colours(list(dict.fromkeys(board["curve"])))


def overview(board: pd.DataFrame) -> go.Figure:
    """Averaged over tasks: score, KV MB and tokens/s against budget, side by side, one line per config."""
    title = "Averaged over tasks: score, KV memory and speed against budget"
    if _check(board):
        return empty_figure(title, "No results yet: open a sweep's results folder or files")
    board, colours = _prepared(board)
    rows = board[board["task"] == AVERAGE]
    fig = make_subplots(
        rows=1, cols=3, subplot_titles=[label for _, label, _ in _PANELS], horizontal_spacing=0.08
    )
    for col, (y, _label, fmt) in enumerate(_PANELS, start=1):
        _curves(fig, rows, y, colours, 1, col, legend=col == 1)
        fig.update_xaxes(title_text="KV budget", tickformat=".0%", row=1, col=col)
        fig.update_yaxes(tickformat=fmt, rangemode="tozero", row=1, col=col)
    fig.update_yaxes(range=[0, 1.05], row=1, col=1)
    n_tasks = board.loc[board["task"] != AVERAGE, "task"].nunique()
    return _legend_below(
        apply_layout(fig, f"{title} ({n_tasks} task{'s' if n_tasks != 1 else ''})", 440), 440
    )


def per_task(board: pd.DataFrame, columns: int = 3) -> go.Figure:
    """Score against budget, one panel per task (the average first), one line per configuration."""
    title = "Score against budget, per task"
    if _check(board):
        return empty_figure(title, "No results yet: open a sweep's results folder or files")
    board, colours = _prepared(board)
    tasks = [AVERAGE] + [t for t in dict.fromkeys(board["task"]) if t != AVERAGE]
    n_rows = -(-len(tasks) // columns)
    fig = make_subplots(
        rows=n_rows, cols=columns, subplot_titles=[html_text(t) for t in tasks],
        horizontal_spacing=0.06, vertical_spacing=min(0.12, 0.5 / max(n_rows, 1)),
    )  # fmt: skip
    for i, task in enumerate(tasks):
        row, col = divmod(i, columns)
        _curves(fig, board[board["task"] == task], "score", colours, row + 1, col + 1, legend=i == 0)
        fig.update_xaxes(tickformat=".0%", row=row + 1, col=col + 1)
        fig.update_yaxes(range=[0, 1.05], tickformat=".0%", row=row + 1, col=col + 1)
    height = 140 + 260 * n_rows
    return _legend_below(apply_layout(fig, title, height), height)
