"""The eviction/merge timeline of one policy, layer and kv-head: step 0 in a band of its own, then decoding.

Step 0 (the prompt compression) removes hundreds of tokens at once; drawn at x = 0 they piled into
one unreadable column. Here the left band shows, along the same position axis, the share of the
prompt's positions that step 0 merged or evicted (bars per span of positions; the step-0 view shows
them token by token), and the right panel the decoding steps, one marker per token that left, with a
line from each merged token to the one that absorbed it.

What it is not: I/O or model code; input frames follow d2o_core.events' schemas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import (
    EVICT,
    MERGE,
    apply_layout,
    clean_tokens,
    empty_figure,
    hover_text,
    missing_columns,
    titled,
)

CAPTION = (
    "Left: how much of each stretch of the prompt the compression at step 0 removed (blue = merged, "
    "red = evicted; the step-0 view shows it token by token). Right: each token that left while "
    "generating, at its step (x) and position (y); a line joins each merged token to the token that "
    "absorbed it."
)
# Up to this many events, SVG markers: a browser draws a few thousand faster than it starts WebGL
# (software WebGL without a GPU took ~1 s for a 2k-event timeline, SVG ~0.2 s); beyond, WebGL.
WEBGL_FROM = 5_000
STEP0_BINS = 64  # at most this many bars in the step-0 band; a short prompt gets one bar per position


def timeline(events: pd.DataFrame, layer: int, head: int, n_prompt: int, policy: str = "") -> go.Figure:
    """When each token left one (layer, kv-head) cache, and which token absorbed each merge.

    Parameters
    ----------
    events : DataFrame
        EVENTS_SCHEMA rows of one policy, all layers and heads (filtered here).
    layer, head : int
        The layer and kv-head to show.
    n_prompt : int
        Prompt length; positions from here on are generated tokens.
    policy : str
        Label shown in the title.

    Returns
    -------
    go.Figure
        Two panels sharing y = position. Left (x axis "x"): horizontal stacked bars "merged at step 0"
        and "evicted at step 0", the share of each span of prompt positions that step 0 removed.
        Right (x axis "x2", steps from 1): marker traces "evicted" and "merged", and one line trace
        "merged into" joining each merge to its target position.
    """
    title = titled(f"Evictions and merges · layer {layer}, head {head}", policy)
    needed = ["step", "layer", "head", "kind", "position", "token", "target_position", "similarity", "score"]
    if missing_columns(events, needed, title):
        return empty_figure(title)
    sel = events[(events["layer"] == layer) & (events["head"] == head)]
    if sel.empty:
        return empty_figure(title, f"No evictions or merges at layer {layer}, head {head}")
    fig = make_subplots(
        rows=1, cols=2, shared_yaxes=True, column_widths=[0.22, 0.78], horizontal_spacing=0.03
    )
    first = sel[sel["step"] == 0]
    _step0_band(fig, first, n_prompt)
    later = sel[sel["step"] > 0]
    # Rows of every layer name positions, so a target's text is usually found even if it never left here.
    names = clean_tokens(events.drop_duplicates("position").set_index("position")["token"])
    later = later.assign(
        text=clean_tokens(later["token"]),
        target=("<b>" + later["target_position"].map(names) + "</b> ").fillna(""),
    )
    template = "<b>{text}</b><br>position {position}<br>step {step}<br>score {score:.3g}"
    scatter = go.Scattergl if len(later) >= WEBGL_FROM else go.Scatter
    for kind, name, colour, symbol in (
        ("evict", "evicted", EVICT, "x"),
        ("merge", "merged", MERGE, "diamond"),
    ):
        rows = later[later["kind"] == kind]
        extra = "<br>similarity {similarity:.3g}<br>merged into {target}(position {target_position})"
        hover = hover_text(template + (extra if kind == "merge" else ""), rows)
        marker = dict(color=colour, symbol=symbol, size=7, opacity=0.8)
        trace = scatter(x=rows["step"], y=rows["position"], mode="markers", name=name, marker=marker)
        fig.add_trace(trace.update(hovertext=hover, hoverinfo="text"), 1, 2)
    merges = later[later["kind"] == "merge"]
    # One None-separated trace for all links: a trace per merge would not scale to thousands.
    link_x, link_y = np.full((2, 3 * len(merges)), None, dtype=object)
    # Slanted a little to the right, so links of one step do not hide each other on a vertical line.
    link_x[0::3], link_x[1::3] = merges["step"].to_numpy(), merges["step"].to_numpy() + 0.35
    link_y[0::3], link_y[1::3] = merges["position"].to_numpy(), merges["target_position"].to_numpy()
    line = dict(color=MERGE, width=1)
    links = scatter(x=link_x, y=link_y, mode="lines", name="merged into", line=line, opacity=0.4)
    fig.add_trace(links.update(hoverinfo="skip"), 1, 2)
    if later.empty:
        note = dict(xref="x2 domain", yref="y2 domain", x=0.5, y=0.5, showarrow=False)
        fig.add_annotation(text="nothing left this cache while generating", **note)
    if n_prompt > 0:
        style = dict(line=dict(dash="dash", color="grey", width=1))
        fig.add_hline(y=n_prompt - 0.5, row=1, col=2, **style)
        fig.add_hline(y=n_prompt - 0.5, row=1, col=1, **style)
        label = dict(
            xref="x2 domain", x=1, y=n_prompt - 0.5, xanchor="right", yanchor="bottom", showarrow=False
        )
        fig.add_annotation(text="generated tokens start", font_color="grey", **label)
    fig.update_xaxes(title_text="step 0: share removed", range=[0, 1], tickformat=".0%", row=1, col=1)
    fig.update_xaxes(title_text="decode step", rangemode="tozero", row=1, col=2)
    fig.update_yaxes(title_text="token position", row=1, col=1)
    return apply_layout(fig, title, 560).update_layout(barmode="stack", bargap=0.05)


def _step0_band(fig: go.Figure, first: pd.DataFrame, n_prompt: int) -> None:
    """Stacked bars per span of prompt positions: the share step 0 merged, then the share it evicted."""
    top = max(n_prompt, int(first["position"].max()) + 1 if len(first) else 0)
    if top <= 0 or first.empty:
        note = dict(xref="x domain", yref="y domain", x=0.5, y=0.5, showarrow=False)
        fig.add_annotation(text="step 0 removed<br>nothing here", **note)
        return
    width = max(1, -(-top // STEP0_BINS))
    edges = np.arange(0, top + width, width)
    starts, ends = edges[:-1], np.minimum(edges[1:], top)
    size = ends - starts
    count = lambda kind: np.histogram(first.loc[first["kind"] == kind, "position"], bins=edges)[0]  # noqa: E731
    for kind, name, colour in (("merge", "merged at step 0", MERGE), ("evict", "evicted at step 0", EVICT)):
        share = count(kind) / size
        span = [f"position {a}" if b - a == 1 else f"positions {a}-{b - 1}" for a, b in zip(starts, ends)]
        hover = [f"{s}<br>{name}: {c} of {n} ({v:.0%})" for s, c, n, v in zip(span, count(kind), size, share)]
        bars = go.Bar(x=share, y=starts + (size - 1) / 2, width=size, orientation="h", name=name)
        bars.update(marker_color=colour, hovertext=hover, hoverinfo="text")
        fig.add_trace(bars, 1, 1)
