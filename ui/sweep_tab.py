"""The Budget sweep tab: the user's prompt at several budgets, and a sweep's results as a leaderboard.

What this module is: the tab's components (`build`) and its handlers: `stored_view` (the tab as it
opens: `results/sweep.csv`, the README's sweep, drawn at once, nothing run), `run_sweep` (fidelity to
the full cache against budget on the user's prompt, for the Compare tab's configurations: its ticked
policies with their Advanced settings and its extra columns; a generator of {output name: value}
dicts) and `open_results` (a sweep's cell records, uploaded or from a folder on this machine, drawn
as the leaderboard that `python -m d2o_core leaderboard --html` writes), all callable without a
browser. Tables name their columns in words and give budgets in %, as the rest of the page does.
What it is not: the task sweeps themselves (`d2o_core.eval.sweep`, `python -m d2o_core sweep`) or
figure code (`ui/figures/fidelity.py`, `ui/figures/leaderboard.py`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import gradio as gr
import pandas as pd

from d2o_core import compare
from d2o_core.eval.sweep import FIDELITY
from d2o_core.policies import build as build_policy
from d2o_core.policies.parse import blank
from d2o_core.runner import result_labels

from . import figures
from . import policy_controls as P
from .engine import Engine
from .errors import page_errors
from .figures import leaderboard as board_figures
from .safe_text import markdown_text
from .wiring import PROGRESS, caption, wire

BUDGETS = [5, 10, 20, 40, 60, 100]
STORED = Path(__file__).resolve().parent.parent / "results" / "sweep.csv"
REGENERATE = "`python -m d2o_core results` (or `make results`)"
# The sweep's table: {column: header}, in order; measures not in a frame are left out, the
# fractions of 1 (PERCENT) are shown in %.
TABLE = {
    "policy": "configuration",
    "budget": "KV budget %",
    "runs": "runs",
    "score": "task score %",
    "token_agreement": "agreement with full %",
    "mean_kl_to_full": "KL to full (nats/step)",
    "nll_of_reference": "NLL of full's text (nats/token)",
    "kv_fraction": "KV kept, % of full",
    "decode_ms_per_token": "decode ms/token",
}
PERCENT = {"budget", "score", "token_agreement", "kv_fraction"}
# A live sweep's table (one run per configuration and budget: no "runs", no task score).
TABLE_HEADERS = tuple(TABLE[c] for c in ("policy", "budget", *FIDELITY))
BOARD = {
    "model": "model",
    "config": "configuration",
    "policy": "policy",
    "budget": "KV budget %",
    "score": "score % (mean)",
    "kv_mb": "KV cache MB",
    "tokens_per_second": "decode tokens/s",
    "cells": "cells",
}
BOARD_HEADERS = tuple(BOARD.values())


def sweep_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean of each measure per (configuration, budget), in run order; headers in words, fractions in %.

    A "runs" column says how many runs each row averages when that is ever more than one.
    """
    if df.empty:
        return pd.DataFrame(columns=list(TABLE_HEADERS))
    measures = [c for c in TABLE if c in df.columns and c not in ("policy", "budget", "runs")]
    groups = df.groupby(["policy", "budget"], sort=False)
    out = groups[measures].mean()
    if groups.size().max() > 1:
        out.insert(0, "runs", groups.size())
    out = out.reset_index()
    for column in PERCENT & set(out.columns):
        out[column] = (100 * out[column]).round(1)
    out["budget"] = out["budget"].round().astype(int) if (out["budget"] % 1 == 0).all() else out["budget"]
    return out.round(4).rename(columns=TABLE)


def fidelity_view(df: pd.DataFrame) -> dict:
    """The sweep's figures and table from a frame with `policy`, `budget` (fraction) and the measures."""
    return {
        "agree_fig": figures.sweep_curves(df, y="token_agreement", facet=None),
        "kl_fig": figures.sweep_curves(df, y="mean_kl_to_full", facet=None),
        "sweep_table": sweep_table(df),
    }


def load_stored(path: Path | str = STORED) -> tuple[pd.DataFrame | None, str]:
    """(the stored sweep, a sentence saying what it is); (None, why not) when it cannot be shown."""
    path = Path(path)
    name = f"{path.parent.name}/{path.name}"
    run = "press **Run sweep** to sweep your prompt"
    if not path.is_file():
        return None, f"No stored sweep: {name} is missing (create it with {REGENERATE}); {run}."
    try:
        df = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        return None, f"The stored sweep in {name} could not be read ({markdown_text(exc)}); {run}."
    needed = ["policy", "budget", "token_agreement", "mean_kl_to_full"]
    missing = [c for c in needed if c not in df.columns]
    if missing or df.empty:
        return None, f"{name} holds no sweep results (no {', '.join(missing) or 'rows'}); {run}."
    budgets = ", ".join(f"{100 * b:g} %" for b in sorted(pd.unique(df["budget"])))
    sample = ["task", "target_tokens", "depth", "sample"]  # one task prompt (run_sweep's columns)
    prompts = f"{len(df)} runs"
    if set(sample) <= set(df.columns):
        prompts = f"{len(df.drop_duplicates(sample))} task prompts"
    tasks = f" ({', '.join(markdown_text(t) for t in pd.unique(df['task']))})" if "task" in df else ""
    return df, (
        f"Stored sweep from {name} (written by {REGENERATE}; the model and machine are in "
        f"results/results.md): {df['policy'].nunique()} policies at {budgets} on {prompts}{tasks}, "
        f"each point the mean over them. Nothing was run: {run}."
    )


def stored_view(path: Path | str = STORED) -> dict:
    """The tab as it opens: the stored sweep, or empty figures and a sentence saying why there is none."""
    df, sentence = load_stored(path)
    return {"sweep_status": sentence} | fidelity_view(df if df is not None else pd.DataFrame())


def sweep_grid(names, budgets, settings: dict | None = None, extras: list | None = None):
    """The Compare tab's configurations at every budget: ([(configuration, budget, Policy)], notes).

    names : ticked policies (the full cache aside: it is the reference); settings : the Advanced
    panel's {policy: {setting: value}}; extras : the extra columns' (policy, budget %, settings text),
    whose own budget is not used (each configuration runs at every budget); notes say so.
    """
    picked = [n for n in names or [] if n != "full"]
    extras = list(extras or [])
    if not picked and all(blank(name) or name == "full" for name, *_ in extras):
        raise ValueError(
            "Tick at least one policy other than the full cache (or fill an extra column in the "
            "Compare tab's Advanced panel) to sweep."
        )
    if not budgets:
        raise ValueError("Tick at least one budget to sweep.")
    notes = [
        f"Extra column {i}'s own budget ({markdown_text(budget)} %) is not used: the sweep runs it at "
        "every budget ticked."
        for i, (name, budget, _) in enumerate(extras, 1)
        if not blank(name) and not blank(budget)
    ]
    as_swept = [(name, None, text) for name, _, text in extras]
    grid: dict = {}  # (configuration, budget): Policy, each configuration once per budget
    for budget in sorted(float(b) for b in budgets):
        for policy in P.Columns(picked, budget, settings or {}, as_swept).policies(limit=None):
            if policy.name != "full":
                grid.setdefault((policy.label, policy.budget), policy)
    order = {label: i for i, label in enumerate(dict.fromkeys(label for label, _ in grid))}
    ranked = sorted(grid.items(), key=lambda item: (order[item[0][0]], item[0][1]))  # by configuration
    return [(label, budget, policy) for (label, budget), policy in ranked], notes


def run_sweep(
    engine: Engine,
    prompt: str,
    names: list[str],
    budgets: list,
    max_new_tokens: int,
    model: str | None = None,
    progress=None,
    settings: dict | None = None,
    extras: list | None = None,
):
    """Fidelity to the full cache vs budget on the user's prompt, every configuration on one shared prefill.

    The configurations are the Compare tab's (`sweep_grid`); the full cache runs once, as the reference.
    """
    with page_errors("The sweep"):
        if not (prompt or "").strip():
            raise ValueError("The prompt is empty: type one on the Compare tab or pick an example.")
        grid, notes = sweep_grid(names, budgets, settings, extras)
        yield {"sweep_status": "Loading the model…" if not engine.is_loaded(model) else "Sweeping…"}
        lm = engine.get(model)
        policies = [build_policy("full", 1.0), *(p for _, _, p in grid)]

        def on_update(update) -> None:
            if progress is not None and update.kind != "done":
                message = update.text if update.kind == "status" else f"{update.label} step {update.step}"
                progress(update.step / max(int(max_new_tokens), 1), desc=message)

        # No attention frame, as the CLI's sweeps: nothing here draws it.
        results = compare(
            lm, prompt, policies, max_new_tokens=int(max_new_tokens), on_update=on_update, attention=False
        )
        rows = [
            (name, budget, *(results[label].metrics.get(k, math.nan) for k in FIDELITY))
            for (name, budget, _), label in zip(grid, result_labels(policies)[1:])
        ]
        df = pd.DataFrame(rows, columns=["policy", "budget", *FIDELITY])
    done = f"Done: {len(df)} runs ({df['policy'].nunique()} configurations) sharing one prefill."
    yield {"sweep_status": " ".join([done, *notes])} | fidelity_view(df)


def folders_allowed() -> bool:
    """A folder path reads this server's disk: only where the page runs for its own user, not on a Space."""
    return not os.environ.get("SPACE_ID")


def open_results(files, folder: str | None = None) -> dict:
    """The leaderboard of uploaded cell records (.json files or one .jsonl) and/or a results folder."""
    from d2o_core.eval import leaderboard, store  # noqa: PLC0415 - only this handler needs them

    with page_errors("Opening the results"):
        paths = [Path(getattr(f, "name", f)) for f in (files or [])]
        if (folder or "").strip():
            if not folders_allowed():
                raise ValueError("This hosted page cannot read folders: upload the cell records instead.")
            paths.append(Path(folder.strip()).expanduser())
        if not paths:
            raise ValueError(
                "Upload a sweep's cell records (.json, or one .jsonl) or give its results folder."
            )
        df = store.frame(store.load_records(*paths))
        b = leaderboard.board(df)
        average = b[b["task"] == leaderboard.AVERAGE].drop(columns=["task"])
        percent = {k: (100 * average[k]).round(1) for k in ("budget", "score")}
        average = average.assign(**percent).round(4).rename(columns=BOARD)[list(BOARD_HEADERS)]
        status = (
            f"Opened {len(df)} cells: {df['model'].nunique()} model(s), {df['task'].nunique()} task(s), "
            f"{df['config'].nunique()} policy configuration(s). Nothing was run."
        )
    return {
        "board_status": markdown_text(status),
        "board_overview": board_figures.overview(b),
        "board_tasks": board_figures.per_task(b),
        "board_table": average,
    }


def build(engine: Engine, prompt, chosen, model, advanced=(), extras=()) -> None:
    """The tab's components and wiring; `prompt`, `chosen`, `model`, and the Advanced panel's
    `advanced` controls and `extras` rows, come from the Compare tab."""
    first = stored_view()
    gr.Markdown(
        "Run your prompt (from the Compare tab) at several budgets and see how far each configuration "
        "drifts from the full cache: agreement of its next-token choice and KL divergence, teacher-forced "
        "on the full cache's text. The configurations are the Compare tab's: each ticked policy with its "
        "Advanced settings, and each filled extra column (at every budget below: its own budget % is not "
        "used here)."
    )
    with gr.Row():
        budgets = gr.CheckboxGroup(BUDGETS, value=[10, 20, 40], label="Budgets (%)", elem_id="sweep-budgets")
        max_new = gr.Slider(4, 128, 32, step=1, label="Max new tokens", elem_id="sweep-max-new")
        go = gr.Button("Run sweep", variant="primary", elem_id="sweep-run")
    sweep_status = gr.Markdown(first["sweep_status"], elem_id="sweep-status")
    with gr.Row():
        agree_fig = gr.Plot(
            first["agree_fig"], label="Agreement with the full cache, by budget", elem_id="sweep-agree"
        )
        kl_fig = gr.Plot(first["kl_fig"], label="KL to the full cache, by budget", elem_id="sweep-kl")
    caption("sweep_curves")
    table = gr.Dataframe(
        first["sweep_table"], label="Sweep results (means)", interactive=False, elem_id="sweep-table"
    )
    io = {"sweep_status": sweep_status, "agree_fig": agree_fig, "kl_fig": kl_fig, "sweep_table": table}
    advanced, extras = list(advanced), list(extras)

    # `progress` before the Advanced values: Gradio hands a tracker only to a positional parameter.
    def sweep(prompt, chosen, budgets, max_new, model, progress=PROGRESS, *values):
        settings = P.settings_from_values(list(values[: len(advanced)])) if advanced else {}
        rows = P.extras_from_values(list(values[len(advanced) :]))
        run = run_sweep(engine, prompt, chosen, budgets, max_new, model, progress, settings, rows)
        for out in run:
            yield {io[k]: v for k, v in out.items()}

    go.click(
        sweep,
        [prompt, chosen, budgets, max_new, model, *advanced, *extras],
        list(io.values()),
        api_visibility="private",
        concurrency_id="model",
    )
    gr.Markdown(
        "### Open sweep results\nA sweep's results (`python -m d2o_core sweep ... --out runs/`) as a "
        "leaderboard: score against budget per policy configuration, per task and averaged, with KV memory "
        "and decode speed. Upload its cell records (`runs/cells/*.json`, or one file from "
        "`python -m d2o_core leaderboard runs/ --jsonl all.jsonl`)"
        + (", or give the folder." if folders_allowed() else ".")
    )
    with gr.Row():
        files = gr.File(
            file_count="multiple", file_types=[".json", ".jsonl"], label="Cell records", elem_id="board-files"
        )
        folder = gr.Textbox(
            label="…or a results folder on this machine",
            placeholder="runs/",
            visible=folders_allowed(),
            elem_id="board-folder",
        )
    show = gr.Button("Open results", elem_id="board-open")
    board_status = gr.Markdown(elem_id="board-status")
    overview = gr.Plot(label="Averaged over tasks", elem_id="board-overview")
    caption("overview")
    tasks = gr.Plot(label="Per task", elem_id="board-tasks")
    caption("per_task")
    board_table = gr.Dataframe(
        pd.DataFrame(columns=list(BOARD_HEADERS)),
        label="Averaged over tasks",
        interactive=False,
        elem_id="board-table",
    )
    outputs = {"board_status": board_status, "board_overview": overview, "board_tasks": tasks}
    outputs["board_table"] = board_table
    show.click(wire(open_results, outputs), [files, folder], list(outputs.values()), api_visibility="private")
