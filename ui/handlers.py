"""What the app's buttons and pickers do: plain functions that return {output name: value}.

What this module is: the request handlers behind `ui/layout.py` — build policies from
the controls, stream a comparison, redraw one figure from stored results, prepare
downloads, and the JSON API. They take plain values and return dicts keyed by output
names, so tests call them directly without a browser; the layout maps names to components.

What it is not: no layout, no model state (`Engine` holds the model; each request's
results travel in the page's `gr.State`), no figure code (`ui/figures.py`).
"""

from __future__ import annotations

import logging
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from d2o_core import POLICIES, iter_compare, run_summary
from d2o_core.events import EVENTS_SCHEMA, STEPS_SCHEMA, SURVIVAL_SCHEMA, frame
from d2o_core.policies import build
from d2o_core.policies.d2o import VARIANTS
from d2o_core.shape_models import NOTICE

from . import figures
from .engine import Engine, gpu

log = logging.getLogger(__name__)
NAMES = list(POLICIES)  # one column per registry entry, in registry order
DEFAULT_CHOSEN = ["full", "h2o", "d2o"]


@dataclass
class Controls:
    """The "Advanced" settings; defaults are each method's published defaults."""

    h2o_sinks: int = 0
    h2o_recent: float = 0.5
    stream_sinks: int = 4
    d2o_variant: str = "paper"
    d2o_sinks: int = 4
    d2o_recent: float = 0.25
    d2o_beta: float = 0.7
    d2o_merge: bool = True
    d2o_layer_budgets: str = "dynamic"
    d2o_protected: str = ""
    temperature: float = 0.0
    seed: int = 0
    chat: bool = True


def parse_layers(text: str) -> tuple[int, ...]:
    """'0, 1, -1' -> (0, 1, -1); ValueError with a sentence otherwise."""
    parts = [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"Protected layers must be whole numbers separated by commas (0, 1, -1); got {text!r}."
        ) from None


def variant_defaults(variant: str) -> tuple[float, float, str]:
    """(recent share, beta, protected layers text) of a D2O variant, to refresh the Advanced controls."""
    v = VARIANTS[variant]
    return v["recent_share"], v["beta"], ", ".join(str(i) for i in v["protected_layers"])


def build_policies(names: list[str], budget_percent: float, c: Controls) -> list:
    """Policies for the chosen names at `budget_percent` (5-100) with the Advanced settings."""
    unknown = sorted(set(names or []) - set(NAMES))
    if unknown:
        raise ValueError(f"Unknown policy {', '.join(unknown)}; choose from {', '.join(NAMES)}.")
    budget = float(budget_percent) / 100
    settings = {
        "full": {},
        "streaming": {"n_sink": int(c.stream_sinks)},
        "h2o": {"n_sink": int(c.h2o_sinks), "recent_share": float(c.h2o_recent)},
        "d2o": {
            "variant": c.d2o_variant,
            "n_sink": int(c.d2o_sinks),
            "recent_share": float(c.d2o_recent),
            "beta": float(c.d2o_beta),
            "merge": bool(c.d2o_merge),
            "layer_budgets": c.d2o_layer_budgets,
            "protected_layers": parse_layers(c.d2o_protected),
        },
    }
    # Policies without Advanced controls here run with their published defaults.
    return [build(name, budget, **settings.get(name, {})) for name in NAMES if name in (names or [])]


def columns_visible(names: list[str]) -> dict:
    return {f"col:{n}": gr.update(visible=n in (names or [])) for n in NAMES}


def _view_default(labels: list[str]) -> str:
    for preferred in ("d2o", "h2o", "streaming"):
        hits = [label for label in labels if label.startswith(preferred)]
        if hits:
            return hits[0]
    return labels[0]


def run_comparison(
    engine: Engine,
    prompt: str,
    names: list[str],
    budget_percent: float,
    max_new_tokens: int,
    model: str | None = None,
    controls: Controls | None = None,
):
    """Stream a comparison: yields dicts of output name -> value (texts per step, then figures)."""
    try:
        with page_errors("Generation"):
            yield from _run(
                engine, prompt, names, budget_percent, max_new_tokens, model, controls or Controls()
            )
    except GeneratorExit:  # Gradio closes the generator on Stop (and when the page goes away)
        log.info("Generation stopped before the end (Stop, or the page was closed).")
        raise


IN_PROGRESS = ("Starting", "Loading", "Reading", "Generating")  # the status lines of a run under way


def run_ended(status: str | None):
    """The status once a comparison's event has ended, however it ended (wired with Gradio's `.then`).

    A run cut short by Stop still shows an in-progress line: say that it stopped, and where. A finished
    run ("Done: ...") and a request refused before it started (an earlier line) stay as they are.
    """
    status = status or ""
    if status.startswith("Generating"):
        step = status.rpartition("step ")[2].strip(" .…")
        return f"Stopped after step {step}; the texts above are what each policy wrote until then."
    if status.startswith(IN_PROGRESS):
        return "Stopped before the first token."
    return gr.skip()


@contextmanager
def page_errors(what: str) -> Iterator[None]:
    """Errors as messages in the page, never stack traces: bad input says what to change,
    anything else is logged on the server and summarised."""
    try:
        yield
    except ValueError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    except gr.Error:
        raise
    except Exception as exc:
        log.error("%s failed:\n%s", what, traceback.format_exc())
        raise gr.Error(
            f"{what} failed ({type(exc).__name__}: {exc}). The details are in the server log."
        ) from None


def _run(engine, prompt, names, budget_percent, max_new_tokens, model, controls):
    policies = build_policies(names, budget_percent, controls)
    if not policies:
        raise ValueError("No policy selected: tick at least one cache policy.")
    if not (prompt or "").strip():
        raise ValueError("The prompt is empty: type a prompt or pick an example.")
    blank = {f"text:{n}": "" for n in NAMES} | {f"stats:{n}": "" for n in NAMES}
    yield blank | columns_visible(names) | {"status": "Starting…"}
    if not engine.is_loaded(model):
        yield {"status": "Loading the model (the first start converts the bundled model, about 20 s)…"}
    lm = engine.get(model)
    column = {p.label: p.name for p in policies}
    stream = _stream(lm, prompt, policies, int(max_new_tokens), controls)
    for update in stream:
        if update.kind == "status":
            yield {"status": update.text}
        elif update.kind == "token":
            yield {f"text:{column[update.label]}": update.text, "status": f"Generating… step {update.step}"}
        else:
            meta = {"prompt": prompt, "max_new_tokens": int(max_new_tokens)}
            yield _finished(lm, update.results, column, meta)


@gpu
def _stream(lm, prompt, policies, max_new_tokens, controls):
    yield from iter_compare(
        lm,
        prompt,
        policies,
        max_new_tokens=max_new_tokens,
        chat=controls.chat,
        temperature=float(controls.temperature),
        seed=int(controls.seed),
    )


def _finished(lm, results: dict, column: dict, meta: dict | None = None) -> dict:
    n_prompt = next(iter(results.values())).metrics["prompt_tokens"]
    status = (
        f"Done: {n_prompt} prompt tokens read once, then {len(results)} policies decoded "
        f"together as one batch (model {lm.name})." + (f" Note: {NOTICE}" if lm.shape_only else "")
    )
    return results_page(results, status, {"model": lm.name} | (meta or {}), column)


def results_page(results: dict, status: str, meta: dict, column: dict | None = None) -> dict:
    """Every output a finished comparison fills (texts, stats, summary, figures, pickers, state), drawn
    from its results alone: the same for a live run's end and for a run opened from a file."""
    labels = list(results)
    column = column or {label: res.settings.get("policy", label) for label, res in results.items()}
    column = {label: name for label, name in column.items() if name in NAMES}
    view = _view_default(labels)
    first = next(iter(results.values())).metrics
    layer = first["n_layers"] // 2
    state = {"results": results, "model": meta.get("model"), "n_prompt": first["prompt_tokens"], "meta": meta}
    out = {f"stats:{column[label]}": run_summary.stats_line(results[label].metrics) for label in column}
    out |= {f"text:{column[label]}": results[label].text for label in column}
    out |= {
        "status": status,
        "state": state,
        "summary": run_summary.summary(results).round(3),
        "budget_fig": budget_figure(results),
        "drift_fig": drift_figure(results),
        "view": gr.update(choices=labels, value=view),
        "layer": gr.update(maximum=first["n_layers"] - 1, value=layer),
        "head": gr.update(maximum=first["n_kv_heads"] - 1, value=0),
    }
    return out | policy_views(state, view, layer, 0)


def budget_figure(results: dict):
    return figures.budget_heatmap(run_summary.combined(results, "layer_budgets"))


def drift_figure(results: dict):
    """Drift of every policy but the reference itself."""
    return figures.drift(run_summary.combined({k: v for k, v in results.items() if k != "full"}, "drift"))


def policy_views(state: dict | None, label: str, layer: int, head: int) -> dict:
    """The three per-policy figures (cache over time, timeline, survival) from stored results."""
    res = (state or {}).get("results", {}).get(label)
    if res is None:
        return {
            "cache_fig": figures.cache_over_time(frame({}, STEPS_SCHEMA)),
            "timeline_fig": timeline_view(None, label, 0, 0)["timeline_fig"],
            "survival_fig": figures.survival(frame({}, SURVIVAL_SCHEMA)),
        }
    return {
        "cache_fig": figures.cache_over_time(res.steps, label),
        "timeline_fig": timeline_view(state, label, layer, head)["timeline_fig"],
        "survival_fig": figures.survival(res.survival(), label),
    }


def timeline_view(state: dict | None, label: str, layer: int, head: int) -> dict:
    """Only the timeline: instant when the layer or head picker moves."""
    res = (state or {}).get("results", {}).get(label)
    if res is None:
        return {"timeline_fig": figures.timeline(frame({}, EVENTS_SCHEMA), 0, 0, 0)}
    return {"timeline_fig": figures.timeline(res.events, int(layer), int(head), state["n_prompt"], label)}


def prepare_downloads(state: dict | None, label: str, layer: int, head: int) -> dict:
    """Write events CSV, the run JSON and every figure as standalone HTML; returns the file list."""
    if not state or not state.get("results"):
        raise gr.Error("Nothing to download yet: run a prompt first.", print_exception=False)
    results = state["results"]
    folder = Path(tempfile.mkdtemp(prefix="d2o-run-"))
    files = {
        "events.csv": run_summary.events_csv(results),
        "run.json": run_summary.comparison_json(results, state.get("meta") or {"model": state["model"]}),
    }
    views = policy_views(state, label, layer, head)
    figs = {
        "budget_heatmap": budget_figure(results),
        "drift": drift_figure(results),
        "cache_over_time": views["cache_fig"],
        "timeline": views["timeline_fig"],
        "survival": views["survival_fig"],
    }
    files |= {f"{name}.html": figures.to_html(fig) for name, fig in figs.items()}
    paths = []
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
        paths.append(str(folder / name))
    return {"downloads": paths}


API_POLICIES = tuple(DEFAULT_CHOSEN)  # the `/compare` endpoint's defaults (layout.py's signature uses these)
API_BUDGET = 0.2
API_MAX_NEW_TOKENS = 64


def _api_args(prompt, policies, budget, max_new_tokens) -> tuple[str, list[str], float, int]:
    """The API's arguments checked by type, each problem a sentence naming the parameter (JSON has no
    int/float distinction for whole numbers, so 64.0 is 64; a string is never a number)."""
    kind = lambda v: f"{type(v).__name__} {v!r}"[:60]  # noqa: E731
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be text (a string); got {kind(prompt)}.")
    if not prompt.strip():
        raise ValueError("prompt is empty: send the text the model should continue.")
    if policies is None:
        policies = API_POLICIES
    if not isinstance(policies, (list, tuple)) or not all(isinstance(p, str) for p in policies):
        raise ValueError(
            f'policies must be a list of names such as ["full", "h2o", "d2o"]; got {kind(policies)}.'
        )
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a number, a fraction in (0, 1] such as 0.2; got {kind(budget)}.")
    if not 0 < budget <= 1:
        raise ValueError(f"budget is a fraction in (0, 1], e.g. 0.2 for 20 %; got {budget}.")
    whole = isinstance(max_new_tokens, int) or (
        isinstance(max_new_tokens, float) and max_new_tokens.is_integer()
    )
    if isinstance(max_new_tokens, bool) or not whole:
        raise ValueError(f"max_new_tokens must be a whole number such as 64; got {kind(max_new_tokens)}.")
    return prompt, list(policies), float(budget), int(max_new_tokens)


def api_compare(
    engine: Engine,
    prompt: str,
    policies: list[str] | tuple[str, ...] | None = API_POLICIES,
    budget: float = API_BUDGET,
    max_new_tokens: int = API_MAX_NEW_TOKENS,
) -> dict:
    """The JSON API: texts and metrics per policy (budget as a fraction, e.g. 0.2); no figures are drawn.

    Only the prompt is needed: policies default to full, h2o and d2o, budget to 0.2, 64 new tokens.
    """
    with page_errors("Generation"):
        prompt, policies, budget, max_new_tokens = _api_args(prompt, policies, budget, max_new_tokens)
        chosen = build_policies(policies, 100 * budget, Controls())
        lm = engine.get()
        stream = _stream(lm, prompt, chosen, int(max_new_tokens), Controls())
        results = next(update.results for update in stream if update.kind == "done")
    return run_summary.jsonable(
        {"results": {label: {"text": res.text, "metrics": res.metrics} for label, res in results.items()}}
    )


def run_sweep(
    engine: Engine,
    prompt: str,
    names: list[str],
    budgets: list,
    max_new_tokens: int,
    model: str | None = None,
    progress=None,
):
    """The Budget sweep tab: fidelity to the full cache vs budget on the user's prompt."""
    from d2o_core.eval import sweep  # noqa: PLC0415 - only this tab needs it

    with page_errors("The sweep"):
        names = [n for n in (names or []) if n != "full"]
        if not names:
            raise ValueError("Tick at least one policy other than the full cache to sweep.")
        if not budgets:
            raise ValueError("Tick at least one budget to sweep.")
        if not (prompt or "").strip():
            raise ValueError("The prompt is empty: type one on the Compare tab or pick an example.")
        yield {"sweep_status": "Loading the model…" if not engine.is_loaded(model) else "Sweeping…"}
        lm = engine.get(model)
        report_progress = (
            (lambda done, total, msg: progress(done / max(total, 1), desc=msg)) if progress else None
        )
        df = sweep.fidelity_sweep(
            lm,
            prompt,
            sorted(float(b) / 100 for b in budgets),
            names,
            int(max_new_tokens),
            progress=report_progress,
        )
    yield {
        "sweep_status": f"Done: {len(df)} runs sharing one prefill.",
        "agree_fig": figures.sweep_curves(df, y="token_agreement", facet=None),
        "kl_fig": figures.sweep_curves(df, y="mean_kl_to_full", facet=None),
        "sweep_table": df.drop(columns=[c for c in ("text",) if c in df.columns]).round(4),
    }
