"""A saved run as one standalone HTML report: texts, the summary table and every figure the page draws.

What this module is: `report_figures(results)` (the figures, built from the run's frames by the same
builders as the page: per-layer budgets, drift, and per policy the cache over time, the eviction and
merge timeline of the middle layer's first kv-head, and token survival) and `report_html(results, meta)`
(one HTML document with plotly.js inlined once, so it opens offline; no CDN, no external script).
`python -m d2o_core show run.json --html report.html` imports it lazily.

What it is not: no gradio and no model; it reads nothing from disk (runfile.load_run does).
"""

from __future__ import annotations

import html

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from d2o_core import run_summary
from d2o_core.run_result import RunResult

from . import figures
from .run_figures import attention_figure, budget_figure, drift_figure, kept_figure


def report_figures(results: dict[str, RunResult]) -> dict[str, go.Figure]:
    """Every figure of the page for `results`, keyed by a title (per-policy ones once per policy)."""
    first = next(iter(results.values())).metrics
    layer = first["n_layers"] // 2
    figs = {
        "Per-layer budgets": budget_figure(results),
        "The prompt's attention, layer by layer": attention_figure(results),
        f"What each column kept of layer {layer}, kv-head 0": kept_figure(results, layer, 0),
        "Drift from the full cache": drift_figure(results),
    }
    for label, res in results.items():
        layer = res.metrics["n_layers"] // 2
        n_prompt = res.metrics["prompt_tokens"]
        figs[f"Cache size over time · {label}"] = figures.cache_over_time(res.steps, label)
        timeline = figures.timeline(res.events, layer, 0, n_prompt, label)
        figs[f"Eviction and merge timeline · {label}"] = timeline
        figs[f"Token survival over the prompt · {label}"] = figures.survival(res.survival(), label)
    return figs


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: .75rem; border-radius: 6px; }
table { border-collapse: collapse; font-size: .9rem; }
td, th { padding: .25rem .6rem; border: 1px solid #ddd; }
.meta { color: #555; }
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
    for label, res in results.items():
        parts.append(f"<h3>{esc(label)}</h3><p class='meta'>{esc(run_summary.stats_line(res.metrics))}</p>")
        parts.append(f"<pre>{esc(res.text)}</pre>")
    table = run_summary.summary(results).round(3).to_html(index=False, na_rep="–", border=0)
    parts.append(f"<h2>Summary</h2>{table}<h2>Figures</h2>")
    for title, fig in report_figures(results).items():
        parts.append(f"<h3>{esc(title)}</h3>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
    parts.append("</body></html>\n")
    return "\n".join(parts)
