"""Errors as sentences in the page, never stack traces.

What this module is: `page_errors`, the one context every handler runs its work in. A `ValueError`
(bad input, said by the engine or a handler) becomes a `gr.Error` with that sentence; anything else
is logged with its trace on the server and summarised in one line for the page.

What it is not: validation itself; each handler and `d2o_core` say what is wrong.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr

log = logging.getLogger(__name__)


@contextmanager
def page_errors(what: str) -> Iterator[None]:
    """Run a handler's work; bad input says what to change, anything else is logged and summarised."""
    try:
        yield
    except ValueError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    except gr.Error:
        raise
    except Exception as exc:
        log.error("%s failed:\n%s", what, traceback.format_exc())
        raise gr.Error(
            f"{what} failed ({type(exc).__name__}: {exc}). The details are in the server log."
        ) from None
