"""Cache size over time: layers x steps, colour = stored entries, for one policy.

What it is not: I/O or model code; input frames follow d2o_core.events' schemas.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .common import _STEP_AXIS, _check, _empty, _grid, _heatmap, _hover, _layers_height, _layout, _titled


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
        Heatmap x = step (0 = prefill compression), y = layer, colour = stored entries per kv-head.
    """
    title = _titled("Cache size over time", policy)
    if _check(steps, ["step", "layer", "stored", "budget", "evicted", "merged"], title):
        return _empty(title)
    df = steps.sort_values(["step", "layer"], kind="stable")
    template = "step {step} · layer {layer}<br>stored {stored} / budget {budget}<br>evicted {evicted}"
    df["hover"] = _hover(template + " (merged {merged})", df)
    step_axis, layers, z, hover = _grid(df, "step", "layer", "stored")
    fig = go.Figure(
        _heatmap(z, hover, "entries per kv-head", x=step_axis, y=layers, zmin=0, colorscale="Blues")
    )
    fig.update_xaxes(title_text=_STEP_AXIS)
    fig.update_yaxes(title_text="layer")
    return _layout(fig, title, _layers_height(len(layers)))
