"""The served app under load and over plain HTTP: a burst of 24 requests is each answered (with its own
answer) or told the queue is full, and memory comes back; a client that leaves frees the model within a
second; a call short of values gets a sentence.

One server in this process (`app.say_missing_values`, the queue and launch options of `app.py`, the
tiny model), spoken to over HTTP as `curl` would: `POST /gradio_api/call/compare`, then read the events.
"""

from __future__ import annotations

import gc
import json
import socket
import threading
import time

import httpx
import pytest
from helpers import TEXT, tiny_model

import app
from d2o_core.limits import limits
from ui.engine import Engine
from ui.layout import build_demo

BURST = 24


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


class SlowSteps:
    """A forward pre-hook on the served model: counts its passes and, while `slow`, makes each take
    STEP_S, so that a long run is still going when its client leaves."""

    STEP_S = 0.05

    def __init__(self):
        self.passes = 0
        self.slow = False

    def __call__(self, module, args):
        self.passes += 1
        if self.slow:
            time.sleep(self.STEP_S)


STEPS = SlowSteps()


def counted_tiny_model(name):
    lm = tiny_model()
    lm.model.register_forward_pre_hook(STEPS)
    return lm


@pytest.fixture(scope="module")
def server():
    demo = build_demo(Engine(["tiny"], loader=counted_tiny_model))
    app.say_missing_values(demo)
    demo.queue(default_concurrency_limit=1, max_size=limits().queue_size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        show_error=False,  # as app.py serves it
        quiet=True,
        **app.server_options(),
    )
    yield demo.local_url.rstrip("/")
    demo.close()


def call(url: str, data: list) -> tuple[str, object]:
    """("complete", result), ("error", message) or ("busy", detail): what a plain HTTP client gets."""
    with httpx.Client(timeout=120) as client:
        r = client.post(f"{url}/gradio_api/call/compare", json={"data": data})
        if r.status_code == 503:
            return "busy", r.json()["detail"]
        r.raise_for_status()
        stream = client.get(f"{url}/gradio_api/call/compare/{r.json()['event_id']}").text
    event, payload = None, None
    for line in stream.splitlines():
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: ") and event in ("complete", "error"):
            payload = json.loads(line[len("data: ") :])
    if event == "complete":
        return "complete", payload[0]
    return event, payload and payload.get("error")


def args(prompt: str) -> list:
    return [prompt, ["full", "h2o"], 0.3, 4, None, None]


def test_a_call_short_of_values_is_told_which_in_a_sentence(server):
    kind, message = call(server, [TEXT, ["full"], 0.2, 2])
    assert kind == "error"
    assert message == (
        "/compare takes 6 values in this order: prompt, policies, budget, max_new_tokens, question, "
        "settings; got 4. Send every one (null where you want none), or call it with gradio_client, "
        "which fills in the defaults."
    )
    assert call(server, [])[1].startswith("/compare takes 6 values")


def test_a_burst_is_answered_or_told_busy_and_memory_comes_back(server):
    assert call(server, args(TEXT))[0] == "complete"  # warm: the model is loaded, the allocator primed
    gc.collect()
    start = rss_mb()
    prompts = [TEXT[: 100 + i] for i in range(BURST)]  # one length each: each answer is told apart
    answers = [None] * BURST

    def ask(i):
        answers[i] = call(server, args(prompts[i]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(BURST)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(a is not None for a in answers), "a request was never answered"
    kinds = [kind for kind, _ in answers]
    assert set(kinds) <= {"complete", "busy"}, answers
    assert kinds.count("complete") >= 1
    for i, (kind, result) in enumerate(answers):
        if kind == "busy":
            assert "Queue is full" in result
        else:  # its own answer: the tiny model's tokenizer reads one token per character
            assert result["results"]["full"]["metrics"]["prompt_tokens"] == len(prompts[i])
    gc.collect()
    assert rss_mb() <= 1.10 * start, (start, rss_mb())


def test_a_client_that_disconnects_frees_the_model_within_a_second(server):
    """Before, the API was one plain call: it decoded all its tokens for nobody (the next request
    waited ~60 s on the CPU). Now the run ends when its client's event stream closes."""
    STEPS.slow, begun = True, STEPS.passes
    try:
        with httpx.Client(timeout=60) as client:
            r = client.post(
                f"{server}/gradio_api/call/compare",
                json={"data": [TEXT, ["full", "h2o"], 0.3, 256, None, None]},
            )
            event_id = r.json()["event_id"]
            with client.stream("GET", f"{server}/gradio_api/call/compare/{event_id}") as stream:
                lines = stream.iter_lines()
                assert any(line.startswith("event: generating") for line in lines)  # it is decoding
            left = time.monotonic()  # the client is gone
        while time.monotonic() - left < 1.0:
            time.sleep(0.1)
        stopped_at = STEPS.passes
        time.sleep(4 * SlowSteps.STEP_S + 0.3)
        assert STEPS.passes == stopped_at, "the run went on decoding after its client left"
        # It stopped far short of the 256 tokens asked for.
        assert stopped_at - begun < 256 / 2, stopped_at - begun
    finally:
        STEPS.slow = False
    assert call(server, args(TEXT))[0] == "complete"  # and the model serves the next request
