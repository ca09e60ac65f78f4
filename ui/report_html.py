"""A saved run as one standalone HTML report: texts, the summary table and every figure the page draws.

What this module is: `report_figures(results)` (the figures, built from the run's frames by the same
builders as the page: per-layer budgets, the prompt's attention, what each column kept, drift, and per
policy the cache over time, the eviction and merge timeline and the step-0 compression of the middle
layer's first kv-head, and token survival) and `report_html(results, meta)` (one HTML document with
plotly.js inlined once, so it opens offline; no CDN, no external script; each figure with its "how to
read this" caption). `python -m d2o_core show run.json --html report.html` imports it lazily, and the
page offers it beside the run JSON (the figure files there leave plotly.js out).

What it is not: no gradio and no model; it reads nothing from disk (runfile.load_run does).
"""

from __future__ import annotations

import html

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from d2o_core import run_summary
from d2o_core.run_result import RunResult

from . import figures
from .run_figures import (
    attention_figure,
    budget_figure,
    drift_figure,
    kept_figure,
    step0_figure,
    survival_figure,
)


def report_figures(results: dict[str, RunResult]) -> dict[str, go.Figure]:
    """Every figure of the page for `results`, keyed by a title (per-policy ones once per policy)."""
    return {title: fig for title, (fig, _) in captioned_figures(results).items()}


def captioned_figures(results: dict[str, RunResult]) -> dict[str, tuple[go.Figure, str]]:
    """`report_figures` with each figure's "how to read this" caption: {title: (figure, caption)}."""
    first = next(iter(results.values())).metrics
    layer = first["n_layers"] // 2
    caption = figures.CAPTIONS
    figs = {
        "Per-layer budgets": (budget_figure(results), caption["budget_heatmap"]),
        "The prompt's attention, layer by layer": (attention_figure(results), caption["attention_map"]),
        f"What each column kept of layer {layer}, kv-head 0": (
            kept_figure(results, layer, 0),
            caption["kept_tokens"],
        ),
        "Drift from the full cache": (drift_figure(results), caption["drift"]),
    }
    for label, res in results.items():
        layer = res.metrics["n_layers"] // 2
        n_prompt = res.metrics["prompt_tokens"]
        figs[f"Cache size over time · {label}"] = (
            figures.cache_over_time(res.steps, label),
            caption["cache_over_time"],
        )
        timeline = figures.timeline(res.events, layer, 0, n_prompt, label)
        figs[f"Eviction and merge timeline · {label}"] = (timeline, caption["timeline"])
        if label != "full" and not res.events.empty:
            figs[f"Step 0, the prompt compression · {label}"] = (
                step0_figure(res, layer, 0, label),
                caption["step0"],
            )
        figs[f"Token survival · {label}"] = (survival_figure(res, label), caption["survival"])
    return figs


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: .75rem; border-radius: 6px; }
table { border-collapse: collapse; font-size: .9rem; }
td, th { padding: .25rem .6rem; border: 1px solid #ddd; }
.meta { color: #555; }
.caption { color: #333; font-size: .95rem; max-width: 70rem; }
"""


def report_html(results: dict[str, RunResult], meta: dict | None = None) -> str:
    """The whole run as one HTML document that needs no network (plotly.js is embedded, once)."""
    meta = meta or {}
    esc = html.escape
    parts = [
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>D2O run report</title>",
        f"<style>{_STYLE}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body><h1>D2O run report</h1>",
    ]
    keys = ("model", "max_new_tokens", "created", "d2o_core_version")
    facts = [f"{k}: {meta[k]}" for k in keys if meta.get(k)]
    parts.append(f"<p class='meta'>{esc(' · '.join(str(f) for f in facts))}</p>")
    if meta.get("prompt"):
        parts.append(f"<h2>Prompt</h2><pre>{esc(meta['prompt'])}</pre>")
    parts.append("<h2>Texts</h2>")
    stats = run_summary.stats_lines(results)
    for label, res in results.items():
        note = run_summary.kept_note(res)
        heading = f"{label} ({note})" if note else label
        parts.append(f"<h3>{esc(heading)}</h3><p class='meta'>{esc(stats[label])}</p>")
        parts.append(f"<pre>{esc(res.text)}</pre>")
    table = run_summary.summary(results).round(3).to_html(index=False, na_rep="–", border=0)
    parts.append(f"<h2>Summary</h2>{table}<h2>Figures</h2>")
    for title, (fig, caption) in captioned_figures(results).items():
        parts.append(f"<h3>{esc(title)}</h3>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
        parts.append(f"<p class='caption'>How to read this: {esc(caption)}</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
