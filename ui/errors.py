"""Errors as sentences in the page, never stack traces.

What this module is: `page_errors`, the one context every handler runs its work in. A `ValueError`
(bad input, said by the engine or a handler) becomes a `gr.Error` with that sentence; anything else
is logged with its trace on the server and summarised in one line for the page. `refused_in_status`
is for a streaming handler whose progress shows on a status line (the Compare run): there bad input
is said in that line and in a warning toast instead.

The page renders an error's message as HTML, and a message may quote its input (a run file's
field, a typed setting): it goes out escaped (`safe_text.html_text`), so it reads as text.

What it is not: validation itself; each handler and `d2o_core` say what is wrong.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr

from .safe_text import html_text, markdown_text

log = logging.getLogger(__name__)


@contextmanager
def page_errors(what: str) -> Iterator[None]:
    """Run a handler's work; bad input says what to change, anything else is logged and summarised."""
    try:
        yield
    except ValueError as exc:
        raise gr.Error(html_text(exc), print_exception=False) from None
    except gr.Error:
        raise
    except Exception as exc:
        log.error("%s failed:\n%s", what, traceback.format_exc())
        raise gr.Error(
            f"{what} failed ({type(exc).__name__}: {html_text(exc)}). The details are in the server log."
        ) from None


def refused_in_status(run: Iterator[dict], status: str) -> Iterator[dict]:
    """Stream `run`'s page updates; bad input (a `ValueError`) ends it with the sentence in output
    `status` and a warning toast, and the event ends without an error.

    Not a `gr.Error`: a failed event makes Gradio lay a red "Error" pill over the outputs that show its
    progress, here the status line, so the line hid under the pill and the toast said the sentence alone.
    """
    try:
        yield from run
    except ValueError as exc:
        gr.Warning(html_text(exc))
        yield {status: f"Not run: {markdown_text(exc)}"}
