"""Sweep results as one standalone HTML leaderboard: the figures, the tables and where the numbers came from.

What this module is: `leaderboard_html(df, title)`, `df` being `d2o_core.eval.store.frame(records)`
(one row per cell). It aggregates with `d2o_core.eval.leaderboard.board`, draws with
ui/figures/leaderboard.py (the same figures the Budget sweep tab shows) and inlines plotly.js once,
so the file opens offline: no CDN, no external script. `python -m d2o_core leaderboard OUT --html
board.html` imports it lazily.

What it is not: reading files (store.load_records does) or running anything.
"""

from __future__ import annotations

import html

import pandas as pd
from plotly.offline import get_plotlyjs

from d2o_core.eval.leaderboard import board, tables

from .figures.leaderboard import overview, per_task

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1280px; padding: 0 1rem; }
table { border-collapse: collapse; font-size: .85rem; margin-bottom: 1.5rem; }
td, th { padding: .2rem .6rem; border: 1px solid #ddd; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.meta { color: #555; }
"""


def facts(df: pd.DataFrame) -> list[str]:
    """One line each: models, tasks, cells, d2o_core versions, machines and when the cells finished."""
    join = lambda col: ", ".join(str(v) for v in dict.fromkeys(df[col].dropna())) or "unknown"
    out = [
        f"{len(df)} cells · models: {join('model')} · tasks: {join('task')}",
        f"policy configurations: {join('config')}",
        f"d2o_core: {join('d2o_core')} · GPUs: {join('gpu') if df['gpu'].notna().any() else 'none (CPU)'}"
        f" · machines: {df['node'].nunique()}",
    ]
    finished = df["finished"].dropna()
    if len(finished):
        out.append(f"cells finished from {finished.min()} to {finished.max()}")
    return out


def leaderboard_html(df: pd.DataFrame, title: str = "Leaderboard") -> str:
    """The whole leaderboard as one HTML document that needs no network (plotly.js embedded once)."""
    esc = html.escape
    b = board(df)
    parts = [
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        f"<style>{_STYLE}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        f"</head><body><h1>{esc(title)}</h1>",
        *(f"<p class='meta'>{esc(line)}</p>" for line in facts(df)),
    ]
    for fig in (overview(b), per_task(b)):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
    for heading, table in tables(b).items():
        parts.append(f"<h2>{esc(heading)}</h2>")
        parts.append(table.to_html(index=False, na_rep="–", border=0, float_format=lambda x: f"{x:.3g}"))
    parts.append("</body></html>\n")
    return "\n".join(parts)
