"""What every figure shares: the policy colour map, layout, empty placeholder, hover text, grids, the
token tiles with their pages (survival, step 0), the figure file and the one wording of D2O's F_l.

What it is not: a figure; each figure module under ui/figures/ builds one kind from a frame, with its
one-line "how to read this" caption (`CAPTION`) next to it.
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
EVICT, MERGE = "#d62728", "#1f77b4"
STEP_AXIS = "step (0 = prefill compression)"
# D2O's per-layer statistic, worded one way in every figure, caption, the About tab and docs/policies.md.
F_L_AXIS = "F_l (high = sparse)"
F_L_MEANING = (
    "F_l is D2O's attention-density statistic: high F_l = sparse, peaked attention (a few tokens take "
    "most of it; the layer gets a smaller budget), low F_l = dense, spread-out attention (a larger budget)"
)
TEXT_PX = 11  # the smallest text drawn in a cell; a cell too small for it shows none (hover still does)
TILE_PX = 30  # height of one row of token tiles, in pixels: room for TEXT_PX text and marks under it
FIGURE_FILE_NOTE = (
    "This file holds one figure without plotly.js (the library that draws it, ~4.7 MB), so that the "
    "figures of a run do not carry seven copies of it. Where plotly.js is not already loaded it shows "
    "nothing: open <b>report.html</b> from the same download, one offline file with every figure of the run."
)


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


def to_html(fig: go.Figure, caption: str = "") -> str:
    """An HTML document for `fig` without plotly.js: the figure's data, its caption and a note.

    plotly.js is ~4.7 MB; a run's downloads hold one offline report with it (ui/report_html.py), and
    figure files that do not repeat it. The note says so, and where to look instead.
    """
    title = html_text(str(fig.layout.title.text or "figure"))
    note = f"<p style='color:#555;font-family:sans-serif'>{FIGURE_FILE_NOTE}</p>"
    shown = f"<p style='font-family:sans-serif'>{html_text(caption)}</p>" if caption else ""
    body = fig.to_html(include_plotlyjs=False, full_html=False)
    return (
        f"<!DOCTYPE html>\n<html>\n<head><meta charset='utf-8'><title>{title}</title></head>\n"
        f"<body>\n{note}\n{body}\n{shown}\n</body>\n</html>\n"
    )


def apply_layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    legend = dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1)
    fig.update_layout(title=dict(text=title, x=0.01), height=height, legend=legend)
    fig.update_layout(margin=dict(l=70, r=30, t=90, b=60), hoverlabel=dict(font_family="monospace"))
    return fig


def empty_figure(title: str, message: str = NO_DATA) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return apply_layout(fig, title, 300)


def titled(title: str, policy: str) -> str:
    return f"{title} · {html_text(policy)}" if policy else title


def with_safe_labels(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with its `policy` labels escaped for plotly's HTML-like text (legends, ticks, hover).

    A label may come from a run file (ui/safe_text.py): plotly would draw `<a href>` in it as a link.
    """
    return df.assign(policy=df["policy"].map(html_text))


def missing_columns(df: pd.DataFrame, columns: list[str], title: str) -> bool:
    """True when `df` has no rows; ValueError when it lacks a column the figure needs."""
    if df.empty:
        return True
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{title!r} needs columns {missing}; got {list(df.columns)}")
    return False


def clean_tokens(tokens: pd.Series, width: int | None = None) -> pd.Series:
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


def hover_text(template: str, df: pd.DataFrame) -> np.ndarray:
    """One hover string per row of `df`, filling `template`'s ``{column:spec}`` fields."""
    return np.array([template.format(**row) for row in df.to_dict("records")], dtype=object)


def heatmap_trace(z: np.ndarray, hover: np.ndarray, bar_title: str, **style) -> go.Heatmap:
    bar = dict(title=dict(text=bar_title, side="right"), thickness=12) | style.pop("colorbar", {})
    return go.Heatmap(z=z, hovertext=hover, hoverinfo="text", hoverongaps=False, colorbar=bar, **style)


def layer_step_grid(df: pd.DataFrame, x: str, y: str, z: str) -> tuple[list, list, np.ndarray, np.ndarray]:
    """Wide `z` and `hover` grids: rows = sorted `y`, columns = `x` in order of appearance."""
    df = df.drop_duplicates([y, x], keep="last")
    xs, ys = list(pd.unique(df[x])), sorted(pd.unique(df[y]))
    wide = lambda values: df.pivot(index=y, columns=x, values=values).reindex(index=ys, columns=xs)
    return xs, ys, wide(z).to_numpy(dtype=float), wide("hover").astype(object).fillna("").to_numpy()


def layers_height(n_layers: int) -> int:
    return int(np.clip(140 + 18 * n_layers, 360, 900))


def token_tiles(
    positions: np.ndarray, per_row: int, n_prompt: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Reading-order tiles for sorted token `positions`: (column, row) of each, and the row count.

    With `n_prompt`, positions from it on (generated tokens) start on a row of their own.
    """
    if per_row < 1:
        raise ValueError(f"per_row must be at least 1, got {per_row}")
    index = np.arange(len(positions))
    generated = np.zeros(len(positions), dtype=bool) if n_prompt is None else positions >= n_prompt
    n_first = int((~generated).sum())
    rows_first = -(-n_first // per_row)
    col = np.where(generated, (index - n_first) % per_row, index % per_row)
    row = np.where(generated, rows_first + (index - n_first) // per_row, index // per_row)
    return col, row, int(row.max()) + 1 if len(row) else 0


def tile_boxes(col: np.ndarray, row: np.ndarray, inset: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """None-separated outlines of tiles (data units, so they scale with the tiles): x and y arrays."""
    box = np.full((len(col), 6), None, dtype=object)
    box_x, box_y = box.copy(), box.copy()
    box_x[:, :5] = col[:, None] + inset * np.array([-1, 1, 1, -1, -1])
    box_y[:, :5] = row[:, None] + inset * np.array([-1, -1, 1, 1, -1])
    return box_x.ravel(), box_y.ravel()


def paged(fig: go.Figure, n_rows: int, rows_per_page: int, row_px: int, extra: int) -> int:
    """Show at most `rows_per_page` rows of tiles, with a menu of pages; returns the figure's height.

    Rows keep `row_px` pixels whatever the prompt's length (text stays TEXT_PX); a long prompt gets
    pages (a menu above the tiles: "tokens 0-479", ...) and can be dragged up and down.
    """
    shown = max(1, min(n_rows, rows_per_page))
    fig.update_yaxes(range=[shown - 0.5, -0.5], autorange=False, fixedrange=False)
    fig.update_xaxes(fixedrange=True)
    if n_rows > rows_per_page:
        pages = range(0, n_rows, rows_per_page)
        buttons = [
            dict(
                label=f"rows {p + 1}-{min(p + rows_per_page, n_rows)} of {n_rows}",
                method="relayout",
                args=[{"yaxis.range": [min(p + rows_per_page, n_rows) - 0.5, p - 0.5]}],
            )
            for p in pages
        ]
        menu = dict(buttons=buttons, type="dropdown", x=0, xanchor="left", y=1.0, yanchor="bottom", active=0)
        fig.update_layout(updatemenus=[menu], dragmode="pan")
    return extra + row_px * shown
