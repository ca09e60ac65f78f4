"""What every figure shares: the policy colour map, layout, empty placeholder, hover text and grids.

What it is not: a figure; each figure module under ui/figures/ builds one kind from a frame.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from ..safe_text import html_text

# Every figure here is drawn on plotly_white. As the default, plotly attaches it to a new figure
# without validating it again; passed per figure, it is deep-copied and checked each time (~25 ms
# of the ~40 ms a small figure takes, and a page draws 7 of them per run, per picker move).
pio.templates.default = "plotly_white"
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
    fig.update_layout(title=dict(text=title, x=0.01), height=height, legend=legend)
    fig.update_layout(margin=dict(l=70, r=30, t=90, b=60), hoverlabel=dict(font_family="monospace"))
    return fig


def _empty(title: str, message: str = NO_DATA) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, 300)


def _titled(title: str, policy: str) -> str:
    return f"{title} · {html_text(policy)}" if policy else title


def _labelled(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with its `policy` labels escaped for plotly's HTML-like text (legends, ticks, hover).

    A label may come from a run file (ui/safe_text.py): plotly would draw `<a href>` in it as a link.
    """
    return df.assign(policy=df["policy"].map(html_text))


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
    text = text.map(html_text)
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
