"""Stored example runs: the page's instant first view, and every example shown at once.

What this module is: each example in `assets/examples.json` has a finished comparison stored in
`assets/runs/<slug>.json.gz` (the run-file format of `d2o_core.runfile`, gzipped: the events of four
policies over a 900-token prompt are ~20 MB of JSON, ~2 MB packed). `write_stored_runs` makes them
by driving the page's own handler (`compare_run.run_comparison`: the same code path as a live run)
and saving its final state, so a stored run and a fresh one give the same figures' data;
`make results` (`python -m d2o_core example-runs`) regenerates them. `example_page` reads one,
once per process, and fills the page from it with `compare_run.results_page`.

What it is not: a cache of live runs; runs are only read, never written, by the page.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from pathlib import Path

import gradio as gr

from d2o_core.runfile import load_run, save_run

from .compare_run import Sampling, results_page, run_comparison
from .engine import Engine
from .policy_controls import DEFAULT_PICKED, Columns
from .safe_text import markdown_text

ASSETS = Path(__file__).resolve().parent.parent / "assets"
RUNS = ASSETS / "runs"
FIRST = "Passkey in a haystack"  # the example the page opens with
BUDGET_PERCENT = 20


@functools.cache
def examples() -> tuple[dict, ...]:
    return tuple(json.loads((ASSETS / "examples.json").read_text(encoding="utf-8")))


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_stored_runs(engine: Engine, folder: Path = RUNS, say=print) -> list[Path]:
    """Run every example through the page's handler (default columns at 20 %), save each run file."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for example in examples():
        columns = Columns(list(DEFAULT_PICKED), BUDGET_PERCENT)
        outs = list(
            run_comparison(engine, example["prompt"], columns, example["max_new_tokens"], None, Sampling())
        )
        state = outs[-1]["state"]
        meta = state["meta"] | {"example": example["name"], "budget_percent": BUDGET_PERCENT}
        path = folder / f"{slug(example['name'])}.json.gz"
        # mtime=0: no gzip timestamp (the run's own creation time is in its meta).
        path.write_bytes(gzip.compress(save_run(state["results"], meta).encode(), mtime=0))
        say(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        paths.append(path)
    return paths


@functools.cache
def _stored(name: str):
    """(results, meta) of the stored run of example `name`, or None when there is none."""
    path = RUNS / f"{slug(name)}.json.gz"
    if not path.is_file():
        return None
    return load_run(gzip.decompress(path.read_bytes()))


def example_named(prompt: str) -> dict | None:
    return next((e for e in examples() if e["prompt"] == prompt), None)


@functools.cache
def example_page(name: str) -> dict | None:
    """Every output of the page for example `name`'s stored run, or None when it has none.

    Built once per process and shared by every visitor: nothing downstream mutates results or figures.
    """
    stored = _stored(name)
    if stored is None:
        return None
    results, meta = stored
    model = markdown_text(meta.get("model") or "unknown")
    budget = markdown_text(meta.get("budget_percent", "?"))
    status = (
        f"Stored run of the example “{markdown_text(name)}” (model {model}, budget {budget} %), "
        "shown at once; press Run again to compute it live with your settings."
    )
    page = results_page(results, status, dict(meta))
    # The question box shows what the stored run ran with (none for the bundled examples).
    question = meta.get("question") if isinstance(meta.get("question"), str) else ""
    return page | {
        "prompt": meta.get("prompt", ""),
        "question": question,
        "run": gr.update(value="Run again"),
    }


def first_view() -> dict:
    """The page as it opens: the first example's stored run, or an invitation when none is stored."""
    page = example_page(FIRST)
    if page is not None:
        return page
    return {"status": "Pick an example or type a prompt, then press Run."}


def show_example(prompt: str, max_new_tokens) -> dict:
    """An example button was clicked: its stored run at once, or a hint to run it."""
    example = example_named(prompt)
    page = example_page(example["name"]) if example else None
    if page is None:
        return {
            "status": "No stored run for this example: press Run to compute it.",
            "run": gr.update(value="Run"),
        }
    return page
