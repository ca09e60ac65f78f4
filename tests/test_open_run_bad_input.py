"""Opening a run file: capped before it is read, only what the page shows is kept, and every shape opens.

Uploads over `D2O_MAX_UPLOAD_MB` are refused by the server before they are stored (`app.server_options`
sets Gradio's `max_file_size`) and by the handler before it reads a byte; a file with more policies than
the page's columns keeps only those in the session's state; a model of one layer or one kv-head opens
through Gradio's own event processing (it gave a blank "Error": Gradio refused a 0-to-0 slider).
"""

from __future__ import annotations

import asyncio
import json
import socket

import gradio as gr
import httpx
import pytest
from gradio.state_holder import SessionState
from helpers import TEXT, tiny_model

import d2o_core
from d2o_core import runfile
from ui import open_run as O
from ui.policy_controls import MAX_COLUMNS


def run_file(folder, lm, names=("full", "h2o", "d2o"), name="run.json"):
    policies = [d2o_core.POLICIES[n](budget=0.3) for n in names]
    results = d2o_core.compare(lm, TEXT, policies, max_new_tokens=2)
    path = folder / name
    path.write_text(runfile.save_run(results, {"model": lm.name, "prompt": TEXT, "max_new_tokens": 2}))
    return path


def test_a_file_over_the_upload_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_bytes(b" " * 3000)
    monkeypatch.setenv("D2O_MAX_UPLOAD_MB", "0.002")  # 2 KB
    monkeypatch.setattr(O, "load_run", lambda *a: pytest.fail("the file was read"))
    with pytest.raises(gr.Error, match="This file is 3 KB; the page opens run files of up to 2 KB"):
        O.open_run(str(path))


def test_only_the_columns_the_page_shows_stay_in_the_session(tiny, tmp_path, monkeypatch):
    names = ("full", "streaming", "h2o", "d2o", "tova", "snapkv", "knorm")
    assert len(names) > MAX_COLUMNS
    drawn = {}  # what the page is filled from (and its state made of): figures are not the point here
    monkeypatch.setattr(
        O, "results_page", lambda results, status, meta: drawn.update(results=results, status=status) or {}
    )
    O.open_run(str(run_file(tmp_path, tiny, names)))
    assert list(drawn["results"]) == list(names[:MAX_COLUMNS])
    assert drawn["status"].startswith(f"Opened run.json: 7 columns (the first {MAX_COLUMNS} shown)")


def test_the_server_refuses_an_upload_over_the_limit_before_storing_it(monkeypatch):
    import app

    monkeypatch.setenv("D2O_MAX_UPLOAD_MB", "0.001")
    options = app.server_options()
    assert options["max_file_size"] == 1048
    with gr.Blocks() as demo:
        gr.UploadButton("Open")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **options)
    try:
        url = demo.local_url.rstrip("/") + "/gradio_api/upload"
        small = httpx.post(url, files={"files": ("a.json", b"{}")}, timeout=30)
        big = httpx.post(url, files={"files": ("b.json", b" " * 5000)}, timeout=30)
    finally:
        demo.close()
    assert small.status_code == 200
    assert big.status_code == 413


@pytest.fixture(scope="module")
def page():
    """The real page (no model: opening a run generates nothing) and its "Open a run" event."""
    from ui.engine import Engine
    from ui.layout import build_demo

    demo = build_demo(Engine(loader=lambda name: pytest.fail("opening a run loaded a model")))
    button = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "open-run")
    event = next(f for f in demo.fns.values() if (button._id, "upload") in [tuple(t) for t in f.targets])
    return demo, event


def upload_through_gradio(page, path) -> dict:
    """What the browser gets back: the handler's outputs after Gradio's own postprocessing."""
    demo, event = page
    data = {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
    return asyncio.run(demo.process_api(event, [data], state=SessionState(demo)))


def pickers(out: dict) -> list[dict]:
    """The layer and head sliders' updates among the outputs."""
    found = [
        o for o in out["data"] if isinstance(o, dict) and o.get("__type__") == "update" and "maximum" in o
    ]
    assert len(found) == 2
    return found


def test_a_run_of_one_layer_and_one_kv_head_opens_and_a_wider_one_after_it(page, tmp_path):
    one = upload_through_gradio(page, run_file(tmp_path, tiny_model(layers=1, kv_heads=1), ("full", "h2o")))
    for picker in pickers(one):  # a slider from 0 to 1 at 0: Gradio refuses one from 0 to 0
        assert (picker["maximum"], picker["value"]) == (1, 0)
    json.dumps(one["data"])  # what goes to the browser is plain JSON
    wide = upload_through_gradio(page, run_file(tmp_path, tiny_model(), ("full", "h2o"), "wide.json"))
    layer, head = pickers(wide)
    assert (layer["maximum"], head["maximum"]) == (3, 1)
