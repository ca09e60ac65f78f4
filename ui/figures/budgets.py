"""Per-layer budgets: layers x policies, colour = share of the prompt kept (0-100 %), D2O's F_l beside it.

The colours span 0-100 %, so the full cache (and a protected layer) at 100 % stands apart from D2O's
largest compressed layer; each cell says its budget in tokens at TEXT_PX, or nothing where the cells
are too small for that (hover still does).

What it is not: I/O or model code; input frames follow d2o_core.events' schemas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import (
    F_L_AXIS,
    F_L_MEANING,
    TEXT_PX,
    apply_layout,
    empty_figure,
    heatmap_trace,
    hover_text,
    layer_step_grid,
    layers_height,
    missing_columns,
    policy_colours,
    with_safe_labels,
)

CAPTION = (
    "One column per policy, one row per layer (0 at the bottom); colour = share of the prompt the layer "
    f"keeps, from 0 to 100 %, and the number = its budget in tokens. Right: {F_L_MEANING}."
)
_MARGINS = 150  # px of a budget figure outside its rows: title, legend, axis titles


def budget_heatmap(layer_budgets: pd.DataFrame) -> go.Figure:
    """Per-layer KV budget of every policy, with D2O's attention density beside it.

    Parameters
    ----------
    layer_budgets : DataFrame
        ``policy`` + LAYER_BUDGETS_SCHEMA, one row per (policy, layer).

    Returns
    -------
    go.Figure
        Heatmap x = policy, y = layer (0 at the bottom), colour = budget_fraction on 0-1, text = budget
        tokens at TEXT_PX when rows are tall enough; beside it, sharing y, bars of `density` (F_l)
        per layer for the policies that report one.
    """
    title = "Per-layer KV budget"
    needed = ["policy", "layer", "budget_tokens", "budget_fraction", "density", "protected"]
    if missing_columns(layer_budgets, needed, title):
        return empty_figure(title)
    df = with_safe_labels(layer_budgets).assign(
        protected=np.where(layer_budgets["protected"], "<br>protected", "")
    )
    template = "{policy}<br>layer {layer}<br>{budget_tokens} tokens ({budget_fraction:.1%} of prompt)"
    df["hover"] = hover_text(template + "{protected}", df)
    policies, layers, z, hover = layer_step_grid(df, "policy", "layer", "budget_fraction")
    _, _, tokens, _ = layer_step_grid(df, "policy", "layer", "budget_tokens")
    height = int(np.clip(_MARGINS + 20 * len(layers), layers_height(len(layers)), 1400))
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[0.72, 0.28])
    fig.update_xaxes(domain=[0, 0.62], col=1).update_xaxes(domain=[0.75, 1], col=2)
    bar = dict(x=fig.layout.xaxis.domain[1] + 0.01, xanchor="left", tickformat=".0%")
    bar |= dict(tickvals=[0, 0.25, 0.5, 0.75, 1])
    # 0-100 %: a full layer (the full cache, a protected one) is never the colour of a compressed one.
    style = dict(zmin=0.0, zmax=1.0, colorscale="Viridis", xgap=1, ygap=1, colorbar=bar)
    heat = heatmap_trace(z, hover, "share of prompt kept", x=policies, y=layers, **style)
    if (height - _MARGINS) / max(len(layers), 1) >= TEXT_PX + 3:  # room for the number in each cell
        text = np.where(np.isfinite(tokens), np.nan_to_num(tokens).astype(int).astype(str), "")
        heat.update(text=text, texttemplate="%{text}", textfont=dict(size=TEXT_PX))
    fig.add_trace(heat, 1, 1)
    dense = df[df["density"].notna()]
    colours = policy_colours(policies)
    for policy, rows in dense.groupby("policy", sort=False):
        trace = go.Bar(x=rows["density"], y=rows["layer"], orientation="h", name=f"F_l · {policy}")
        hover = "layer %{y}<br>F_l %{x:.3g} (high = sparse, peaked attention)<extra></extra>"
        trace.update(marker_color=colours[policy], hovertemplate=hover)
        fig.add_trace(trace, 1, 2)
    if dense.empty:
        note = dict(xref="x2 domain", yref="y2 domain", x=0.5, y=0.5, showarrow=False)
        fig.add_annotation(text="no F_l (D2O not run)", **note)
    fig.update_xaxes(title_text="policy", type="category", row=1, col=1)
    fig.update_xaxes(title_text=F_L_AXIS, row=1, col=2)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    return apply_layout(fig, title, height)
