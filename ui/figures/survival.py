"""Token survival: the text coloured by the share of (layer, head) slots that still hold each token.

The prompt's tokens, then (on rows of their own) the generated ones the cache held, as tiles of
readable text: rows keep their height whatever the length, and a long prompt gets pages (a menu,
and the tiles can be dragged). Merges are a bar under the text, never over it; sinks and marked
spans (the question, a needle and its answer) are outlined.

What it is not: I/O or model code; input frames follow d2o_core.events' schemas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .common import (
    TEXT_PX,
    TILE_PX,
    apply_layout,
    clean_tokens,
    empty_figure,
    heatmap_trace,
    hover_text,
    missing_columns,
    paged,
    tile_boxes,
    titled,
    token_tiles,
)

CAPTION = (
    "Each tile is a token, in reading order (generated tokens start on a new row): green = every "
    "layer and head still holds it at the end, red = none does; the purple bar under a token grows "
    "with the share of slots that merged it into another token; black outlines are attention sinks."
)
MARK_COLOURS = {"question": "#e6550d", "needle": "#6a3d9a", "answer": "#d62728"}
_MARK_INSET = {"answer": 0.34}  # inside the needle's outline; other marks sit just inside the tile
_MERGE_BAR = "#3f007d"


def survival(
    survival: pd.DataFrame,
    policy: str = "",
    per_row: int = 20,
    n_prompt: int | None = None,
    marks: pd.DataFrame | None = None,
    rows_per_page: int = 24,
) -> go.Figure:
    """The text laid out as tiles, each token coloured by the share of cache slots still holding it.

    Parameters
    ----------
    survival : DataFrame
        SURVIVAL_SCHEMA rows, one per token (prompt, and optionally the generated tokens after it).
    policy : str
        Label shown in the title.
    per_row : int
        Tokens per row of tiles.
    n_prompt : int or None
        Prompt length: positions from here on are generated tokens and start a new row.
    marks : DataFrame or None
        Spans to outline: columns ``name`` (e.g. "question", "needle", "answer"), ``start``, ``end``
        (positions, end excluded).
    rows_per_page : int
        Rows shown at once; more rows get a page menu.

    Returns
    -------
    go.Figure
        data[0]: heatmap tiles (row 0 at the top) coloured by kept_share, the token written on each
        at TEXT_PX; then a bar under each partly merged token (length = merged_share), sink
        outlines and one outline trace per mark name.
    """
    title = titled("Token survival", policy)
    if missing_columns(
        survival, ["position", "token", "kept_share", "merged_share", "evicted_share", "is_sink"], title
    ):
        return empty_figure(title)
    df = survival.sort_values("position", kind="stable").reset_index(drop=True)
    col, row, n_rows = token_tiles(df["position"].to_numpy(), per_row, n_prompt)
    df["text"], df["sink"] = clean_tokens(df["token"]), np.where(df["is_sink"], "<br>attention sink", "")
    template = "position {position}<br><b>{text}</b><br>kept {kept_share:.0%} · merged {merged_share:.0%}"
    hover = hover_text(template + " · evicted {evicted_share:.0%}{sink}", df)

    def tiles(values: np.ndarray, fill: object) -> np.ndarray:
        out = np.full((n_rows, per_row), fill, dtype=object)
        out[row, col] = values
        return out

    z = tiles(df["kept_share"].to_numpy(), np.nan).astype(float)
    # A horizontal colorbar under the (axis-free) tiles keeps its long title readable for one-line prompts.
    bar = dict(orientation="h", x=0.5, xanchor="center", y=-0.02, yanchor="top", len=0.5, tickformat=".0%")
    style = dict(zmin=0, zmax=1, colorscale="RdYlGn", xgap=2, ygap=2, colorbar=bar | dict(thickness=10))
    fig = go.Figure(heatmap_trace(z, tiles(hover, ""), "share of layer×head slots still holding it", **style))
    fig.data[0].update(
        text=tiles(clean_tokens(df["token"], 6).to_numpy(), ""),
        texttemplate="%{text}",
        textfont=dict(size=TEXT_PX),
        colorbar_title_side="top",
    )
    merged = df["merged_share"].to_numpy() > 0
    if merged.any():
        # A bar along the tile's lower edge, under the text: its length is the merged share.
        share = df["merged_share"].to_numpy()[merged]
        seg_x, seg_y = np.full((2, merged.sum(), 3), None, dtype=object)
        seg_x[:, 0], seg_x[:, 1] = col[merged] - 0.45, col[merged] - 0.45 + 0.9 * share
        seg_y[:, 0] = seg_y[:, 1] = row[merged] + 0.36
        line = dict(color=_MERGE_BAR, width=3)
        bars = go.Scatter(x=seg_x.ravel(), y=seg_y.ravel(), mode="lines", name="merged share (bar length)")
        fig.add_trace(bars.update(line=line, hoverinfo="skip"))
    sink = df["is_sink"].to_numpy(dtype=bool)
    if sink.any():
        box_x, box_y = tile_boxes(col[sink], row[sink])
        fig.add_trace(go.Scatter(x=box_x, y=box_y, mode="lines", name="attention sink"))
        fig.data[-1].update(line=dict(color="black", width=2), hoverinfo="skip")
    _marks(fig, df["position"].to_numpy(), col, row, marks)
    generated = n_prompt is not None and bool((df["position"] >= n_prompt).any())
    if generated:
        first = int(row[df["position"].to_numpy() >= n_prompt].min())
        fig.add_hline(y=first - 0.5, line=dict(color="black", width=2, dash="dot"))
        note = dict(x=0, xref="paper", y=first - 0.5, yanchor="top", xanchor="right", showarrow=False)
        fig.add_annotation(text="generated ↓", font_size=TEXT_PX, **note)
    fig.update_xaxes(visible=False, range=[-0.6, per_row - 0.4])
    fig.update_yaxes(visible=False)
    height = paged(fig, n_rows, rows_per_page, TILE_PX, extra=200)
    return apply_layout(fig, title, height).update_layout(margin_b=100)


def _marks(fig: go.Figure, positions: np.ndarray, col, row, marks: pd.DataFrame | None) -> None:
    """One outline trace per mark name, around the tiles of its spans."""
    if marks is None or marks.empty:
        return
    for name, spans in marks.groupby("name", sort=False):
        inside = np.zeros(len(positions), dtype=bool)
        for start, end in zip(spans["start"], spans["end"]):
            inside |= (positions >= start) & (positions < end)
        if not inside.any():
            continue
        box_x, box_y = tile_boxes(col[inside], row[inside], inset=_MARK_INSET.get(str(name), 0.44))
        colour = MARK_COLOURS.get(str(name), "#1f78b4")
        fig.add_trace(go.Scatter(x=box_x, y=box_y, mode="lines", name=str(name)))
        fig.data[-1].update(line=dict(color=colour, width=2), hoverinfo="skip")
