"""The Budget sweep tab: the user's prompt at several budgets, fidelity to the full cache against budget.

What this module is: the tab's components (`build`) and its handler (`run_sweep`, a generator of
{output name: value} dicts, callable without a browser). What it is not: the sweep itself
(`d2o_core.eval.sweep.fidelity_sweep`) or figure code (`ui/figures/fidelity.py`).
"""

from __future__ import annotations

import gradio as gr

from . import figures
from .engine import Engine
from .errors import page_errors
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
