"""Cache size over time for one policy: a line of stored entries against the budget over the steps,
above a layers x steps heatmap (colour = stored entries).

The line is there for `compress_every`: every step (1) holds the cache flat at its budget, once
after the prompt (0) lets it grow one entry a step, and every N steps draws a saw-tooth (N - 1 entries
past the budget, then back to it), differences of a few entries that a colour scale from 0 hides.

What it is not: I/O or model code; input frames follow d2o_core.events' schemas.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .common import (
    STEP_AXIS,
    apply_layout,
    empty_figure,
    heatmap_trace,
    hover_text,
    layer_step_grid,
    layers_height,
    missing_columns,
    titled,
)

CAPTION = (
    "Top: entries each layer holds per kv-head (mean over layers) at every step, against the budget; "
    "below: one row per layer, darker = more entries; step 0 is the compression right after the prompt."
)
LINE_HEIGHT = 170  # px added above the heatmap for the line
_SPLIT = 0.7  # the heatmap's share of the plotting area (bottom); the line has the rest, less a gap


def cache_over_time(steps: pd.DataFrame, policy: str = "") -> go.Figure:
    """Stored cache entries per layer and step, for one policy.

    Parameters
    ----------
    steps : DataFrame
        STEPS_SCHEMA rows of one policy.
    policy : str
        Label shown in the title.

    Returns
    -------
    go.Figure
        data[0]: heatmap x = step (0 = prefill compression), y = layer, colour = stored entries per
        kv-head (bottom). Then lines over the same steps (top): stored entries per kv-head, mean over
        layers, and the budget (mean over layers) unless nothing was ever capped (the full cache).
    """
    title = titled("Cache size over time", policy)
    if missing_columns(steps, ["step", "layer", "stored", "budget", "evicted", "merged"], title):
        return empty_figure(title)
    df = steps.sort_values(["step", "layer"], kind="stable")
    template = "step {step} · layer {layer}<br>stored {stored} / budget {budget}<br>evicted {evicted}"
    df["hover"] = hover_text(template + " (merged {merged})", df)
    step_axis, layers, z, hover = layer_step_grid(df, "step", "layer", "stored")
    bar = dict(len=_SPLIT, y=_SPLIT / 2, yanchor="middle")
    fig = go.Figure(
        heatmap_trace(
            z, hover, "entries per kv-head", x=step_axis, y=layers, zmin=0, colorscale="Blues", colorbar=bar
        )
    )
    mean = df.groupby("step", sort=False)[["stored", "budget"]].mean()
    line = dict(x=list(mean.index), xaxis="x2", yaxis="y2", mode="lines+markers", marker_size=4)
    fig.add_trace(
        go.Scatter(
            y=mean["stored"].round(2).tolist(),
            name="stored",
            line=dict(color="#08519c"),
            hovertemplate="step %{x}<br>stored %{y} per kv-head (mean over layers)<extra></extra>",
            **line,
        )
    )
    capped = not ((df["budget"] == df["stored"]).all() and df["evicted"].sum() == 0)
    if capped:
        fig.add_trace(
            go.Scatter(
                y=mean["budget"].round(2).tolist(),
                name="budget",
                line=dict(color="#d62728", dash="dash"),
                hovertemplate="step %{x}<br>budget %{y} per kv-head (mean over layers)<extra></extra>",
                **line,
            )
        )
    fig.update_layout(
        yaxis=dict(domain=[0, _SPLIT], title_text="layer"),
        xaxis=dict(title_text=STEP_AXIS),
        xaxis2=dict(matches="x", anchor="y2", showticklabels=False),
        yaxis2=dict(domain=[_SPLIT + 0.06, 1], title_text="entries (mean)"),
    )
    return apply_layout(fig, title, layers_height(len(layers)) + LINE_HEIGHT)
