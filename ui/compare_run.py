"""What the Compare tab's buttons and pickers do: plain functions that return {output name: value}.

What this module is: stream a comparison of columns (`policy_controls.Columns`), fill every output
of a finished run from its results alone (`results_page`: the same for a live run, a stored example
and a reopened file), redraw one figure when a picker moves, and write the downloads. Handlers take
plain values and return dicts keyed by output names (`text:0`, `budget_fig`, ...), so tests call
them without a browser; `compare_tab.py` maps names to components.

What it is not: no layout, no model state (`Engine` holds the model; each request's results
travel in the page's `gr.State`), no figure code (`ui/figures/`).
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from d2o_core import POLICIES, iter_compare, limits, run_summary
from d2o_core.events import ATTENTION_SCHEMA, EVENTS_SCHEMA, KEPT_SCHEMA, STEPS_SCHEMA, SURVIVAL_SCHEMA, frame
from d2o_core.shape_models import NOTICE

from . import figures
from .engine import Engine, gpu
from .errors import page_errors, refused_in_status
from .policy_controls import MAX_COLUMNS, Columns
from .report_html import report_html
from .run_figures import (
    attention_figure,
    budget_figure,
    drift_figure,
    kept_figure,
    step0_figure,
    survival_figure,
)
from .safe_text import markdown_text

log = logging.getLogger(__name__)
SLOTS = range(MAX_COLUMNS)
IN_PROGRESS = ("Starting", "Loading", "Reading", "Generating")  # status lines of a run under way
FIGURE_OUTPUTS = (
    "budget_fig",
    "attention_fig",
    "timeline_fig",
    "step0_fig",
    "kept_fig",
    "survival_fig",
    "cache_fig",
    "drift_fig",
)
# Cleared when a run starts: the previous run's figures and results do not belong beside the new
# texts, and a browser redrawing large plots while text streams takes CPU from the model (2 cores).
STALE = dict.fromkeys((*FIGURE_OUTPUTS, "summary", "state"))
# Streamed texts go out at most this often, all columns in one update: one update per token and
# column made the browser redraw ~4x per step, and the CPU it took slowed the model it waited for.
STREAM_EVERY_S = 0.25


@dataclass
class Sampling:
    """How tokens are chosen: greedy at temperature 0, else sampled with `seed` (same for every column)."""

    temperature: float = 0.0
    seed: int = 0
    chat: bool = True


def column_title(label: str, settings: dict, note: str = "") -> str:
    """'d2o(variant=official)@40%' -> '### D2O · variant=official · 40 %' (the budget always shown).

    note : what the column kept when its budget alone would mislead (`run_summary.kept_note`), after
    the budget: 'SnapKV · 20 % (prompt shorter than the window (64): kept whole)'.

    The label and settings may come from a run file: what they say is shown as text (`safe_text`).
    """
    name = str(settings.get("policy", label))
    title = POLICIES[name].title if name in POLICIES else markdown_text(name)
    rest = label.split("@")[0][len(name) :]
    if rest.startswith("(") and rest.endswith(")"):
        rest = rest[1:-1]  # only the label's own brackets: "protected_layers=(0, 1)" keeps its tuple's
    rest = re.sub(r",(?=\S)", ", ", rest)  # between settings; a tuple's "0, 1" already has its space
    parts = [title, *([markdown_text(rest)] if rest else [])]
    if name != "full" and isinstance(settings.get("budget"), (int, float)):
        parts.append(f"{100 * settings['budget']:g} %" + (f" ({markdown_text(note)})" if note else ""))
    return "### " + " · ".join(parts)


def blank_columns(count: int) -> dict:
    """Every column slot emptied; the first `count` shown."""
    out = {f"text:{i}": "" for i in SLOTS} | {f"stats:{i}": "" for i in SLOTS}
    return out | {f"col:{i}": gr.update(visible=i < count) for i in SLOTS}


def run_comparison(
    engine: Engine,
    prompt: str,
    columns: Columns | Callable[[], Columns],
    max_new_tokens: int,
    model: str | None = None,
    sampling: Sampling | None = None,
    question: str | None = None,
):
    """Stream a comparison: yields dicts of output name -> value (texts per step, then figures).

    columns : what to run, or a function that reads it from the page's controls (called inside the
    page's error handling, so a bad setting becomes a sentence).
    question : kept whole: the prompt is then the context, which every column compresses; the
    question is read after the compression and never evicted by it. Blank or None: no question.

    Bad input ends the stream with its sentence in the status line ("Not run: ...") and a warning
    toast; an unexpected failure raises a `gr.Error` (see `errors.py`).
    """
    try:
        with page_errors("Generation"):
            run = _run(engine, prompt, columns, max_new_tokens, model, sampling or Sampling(), question)
            yield from refused_in_status(run, "status")
    except GeneratorExit:  # Gradio closes the generator on Stop (and when the page goes away)
        log.info("Generation stopped before the end (Stop, or the page was closed).")
        raise


PREVIOUS_PROMPT = "The texts and figures below are from the previous prompt; press Run for this one."


def prompt_edited(prompt: str | None, question: str | None, state: dict | None, examples=()):
    """The status once the prompt or question box changed: the run shown is the previous prompt's.

    Back to the shown run's own prompt and question, its status line returns. Left as it is: nothing
    shown, a run under way (its state cleared), or another prompt of `examples` (an example button put
    it there, and its own handler says what is shown). Cheap: one line, no figure, nothing cleared.
    """
    meta = (state or {}).get("meta")
    if not meta:
        return gr.skip()
    asked = (question or "").strip() or None
    if prompt != meta.get("prompt"):
        return gr.skip() if prompt in examples else PREVIOUS_PROMPT
    if asked != ((meta.get("question") or "").strip() or None):
        return PREVIOUS_PROMPT
    return state.get("status", gr.skip())


def run_ended(status: str | None):
    """The status once a comparison's event has ended, however it ended (wired with Gradio's `.then`).

    A run cut short by Stop still shows an in-progress line: say that it stopped, and where. A finished
    run ("Done: ...") and a refused request ("Not run: ...", or an earlier line) stay as they are.
    """
    status = status or ""
    if status.startswith("Generating"):
        step = re.search(r"step (\d+)", status)
        step = step.group(1) if step else "?"
        return f"Stopped after step {step}; the texts above are what each policy wrote until then."
    if status.startswith(IN_PROGRESS):
        return "Stopped before the first token."
    return gr.skip()


@dataclass
class Progress:
    """The status line while a run streams: the step, the time to the first token, steps per second."""

    started: float
    first: float | None = None  # seconds from the start to the first token (the prompt's pass)

    def line(self, step: int) -> str:
        now = time.monotonic() - self.started
        if self.first is None:
            self.first = now
        text = f"Generating… step {step} · first token after {self.first:.1f} s"
        if step and now > self.first:
            text += f" · {step / (now - self.first):.1f} steps/s (all columns together)"
        return text


def within_time_limit(stream, seconds: float | None = None):
    """`stream`'s updates until the request's wall-time limit (`D2O_MAX_REQUEST_SECONDS`); past it the
    stream is closed (the model is free at once) and a sentence says why."""
    seconds = limits.limits().request_seconds if seconds is None else seconds
    deadline = time.monotonic() + seconds
    try:
        for update in stream:
            yield update
            if time.monotonic() > deadline:
                raise ValueError(
                    f"The request ran past its time limit of {seconds:g} s and was stopped; ask for fewer "
                    "tokens or columns (D2O_MAX_REQUEST_SECONDS sets the limit)."
                )
    finally:
        stream.close()


def _run(engine, prompt, columns: Columns, max_new_tokens, model, sampling: Sampling, question=None):
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("The prompt is empty: type a prompt or pick an example.")
    question = question if isinstance(question, str) and question.strip() else None
    policies = (columns() if callable(columns) else columns).policies()
    titles = {f"title:{i}": f"### {p.title}" for i, p in enumerate(policies)}
    yield blank_columns(len(policies)) | titles | STALE | {"status": "Starting…"}
    if not engine.is_loaded(model):
        yield {"status": "Loading the model (the first start converts the bundled model, about 20 s)…"}
    lm = engine.get(model)
    slot: dict[str, int] = {}
    pending: dict = {}  # texts not sent yet: whole steps go out together, at most every STREAM_EVERY_S
    sent, step = -float("inf"), None
    clock = Progress(time.monotonic())
    stream = stream_compare(lm, prompt, policies, int(max_new_tokens), sampling, question)
    for update in within_time_limit(stream):
        if update.kind == "status":
            yield pending | {"status": update.text}
            pending = {}
        elif update.kind == "token":
            if update.step != step and pending and time.monotonic() - sent >= STREAM_EVERY_S:
                yield pending
                pending, sent = {}, time.monotonic()
            i, step = slot.setdefault(update.label, len(slot)), update.step
            pending |= {f"text:{i}": update.text, "status": clock.line(update.step)}
        else:
            n_prompt = next(iter(update.results.values())).metrics["prompt_tokens"]
            read = (
                f"{n_prompt} prompt tokens read once (the question after the context's compression, "
                "kept whole)"
                if question
                else f"{n_prompt} prompt tokens read once"
            )
            status = (
                f"Done: {read}, then {len(update.results)} columns decoded "
                f"together as one batch (model {markdown_text(lm.name)})."
                + (f" Note: {NOTICE}" if lm.shape_only else "")
            )
            meta = {"model": lm.name, "prompt": prompt, "max_new_tokens": int(max_new_tokens)}
            if question:  # a run file without it (older, or no question) means none
                meta["question"] = question
            yield results_page(update.results, status, meta)


@gpu
def stream_compare(lm, prompt, policies, max_new_tokens, sampling: Sampling, question: str | None = None):
    """`iter_compare` with the page's sampling settings and question (on a Space, inside its GPU
    allocation)."""
    yield from iter_compare(
        lm,
        prompt,
        policies,
        max_new_tokens=max_new_tokens,
        chat=sampling.chat,
        temperature=float(sampling.temperature),
        seed=int(sampling.seed),
        question=question,
    )


def _view_default(labels: list[str]) -> str:
    for preferred in ("d2o", "h2o", "streaming"):
        hits = [label for label in labels if label.startswith(preferred)]
        if hits:
            return hits[0]
    return labels[0]


def results_page(results: dict, status: str, meta: dict) -> dict:
    """Every output a finished comparison fills (columns, summary, figures, pickers, state), drawn from
    its results alone: the same for a live run's end, a stored example and a run opened from a file."""
    labels = list(results)[:MAX_COLUMNS]
    view = _view_default(labels)
    first = next(iter(results.values())).metrics
    layer = first["n_layers"] // 2
    state = {"results": results, "model": meta.get("model"), "n_prompt": first["prompt_tokens"], "meta": meta}
    state["status"] = status  # shown again when a prompt typed over is typed back (`prompt_edited`)
    out = blank_columns(len(labels))
    stats = run_summary.stats_lines(results)  # every column against one reference
    for i, label in enumerate(labels):
        res = results[label]
        title = column_title(label, res.settings, run_summary.kept_note(res))
        out |= {f"title:{i}": title, f"text:{i}": res.text, f"stats:{i}": stats[label]}
    out |= {
        "status": status,
        "state": state,
        "summary": run_summary.summary(results).round(3),
        "budget_fig": budget_figure(results),
        "drift_fig": drift_figure(results),
        "attention_fig": attention_figure(results),
        "view": gr.update(choices=labels, value=view),
        "layer": picker(gr.update(maximum=first["n_layers"] - 1, value=layer)),
        "head": picker(gr.update(maximum=first["n_kv_heads"] - 1, value=0)),
    }
    return out | policy_views(state, view, layer, 0)


def policy_views(state: dict | None, label: str, layer: int, head: int) -> dict:
    """The per-policy figures (cache over time, timeline, survival) and the kept-tokens view."""
    results = (state or {}).get("results", {})
    res = results.get(label)
    if res is None:
        return {
            "cache_fig": figures.cache_over_time(frame({}, STEPS_SCHEMA)),
            "survival_fig": figures.survival(frame({}, SURVIVAL_SCHEMA)),
        } | timeline_view(None, label, 0, 0)
    return {
        "cache_fig": figures.cache_over_time(res.steps, label),
        "survival_fig": survival_figure(res, label),
    } | timeline_view(state, label, layer, head)


def timeline_view(state: dict | None, label: str, layer: int, head: int) -> dict:
    """The figures that follow the layer and head pickers: instant when a picker moves."""
    results = (state or {}).get("results", {})
    res = results.get(label)
    if res is None:
        empty = frame({}, EVENTS_SCHEMA)
        return {
            "timeline_fig": figures.timeline(empty, 0, 0, 0),
            "step0_fig": figures.step0(empty, [], 0, 0),
            "kept_fig": figures.kept_tokens(frame({}, ATTENTION_SCHEMA), frame({}, KEPT_SCHEMA), 0, 0),
        }
    return {
        "timeline_fig": figures.timeline(res.events, int(layer), int(head), state["n_prompt"], label),
        "step0_fig": step0_figure(res, layer, head, label),
        "kept_fig": kept_figure(results, layer, head),
    }


def prepare_downloads(state: dict | None, label: str, layer: int, head: int) -> dict:
    """Write events CSV, the run JSON, the offline report (every figure, plotly.js once) and each figure
    as HTML without plotly.js; returns the file list."""
    if not state or not state.get("results"):
        raise gr.Error("Nothing to download yet: run a prompt first.", print_exception=False)
    results = state["results"]
    folder = Path(tempfile.mkdtemp(prefix="d2o-run-"))
    meta = state.get("meta") or {"model": state["model"]}
    files = {
        "events.csv": run_summary.events_csv(results),
        "run.json": run_summary.comparison_json(results, meta),
        "report.html": report_html(results, meta),
    }
    views = policy_views(state, label, layer, head)
    figs = {  # file name: (figure, its builder's name for the caption)
        "budget_heatmap": (budget_figure(results), "budget_heatmap"),
        "attention": (attention_figure(results), "attention_map"),
        "drift": (drift_figure(results), "drift"),
        "cache_over_time": (views["cache_fig"], "cache_over_time"),
        "timeline": (views["timeline_fig"], "timeline"),
        "step0": (views["step0_fig"], "step0"),
        "kept_tokens": (views["kept_fig"], "kept_tokens"),
        "survival": (views["survival_fig"], "survival"),
    }
    files |= {
        f"{name}.html": figures.to_html(fig, figures.CAPTIONS[key]) for name, (fig, key) in figs.items()
    }
    paths = []
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
        paths.append(str(folder / name))
    return {"downloads": paths}


def picker(update: dict) -> dict:
    """A layer or head slider's update that Gradio accepts for a model of one layer or one kv-head.

    Gradio builds the slider anew from an update and refuses a range from 0 to 0 outside the
    handler (the page showed a blank "Error"): such a slider spans 0 to 1, at 0 (1 draws an empty
    timeline). It stays interactive: Gradio would keep interactive=False for the next run's slider.
    """
    maximum = update.get("maximum")
    if maximum is not None and maximum < 1:
        return update | {"maximum": 1, "value": 0}
    return update
