"""Entry point: parse settings, load the model once, build the page, launch.

    python app.py [--host 127.0.0.1] [--port 7860] [--model NAME] [--no-preload]

Environment: D2O_MODELS (comma-separated allowlist; first is the default), D2O_MODEL,
D2O_DEVICE, D2O_CACHE_DIR, the request limits of d2o_core/limits.py (D2O_MAX_UPLOAD_MB,
D2O_MAX_PROMPT_CHARS, D2O_MAX_PROMPT_TOKENS, D2O_QUEUE_SIZE, ...), GRADIO_SERVER_NAME / GRADIO_SERVER_PORT,
GRADIO_ANALYTICS_ENABLED (Gradio's usage analytics; off unless "True").
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import threading
import time

import gradio as gr

from d2o_core.limits import limits
from ui import stored_runs
from ui.engine import Engine, allowed_models
from ui.layout import build_demo, launch_options

ON_SPACE = bool(os.environ.get("SPACE_ID"))
# The other examples' stored pages are read this long after start: reading them takes ~6 s of CPU
# (and the GIL), which made the first visitor's figures ~0.8 s later on 2 cores. An example clicked
# before then is read on the spot (~1 s).
WARM_EXAMPLES_AFTER_S = 30.0


def warm_stored_runs() -> None:
    """Read the first view's stored run now (the page opens on it); the other examples later."""
    start = time.perf_counter()
    stored_runs.first_view()
    logging.info("first view ready in %.1f s", time.perf_counter() - start)
    names = [e["name"] for e in stored_runs.examples()]
    warm = threading.Timer(WARM_EXAMPLES_AFTER_S, lambda: [stored_runs.example_page(n) for n in names])
    warm.daemon = True
    warm.start()


def make_app(models: list[str] | None = None, preload: bool = True, engine: Engine | None = None):
    """The queued Gradio app; loads the default model first unless `preload` is False."""
    engine = engine or Engine(models or allowed_models())
    if preload:
        start = time.perf_counter()
        lm = engine.get()
        logging.info(
            "model %s (%s) ready on %s in %.1f s", lm.name, lm.source, lm.device, time.perf_counter() - start
        )
    warm_stored_runs()
    demo = build_demo(engine)
    say_missing_values(demo)
    # Model work runs one request at a time; a bounded queue turns away floods with a message.
    demo.queue(default_concurrency_limit=1, max_size=limits().queue_size)
    return demo


def say_missing_values(demo):
    """A call with fewer values than its endpoint takes (plain HTTP: gradio_client fills in defaults)
    is refused by Gradio before any handler runs, with a ValueError that `show_error=False` keeps
    from the client, which read `{"error": null}`. It gets a sentence instead (a `gr.Error`, which
    Gradio always passes on), naming the values; the call is refused as before."""
    validate = demo.validate_inputs

    def checked(block_fn, inputs):
        wanted = len(block_fn.inputs)
        if len(inputs) < wanted:
            params = list(inspect.signature(block_fn.fn).parameters.values()) if block_fn.fn else []
            named = len(params) == wanted and all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
            order = f" in this order: {', '.join(p.name for p in params)}" if named else ""
            where = f"/{block_fn.api_name}" if isinstance(block_fn.api_name, str) else "This event"
            raise gr.Error(
                f"{where} takes {wanted} values{order}; got {len(inputs)}. Send every one (null where "
                "you want none), or call it with gradio_client, which fills in the defaults."
            )
        return validate(block_fn, inputs)

    demo.validate_inputs = checked
    return demo


def server_options() -> dict:
    """`demo.launch` arguments: the page's style, and uploads over the limit refused by the server
    before they are stored (the handler checks the size again before reading a file)."""
    return launch_options() | {"max_file_size": limits().upload_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description="D2O Cache Explorer")
    parser.add_argument(
        "--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if ON_SPACE else "127.0.0.1")
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--model", default=None, help="allowed model(s), comma-separated (default: bundled)")
    parser.add_argument("--no-preload", action="store_true", help="load the model on the first request")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    models = [m.strip() for m in args.model.split(",")] if args.model else None
    try:
        demo = make_app(models, preload=not args.no_preload)
    except (FileNotFoundError, ValueError, OSError) as exc:  # a missing model: say what to do, no trace
        raise SystemExit(f"error: {exc}") from None
    print(
        f"Open http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port} in a browser",
        flush=True,
    )
    demo.launch(server_name=args.host, server_port=args.port, show_error=False, **server_options())


if __name__ == "__main__":
    main()
