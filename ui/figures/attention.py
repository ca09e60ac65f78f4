"""The attention view (teaching): where the prompt's attention goes, and what that did to the budgets.

`attention_map` shows, per layer, how much attention each prompt token received, beside D2O's layer
statistic F_l (high = sparse, peaked attention) and the budget every policy gave that layer, so
"sparse attention -> smaller budget" can be read off one figure. `kept_tokens` shows, for one layer
and kv-head, the same attention over the prompt with one strip per policy below it: which tokens
(the prompt's, then the generated ones the cache held) that policy kept, merged or evicted.

What it is not: I/O or model code; input frames follow d2o_core.events' schemas (ATTENTION_SCHEMA,
LAYER_BUDGETS_SCHEMA with a leading `policy` column, KEPT_SCHEMA with a leading `policy` column).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..safe_text import html_text
from .common import (
    EVICT,
    F_L_AXIS,
    F_L_MEANING,
    MERGE,
    apply_layout,
    clean_tokens,
    empty_figure,
    heatmap_trace,
    hover_text,
    layers_height,
    missing_columns,
    policy_colours,
    with_safe_labels,
)

CAPTIONS = {
    "attention_map": (
        "Each row is a layer (0 at the bottom), each column a prompt token; brighter = the token received "
        "more of that layer's attention (log scale). Middle: each layer's F_l; right: the share of the "
        f"prompt each policy kept in that layer. {F_L_MEANING}."
    ),
    "kept_tokens": (
        "Top: the attention each prompt token received in this layer and head (log scale). Below, one "
        "strip per column over the prompt and then its generated tokens: dark green = sink, green = "
        "kept, blue = merged, red = evicted by the end of the run."
    ),
}
MARK_COLOURS = {"question": "#e6550d", "needle": "#6a3d9a", "answer": "#d62728"}
_ATTENTION = ["layer", "head", "position", "token", "column_sum", "density"]
_BUDGETS = ["policy", "layer", "budget_tokens", "budget_fraction", "density", "protected"]
_KEPT = ["policy", "position", "token", "state"]
# State order = colour order of the strips; greens for what stayed, blue merged, red evicted.
_STATES = {"sink": "#00441b", "kept": "#74c476", "merged": MERGE, "evicted": EVICT}


def _layer_shares(attention: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, position): column sums summed over kv-heads, and their share of the layer's total."""
    per = attention.groupby(["layer", "position"], sort=True, as_index=False).agg(
        column_sum=("column_sum", "sum"), token=("token", "first")
    )
    per["share"] = per["column_sum"] / per.groupby("layer")["column_sum"].transform("sum")
    return per


def _log_colour_bar(low: float, high: float, x: float) -> dict:
    """Colour bar ticks for log10 shares, labelled in percent (one tick per decade)."""
    ticks = np.arange(np.ceil(low), np.floor(high) + 1)
    text = [f"{100 * 10**t:.3g}%" for t in ticks]
    return dict(tickvals=ticks, ticktext=text, x=x, xanchor="left")


def attention_map(attention: pd.DataFrame, layer_budgets: pd.DataFrame) -> go.Figure:
    """Layers x prompt tokens of the prompt's attention, with each layer's density and budgets beside it.

    Parameters
    ----------
    attention : DataFrame
        ATTENTION_SCHEMA rows (one per layer, kv-head, prompt position) of one comparison.
    layer_budgets : DataFrame
        ``policy`` + LAYER_BUDGETS_SCHEMA, one row per (policy, layer); may be empty.

    Returns
    -------
    go.Figure
        Left: one Heatmap, y = layer (0 at the bottom), x = prompt position, colour = log10 of the
        token's share of the layer's attention (kv-heads summed); hover shows the token. Middle: bars
        of F_l per layer (high = sparse). Right: one line per policy, the share of the prompt it kept
        in each layer.
    """
    title = "Prompt attention per layer: dense attention (low F_l) → larger D2O budget"
    if missing_columns(attention, _ATTENTION, title):
        return empty_figure(title)
    budgets = with_safe_labels(layer_budgets) if not missing_columns(layer_budgets, _BUDGETS, title) else None
    per = _layer_shares(attention)
    layers = sorted(per["layer"].unique())
    positions = sorted(per["position"].unique())
    shape = (len(layers), len(positions))
    # Colour by log share of the layer's attention: sinks take most of it (often > 50 %), so on a
    # linear scale one column would be bright and the rest flat; per-layer shares make layers
    # comparable whatever their head count. Floor a decade under the uniform share, 1 / Lp.
    share = per["share"].to_numpy(dtype=float)
    z = np.log10(np.clip(share, 1e-12, None)).round(4).reshape(shape)  # 4 decimals: plenty for a colour
    low = float(np.log10(0.1 / len(positions)))
    high = max(float(z.max()), low + 1)
    # Hover from per-cell customdata and one template, not a full string per cell: a 2k-token prompt
    # over 30 layers is 60k cells, and full strings made the figure's JSON ~6 MB per 1k tokens.
    cells = np.stack(
        [
            clean_tokens(per["token"]).to_numpy(dtype=object),
            per["share"].map("{:.3%}".format).to_numpy(dtype=object),
            per["column_sum"].map("{:.4g}".format).to_numpy(dtype=object),
        ],
        axis=-1,
    ).reshape(*shape, 3)
    hover = "layer %{y}<br>position %{x}<br><b>%{customdata[0]}</b>"
    hover += "<br>%{customdata[1]} of the layer's attention"
    hover += "<br>column sum %{customdata[2]} (kv-heads summed)<extra></extra>"
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, column_widths=[0.7, 0.12, 0.18])
    fig.update_xaxes(domain=[0, 0.62], col=1).update_xaxes(domain=[0.72, 0.83], col=2)
    fig.update_xaxes(domain=[0.86, 1], col=3)
    bar = _log_colour_bar(low, high, 0.63)
    style = dict(zmin=low, zmax=high, colorscale="Magma", colorbar=bar | dict(len=0.9))
    heat = heatmap_trace(z, None, "share of layer's attention", x=positions, y=layers, **style)
    fig.add_trace(heat.update(customdata=cells, hovertemplate=hover, hoverinfo=None), 1, 1)
    density = attention.drop_duplicates("layer").sort_values("layer")
    trace = go.Bar(x=density["density"], y=density["layer"], orientation="h", name="D2O's F_l")
    hover = "layer %{y}<br>F_l %{x:.3g} (high = sparse, peaked attention)<extra></extra>"
    trace.update(marker_color="#7f7f7f", hovertemplate=hover)
    fig.add_trace(trace, 1, 2)
    _budget_lines(fig, budgets)
    fig.update_xaxes(title_text="prompt position", row=1, col=1)
    fig.update_xaxes(title_text=F_L_AXIS, row=1, col=2)
    fig.update_xaxes(title_text="budget (share of prompt)", tickformat=".0%", row=1, col=3)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    return apply_layout(fig, title, layers_height(len(layers))).update_layout(legend_y=1.06)


def _budget_lines(fig: go.Figure, budgets: pd.DataFrame | None) -> None:
    """One line per policy in the right panel: the share of the prompt it kept per layer."""
    if budgets is None:
        note = dict(xref="x3 domain", yref="y3 domain", x=0.5, y=0.5, showarrow=False)
        fig.add_annotation(text="no budgets", **note)
        return
    colours = policy_colours(list(pd.unique(budgets["policy"])))
    df = budgets.assign(protected=np.where(budgets["protected"], " · protected", ""))
    template = "{policy}<br>layer {layer}: {budget_tokens} tokens ({budget_fraction:.1%}){protected}"
    for policy, rows in df.groupby("policy", sort=False):
        rows = rows.sort_values("layer")
        line = go.Scatter(x=rows["budget_fraction"], y=rows["layer"], mode="lines+markers", name=policy)
        line.update(
            line_color=colours[policy], marker_size=5, hovertext=hover_text(template, rows), hoverinfo="text"
        )
        fig.add_trace(line, 1, 3)


def kept_tokens(
    attention: pd.DataFrame,
    kept: pd.DataFrame,
    layer: int,
    head: int,
    n_prompt: int | None = None,
    marks: pd.DataFrame | None = None,
) -> go.Figure:
    """One layer and kv-head: the prompt's attention per token, and what each policy did with it.

    Parameters
    ----------
    attention : DataFrame
        ATTENTION_SCHEMA rows (all layers and heads; filtered here).
    kept : DataFrame
        ``policy`` + KEPT_SCHEMA (``d2o_core.events.kept_frame`` per policy, concatenated), one row per
        (policy, position) for this layer and head: the prompt's positions, and optionally the
        generated tokens the cache held after them; may be empty.
    layer, head : int
        The layer and kv-head to show.
    n_prompt : int or None
        Prompt length: a dashed line marks where generated tokens start, when `kept` has any.
    marks : DataFrame or None
        Spans to shade over both panels: columns ``name`` ("question", "needle", "answer"), ``start``,
        ``end`` (positions, end excluded).

    Returns
    -------
    go.Figure
        Top: bars of the column sums over prompt positions (log y, hover = token). Below, on the same
        x axis: one Heatmap with a strip per policy, coloured sink / kept / merged / evicted.
    """
    title = f"Attention and what each policy kept · layer {layer}, head {head}"
    no_attention = missing_columns(attention, _ATTENTION, title)
    no_kept = missing_columns(kept, _KEPT, title)
    if no_attention and no_kept:
        return empty_figure(title)
    sel = attention.iloc[0:0] if no_attention else attention
    sel = sel[(sel["layer"] == layer) & (sel["head"] == head)].sort_values("position")
    if sel.empty and no_kept:
        return empty_figure(title, f"No attention was recorded for layer {layer}, head {head}")
    n_policies = 0 if no_kept else kept["policy"].nunique()
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.04, row_heights=[0.62, 0.38])
    if not sel.empty:
        sel = sel.assign(text=clean_tokens(sel["token"]))
        hover = hover_text("position {position}<br><b>{text}</b><br>column sum {column_sum:.4g}", sel)
        bars = go.Bar(x=sel["position"], y=sel["column_sum"], name="attention received", marker_color="#555")
        fig.add_trace(bars.update(hovertext=hover, hoverinfo="text"), 1, 1)
    # Log y: the sinks receive orders of magnitude more than the other tokens.
    fig.update_yaxes(title_text="column sum", type="log", row=1, col=1)
    if not no_kept:
        fig.add_trace(_state_strips(with_safe_labels(kept)), 2, 1)
    else:
        note = dict(xref="x2 domain", yref="y2 domain", x=0.5, y=0.5, showarrow=False)
        fig.add_annotation(text="no policy results", **note)
    generated = not no_kept and n_prompt is not None and bool((kept["position"] >= n_prompt).any())
    if generated:
        edge = dict(type="line", xref="x", yref="paper", x0=n_prompt - 0.5, x1=n_prompt - 0.5, y0=0, y1=1)
        fig.add_shape(**edge, line=dict(dash="dash", color="black", width=1))
        label = dict(xref="x", yref="paper", x=n_prompt - 0.5, y=1, xanchor="left", showarrow=False)
        fig.add_annotation(text=" generated →", yanchor="bottom", **label)
    _shade(fig, marks)
    axis = "token position (prompt, then generated)" if generated else "prompt position"
    fig.update_xaxes(title_text=axis, row=2, col=1)
    fig.update_yaxes(type="category", autorange="reversed", row=2, col=1)
    return apply_layout(fig, title, int(min(380 + 34 * n_policies, 1000))).update_layout(bargap=0)


def _state_strips(kept: pd.DataFrame) -> go.Heatmap:
    """A single Heatmap, one row per policy (order of appearance), colour = state code (KEPT order)."""
    codes = {state: i for i, state in enumerate(_STATES)}
    policies = list(pd.unique(kept["policy"]))
    df = kept.assign(
        code=kept["state"].map(codes).astype(float), text=clean_tokens(kept["token"]), row=kept["policy"]
    )
    df["hover"] = hover_text("{policy}<br>position {position}<br><b>{text}</b><br>{state}", df)
    positions = sorted(df["position"].unique())
    wide = lambda col: df.pivot(index="row", columns="position", values=col).reindex(  # noqa: E731
        index=policies, columns=positions
    )
    # A stepped colour scale over codes 0..n-1 (one flat band each), so the strips read as categories.
    n = len(_STATES)
    scale = [[edge, colour] for i, colour in enumerate(_STATES.values()) for edge in (i / n, (i + 1) / n)]
    bar = dict(tickvals=list(range(n)), ticktext=list(_STATES), len=0.35, y=0, yanchor="bottom")
    style = dict(zmin=-0.5, zmax=n - 0.5, colorscale=scale, ygap=2, colorbar=bar)
    hover = wide("hover").astype(object).fillna("").to_numpy()
    return heatmap_trace(wide("code").to_numpy(dtype=float), hover, "state", x=positions, y=policies, **style)


def _shade(fig: go.Figure, marks: pd.DataFrame | None) -> None:
    """A translucent band over both panels for each marked span, named once in the legend."""
    if marks is None or marks.empty:
        return
    for name, spans in marks.groupby("name", sort=False):
        colour = MARK_COLOURS.get(str(name), "#1f78b4")
        for start, end in zip(spans["start"], spans["end"]):
            band = dict(type="rect", xref="x", yref="paper", x0=start - 0.5, x1=end - 0.5, y0=0, y1=1)
            fig.add_shape(**band, fillcolor=colour, opacity=0.2, line_width=0, layer="below")
        swatch = dict(symbol="square", size=12, color=colour, opacity=0.5)
        key = go.Scatter(x=[None], y=[None], mode="markers", name=f"{html_text(str(name))} (shaded)")
        fig.add_trace(key.update(marker=swatch, hoverinfo="skip"))
