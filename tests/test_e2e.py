"""End to end: the real app (`python app.py`, bundled model) on a free port, via gradio_client and a browser.

The browser test drives Debian's chromium with playwright (never `playwright install`). It
skips when chromium or playwright is missing, unless D2O_REQUIRE_BROWSER=1 (CI sets it).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    # Offline: every host name but the app's fails to resolve, so background services
    # (and the page's web fonts) look nothing up.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-pings",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-breakpad",
    "--disable-client-side-phishing-detection",
    "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication,"
    "CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
]

pytestmark = pytest.mark.integration
STOPPED_LOG = "Generation stopped before the end"  # ui/handlers.py logs it when Stop closes a run


def server_log() -> str:
    return (ARTIFACTS / "app.log").read_text(errors="replace")


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "app.log", "w")
    env = os.environ | {"PYTHONUNBUFFERED": "1"}  # with conftest's offline settings and network guard
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240  # the first start converts the bundled model (~20 s)
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}; see {ARTIFACTS / 'app.log'}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("app.py did not start within 240 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_compare_endpoint_answers_gradio_client(server):
    from gradio_client import Client

    # Client's telemetry thread posts to the hub (huggingface_hub.send_telemetry) unless analytics_enabled
    # is False: its default, True, wins over GRADIO_ANALYTICS_ENABLED (`analytics_enabled or env`).
    client = Client(server, verbose=False, analytics_enabled=False)
    out = client.predict(
        prompt="What is the capital of France?",
        policies=["full", "h2o", "d2o"],
        budget=0.5,
        max_new_tokens=8,
        api_name="/compare",
    )
    assert set(out["results"]) == {"full", "h2o", "d2o"}
    assert "Paris" in out["results"]["full"]["text"]
    metrics = out["results"]["d2o"]["metrics"]
    assert metrics["new_tokens"] <= 8 and 0 < metrics["kv_fraction"] <= 1


def _browser():
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        return "Debian chromium is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "python playwright is not installed"
    return None


def test_browser_example_run_streams_columns_and_draws_figures(server):
    missing = _browser()
    if missing:
        if os.environ.get("D2O_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server)
        page.get_by_text("Passkey in a haystack").first.click()
        page.wait_for_function("() => document.querySelector('#prompt textarea').value.includes('pass key')")
        start = time.time()
        page.click("#run")
        # Columns fill while generating, before the figures exist.
        page.wait_for_function(
            "() => document.querySelector('#text-d2o textarea').value.length > 0", timeout=120_000
        )
        page.wait_for_function(
            "() => ['budget-fig', 'timeline-fig', 'survival-fig', 'cache-fig', 'drift-fig']"
            ".every(id => document.querySelector('#' + id + ' .js-plotly-plot'))",
            timeout=180_000,
        )
        elapsed = time.time() - start
        for name in ("full", "h2o", "d2o"):
            assert page.input_value(f"#text-{name} textarea").strip(), name
            assert "% of full" in page.inner_text(f"#stats-{name}")
        # Moving the layer picker redraws the timeline from stored results.
        page.fill("#layer input[type=number]", "3")
        page.keyboard.press("Enter")
        page.wait_for_function(
            "() => document.querySelector('#timeline-fig .gtitle')?.textContent.includes('layer 3')",
            timeout=30_000,
        )
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        print(f"first complete result in {elapsed:.1f} s")
        # Stop ends a run mid-stream: the server closes the generation, the page says so once the
        # request has ended, and no token arrives after that. Then the next run works.
        page.get_by_text("Summarise a story").first.click()  # 96 new tokens at most
        page.click("#run")
        page.wait_for_function(  # a few tokens in: mid-stream
            "() => /Generating… step ([3-9]|[1-9][0-9])/.test(document.querySelector('#status').innerText)",
            timeout=120_000,
        )
        closed_before = server_log().count(STOPPED_LOG)
        clicked = time.monotonic()
        page.click("#stop")
        page.wait_for_function(
            "() => document.querySelector('#status').innerText.includes('Stopped')", timeout=60_000
        )
        latency = time.monotonic() - clicked
        stopped = page.input_value("#text-full textarea")
        status = page.inner_text("#status")
        print(f"Stop ended the request in {latency:.2f} s ({status.split(';')[0]})")
        assert latency < 30, latency
        step = int(re.search(r"Stopped after step (\d+)", status)[1])
        assert 3 <= step < 95
        assert wait_until(lambda: server_log().count(STOPPED_LOG) > closed_before, timeout=30)
        # The server has closed the generation and the page has its last update: nothing may follow.
        assert page.input_value("#text-full textarea") == stopped
        assert page.inner_text("#status") == status
        assert page.locator(".toast-body.error, .toast-wrap .error").count() == 0
        page.get_by_text("Factual question").first.click()
        page.click("#run")
        page.wait_for_function(
            "() => document.querySelector('#status').innerText.includes('Done')", timeout=120_000
        )
        assert "Paris" in page.input_value("#text-full textarea")
        browser.close()
