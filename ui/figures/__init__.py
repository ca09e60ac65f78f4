"""Plotly figures for the D2O Cache Explorer: run frames in, `go.Figure` out, one module per kind.

What this package is: pure builders (no I/O, no model, no gradio) over the frames whose schemas live in
`d2o_core.events`; frames that combine policies carry a leading `policy` column. `common` holds the
colour map, layout and helpers every figure shares. Each figure has a one-line "how to read this"
caption next to its builder; `CAPTIONS` collects them by builder name (shown under each figure on the
page and in the offline report), and `FIGURES` lists every figure with its title, by tab, for the
About tab.

What it is not: where a figure goes on the page (ui/*_tab.py).
"""

from .attention import CAPTIONS as _ATTENTION
from .attention import attention_map, kept_tokens
from .budgets import CAPTION as _BUDGETS
from .budgets import budget_heatmap
from .cache_time import CAPTION as _CACHE_TIME
from .cache_time import cache_over_time
from .common import F_L_MEANING, NO_DATA, policy_colours, to_html
from .fidelity import CAPTIONS as _FIDELITY
from .fidelity import MEASURES, drift, sweep_curves
from .leaderboard import CAPTIONS as _LEADERBOARD
from .step0 import CAPTION as _STEP0
from .step0 import step0
from .survival import CAPTION as _SURVIVAL
from .survival import survival
from .throughput import CAPTIONS as _THROUGHPUT
from .timeline import CAPTION as _TIMELINE
from .timeline import timeline

CAPTIONS: dict[str, str] = {
    "budget_heatmap": _BUDGETS,
    "attention_map": _ATTENTION["attention_map"],
    "timeline": _TIMELINE,
    "step0": _STEP0,
    "kept_tokens": _ATTENTION["kept_tokens"],
    "survival": _SURVIVAL,
    "cache_over_time": _CACHE_TIME,
    "drift": _FIDELITY["drift"],
    "sweep_curves": _FIDELITY["sweep_curves"],
    "overview": _LEADERBOARD["overview"],
    "per_task": _LEADERBOARD["per_task"],
    "tokens_vs_batch": _THROUGHPUT["tokens_vs_batch"],
    "cap_bars": _THROUGHPUT["cap_bars"],
}

# Every figure of the page, by tab: (builder name, title shown on the page).
FIGURES: dict[str, list[tuple[str, str]]] = {
    "Compare": [
        ("budget_heatmap", "Per-layer budgets"),
        ("attention_map", "The prompt's attention, layer by layer"),
        ("timeline", "Eviction and merge timeline"),
        ("step0", "Step 0: the prompt compression, token by token"),
        ("kept_tokens", "What each column kept of one layer and head"),
        ("survival", "Token survival over the prompt and the generated text"),
        ("cache_over_time", "Cache size over time"),
        ("drift", "Drift from the full cache"),
    ],
    "Budget sweep": [
        ("sweep_curves", "Agreement and KL against budget (the stored sweep, or your prompt)"),
        ("overview", "Leaderboard: averaged over tasks"),
        ("per_task", "Leaderboard: score per task"),
    ],
    "Throughput": [
        ("tokens_vs_batch", "Tokens per second against batch size"),
        ("cap_bars", "Tokens per second under the same KV cap"),
    ],
}

__all__ = [
    "CAPTIONS",
    "FIGURES",
    "F_L_MEANING",
    "MEASURES",
    "NO_DATA",
    "attention_map",
    "budget_heatmap",
    "cache_over_time",
    "drift",
    "kept_tokens",
    "policy_colours",
    "step0",
    "survival",
    "sweep_curves",
    "timeline",
    "to_html",
]
