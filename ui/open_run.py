"""Open a run: an uploaded run file (JSON) fills the page exactly as the finished run did.

What this module is: the upload handler. It reads the file with `d2o_core.runfile.load_run` and
hands the results to `compare_run.results_page`, the same function a live run ends with, so texts,
tables and every figure come back as they were. What it is not: a parser (runfile.py validates;
nothing in a file executes) or a generator (nothing is run).
"""

from __future__ import annotations

from pathlib import Path

from d2o_core.limits import check_upload
from d2o_core.runfile import load_run

from .compare_run import results_page
from .errors import page_errors
from .policy_controls import MAX_COLUMNS
from .safe_text import markdown_text


def open_run(path: str | Path | None) -> dict:
    """Fill the page from the run file at `path` (what Gradio's upload hands over: a local file path)."""
    with page_errors("Opening the run"):
        if not path:
            raise ValueError("No file was uploaded: choose a run file (.json) saved by this app or the CLI.")
        path = Path(getattr(path, "name", path))
        check_upload(path)  # before reading it: the server also refuses larger uploads (app.py)
        results, meta = load_run(path)
        if not results:
            raise ValueError("This run file holds no policy results, so there is nothing to show.")
        # Only the columns the page shows stay in the session's state (the pickers redraw from it).
        held, results = len(results), dict(list(results.items())[:MAX_COLUMNS])
        shown = f" (the first {MAX_COLUMNS} shown)" if held > MAX_COLUMNS else ""
        first = next(iter(results.values())).metrics
        # The file's name and every string in it are the file's own words: shown as text, never markup.
        model = markdown_text(meta.get("model") or first.get("model", "unknown"))
        saved = f", saved {markdown_text(meta['created'])}" if meta.get("created") else ""
        status = (
            f"Opened {markdown_text(path.name)}: {held} columns{shown} on a prompt of "
            f"{first['prompt_tokens']} tokens (model {model}{saved}). Nothing was generated."
        )
        page = results_page(results, status, dict(meta))
        page |= {"prompt": meta["prompt"]} if isinstance(meta.get("prompt"), str) else {}
        # The question the run kept whole; a file without one (older, or none asked) clears the box.
        return page | {"question": meta["question"] if isinstance(meta.get("question"), str) else ""}
