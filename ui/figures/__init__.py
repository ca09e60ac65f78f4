"""Plotly figures for the D2O Cache Explorer: run frames in, `go.Figure` out, one module per kind.

What this package is: pure builders (no I/O, no model, no gradio) over the frames whose schemas live in
`d2o_core.events`; frames that combine policies carry a leading `policy` column. `common` holds the
colour map and layout every figure shares.

What it is not: where a figure goes on the page (ui/*_tab.py).
"""

from .attention import attention_map, kept_tokens
from .budgets import budget_heatmap
from .cache_time import cache_over_time
from .common import NO_DATA, policy_colours, to_html
from .fidelity import drift, sweep_curves
from .survival import survival
from .timeline import timeline

__all__ = [
    "NO_DATA",
    "attention_map",
    "budget_heatmap",
    "cache_over_time",
    "drift",
    "kept_tokens",
    "policy_colours",
    "survival",
    "sweep_curves",
    "timeline",
    "to_html",
]
