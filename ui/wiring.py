"""How a handler's {output name: value} dicts reach Gradio components.

What this module is: `wire(handler, outputs)`, the one adapter every tab uses, the shared
`gr.Progress` default, `initial`, which turns a handler's output into a component's build
arguments, and `caption`, the "how to read this" line every tab puts under its figures. What it is
not: any behaviour; handlers live beside their tabs.
"""

from __future__ import annotations

import inspect

import gradio as gr

from . import figures

PROGRESS = gr.Progress()  # Gradio injects the live tracker where a parameter defaults to one


def wire(handler, outputs: dict):
    """A Gradio function mapping a handler's {name: value} dicts onto components (generators stream)."""
    if inspect.isgeneratorfunction(handler):

        def stream(*args):
            for out in handler(*args):
                yield {outputs[k]: v for k, v in out.items()}

        return stream
    return lambda *args: {outputs[k]: v for k, v in handler(*args).items()}


def initial(page: dict, name: str, **defaults) -> dict:
    """Constructor arguments that make component `name` start as the handler's output `page` leaves it.

    `defaults` are its arguments where `page` says nothing; an update (`gr.update(visible=...)`) in
    `page` overrides the fields it names, a plain value overrides `value`.
    """
    value = page.get(name)
    if value is None:
        return defaults
    if isinstance(value, dict) and value.get("__type__") == "update":
        return defaults | {k: v for k, v in value.items() if k != "__type__"}
    return defaults | {"value": value}


def caption(builder: str) -> gr.Markdown:
    """The one-line "how to read this" under a figure: `builder`'s caption (ui/figures' CAPTIONS)."""
    return gr.Markdown(f"*How to read this:* {figures.CAPTIONS[builder]}", elem_classes=["caption"])
