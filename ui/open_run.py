"""The page's "Open a run" upload: a saved run file fills the page as a finished run would.

What this module is: one handler, `open_run(path) -> {output name: value}`, that reads a run file
with `d2o_core.runfile.load_run` and hands the results to `handlers.results_page`, the same function
that fills the page at the end of a live run, so texts, stats, tables and every figure come out alike;
the prompt box gets the run's prompt back when the file has one.

What it is not: no layout (ui/layout.py wires the upload) and no model: opening a run generates nothing.
A file that cannot be read shows one sentence in the page, never a trace.
"""

from __future__ import annotations

from pathlib import Path

from d2o_core.runfile import load_run

from . import handlers as H


def open_run(path: str | Path | None) -> dict:
    """Fill the page from the run file at `path` (what Gradio's upload hands over: a local file path)."""
    with H.page_errors("Opening the run"):
        if not path:
            raise ValueError("No file was uploaded: choose a run file (.json) saved by this app or the CLI.")
        path = Path(getattr(path, "name", path))
        results, meta = load_run(path)
        if not results:
            raise ValueError("This run file holds no policy results, so there is nothing to show.")
        first = next(iter(results.values())).metrics
        saved = f", saved {meta['created']}" if meta.get("created") else ""
        status = (
            f"Opened {path.name}: {len(results)} policies on a prompt of {first['prompt_tokens']} tokens "
            f"(model {meta.get('model') or first.get('model', 'unknown')}{saved}). Nothing was generated."
        )
        blank = {f"text:{n}": "" for n in H.NAMES} | {f"stats:{n}": "" for n in H.NAMES}
        page = H.results_page(results, status, dict(meta))
        shown = [name for name in H.NAMES if f"text:{name}" in page]
        prompt = {"prompt": meta["prompt"]} if isinstance(meta.get("prompt"), str) else {}
        return blank | H.columns_visible(shown) | page | prompt
