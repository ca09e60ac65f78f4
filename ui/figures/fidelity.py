"""Drift from the full cache (per-step KL and agreement) and budget sweep curves.

What it is not: I/O or model code; input frames follow d2o_core.events' schemas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..safe_text import html_text
from .common import apply_layout, empty_figure, missing_columns, policy_colours, with_safe_labels

CAPTIONS = {
    "drift": (
        "Each column reads the full cache's own text; top: at each step, how far its next-token "
        "distribution is from the full cache's (KL, 0 = identical); bottom: the share of steps so far "
        "on which it would have picked the same next token."
    ),
    "sweep_curves": (
        "One measure (agreement with the full cache, KL to it, or a task's score) against the KV budget, "
        "the share of the prompt each layer keeps: one line per policy configuration, its mean at each "
        "budget (hover: over how many runs)."
    ),
}
# What a sweep's columns measure, in words (titles, axes, hover, tables), and how to show a value:
# {column: (words, plotly number format)}; a fraction of 1 is shown in %, as budgets are.
MEASURES = {
    "score": ("Task score", ".0%"),
    "token_agreement": ("Agreement with the full cache's next token", ".0%"),
    "mean_kl_to_full": ("KL divergence to the full cache (nats per step)", ".3g"),
    "nll_of_reference": ("NLL of the full cache's text (nats per token)", ".3g"),
    "kv_fraction": ("KV cache kept (share of the full cache's)", ".0%"),
    "decode_ms_per_token": ("Decode time (ms per token)", ".3g"),
}


def drift(drift: pd.DataFrame) -> go.Figure:
    """Per-step KL to the full cache and running top-1 agreement, one line per policy.

    Parameters
    ----------
    drift : DataFrame
        ``policy`` + DRIFT_SCHEMA, teacher-forced on the full cache's tokens.

    Returns
    -------
    go.Figure
        Two stacked panels sharing x = step: kl_to_full, and the cumulative mean of `agrees`.
    """
    title = "Drift from the full cache (teacher-forced on its tokens)"
    if missing_columns(drift, ["policy", "step", "kl_to_full", "agrees"], title):
        return empty_figure(title)
    drift = with_safe_labels(drift)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    colours = policy_colours(list(pd.unique(drift["policy"])))
    for policy, rows in drift.groupby("policy", sort=False):
        rows = rows.sort_values("step", kind="stable")
        agreement = rows["agrees"].astype(float).cumsum().to_numpy() / np.arange(1, len(rows) + 1)
        style = dict(name=policy, legendgroup=policy, mode="lines+markers", marker_size=4)
        style["line"] = dict(color=colours[policy], width=2)
        kl = go.Scatter(
            x=rows["step"], y=rows["kl_to_full"], hovertemplate="step %{x}<br>KL %{y:.4g}", **style
        )
        fig.add_trace(kl, 1, 1)
        agree = go.Scatter(
            x=rows["step"], y=agreement, hovertemplate="step %{x}<br>agreement %{y:.1%}", **style
        )
        fig.add_trace(agree.update(showlegend=False), 2, 1)
    fig.update_yaxes(title_text="KL to full (nats)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="top-1 agreement so far", range=[0, 1.02], tickformat=".0%", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    return apply_layout(fig, title, 560)


def sweep_curves(sweep: pd.DataFrame, y: str = "score", facet: str | None = "task") -> go.Figure:
    """Mean `y` against KV budget: one line per policy, one panel per `facet` value.

    Parameters
    ----------
    sweep : DataFrame
        Tidy results with ``policy``, ``budget`` (fraction 0..1), `y` and optionally `facet`.
    y : str
        Column to average; named in words where `MEASURES` knows it.
    facet : str or None
        Column that splits panels; None, or a column the frame lacks, gives one panel.

    Returns
    -------
    go.Figure
        Lines with markers, y axes shared; hover shows the mean and how many rows it averages.
    """
    words, number = MEASURES.get(y, (y.replace("_", " "), ".3g"))
    title = f"{words} against the KV budget"
    if missing_columns(sweep, ["policy", "budget", y], title):
        return empty_figure(title)
    facet = facet if facet is not None and facet in sweep.columns else None
    keys = ([facet] if facet else []) + ["policy", "budget"]
    agg = (
        with_safe_labels(sweep).groupby(keys, sort=False).agg(mean=(y, "mean"), n=(y, "count")).reset_index()
    )
    panels = sorted(pd.unique(agg[facet]), key=str) if facet else [None]
    n_cols = min(len(panels), 4)  # wider than four panels is unreadable on a ~1000 px page
    n_rows = -(-len(panels) // n_cols)
    names = [html_text(p) for p in panels] if facet else None
    grid = dict(shared_yaxes="all", shared_xaxes="all", horizontal_spacing=0.04, vertical_spacing=0.14)
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=names, **grid)
    colours = policy_colours(list(pd.unique(agg["policy"])))
    hover = f"budget %{{x:.0%}}<br>{html_text(words)}: %{{y:{number}}}<br>mean of %{{customdata}} run(s)"
    seen: set[str] = set()
    for i, panel in enumerate(panels):
        part = agg if facet is None else agg[agg[facet] == panel]
        for policy, rows in part.groupby("policy", sort=False):
            rows = rows.sort_values("budget")
            line = go.Scatter(x=rows["budget"], y=rows["mean"], customdata=rows["n"], mode="lines+markers")
            line.update(name=policy, legendgroup=policy, showlegend=policy not in seen, hovertemplate=hover)
            fig.add_trace(line.update(line_color=colours[policy]), i // n_cols + 1, i % n_cols + 1)
            seen.add(policy)
    fig.update_xaxes(tickformat=".0%", title_text="KV budget (% of prompt)", row=n_rows)
    fig.update_yaxes(title_text=html_text(words), col=1)
    if number.endswith("%"):
        fig.update_yaxes(tickformat=".0%")
    fig = apply_layout(fig, title, 420 + 260 * (n_rows - 1))
    # Facet titles sit where a top legend would go, so this legend stands on the right.
    return fig.update_layout(legend=dict(orientation="v", x=1.02, xanchor="left", y=1, yanchor="top"))
