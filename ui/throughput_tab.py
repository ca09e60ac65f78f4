"""The Throughput tab: tokens/s per policy when every policy gets the same KV memory.

What this module is: `build(engine, model)` (the tab's components and events, called inside a
`gr.Tab` by `ui/layout.py`) and its handlers, plain functions returning {output name: value}:
`stored_view` shows `assets/throughput.json` at once (no model run; a sentence when the file is
missing or broken), `run_live` reruns the benchmark on the page's model with a progress bar,
in a worker thread that the Stop button ends at its next progress report.

What it is not: the measurement (`d2o_core.eval.throughput`) or the figures (`ui/figures/throughput.py`).
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import gradio as gr
import pandas as pd

from d2o_core.eval import throughput_tables
from d2o_core.eval.throughput import check_batches, make_policies, run_throughput
from d2o_core.run_summary import jsonable

from .engine import Engine, gpu
from .errors import page_errors
from .figures import throughput as TF
from .safe_text import markdown_text
from .wiring import PROGRESS, caption, wire

STORED = Path(__file__).resolve().parent.parent / "assets" / "throughput.json"
REGENERATE = "`python -m d2o_core results --throughput-only` (or `make results`)"
LIVE_POLICIES = [
    ("full cache", "full"), ("StreamingLLM", "streaming"), ("H2O", "h2o"), ("D2O", "d2o"),
    ("D2O, official reading", "d2o:official"),
]  # fmt: skip
GENERIC = (
    "Same KV memory for every policy: a compressed cache is smaller, so more rows fit where one "
    "full-cache row did; a batch reads the model's weights once per step, so tokens per second grow "
    "with the batch. One sequence alone is not faster."
)
STOPPED = "Stopped. The figures still show the results from before the run."


def load_stored(path: Path | str = STORED) -> tuple[dict | None, str]:
    """(the stored document, a sentence saying what it is); (None, why not) when it cannot be used."""
    path = Path(path)
    name = f"{path.parent.name}/{path.name}"
    if not path.is_file():
        return (
            None,
            f"No stored throughput results: {name} is missing. Create it with {REGENERATE}, or Run live.",
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return (
            None,
            f"The stored results in {name} could not be read ({exc}); regenerate them with {REGENERATE}.",
        )
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not rows or not isinstance(rows, list) or not all(isinstance(r, dict) and "policy" in r for r in rows):
        return None, f"{name} holds no throughput rows; regenerate it with {REGENERATE}."
    return doc, _source(doc, f"Stored results from {name}")


def _source(doc: dict, what: str) -> str:
    # The document's words are shown as text (ui/safe_text.py), whoever wrote the file.
    m = {k: markdown_text(v) for k, v in (doc.get("machine") or {}).items()}
    said = {k: markdown_text(doc.get(k, "?")) for k in ("date", "prompt_tokens", "new_tokens")}
    when = f", measured {said['date']}" if doc.get("date") else ""
    budget, cap = float(doc.get("budget", float("nan"))), float(doc.get("kv_mb_cap", float("nan")))
    return (
        f"{what}{when}: {m.get('model', 'unknown model')} on {m.get('cpu', 'an unrecorded machine')} "
        f"({m.get('device', '?')}), {said['prompt_tokens']} prompt tokens per row, "
        f"{said['new_tokens']} new tokens, budget {100 * budget:g} %, KV cap {cap:.1f} MB per batch."
    )


def explain(doc: dict) -> str:
    """The plain-words sentence under the plots, with this document's numbers where it has them."""
    cap = {r["policy"]: r for r in doc.get("rows") or [] if r.get("mode") == "cap"}
    full = cap.get("full")
    others = [r for label, r in cap.items() if label != "full" and r.get("kv_mb_row")]
    if not full or not others or not full.get("kv_mb_row"):
        return GENERIC
    best = max(others, key=lambda r: (r["batch"], r["policy"] == "d2o", r["policy"].startswith("d2o")))
    smaller = full["kv_mb_row"] / best["kv_mb_row"]
    policy, batch, full_batch = (markdown_text(v) for v in (best["policy"], best["batch"], full["batch"]))
    text = (
        f"Same KV memory for every policy ({full['kv_mb_cap']:.1f} MB): a {policy} row needs "
        f"{best['kv_mb_row']:.1f} MB against {full['kv_mb_row']:.1f} MB for a full-cache row "
        f"(~{smaller:.1f}x smaller), so {batch} of its rows fit where {full_batch} full-cache "
        f"row{'s' if full['batch'] != 1 else ''} did. A batch reads the weights once per step, so "
        "tokens per second grow with the batch. One sequence alone is not faster"
    )
    alone, full_alone = best.get("single_tokens_per_second"), full.get("single_tokens_per_second")
    if alone and full_alone:
        text += f" ({policy} alone: {alone:.1f} tokens/s, the full cache alone: {full_alone:.1f})"
    text += "."
    if any("official" in label for label in cap):
        text += " D2O's official reading keeps three layers whole, so fewer of its rows fit."
    return text


def view(doc: dict | None, sentence: str) -> dict:
    """Every output of the tab from one document (None: empty figures and the sentence saying why)."""
    df = pd.DataFrame((doc or {}).get("rows") or [])
    lines = throughput_tables.ratio_lines(doc) if doc else []
    table = throughput_tables.table(doc) if doc else pd.DataFrame()
    bullets = "".join(f"\n- {markdown_text(line)}" for line in lines)
    return {
        "tp_status": sentence + ("\n" + bullets if lines else ""),
        "tp_bars": TF.cap_bars(df),
        "tp_lines": TF.tokens_vs_batch(df),
        "tp_explain": explain(doc) if doc else GENERIC,
        "tp_table": table.round(3),
    }


def stored_view(path: Path | str = STORED) -> dict:
    """The tab as it opens: the stored results, or a sentence saying why there are none."""
    return view(*load_stored(path))


class _Stopped(Exception):
    """Raised inside the worker at its next progress report once the page's Stop was pressed."""


class _Worker:
    """Runs `work(progress)` in a thread; `updates()` yields its progress reports (None while quiet)."""

    def __init__(self, work: Callable[[Callable], dict]):
        self.reports: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.doc: dict | None = None
        self.error: BaseException | None = None

        def tick(done: int, total: int, message: str) -> None:
            if self.stop.is_set():
                raise _Stopped
            self.reports.put((done, total, message))

        def run() -> None:
            try:
                self.doc = work(tick)
            except BaseException as exc:  # handed to the page's thread, which reports it
                self.error = exc
            finally:
                self.reports.put(None)

        threading.Thread(target=run, daemon=True, name="throughput-live").start()

    def updates(self, poll: float = 0.5) -> Iterator[tuple | None]:
        while True:
            try:
                item = self.reports.get(timeout=poll)
            except queue.Empty:
                yield None  # lets Gradio close the generator (Stop) while a long step runs
                continue
            if item is None:
                return
            yield item


@gpu
def _measure(lm, options: dict, progress) -> dict:
    return run_throughput(lm, **options, progress=progress)


def run_live(
    engine: Engine,
    prompt_tokens: int,
    new_tokens: int,
    budget_percent: float,
    policies: list[str],
    batches: list,
    model: str | None = None,
    progress=None,
):
    """Rerun the benchmark on the page's model; yields status lines, then every output of the tab."""
    with page_errors("The throughput run"):
        if not policies:
            raise ValueError("Tick at least one policy to measure (the full cache gives the ratios).")
        options = dict(
            prompt_tokens=int(prompt_tokens), new_tokens=int(new_tokens), budget=float(budget_percent) / 100,
            policies=list(policies), batches=sorted(int(b) for b in batches) if batches else None,
        )  # fmt: skip
        make_policies(options["policies"], options["budget"])  # bad input: a sentence before any work
        if options["batches"]:
            check_batches(options["batches"])
        yield {"tp_status": "Loading the model…" if not engine.is_loaded(model) else "Starting…"}
        lm = engine.get(model)
        worker = _Worker(lambda tick: _measure(lm, options, tick))
        try:
            for report in worker.updates():
                if report is None:
                    yield {"tp_status": gr.skip()}
                    continue
                done, total, message = report
                if progress is not None:
                    progress(done / max(total, 1), desc=message)
                yield {"tp_status": f"Running ({done}/{total}): {message}"}
        finally:
            worker.stop.set()  # Stop closes this generator: the worker ends at its next report
        if worker.error is not None:
            raise worker.error
        doc = jsonable(worker.doc)
    yield view(doc, _source(doc, f"Live run on this page's model ({doc['wall_seconds']:.0f} s)"))


def build(engine: Engine, model: gr.components.Component) -> None:
    """The tab's components and events; call inside `with gr.Tab(...)`. `model` is the page's model picker."""
    first = stored_view()
    gr.Markdown(
        "Give every policy the same KV memory (by default what ONE full-cache row of the prompt needs) "
        "and fit as many rows as it allows: tokens per second at that batch, against batch size."
    )
    status = gr.Markdown(first["tp_status"], elem_id="tp-status")
    with gr.Row():
        with gr.Column():
            bars = gr.Plot(first["tp_bars"], label="Tokens/s at the cap", elem_id="tp-bars")
            caption("cap_bars")
        with gr.Column():
            lines = gr.Plot(first["tp_lines"], label="Tokens/s against batch size", elem_id="tp-lines")
            caption("tokens_vs_batch")
    explanation = gr.Markdown(first["tp_explain"], elem_id="tp-explain")
    table = gr.Dataframe(
        first["tp_table"], label="Every measured point", interactive=False, elem_id="tp-table"
    )
    with gr.Accordion("Run live on this page's model (about a minute on a CPU)", open=False):
        with gr.Row():
            prompt_tokens = gr.Slider(
                256, 2048, 1024, step=64, label="Prompt tokens per row", elem_id="tp-prompt"
            )
            new_tokens = gr.Slider(4, 64, 16, step=1, label="New tokens per row", elem_id="tp-new")
            budget = gr.Slider(
                5, 50, 20, step=1, label="KV budget (% of the prompt kept per layer)", elem_id="tp-budget"
            )
        with gr.Row():
            chosen = gr.CheckboxGroup(
                LIVE_POLICIES, value=["full", "h2o", "d2o"], label="Policies", elem_id="tp-policies"
            )
            batches = gr.CheckboxGroup(
                [1, 2, 4, 8], value=[1, 2, 4], label="Batch sizes for the curve", elem_id="tp-batches"
            )
        with gr.Row():
            go = gr.Button("Run live", variant="primary", elem_id="tp-run")
            stop = gr.Button("Stop", variant="stop", elem_id="tp-stop")
            show = gr.Button("Show the stored results", elem_id="tp-stored")
    io = {
        "tp_status": status,
        "tp_bars": bars,
        "tp_lines": lines,
        "tp_explain": explanation,
        "tp_table": table,
    }

    def live(prompt_tokens, new_tokens, budget, chosen, batches, model, progress=PROGRESS):
        yield from wire(run_live, io)(
            engine, prompt_tokens, new_tokens, budget, chosen, batches, model, progress
        )

    event = go.click(
        live,
        [prompt_tokens, new_tokens, budget, chosen, batches, model],
        list(io.values()),
        api_visibility="private",
        concurrency_id="model",
    )
    stop.click(lambda: STOPPED, None, status, cancels=[event], queue=False)
    show.click(wire(stored_view, io), None, list(io.values()), queue=False)
