"""The Budget sweep tab: the user's prompt at several budgets, and a sweep's results as a leaderboard.

What this module is: the tab's components (`build`) and its handlers: `run_sweep` (fidelity to the
full cache against budget on the user's prompt; a generator of {output name: value} dicts) and
`open_results` (a sweep's cell records, uploaded or from a folder on this machine, drawn as the
leaderboard that `python -m d2o_core leaderboard --html` writes), both callable without a browser.
What it is not: the sweeps themselves (`d2o_core.eval.sweep.fidelity_sweep`, `python -m d2o_core
sweep`) or figure code (`ui/figures/fidelity.py`, `ui/figures/leaderboard.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from . import figures
from .engine import Engine
from .errors import page_errors
from .figures import leaderboard as board_figures
from .safe_text import markdown_text
from .wiring import PROGRESS, wire

BUDGETS = [5, 10, 20, 40, 60, 100]


def run_sweep(
    engine: Engine,
    prompt: str,
    names: list[str],
    budgets: list,
    max_new_tokens: int,
    model: str | None = None,
    progress=None,
):
    """Fidelity to the full cache vs budget on the user's prompt, one shared prefill per budget set."""
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
        report = (lambda done, total, msg: progress(done / max(total, 1), desc=msg)) if progress else None
        df = sweep.fidelity_sweep(
            lm, prompt, sorted(float(b) / 100 for b in budgets), names, int(max_new_tokens), progress=report
        )
    yield {
        "sweep_status": f"Done: {len(df)} runs sharing one prefill.",
        "agree_fig": figures.sweep_curves(df, y="token_agreement", facet=None),
        "kl_fig": figures.sweep_curves(df, y="mean_kl_to_full", facet=None),
        "sweep_table": df.drop(columns=[c for c in ("text",) if c in df.columns]).round(4),
    }


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
        average = b[b["task"] == leaderboard.AVERAGE].drop(columns=["task"]).round(4)
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


def build(engine: Engine, prompt, chosen, model) -> None:
    """The tab's components and wiring; `prompt`, `chosen` and `model` come from the Compare tab."""
    gr.Markdown(
        "Run your prompt (from the Compare tab) at several budgets and see how far each ticked policy drifts "
        "from the full cache: agreement of its next-token choice and KL divergence, teacher-forced on the "
        "full cache's text."
    )
    with gr.Row():
        budgets = gr.CheckboxGroup(BUDGETS, value=[10, 20, 40], label="Budgets (%)")
        max_new = gr.Slider(4, 128, 32, step=1, label="Max new tokens")
        go = gr.Button("Run sweep", variant="primary", elem_id="sweep-run")
    sweep_status = gr.Markdown()
    with gr.Row():
        agree_fig, kl_fig = gr.Plot(label="Agreement vs budget"), gr.Plot(label="KL vs budget")
    table = gr.Dataframe(label="Sweep results", interactive=False)
    io = {"sweep_status": sweep_status, "agree_fig": agree_fig, "kl_fig": kl_fig, "sweep_table": table}

    def sweep(prompt, chosen, budgets, max_new, model, progress=PROGRESS):
        yield from wire(run_sweep, io)(engine, prompt, chosen, budgets, max_new, model, progress)

    go.click(
        sweep,
        [prompt, chosen, budgets, max_new, model],
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
            label="…or a results folder on this machine", placeholder="runs/", visible=folders_allowed()
        )
    show = gr.Button("Open results", elem_id="board-open")
    board_status = gr.Markdown()
    overview = gr.Plot(label="Averaged over tasks")
    tasks = gr.Plot(label="Per task")
    board_table = gr.Dataframe(label="Averaged over tasks", interactive=False)
    outputs = {"board_status": board_status, "board_overview": overview, "board_tasks": tasks}
    outputs["board_table"] = board_table
    show.click(wire(open_results, outputs), [files, folder], list(outputs.values()), api_visibility="private")
