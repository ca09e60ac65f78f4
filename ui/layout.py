"""The page: `build_demo(engine) -> gr.Blocks`. Wiring only; behaviour lives in `handlers.py`.

Zones: controls (prompt, examples, policies, budget, Advanced, Run/Stop), one streaming
column per policy, then the figures with their pickers and downloads. A second tab
sweeps the budget on the user's prompt; a third (ui/throughput_tab.py) shows tokens/s under one
KV-memory cap; a fourth explains the policies.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import gradio as gr

from d2o_core import POLICIES

from . import handlers as H
from . import throughput_tab
from .engine import Engine
from .open_run import open_run

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ABOUT = (ASSETS / "about.md").read_text(encoding="utf-8") if (ASSETS / "about.md").is_file() else ""
TIPS = {
    "h2o_sinks": "First positions H2O never evicts. The original H2O keeps none.",
    "h2o_recent": "Share of H2O's budget kept for the most recent tokens; the rest goes to heavy hitters.",
    "stream_sinks": "StreamingLLM keeps these first positions plus the most recent tokens. Keys keep their "
    "original rotary positions here (the original method re-indexes them inside the cache).",
    "d2o_variant": "Two readings of D2O: 'paper' (3:1 heavy:recent, EMA of the max similarity, per-head "
    "merges, softmax merge weights) or 'official' code (1:1, EMA of the mean, merges shared by heads, "
    "unnormalised weights, layers 0, 1 and the last keep everything, so it uses more memory).",
    "d2o_sinks": "First positions D2O never evicts.",
    "d2o_recent": "Share of each layer's budget kept for the most recent tokens.",
    "d2o_beta": "Weight of the newest similarity in the merge threshold's moving average.",
    "d2o_merge": "Off: evicted tokens are dropped (H2O with D2O's per-layer budgets).",
    "d2o_layer_budgets": "dynamic: layers with dense attention get more budget; uniform: all the same.",
    "d2o_protected": "Layers that keep their full cache, e.g. 0, 1, -1 (negative counts from the end).",
    "temperature": "0 = greedy. Above 0, sampling with the seed below (the same for every policy).",
    "seed": "Sampling seed; the same seed gives the same text.",
    "chat": "Wrap the prompt in the model's chat template.",
}


def load_examples() -> list[dict]:
    return json.loads((ASSETS / "examples.json").read_text(encoding="utf-8"))


def analytics_enabled() -> bool:
    """Gradio's usage analytics: off unless the host sets GRADIO_ANALYTICS_ENABLED=True.

    Gradio's own default is on; an offline research tool should not phone home unasked.
    """
    return os.environ.get("GRADIO_ANALYTICS_ENABLED", "False") == "True"


def launch_options() -> dict:
    """Arguments for `demo.launch` that style the page (Gradio 6 takes them at launch)."""
    return {"css_paths": [ASSETS / "style.css"], "theme": gr.themes.Soft()}


def _advanced() -> dict[str, gr.components.Component]:
    """The Advanced accordion: one control per `handlers.Controls` field, default and tooltip included."""
    d, c = H.Controls(), {}

    def slider(name: str, low: float, high: float, step: float, label: str) -> None:
        c[name] = gr.Slider(low, high, getattr(d, name), step=step, label=label, info=TIPS[name])

    def choice(name: str, options: list[str], label: str) -> None:
        c[name] = gr.Radio(options, value=getattr(d, name), label=label, info=TIPS[name])

    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            slider("h2o_sinks", 0, 16, 1, "H2O sinks")
            slider("h2o_recent", 0, 1, 0.05, "H2O recent share")
            slider("stream_sinks", 0, 16, 1, "StreamingLLM sinks")
        choice("d2o_variant", ["paper", "official"], "D2O variant")
        with gr.Row():
            slider("d2o_sinks", 0, 16, 1, "D2O sinks")
            slider("d2o_recent", 0, 1, 0.05, "D2O recent share")
            slider("d2o_beta", 0.05, 1, 0.05, "D2O EMA beta")
        with gr.Row():
            c["d2o_merge"] = gr.Checkbox(
                d.d2o_merge, label="D2O merges evicted tokens", info=TIPS["d2o_merge"]
            )
            choice("d2o_layer_budgets", ["dynamic", "uniform"], "D2O layer budgets")
            c["d2o_protected"] = gr.Textbox(
                d.d2o_protected, label="D2O protected layers", placeholder="none", info=TIPS["d2o_protected"]
            )
        with gr.Row():
            slider("temperature", 0, 1.5, 0.05, "Temperature")
            c["seed"] = gr.Number(d.seed, precision=0, label="Seed", info=TIPS["seed"])
            c["chat"] = gr.Checkbox(d.chat, label="Chat template", info=TIPS["chat"])
    return c


def _columns() -> dict[str, gr.components.Component]:
    out = {}
    with gr.Row(equal_height=True):
        for name in H.NAMES:
            with gr.Column(
                visible=name in H.DEFAULT_CHOSEN, min_width=220, elem_classes=["policy-col", f"policy-{name}"]
            ) as col:
                gr.Markdown(f"### {POLICIES[name].title}")
                out[f"text:{name}"] = gr.Textbox(
                    lines=6, max_lines=16, show_label=False, interactive=False, elem_id=f"text-{name}"
                )
                out[f"stats:{name}"] = gr.Markdown(elem_id=f"stats-{name}", elem_classes=["stats"])
            out[f"col:{name}"] = col
    return out


def _wire(handler, outputs: dict):
    """A Gradio function mapping a handler's {name: value} dicts onto components."""
    if inspect.isgeneratorfunction(handler):

        def stream(*args):
            for out in handler(*args):
                yield {outputs[k]: v for k, v in out.items()}

        return stream
    return lambda *args: {outputs[k]: v for k, v in handler(*args).items()}


def build_demo(engine: Engine) -> gr.Blocks:
    """The whole page for `engine`'s models (built, not launched)."""
    examples = load_examples()
    with gr.Blocks(title="D2O Cache Explorer", analytics_enabled=analytics_enabled()) as demo:
        gr.Markdown(
            "# D2O Cache Explorer\nSee what KV-cache compression does to a language model: the same prompt, "
            "generated with several cache policies side by side, and what each one kept, evicted and merged."
        )
        state = gr.State()
        with gr.Tab("Compare"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(
                        label="Prompt",
                        lines=6,
                        max_lines=10,
                        elem_id="prompt",
                        placeholder="Type a prompt, or pick an example below",
                    )
                    max_new = gr.Slider(1, 256, 64, step=1, label="Max new tokens")
                    gr.Examples(
                        [[e["prompt"], e["max_new_tokens"]] for e in examples],
                        [prompt, max_new],
                        example_labels=[e["name"] for e in examples],
                        label="Examples",
                        examples_per_page=12,
                    )
                with gr.Column(scale=2):
                    model = gr.Dropdown(
                        engine.models, value=engine.default, label="Model", visible=len(engine.models) > 1
                    )
                    chosen = gr.CheckboxGroup(
                        [(POLICIES[n].title, n) for n in H.NAMES],
                        value=H.DEFAULT_CHOSEN,
                        label="Cache policies",
                        elem_id="policies",
                    )
                    budget = gr.Slider(5, 100, 20, step=1, label="KV budget (% of the prompt kept per layer)")
                    controls = _advanced()
                    with gr.Row():
                        run = gr.Button("Run", variant="primary", elem_id="run")
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
            status = gr.Markdown(elem_id="status")
            outputs = _columns()
            summary = gr.Dataframe(label="Summary", interactive=False, elem_id="summary")
            budget_fig = gr.Plot(label="Per-layer budgets", elem_id="budget-fig")
            with gr.Row():
                view = gr.Dropdown([], label="Policy shown below", elem_id="view")
                layer = gr.Slider(0, 1, 0, step=1, label="Layer", elem_id="layer")
                head = gr.Slider(0, 1, 0, step=1, label="KV head", elem_id="head")
            timeline_fig = gr.Plot(label="Eviction and merge timeline", elem_id="timeline-fig")
            survival_fig = gr.Plot(label="Token survival over the prompt", elem_id="survival-fig")
            cache_fig = gr.Plot(label="Cache size over time", elem_id="cache-fig")
            drift_fig = gr.Plot(label="Drift from the full cache", elem_id="drift-fig")
            with gr.Accordion("Downloads", open=False):
                prepare = gr.Button("Prepare downloads (events CSV, run JSON, figures as HTML)")
                downloads = gr.File(file_count="multiple", label="Files", interactive=False)
            open_file = gr.UploadButton("Open a run (JSON)", file_types=[".json"], elem_id="open-run")
        with gr.Tab("Budget sweep"):
            sweep_io = _sweep_tab(engine, prompt, chosen, model)
        with gr.Tab("Throughput"):
            throughput_tab.build(engine, model)
        with gr.Tab("About"):
            gr.Markdown(ABOUT)

        outputs |= {
            "status": status,
            "summary": summary,
            "budget_fig": budget_fig,
            "drift_fig": drift_fig,
            "timeline_fig": timeline_fig,
            "survival_fig": survival_fig,
            "cache_fig": cache_fig,
            "state": state,
            "view": view,
            "layer": layer,
            "head": head,
            "downloads": downloads,
        }
        ctrl = list(controls.values())

        def compare(prompt, chosen, budget, max_new, model, *values):
            yield from H.run_comparison(
                engine, prompt, chosen, budget, max_new, model, H.Controls(**dict(zip(controls, values)))
            )

        event = run.click(
            _wire(compare, outputs),
            [prompt, chosen, budget, max_new, model, *ctrl],
            list(outputs.values()),
            api_visibility="private",
            concurrency_id="model",
        )
        # However the run ended: Stop leaves an in-progress status behind, which becomes "Stopped ...".
        # Gradio runs this once the server has ended the request, after its last streamed update.
        event.then(H.run_ended, status, status, api_visibility="private", queue=False)
        stop.click(None, cancels=[event])
        chosen.change(
            _wire(H.columns_visible, outputs),
            chosen,
            [outputs[f"col:{n}"] for n in H.NAMES],
            api_visibility="private",
            queue=False,
        )
        controls["d2o_variant"].change(
            H.variant_defaults,
            controls["d2o_variant"],
            [controls["d2o_recent"], controls["d2o_beta"], controls["d2o_protected"]],
            api_visibility="private",
            queue=False,
        )
        views = [cache_fig, timeline_fig, survival_fig]
        view.change(
            _wire(H.policy_views, outputs), [state, view, layer, head], views, api_visibility="private"
        )
        for picker in (layer, head):
            picker.change(
                _wire(H.timeline_view, outputs),
                [state, view, layer, head],
                timeline_fig,
                api_visibility="private",
            )
        prepare.click(
            _wire(H.prepare_downloads, outputs),
            [state, view, layer, head],
            downloads,
            api_visibility="private",
        )

        opened = outputs | {"prompt": prompt}  # a run file brings its prompt back too
        open_file.upload(_wire(open_run, opened), open_file, list(opened.values()), api_visibility="private")

        def compare_api(
            prompt: str,
            policies: list[str] = list(H.API_POLICIES),  # noqa: B006 - gr.api shows it as the default
            budget: float = H.API_BUDGET,
            max_new_tokens: int = H.API_MAX_NEW_TOKENS,
        ) -> dict:
            """Texts and metrics per policy; only the prompt is needed (README: "Python client / API")."""
            return H.api_compare(engine, prompt, policies, budget, max_new_tokens)

        gr.api(compare_api, api_name="compare", concurrency_id="model")
        sweep_io["wire"](outputs)
    return demo


PROGRESS = gr.Progress()  # Gradio injects the live tracker where a parameter defaults to one


def _sweep_tab(engine: Engine, prompt, chosen, model) -> dict:
    gr.Markdown(
        "Run your prompt (from the Compare tab) at several budgets and see how far each policy drifts from "
        "the full cache: agreement of its next-token choice and KL divergence, teacher-forced on the full "
        "cache's text."
    )
    with gr.Row():
        budgets = gr.CheckboxGroup([5, 10, 20, 40, 60, 100], value=[10, 20, 40], label="Budgets (%)")
        max_new = gr.Slider(4, 128, 32, step=1, label="Max new tokens")
        go = gr.Button("Run sweep", variant="primary", elem_id="sweep-run")
    sweep_status = gr.Markdown()
    with gr.Row():
        agree_fig, kl_fig = gr.Plot(label="Agreement vs budget"), gr.Plot(label="KL vs budget")
    table = gr.Dataframe(label="Sweep results", interactive=False)

    def wire(outputs: dict) -> None:
        io = {"sweep_status": sweep_status, "agree_fig": agree_fig, "kl_fig": kl_fig, "sweep_table": table}

        def sweep(prompt, chosen, budgets, max_new, model, progress=PROGRESS):
            yield from _wire(H.run_sweep, io)(engine, prompt, chosen, budgets, max_new, model, progress)

        go.click(
            sweep,
            [prompt, chosen, budgets, max_new, model],
            list(io.values()),
            api_visibility="private",
            concurrency_id="model",
        )

    return {"wire": wire}
