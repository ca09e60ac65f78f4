"""The eviction/merge timeline: steps x token positions for one policy, layer and kv-head.

What it is not: I/O or model code; input frames follow d2o_core.events' schemas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .common import _EVICT, _MERGE, _STEP_AXIS, _check, _clean, _empty, _hover, _layout, _titled

# Up to this many events, SVG markers: a browser draws a few thousand faster than it starts WebGL
# (software WebGL without a GPU took ~1 s for a 2k-event timeline, SVG ~0.2 s); beyond, WebGL.
WEBGL_FROM = 5_000


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
        x = step, y = position: marker traces "evicted" and "merged", and one line
        trace "merged into" joining each merge to its target position.
    """
    title = _titled(f"Evictions and merges · layer {layer}, head {head}", policy)
    needed = ["step", "layer", "head", "kind", "position", "token", "target_position", "similarity", "score"]
    if _check(events, needed, title):
        return _empty(title)
    sel = events[(events["layer"] == layer) & (events["head"] == head)]
    if sel.empty:
        return _empty(title, f"No evictions or merges at layer {layer}, head {head}")
    # Rows of every layer name positions, so a target's text is usually found even if it never left here.
    names = _clean(events.drop_duplicates("position").set_index("position")["token"])
    sel = sel.assign(
        text=_clean(sel["token"]), target=("<b>" + sel["target_position"].map(names) + "</b> ").fillna("")
    )
    template = "<b>{text}</b><br>position {position}<br>step {step}<br>score {score:.3g}"
    scatter = go.Scattergl if len(sel) >= WEBGL_FROM else go.Scatter
    fig = go.Figure()
    for kind, name, colour, symbol in (
        ("evict", "evicted", _EVICT, "x"),
        ("merge", "merged", _MERGE, "diamond"),
    ):
        rows = sel[sel["kind"] == kind]
        extra = "<br>similarity {similarity:.3g}<br>merged into {target}(position {target_position})"
        hover = _hover(template + (extra if kind == "merge" else ""), rows)
        marker = dict(color=colour, symbol=symbol, size=7, opacity=0.8)
        fig.add_trace(scatter(x=rows["step"], y=rows["position"], mode="markers", name=name, marker=marker))
        fig.data[-1].update(hovertext=hover, hoverinfo="text")
    merges = sel[sel["kind"] == "merge"]
    # One None-separated trace for all links: a trace per merge would not scale to thousands.
    link_x, link_y = np.full((2, 3 * len(merges)), None, dtype=object)
    # Slanted a little to the right, so links of one step do not hide each other on a vertical line.
    link_x[0::3], link_x[1::3] = merges["step"].to_numpy(), merges["step"].to_numpy() + 0.35
    link_y[0::3], link_y[1::3] = merges["position"].to_numpy(), merges["target_position"].to_numpy()
    line = dict(color=_MERGE, width=1)
    fig.add_trace(scatter(x=link_x, y=link_y, mode="lines", name="merged into", line=line, opacity=0.4))
    fig.data[-1].update(hoverinfo="skip")
    if n_prompt > 0:
        label = dict(annotation_text="generated tokens start", annotation_position="top left")
        fig.add_hline(y=n_prompt - 0.5, line=dict(dash="dash", color="grey", width=1), **label)
    fig.update_xaxes(title_text=_STEP_AXIS)
    fig.update_yaxes(title_text="token position")
    return _layout(fig, title, 520)
