"""The Compare tab: controls, one streaming column per configuration, then the figures. Wiring only.

Zones: (1) prompt, the question kept whole, examples (each shows its stored run at once), policies,
budget, Run and Stop, then Advanced (generated per policy from the registry, extra columns, sampling),
so that opening it leaves Run and Stop on the screen;
(2) up to six columns, one per configuration, streaming their text with a stats line; (3) the
figures with their pickers, downloads and "Open a run". Behaviour lives in `compare_run.py`,
`stored_runs.py` and `open_run.py`; this module only places components and connects them.
"""

from __future__ import annotations

import functools

import gradio as gr

from d2o_core import POLICIES

from . import compare_run as C
from . import policy_controls as P
from . import stored_runs
from .engine import Engine
from .open_run import open_run
from .wiring import caption, initial, wire

SAMPLING_HELP = {
    "temperature": "0 = greedy. Above 0, sampling with the seed below (the same for every column).",
    "seed": "Sampling seed; the same seed gives the same text.",
    "chat": "Wrap the prompt in the model's chat template.",
}
QUESTION_HELP = (
    "With a question, the prompt above is the context: each column compresses it, then reads the "
    "question, which no compression evicts (kvpress's convention). The question is not part of the "
    "examples' stored runs."
)
FIGURES = {  # output name: (label, element id, builder: its caption in figures.CAPTIONS), below the pickers
    "timeline_fig": ("Eviction and merge timeline", "timeline-fig", "timeline"),
    "step0_fig": ("Step 0: the prompt compression, token by token", "step0-fig", "step0"),
    "kept_fig": ("What each column kept of one layer and head", "kept-fig", "kept_tokens"),
    "survival_fig": ("Token survival over the prompt and the generated text", "survival-fig", "survival"),
    "cache_fig": ("Cache size over time", "cache-fig", "cache_over_time"),
    "drift_fig": ("Drift from the full cache", "drift-fig", "drift"),
}


def _controls(engine: Engine, first: dict) -> dict:
    c: dict = {}
    c["model"] = gr.Dropdown(
        engine.models, value=engine.default, label="Model", visible=len(engine.models) > 1
    )
    c["picked"] = gr.CheckboxGroup(
        [(POLICIES[n].title, n) for n in P.NAMES],
        value=list(P.DEFAULT_PICKED),
        label="Cache policies (one column each)",
        elem_id="policies",
    )
    c["budget"] = gr.Slider(
        5, 100, 20, step=1, label="KV budget (% of the prompt kept per layer)", elem_id="budget"
    )
    # Run and Stop above Advanced: opened, its ~1,300 px of settings pushed them off the screen.
    with gr.Row():
        c["run"] = gr.Button(**initial(first, "run", value="Run"), variant="primary", elem_id="run")
        c["stop"] = gr.Button("Stop", variant="stop", elem_id="stop")
    with gr.Accordion("Advanced", open=False):
        gr.Markdown("Each policy's settings (defaults from its paper); they apply to its column.")
        c["advanced"] = P.advanced_controls()
        c["extras"] = P.extra_columns()
        with gr.Row():
            # A whole maximum: the slider's end label is a few characters wide, and "1.5" showed as "1.".
            c["temperature"] = gr.Slider(
                0, 2, 0, step=0.1, label="Temperature", info=SAMPLING_HELP["temperature"]
            )
            c["seed"] = gr.Number(0, precision=0, label="Seed", info=SAMPLING_HELP["seed"])
            c["chat"] = gr.Checkbox(True, label="Chat template", info=SAMPLING_HELP["chat"])
    return c


def _columns(first: dict) -> dict:
    out = {}
    with gr.Row(equal_height=True):
        for i in C.SLOTS:
            with gr.Column(
                **initial(first, f"col:{i}", visible=False),
                min_width=220,
                elem_classes=["policy-col"],
                elem_id=f"col-{i}",
            ) as col:
                out[f"title:{i}"] = gr.Markdown(**initial(first, f"title:{i}"), elem_id=f"title-{i}")
                out[f"text:{i}"] = gr.Textbox(
                    **initial(first, f"text:{i}"),
                    lines=6,
                    max_lines=16,
                    show_label=False,
                    interactive=False,
                    elem_id=f"text-{i}",
                )
                out[f"stats:{i}"] = gr.Markdown(
                    **initial(first, f"stats:{i}"), elem_id=f"stats-{i}", elem_classes=["stats"]
                )
            out[f"col:{i}"] = col
    return out


def _figures(first: dict) -> dict:
    out = {
        "summary": gr.Dataframe(
            **initial(first, "summary"), label="Summary", interactive=False, elem_id="summary"
        )
    }
    out["budget_fig"] = gr.Plot(
        **initial(first, "budget_fig"), label="Per-layer budgets", elem_id="budget-fig"
    )
    caption("budget_heatmap")
    out["attention_fig"] = gr.Plot(
        **initial(first, "attention_fig"),
        label="The prompt's attention, layer by layer",
        elem_id="attention-fig",
    )
    caption("attention_map")
    with gr.Row():
        out["view"] = gr.Dropdown(
            **initial(first, "view", choices=[]), label="Column shown below", elem_id="view"
        )
        out["layer"] = gr.Slider(
            **initial(first, "layer", minimum=0, maximum=1, value=0), step=1, label="Layer", elem_id="layer"
        )
        out["head"] = gr.Slider(
            **initial(first, "head", minimum=0, maximum=1, value=0), step=1, label="KV head", elem_id="head"
        )
    for name, (label, elem_id, builder) in FIGURES.items():
        out[name] = gr.Plot(**initial(first, name), label=label, elem_id=elem_id)
        caption(builder)
    with gr.Row():
        with gr.Accordion("Downloads", open=False):
            prepare = gr.Button(
                "Prepare downloads (events CSV, run JSON, one offline report, figures as HTML)",
                elem_id="prepare",
            )
            out["downloads"] = gr.File(
                file_count="multiple", label="Files", interactive=False, elem_id="downloads"
            )
        out["open"] = gr.UploadButton("Open a run (JSON)", file_types=[".json"], elem_id="open-run")
    out["prepare"] = prepare
    return out


def build(engine: Engine, demo: gr.Blocks) -> dict:
    """The tab's components and wiring; returns what other tabs share (prompt, picked, model, and the
    Advanced panel's controls and extra columns, which the Budget sweep runs too).

    The page opens on the stored first view (`stored_runs.first_view`), built into the components'
    initial values: it arrives with the page itself, and only its state (never sent to the browser)
    waits for the load event.
    """
    first = stored_runs.first_view()
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(
                **initial(first, "prompt"),
                label="Prompt",
                lines=6,
                max_lines=10,
                elem_id="prompt",
                placeholder="Type a prompt, or pick an example",
            )
            question = gr.Textbox(
                **initial(first, "question"),
                label="Question, never compressed",
                info=QUESTION_HELP,
                lines=1,
                max_lines=4,
                elem_id="question",
                placeholder="Optional: blank compresses the whole prompt",
            )
            max_new = gr.Slider(1, 256, 64, step=1, label="Max new tokens", elem_id="max-new")
            examples = gr.Examples(
                [[e["prompt"], e["max_new_tokens"]] for e in stored_runs.examples()],
                [prompt, max_new],
                example_labels=[e["name"] for e in stored_runs.examples()],
                label="Examples (each opens its stored run at once)",
                examples_per_page=12,
            )
        with gr.Column(scale=2):
            c = _controls(engine, first)
    status = gr.Markdown(**initial(first, "status"), elem_id="status")
    state = gr.State()
    out = _columns(first) | _figures(first)
    outputs = {k: v for k, v in out.items() if k not in ("open", "prepare")}
    outputs |= {"status": status, "state": state, "prompt": prompt, "question": question, "run": c["run"]}
    _wire_run(engine, c, prompt, question, max_new, outputs)
    _wire_views(out, outputs, state)
    page = list(outputs.values())
    examples.dataset.click(
        wire(stored_runs.show_example, outputs), [prompt, max_new], page, api_visibility="private"
    )
    out["open"].upload(wire(open_run, outputs), out["open"], page, api_visibility="private")
    # A new prompt or question: the status says the run shown is the previous prompt's. Only the status
    # line changes (nothing cleared, no figure redrawn), outside the queue. `change`, not `input`: a
    # Textbox's `input` comes from key presses, so deleting, pasting or cutting never sent it.
    edited = functools.partial(C.prompt_edited, examples={e["prompt"] for e in stored_runs.examples()})
    for box in (prompt, question):
        box.change(
            edited,
            [prompt, question, state],
            status,
            api_visibility="private",
            queue=False,
            show_progress="hidden",
            trigger_mode="always_last",
        )
    # The state holds the run's results (the pickers redraw from it); Gradio would deep-copy an
    # initial State value for every visitor, so the load event hands over the shared one instead.
    demo.load(lambda: first.get("state"), None, state, api_visibility="private")
    return {
        "prompt": prompt,
        "picked": c["picked"],
        "model": c["model"],
        "advanced": c["advanced"],
        "extras": c["extras"],
    }


def _wire_run(engine: Engine, c: dict, prompt, question, max_new, outputs: dict) -> None:
    n_advanced = len(c["advanced"])

    def compare(prompt, question, picked, budget, max_new, model, temperature, seed, chat, *values):
        def columns():
            settings = P.settings_from_values(list(values[:n_advanced]))
            return P.Columns(picked, budget, settings, P.extras_from_values(list(values[n_advanced:])))

        # A cleared seed box sends None: blank means the default seed, as elsewhere on the page.
        sampling = C.Sampling(temperature, 0 if seed is None else seed, chat)
        yield from C.run_comparison(engine, prompt, columns, max_new, model, sampling, question)

    inputs = [
        prompt,
        question,
        c["picked"],
        c["budget"],
        max_new,
        c["model"],
        c["temperature"],
        c["seed"],
        c["chat"],
    ]
    event = c["run"].click(
        wire(compare, outputs),
        [*inputs, *c["advanced"], *c["extras"]],
        list(outputs.values()),
        api_visibility="private",
        concurrency_id="model",
        # Only the status line shows that a run is under way: a spinner over each of ~40 outputs is
        # redrawn by the browser all run long, and on a 2-core laptop that CPU comes from the model.
        show_progress="minimal",
        show_progress_on=[outputs["status"]],
    )
    # However the run ended: Stop leaves an in-progress status behind, which becomes "Stopped ...".
    # Gradio runs this once the server has ended the request, after its last streamed update.
    event.then(C.run_ended, outputs["status"], outputs["status"], api_visibility="private", queue=False)
    c["stop"].click(None, cancels=[event])


def _wire_views(out: dict, outputs: dict, state) -> None:
    pickers = [state, out["view"], out["layer"], out["head"]]
    views = [out[k] for k in ("cache_fig", "survival_fig", "timeline_fig", "step0_fig", "kept_fig")]
    # `input`, not `change`: a finished run sets the pickers itself, with its figures already drawn;
    # redrawing them on that change sent four figures twice as the page opened.
    out["view"].input(wire(C.policy_views, outputs), pickers, views, api_visibility="private")
    for picker in (out["layer"], out["head"]):
        picker.input(
            wire(C.timeline_view, outputs),
            pickers,
            [out["timeline_fig"], out["step0_fig"], out["kept_fig"]],
            api_visibility="private",
        )
    out["prepare"].click(
        wire(C.prepare_downloads, outputs), pickers, out["downloads"], api_visibility="private"
    )
