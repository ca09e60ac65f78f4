"""The page: `build_demo(engine) -> gr.Blocks`, its tabs in order. Wiring only.

Tabs: Compare (`compare_tab.py`), Budget sweep (`sweep_tab.py`), Throughput (`throughput_tab.py`)
and About (`about.py`). Each tab module places its own components and connects them to its
handlers; this module only orders the tabs, the JSON API (`api.py`) and the launch options.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from . import about, api, compare_tab, sweep_tab, throughput_tab
from .engine import Engine

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ABOUT = about.about_markdown()  # assets/about.md with the policy table and figure list generated
INTRO = (
    "# D2O Cache Explorer\nSee what KV-cache compression does to a language model: the same prompt, "
    "generated with several cache policies side by side, and what each one kept, evicted and merged."
)


def analytics_enabled() -> bool:
    """Gradio's usage analytics: off unless the host sets GRADIO_ANALYTICS_ENABLED=True.

    Gradio's own default is on; an offline research tool should not phone home unasked.
    """
    return os.environ.get("GRADIO_ANALYTICS_ENABLED", "False") == "True"


def plotly_preload() -> str:
    """A `<link rel="modulepreload">` for Gradio's plotly chunk, or "" when this Gradio has none.

    Gradio fetches plotly.js (a 4.6 MB module) only once a plot has a value; preloading it while the
    page shell renders makes the first view's figures appear ~0.5-0.9 s sooner on a 2-core CPU, and
    in page order (the budget heatmap first). A wrong guess costs one unused fetch, nothing else.
    """
    assets = Path(gr.__file__).parent / "templates" / "frontend" / "assets"
    return "".join(
        f'<link rel="modulepreload" href="./assets/{p.name}">' for p in sorted(assets.glob("PlotlyPlot-*.js"))
    )


def launch_options() -> dict:
    """Arguments for `demo.launch` that style the page (Gradio 6 takes them at launch)."""
    return {"css_paths": [ASSETS / "style.css"], "theme": gr.themes.Soft(), "head": plotly_preload()}


def build_demo(engine: Engine) -> gr.Blocks:
    """The whole page for `engine`'s models (built, not launched)."""
    with gr.Blocks(title="D2O Cache Explorer", analytics_enabled=analytics_enabled()) as demo:
        gr.Markdown(INTRO)
        with gr.Tab("Compare"):
            shared = compare_tab.build(engine, demo)
        with gr.Tab("Budget sweep"):
            advanced = {k: shared[k] for k in ("advanced", "extras")}  # its runs are the Compare tab's
            sweep_tab.build(engine, shared["prompt"], shared["picked"], shared["model"], **advanced)
        with gr.Tab("Throughput"):
            throughput_tab.build(engine, shared["model"])
        with gr.Tab("About"):
            gr.Markdown(ABOUT)

        def compare_api(
            prompt: str,
            policies: list[str] = list(api.API_POLICIES),  # noqa: B006 - gr.api shows it as the default
            budget: float = api.API_BUDGET,
            max_new_tokens: int = api.API_MAX_NEW_TOKENS,
            question: str | None = None,
            settings: dict | None = None,
        ) -> Iterator[dict]:
            """Texts and metrics per policy; only the prompt is needed (README: "Python client / API").

            While it runs it sends {"status": "step k of n"} lines; the last item is the result, which
            gradio_client's predict returns. A client that disconnects ends the run.

            question: kept whole, read after the prompt's compression; settings: per policy, e.g.
            {"d2o": {"merge": "no"}, "h2o": {"compress_every": 0}}.
            """
            yield from api.api_stream(engine, prompt, policies, budget, max_new_tokens, question, settings)

        gr.api(compare_api, api_name="compare", concurrency_id="model")
    return demo
