"""Plotly figures of the Throughput tab: throughput rows in, `go.Figure` out.

What this module is: two pure builders over the rows of `d2o_core.eval.throughput.run_throughput`
(one row per policy and batch, `mode` "cap" or "sweep"): tokens/s against batch size with each
policy's largest batch under the cap marked (`tokens_vs_batch`), and tokens/s at the cap per
policy with the ratio to the full cache on each bar (`cap_bars`). Colours follow
`ui.figures.policy_colours`, like every other figure of the app.

What it is not: no I/O, no model, no gradio; loading the stored JSON and the live run are
`ui/throughput_tab.py`'s business.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .common import apply_layout, empty_figure, policy_colours, with_safe_labels

CAPTIONS = {
    "tokens_vs_batch": (
        "Generated tokens per second as more rows decode together (log x), one line per policy; a star "
        "marks each policy's largest batch that fits under the KV memory cap."
    ),
    "cap_bars": (
        "Generated tokens per second of each policy at its largest batch under the same KV memory cap; "
        "the label gives the ratio to the full cache and the batch size."
    ),
}
NO_DATA = "No throughput results: run the benchmark (Run live, or `make results`)"
NEEDED = ("policy", "batch", "tokens_per_second", "mode")


def _usable(df: pd.DataFrame | None, mode: str) -> pd.DataFrame:
    if df is None or df.empty or not set(NEEDED) <= set(df.columns):
        return pd.DataFrame(columns=list(NEEDED))
    return with_safe_labels(df[df["mode"] == mode])


def _hover(df: pd.DataFrame) -> list[str]:
    kv = df["kv_mb_decode_peak"] if "kv_mb_decode_peak" in df else pd.Series(float("nan"), index=df.index)
    ms = df["decode_ms_per_step"] if "decode_ms_per_step" in df else pd.Series(float("nan"), index=df.index)
    return [
        f"{p}, batch {b}<br>{t:.1f} tokens/s, {m:.0f} ms/step<br>KV {k:.1f} MB"
        for p, b, t, m, k in zip(df["policy"], df["batch"], df["tokens_per_second"], ms, kv)
    ]


def tokens_vs_batch(df: pd.DataFrame, title: str = "Tokens per second against batch size") -> go.Figure:
    """One line per policy over the sweep's batch sizes; a star at each policy's largest batch under the cap.

    Parameters
    ----------
    df : rows with columns policy, batch, tokens_per_second, mode ("sweep" rows draw the lines,
        "cap" rows the stars); decode_ms_per_step, kv_mb_decode_peak and kv_mb_cap show on hover.
    """
    sweep, cap = _usable(df, "sweep"), _usable(df, "cap")
    if sweep.empty and cap.empty:
        return empty_figure(title, NO_DATA)
    colours = policy_colours(list(pd.concat([sweep["policy"], cap["policy"]]).unique()))
    fig = go.Figure()
    for policy, rows in sweep.groupby("policy", sort=False):
        rows = rows.sort_values("batch")
        fig.add_trace(
            go.Scatter(
                x=rows["batch"],
                y=rows["tokens_per_second"],
                mode="lines+markers",
                name=policy,
                line=dict(color=colours[policy]),
                hovertext=_hover(rows),
                hoverinfo="text",
                legendgroup=policy,
            )
        )
    for policy, rows in cap.groupby("policy", sort=False):
        alone = policy not in set(sweep["policy"])  # no line: the star needs its own legend entry
        fig.add_trace(
            go.Scatter(
                x=rows["batch"],
                y=rows["tokens_per_second"],
                mode="markers",
                name=f"{policy} (at the cap only)" if alone else f"{policy}: under the cap",
                marker=dict(symbol="star", size=16, color=colours[policy], line=dict(width=1, color="white")),
                hovertext=[f"largest batch under the cap<br>{h}" for h in _hover(rows)],
                hoverinfo="text",
                legendgroup=policy,
                showlegend=alone,
            )
        )
    if not cap.empty and not sweep.empty:  # one legend entry says what a star is
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name="largest batch under the KV cap",
                marker=dict(symbol="star", size=12, color="#969696"),
            )
        )
    batches = sorted(set(sweep["batch"]) | set(cap["batch"]))
    fig.update_xaxes(title_text="batch size (rows decoded together)", type="log", tickvals=batches)
    fig.update_yaxes(title_text="generated tokens per second", rangemode="tozero")
    apply_layout(fig, title, 460)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0))
    return fig.update_layout(margin=dict(b=110))


def cap_bars(df: pd.DataFrame, title: str = "Tokens per second under the same KV cap") -> go.Figure:
    """One bar per policy at its largest batch under the cap, labelled with its ratio to the full cache.

    Parameters
    ----------
    df : rows with columns policy, batch, tokens_per_second, mode; only "cap" rows are drawn.
        Without a "full" row the bars carry their batch size only.
    """
    cap = _usable(df, "cap")
    if cap.empty:
        return empty_figure(title, NO_DATA)
    full = cap.loc[cap["policy"] == "full", "tokens_per_second"]
    base = float(full.iloc[0]) if len(full) and full.iloc[0] > 0 else None
    colours = policy_colours(list(cap["policy"]))
    labels = [
        (f"{t / base:.1f}x full" if base else f"{t:.1f} tok/s") + f"<br>batch {b}"
        for t, b in zip(cap["tokens_per_second"], cap["batch"])
    ]
    fig = go.Figure(
        go.Bar(
            x=cap["policy"],
            y=cap["tokens_per_second"],
            text=labels,
            textposition="outside",
            marker_color=[colours[p] for p in cap["policy"]],
            hovertext=_hover(cap),
            hoverinfo="text",
        )
    )
    fig.update_xaxes(title_text="policy")
    top = float(cap["tokens_per_second"].max())
    fig.update_yaxes(title_text="generated tokens per second", range=[0, 1.25 * top if top > 0 else 1])
    fig.update_layout(showlegend=False)
    return apply_layout(fig, title, 420)
