"""Per-layer budgets: layers x policies, colour = budget fraction, with D2O's attention density beside it.

What it is not: I/O or model code; input frames follow d2o_core.events' schemas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import (
    _check,
    _empty,
    _grid,
    _heatmap,
    _hover,
    _labelled,
    _layers_height,
    _layout,
    policy_colours,
)


def budget_heatmap(layer_budgets: pd.DataFrame) -> go.Figure:
    """Per-layer KV budget of every policy, with D2O's attention density beside it.

    Parameters
    ----------
    layer_budgets : DataFrame
        ``policy`` + LAYER_BUDGETS_SCHEMA, one row per (policy, layer).

    Returns
    -------
    go.Figure
        Heatmap x = policy, y = layer (0 at the bottom), colour = budget_fraction; beside it,
        sharing y, bars of `density` per layer for the policies that report one.
    """
    title = "Per-layer KV budget"
    needed = ["policy", "layer", "budget_tokens", "budget_fraction", "density", "protected"]
    if _check(layer_budgets, needed, title):
        return _empty(title)
    df = _labelled(layer_budgets).assign(protected=np.where(layer_budgets["protected"], "<br>protected", ""))
    template = "{policy}<br>layer {layer}<br>{budget_tokens} tokens ({budget_fraction:.1%} of prompt)"
    df["hover"] = _hover(template + "{protected}", df)
    policies, layers, z, hover = _grid(df, "policy", "layer", "budget_fraction")
    _, _, tokens, _ = _grid(df, "policy", "layer", "budget_tokens")
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[0.72, 0.28])
    fig.update_xaxes(domain=[0, 0.62], col=1).update_xaxes(domain=[0.75, 1], col=2)
    bar = dict(x=fig.layout.xaxis.domain[1] + 0.01, xanchor="left", tickformat=".0%")
    # Scale the colours to the compressed layers, so D2O's per-layer differences show; layers that
    # keep everything (the full cache, protected layers) sit at the top of the scale.
    compressed = z[np.isfinite(z) & (z < 1)]
    top = float(compressed.max()) if compressed.size else 1.0
    low = float(compressed.min()) if compressed.size else 0.0
    style = dict(zmin=min(low, top * 0.5), zmax=top, colorscale="Viridis", xgap=1, ygap=1, colorbar=bar)
    text = np.where(np.isfinite(tokens), np.nan_to_num(tokens).astype(int).astype(str), "")
    cells = dict(text=text, texttemplate="%{text}", textfont=dict(size=9))
    fig.add_trace(_heatmap(z, hover, "share of prompt kept", x=policies, y=layers, **style, **cells), 1, 1)
    dense = df[df["density"].notna()]
    colours = policy_colours(policies)
    for policy, rows in dense.groupby("policy", sort=False):
        trace = go.Bar(x=rows["density"], y=rows["layer"], orientation="h", name=f"density · {policy}")
        trace.update(marker_color=colours[policy], hovertemplate="layer %{y}<br>density %{x:.3g}")
        fig.add_trace(trace, 1, 2)
    if dense.empty:
        note = dict(xref="x2 domain", yref="y2 domain", x=0.5, y=0.5, showarrow=False)
        fig.add_annotation(text="no density (D2O not run)", **note)
    fig.update_xaxes(title_text="policy", type="category", row=1, col=1)
    fig.update_xaxes(title_text="D2O attention density F_l", row=1, col=2)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    return _layout(fig, title, _layers_height(len(layers)))
