"""The figures of a finished comparison, from its results alone (no gradio, no I/O).

What this module is: the few builders that combine several columns' frames (budgets, drift, the
prompt's attention, what each column kept) before handing them to `ui/figures/`; the page
(`compare_run.py`) and the offline HTML report (`report_html.py`) both draw through them, so the
two always show the same data. What it is not: figure styling (`ui/figures/`).
"""

from __future__ import annotations

import pandas as pd

from d2o_core import run_summary
from d2o_core.events import kept_frame

from . import figures


def budget_figure(results: dict):
    return figures.budget_heatmap(run_summary.combined(results, "layer_budgets"))


def drift_figure(results: dict):
    """Drift of every policy but the reference itself."""
    return figures.drift(run_summary.combined({k: v for k, v in results.items() if k != "full"}, "drift"))


def attention_figure(results: dict):
    """The prompt's attention per layer beside each layer's density and budgets (shared by all columns)."""
    attention = next(iter(results.values())).attention
    return figures.attention_map(attention, run_summary.combined(results, "layer_budgets"))


def kept_figure(results: dict, layer: int, head: int):
    """For one layer and kv-head: the prompt's attention over tokens, and what each column kept of it."""
    first = next(iter(results.values()))
    kept = pd.concat(
        [
            kept_frame(
                res.events, res.prompt_tokens, int(layer), int(head), res.settings.get("n_sink", 0)
            ).assign(policy=label)
            for label, res in results.items()
        ],
        ignore_index=True,
    )
    return figures.kept_tokens(first.attention, kept, int(layer), int(head))
