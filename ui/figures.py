"""Plotly figures for the D2O Cache Explorer: run frames in, `go.Figure` out.

What this module is: one pure builder per figure of the app (per-layer budgets,
cache size over time, eviction/merge timeline, token survival, drift from the
full cache, budget sweeps), a policy colour map shared by all of them, and an
offline HTML export. Inputs are the frames whose schemas live in
`d2o_core.events`; frames that combine policies carry a leading `policy` column.

What it is not: it does no I/O, runs no model and imports neither gradio nor
torch; where a figure goes on the page is `ui/layout.py`'s business.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

NO_DATA = "No data yet: run a prompt"
_FAMILIES = {  # base colour first, then shades for variants such as "d2o(variant=official)"
    "full": ("#4d4d4d", "#000000", "#969696", "#252525"),
    "streaming": ("#1f77b4", "#6baed6", "#08519c", "#9ecae1"),
    "h2o": ("#ff7f0e", "#fdae6b", "#a63603", "#e6550d"),
    "d2o": ("#2ca02c", "#74c476", "#006d2c", "#a1d99b"),
}
_PALETTE = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728", "#7f7f7f")
_EVICT, _MERGE = "#d62728", "#1f77b4"
_STEP_AXIS = "step (0 = prefill compression)"


def policy_colours(policies: list[str]) -> dict[str, str]:
    """Map policy labels to colours, the same way in every figure.

    Parameters
    ----------
    policies : list of str
        Policy labels, e.g. ``["full", "h2o", "d2o", "d2o(variant=official)"]``.

    Returns
    -------
    dict of str to str
        Fixed colours for "full", "streaming", "h2o", "d2o"; labels starting with one of those get a
        shade of it (then palette colours), others palette colours. Depends only on the set of labels.
    """
    colours: dict[str, str] = {}
    used = dict.fromkeys(_FAMILIES, 0)
    spare = 0
    # Shortest first, so a bare family name gets its base colour before its variants.
    for label in sorted(set(policies), key=lambda p: (len(p), p)):
        family = next((f for f in _FAMILIES if label.lower().startswith(f)), None)
        if family is not None and used[family] < len(_FAMILIES[family]):
            colours[label] = _FAMILIES[family][used[family]]
            used[family] += 1
        else:
            colours[label] = _PALETTE[spare % len(_PALETTE)]
            spare += 1
    return colours


def to_html(fig: go.Figure) -> str:
    """A standalone HTML document for `fig` with plotly.js inlined, so it opens offline."""
    return fig.to_html(include_plotlyjs=True, full_html=True)


def _layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    legend = dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1)
    fig.update_layout(template="plotly_white", title=dict(text=title, x=0.01), height=height, legend=legend)
    fig.update_layout(margin=dict(l=70, r=30, t=90, b=60), hoverlabel=dict(font_family="monospace"))
    return fig


def _empty(title: str, message: str = NO_DATA) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, 300)


def _titled(title: str, policy: str) -> str:
    return f"{title} · {policy}" if policy else title


def _check(df: pd.DataFrame, columns: list[str], title: str) -> bool:
    """True when `df` has no rows; ValueError when it lacks a column the figure needs."""
    if df.empty:
        return True
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{title!r} needs columns {missing}; got {list(df.columns)}")
    return False


def _clean(tokens: pd.Series, width: int | None = None) -> pd.Series:
    """Token text made visible and safe for plotly's HTML-like labels.

    Newlines become "⏎", tabs "⇥", leading spaces "·"; `width` truncates with "…"
    before escaping, so an HTML entity is never cut in half.
    """
    text = tokens.astype(str).fillna("").str.replace("\r\n", "⏎")
    text = text.str.replace("\n", "⏎").str.replace("\r", "⏎").str.replace("\t", "⇥")
    text = text.str.replace(r"^ +", lambda m: "·" * len(m.group(0)), regex=True)
    if width is not None:
        text = text.where(text.str.len() <= width, text.str.slice(0, width - 1) + "…")
    text = text.str.replace("&", "&amp;").str.replace("<", "&lt;").str.replace(">", "&gt;")
    return text.mask(text == "", "∅")


def _hover(template: str, df: pd.DataFrame) -> np.ndarray:
    """One hover string per row of `df`, filling `template`'s ``{column:spec}`` fields."""
    return np.array([template.format(**row) for row in df.to_dict("records")], dtype=object)


def _heatmap(z: np.ndarray, hover: np.ndarray, bar_title: str, **style) -> go.Heatmap:
    bar = dict(title=dict(text=bar_title, side="right"), thickness=12) | style.pop("colorbar", {})
    return go.Heatmap(z=z, hovertext=hover, hoverinfo="text", hoverongaps=False, colorbar=bar, **style)


def _grid(df: pd.DataFrame, x: str, y: str, z: str) -> tuple[list, list, np.ndarray, np.ndarray]:
    """Wide `z` and `hover` grids: rows = sorted `y`, columns = `x` in order of appearance."""
    df = df.drop_duplicates([y, x], keep="last")
    xs, ys = list(pd.unique(df[x])), sorted(pd.unique(df[y]))
    wide = lambda values: df.pivot(index=y, columns=x, values=values).reindex(index=ys, columns=xs)
    return xs, ys, wide(z).to_numpy(dtype=float), wide("hover").astype(object).fillna("").to_numpy()


def _layers_height(n_layers: int) -> int:
    return int(np.clip(140 + 18 * n_layers, 360, 900))


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
    df = layer_budgets.assign(protected=np.where(layer_budgets["protected"], "<br>protected", ""))
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
    fig = go.Figure()
    for kind, name, colour, symbol in (
        ("evict", "evicted", _EVICT, "x"),
        ("merge", "merged", _MERGE, "diamond"),
    ):
        rows = sel[sel["kind"] == kind]
        extra = "<br>similarity {similarity:.3g}<br>merged into {target}(position {target_position})"
        hover = _hover(template + (extra if kind == "merge" else ""), rows)
        marker = dict(color=colour, symbol=symbol, size=7, opacity=0.8)
        fig.add_trace(
            go.Scattergl(x=rows["step"], y=rows["position"], mode="markers", name=name, marker=marker)
        )
        fig.data[-1].update(hovertext=hover, hoverinfo="text")
    merges = sel[sel["kind"] == "merge"]
    # One None-separated trace for all links: a trace per merge would not scale to thousands.
    link_x, link_y = np.full((2, 3 * len(merges)), None, dtype=object)
    # Slanted a little to the right, so links of one step do not hide each other on a vertical line.
    link_x[0::3], link_x[1::3] = merges["step"].to_numpy(), merges["step"].to_numpy() + 0.35
    link_y[0::3], link_y[1::3] = merges["position"].to_numpy(), merges["target_position"].to_numpy()
    line = dict(color=_MERGE, width=1)
    fig.add_trace(go.Scattergl(x=link_x, y=link_y, mode="lines", name="merged into", line=line, opacity=0.4))
    fig.data[-1].update(hoverinfo="skip")
    if n_prompt > 0:
        label = dict(annotation_text="generated tokens start", annotation_position="top left")
        fig.add_hline(y=n_prompt - 0.5, line=dict(dash="dash", color="grey", width=1), **label)
    fig.update_xaxes(title_text=_STEP_AXIS)
    fig.update_yaxes(title_text="token position")
    return _layout(fig, title, 520)


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
    if _check(drift, ["policy", "step", "kl_to_full", "agrees"], title):
        return _empty(title)
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
    return _layout(fig, title, 560)


def sweep_curves(sweep: pd.DataFrame, y: str = "score", facet: str | None = "task") -> go.Figure:
    """Mean `y` against KV budget: one line per policy, one panel per `facet` value.

    Parameters
    ----------
    sweep : DataFrame
        Tidy results with ``policy``, ``budget`` (fraction 0..1), `y` and optionally `facet`.
    y : str
        Column to average.
    facet : str or None
        Column that splits panels; None, or a column the frame lacks, gives one panel.

    Returns
    -------
    go.Figure
        Lines with markers, y axes shared; hover shows the mean and how many rows it averages.
    """
    title = f"{y} against KV budget"
    if _check(sweep, ["policy", "budget", y], title):
        return _empty(title)
    facet = facet if facet is not None and facet in sweep.columns else None
    keys = ([facet] if facet else []) + ["policy", "budget"]
    agg = sweep.groupby(keys, sort=False).agg(mean=(y, "mean"), n=(y, "count")).reset_index()
    panels = sorted(pd.unique(agg[facet]), key=str) if facet else [None]
    n_cols = min(len(panels), 4)  # wider than four panels is unreadable on a ~1000 px page
    n_rows = -(-len(panels) // n_cols)
    names = [str(p) for p in panels] if facet else None
    grid = dict(shared_yaxes="all", shared_xaxes="all", horizontal_spacing=0.04, vertical_spacing=0.14)
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=names, **grid)
    colours = policy_colours(list(pd.unique(agg["policy"])))
    hover = f"budget %{{x:.0%}}<br>mean {y} %{{y:.3g}}<br>n = %{{customdata}}"
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
    fig.update_yaxes(title_text=f"mean {y}", col=1)
    fig = _layout(fig, title, 420 + 260 * (n_rows - 1))
    # Facet titles sit where a top legend would go, so this legend stands on the right.
    return fig.update_layout(legend=dict(orientation="v", x=1.02, xanchor="left", y=1, yanchor="top"))
