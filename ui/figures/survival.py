"""Token survival: the prompt text coloured by the share of (layer, head) slots that still hold each token.

What it is not: I/O or model code; input frames follow d2o_core.events' schemas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .common import _check, _clean, _empty, _heatmap, _hover, _layout, _titled


def survival(survival: pd.DataFrame, policy: str = "", per_row: int = 24) -> go.Figure:
    """The prompt laid out as text, each token coloured by the share of cache slots still holding it.

    Parameters
    ----------
    survival : DataFrame
        SURVIVAL_SCHEMA rows, one per prompt token.
    policy : str
        Label shown in the title.
    per_row : int
        Tokens per line of text.

    Returns
    -------
    go.Figure
        Heatmap tiles (row 0 at the top) coloured by kept_share with the token on
        each tile; sinks outlined, tokens with merged_share > 0 marked by a diamond.
    """
    title = _titled("Token survival", policy)
    if _check(
        survival, ["position", "token", "kept_share", "merged_share", "evicted_share", "is_sink"], title
    ):
        return _empty(title)
    if per_row < 1:
        raise ValueError(f"per_row must be at least 1, got {per_row}")
    df = survival.sort_values("position", kind="stable").reset_index(drop=True)
    n, n_rows = len(df), -(-len(df) // per_row)
    col, row = np.arange(n) % per_row, np.arange(n) // per_row
    df["text"], df["sink"] = _clean(df["token"]), np.where(df["is_sink"], "<br>attention sink", "")
    template = "position {position}<br><b>{text}</b><br>kept {kept_share:.0%} · merged {merged_share:.0%}"
    hover = _hover(template + " · evicted {evicted_share:.0%}{sink}", df)

    def tiles(values: np.ndarray, fill: object) -> np.ndarray:
        out = np.full(n_rows * per_row, fill, dtype=object)
        out[:n] = values
        return out.reshape(n_rows, per_row)

    z = tiles(df["kept_share"].to_numpy(), np.nan).astype(float)
    # A horizontal colorbar under the (axis-free) tiles keeps its long title readable for one-line prompts.
    bar = dict(orientation="h", x=0.5, xanchor="center", y=-0.02, yanchor="top", len=0.5, tickformat=".0%")
    style = dict(zmin=0, zmax=1, colorscale="RdYlGn", xgap=2, ygap=2, colorbar=bar | dict(thickness=10))
    fig = go.Figure(_heatmap(z, tiles(hover, ""), "share of layer×head slots still holding it", **style))
    fig.data[0].update(
        text=tiles(_clean(df["token"], 6).to_numpy(), ""), texttemplate="%{text}", colorbar_title_side="top"
    )
    sink = df["is_sink"].to_numpy(dtype=bool)
    if sink.any():
        # None-separated squares in data units scale with the tiles; pixel-sized markers would not.
        box = np.full((sink.sum(), 6), None, dtype=object)
        box_x, box_y = box.copy(), box.copy()
        box_x[:, :5] = col[sink, None] + np.array([-0.5, 0.5, 0.5, -0.5, -0.5])
        box_y[:, :5] = row[sink, None] + np.array([-0.5, -0.5, 0.5, 0.5, -0.5])
        outline = dict(color="black", width=2)
        fig.add_trace(
            go.Scatter(x=box_x.ravel(), y=box_y.ravel(), mode="lines", name="attention sink", line=outline)
        )
        fig.data[-1].update(hoverinfo="skip")
    merged = df["merged_share"].to_numpy() > 0
    if merged.any():
        marker = dict(symbol="diamond", size=7, color="#3f007d", line=dict(color="white", width=1))
        dots = go.Scatter(x=col[merged] + 0.3, y=row[merged] - 0.28, mode="markers", name="partly merged")
        fig.add_trace(dots.update(marker=marker, hovertext=hover[merged], hoverinfo="text"))
    fig.update_xaxes(visible=False, range=[-0.6, per_row - 0.4])
    fig.update_yaxes(visible=False, autorange="reversed")
    return _layout(fig, title, int(min(200 + 28 * n_rows, 1600))).update_layout(margin_b=100)
