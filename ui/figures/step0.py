"""Step 0 of its own: what the prompt compression did to one (layer, kv-head), readable without hovering.

The prompt as tiles of text, in reading order. A kept token is plain; an evicted one is struck
through on grey; a merged one takes the colour of the kept token that absorbed it and says its
number ("→#7"), and that kept token carries the same colour, strong, with "#7 ←5" (it absorbed 5).

What it is not: I/O or model code; `events` follows d2o_core.events' EVENTS_SCHEMA (step 0 rows are used).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .common import (
    TEXT_PX,
    apply_layout,
    clean_tokens,
    empty_figure,
    missing_columns,
    paged,
    titled,
    token_tiles,
)

CAPTION = (
    "The prompt as text for one layer and head, right after the prompt compression (step 0): struck "
    'through on grey = evicted; a coloured token with "→#7" was merged into the kept token marked '
    '"#7" in the same, stronger colour ("←5": it absorbed 5); plain = kept as it was.'
)
_KEPT, _EVICTED = "#ffffff", "#d9d9d9"
# Pairs (strong: the kept target, light: what merged into it); numbers cycle through them.
_PAIRS = (
    ("#1f77b4", "#aec7e8"),
    ("#ff7f0e", "#ffbb78"),
    ("#2ca02c", "#98df8a"),
    ("#9467bd", "#c5b0d5"),
    ("#8c564b", "#c49c94"),
    ("#e377c2", "#f7b6d2"),
    ("#17becf", "#9edae5"),
    ("#bcbd22", "#dbdb8d"),
)
ROW_PX = 44  # two lines of TEXT_PX text per tile: the token, then its tag


def step0(
    events: pd.DataFrame,
    prompt_tokens: Sequence[str],
    layer: int,
    head: int,
    policy: str = "",
    n_sink: int = 0,
    per_row: int = 16,
    rows_per_page: int = 16,
) -> go.Figure:
    """Which prompt tokens the step-0 compression evicted, and which kept token absorbed each merged one.

    Parameters
    ----------
    events : DataFrame
        EVENTS_SCHEMA rows of one policy (all steps, layers and heads; step 0 of `layer`, `head` is used).
    prompt_tokens : sequence of str
        The prompt's token texts (position = index).
    layer, head : int
        The layer and kv-head to show.
    policy : str
        Label shown in the title.
    n_sink : int
        The policy's attention sinks (tagged "sink").
    per_row, rows_per_page : int
        Tokens per row; rows shown at once (more get a page menu).

    Returns
    -------
    go.Figure
        data[0]: one heatmap of tiles whose `customdata` is the state per tile ("kept", "target",
        "merged", "evicted", "" for padding) and whose text is the token over its tag ("→#n" merged,
        "#n ←k" target, "sink"); evicted tokens are struck through (<s>). Then legend-only traces.
    """
    title = titled(f"Step 0, the prompt compression · layer {layer}, head {head}", policy)
    n = len(prompt_tokens)
    if n == 0:
        return empty_figure(title)
    needed = ["step", "layer", "head", "kind", "position", "target_position", "similarity"]
    sel = events.iloc[0:0] if missing_columns(events, needed, title) else events
    if not sel.empty:
        sel = sel[(sel["step"] == 0) & (sel["layer"] == layer) & (sel["head"] == head)]
        sel = sel[(sel["position"] < n)]
    merged = sel[(sel["kind"] == "merge") & sel["target_position"].between(0, n - 1)]
    state = np.full(n, "kept", dtype=object)
    state[sel["position"].to_numpy(dtype=np.int64)] = "evicted"
    targets = np.sort(pd.unique(merged["target_position"].to_numpy(dtype=np.int64)))
    state[merged["position"].to_numpy(dtype=np.int64)] = "merged"
    state[targets] = "target"
    sources, into = merged["position"].to_numpy(np.int64), merged["target_position"].to_numpy(np.int64)
    # Targets are numbered 1, 2, ... in reading order; a merged token carries its target's number.
    number = np.zeros(n, dtype=np.int64)
    number[targets] = np.arange(1, len(targets) + 1)
    number[sources] = number[into]
    absorbed = np.bincount(into, minlength=n)[:n]
    words = clean_tokens(pd.Series(list(prompt_tokens), dtype=object), 7).to_numpy(dtype=object)
    tag = np.full(n, "", dtype=object)
    is_merged, is_target = state == "merged", state == "target"
    tag[is_merged] = [f"→#{k}" for k in number[is_merged]]
    tag[is_target] = [f"#{k} ←{a}" for k, a in zip(number[is_target], absorbed[is_target])]
    tag[(np.arange(n) < n_sink) & (state == "kept")] = "sink"
    text = np.where(state == "evicted", "<s>" + words + "</s>", words) + "<br>" + tag
    colour = np.full(n, _KEPT, dtype=object)
    colour[state == "evicted"] = _EVICTED
    pair = (number - 1) % len(_PAIRS)
    colour[is_target] = [_PAIRS[p][0] for p in pair[is_target]]
    colour[is_merged] = [_PAIRS[p][1] for p in pair[is_merged]]
    hover = _hovers(prompt_tokens, state, number, absorbed, merged)
    fig = go.Figure(_tiles_trace(colour, text, hover, state, per_row))
    counts = {s: int((state == s).sum()) for s in ("kept", "target", "merged", "evicted")}
    for name, swatch in (
        ("kept", _KEPT),
        ("evicted (struck through)", _EVICTED),
        ("merged → #n (light)", _PAIRS[0][1]),
        ("kept #n that absorbed merges (strong)", _PAIRS[0][0]),
    ):
        marker = dict(symbol="square", size=12, color=swatch, line=dict(color="#555", width=1))
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, marker=marker))
    left = counts["merged"] + counts["evicted"]
    summary = (
        f"{n} prompt tokens: {left} left at step 0 ({counts['merged']} merged into {counts['target']} kept "
        f"tokens, {counts['evicted']} evicted); {counts['kept'] + counts['target']} kept"
    )
    if sel.empty:
        summary = f"{n} prompt tokens, all kept at step 0 (nothing to compress here)"
    note = dict(x=0, xref="paper", y=1.0, yref="paper", yanchor="bottom", xanchor="left", showarrow=False)
    fig.add_annotation(text=summary, font_size=TEXT_PX + 1, yshift=34, **note)
    fig.update_xaxes(visible=False, range=[-0.6, per_row - 0.4])
    fig.update_yaxes(visible=False)
    n_rows = -(-n // per_row)
    height = paged(fig, n_rows, rows_per_page, ROW_PX, extra=190)
    fig = apply_layout(fig, title, height)
    return fig.update_layout(margin=dict(t=130, b=30, l=20, r=20), plot_bgcolor="#f7f7f7")


def _hovers(prompt_tokens, state, number, absorbed, merged: pd.DataFrame) -> np.ndarray:
    """Per token: its position and text, what step 0 did with it, and the other end of any merge."""
    full = clean_tokens(pd.Series(list(prompt_tokens), dtype=object)).to_numpy(dtype=object)
    n = len(full)
    hover = np.array([f"position {i}<br><b>{full[i]}</b><br>{state[i]}" for i in range(n)], dtype=object)
    for p, t, s in zip(merged["position"], merged["target_position"], merged["similarity"]):
        hover[p] += f" into #{number[t]} <b>{full[t]}</b> (position {t}), similarity {s:.3g}"
    for t, sources in merged.groupby("target_position")["position"]:
        names = ", ".join(str(full[p]) for p in list(sources)[:8]) + (", …" if len(sources) > 8 else "")
        hover[t] = (
            f"position {t}<br><b>{full[t]}</b><br>kept as #{number[t]}; absorbed {absorbed[t]}: {names}"
        )
    return hover


def _tiles_trace(colour, text, hover, state, per_row: int) -> go.Heatmap:
    """One heatmap whose cells take their own colours: z = the colour's index in a stepped scale."""
    n = len(colour)
    col, row, n_rows = token_tiles(np.arange(n), per_row)
    palette = list(dict.fromkeys([_KEPT, _EVICTED, *[c for pair in _PAIRS for c in pair]]))
    code = {c: i for i, c in enumerate(palette)}
    k = len(palette)
    scale = [[edge, c] for i, c in enumerate(palette) for edge in (i / k, (i + 1) / k)]

    def grid(values, fill, dtype=object):
        out = np.full((n_rows, per_row), fill, dtype=dtype)
        out[row, col] = values
        return out

    z = grid(np.array([code[c] for c in colour], dtype=float), np.nan, float)
    heat = go.Heatmap(
        z=z,
        zmin=-0.5,
        zmax=k - 0.5,
        colorscale=scale,
        showscale=False,
        xgap=2,
        ygap=2,
        text=grid(text, ""),
        texttemplate="%{text}",
        textfont=dict(size=TEXT_PX),  # colour: plotly picks one that contrasts with each cell
        customdata=grid(state, ""),
        hovertext=grid(hover, ""),
        hoverinfo="text",
        hoverongaps=False,
        name="tokens",
    )
    return heat
