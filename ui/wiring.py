"""How a handler's {output name: value} dicts reach Gradio components.

What this module is: `wire(handler, outputs)`, the one adapter every tab uses, the shared
`gr.Progress` default, and `initial`, which turns a handler's value into a component's build
arguments. What it is not: any behaviour; handlers live beside their tabs.
"""

from __future__ import annotations

import inspect

import gradio as gr

PROGRESS = gr.Progress()  # Gradio injects the live tracker where a parameter defaults to one


def wire(handler, outputs: dict):
    """A Gradio function mapping a handler's {name: value} dicts onto components (generators stream)."""
    if inspect.isgeneratorfunction(handler):

        def stream(*args):
            for out in handler(*args):
                yield {outputs[k]: v for k, v in out.items()}

        return stream
    return lambda *args: {outputs[k]: v for k, v in handler(*args).items()}


def initial(value) -> dict:
    """Constructor arguments that make a component start as a handler's output `value` would leave it.

    An update (`gr.update(visible=..., choices=...)`) gives its fields; a plain value gives `value`;
    None (the handler does not fill that output) gives nothing.
    """
    if value is None:
        return {}
    if isinstance(value, dict) and value.get("__type__") == "update":
        return {k: v for k, v in value.items() if k != "__type__"}
    return {"value": value}
