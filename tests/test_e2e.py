"""End to end: the real app (`python app.py`, bundled model) on a free port, via gradio_client and a browser.

The browser test drives Debian's chromium with playwright (never `playwright install`). It
skips when chromium or playwright is missing, unless D2O_REQUIRE_BROWSER=1 (CI sets it).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers import CHROMIUM, CHROMIUM_FLAGS, fake_records, missing_browser

from ui.about import policy_rows

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

# One worker runs this whole module under `make test` (pytest-xdist): the app server starts once.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("app_server")]
STOPPED_LOG = "Generation stopped before the end"  # ui/compare_run.py logs it when Stop closes a run


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
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the other worker has the other core
        env["OMP_NUM_THREADS"] = "1"
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
    # The optional question and settings, as JSON through the client (2 tokens: the check is the types).
    out = client.predict(
        prompt="France is a country in Europe.",
        policies=["h2o"],
        max_new_tokens=2,
        question="What is its capital?",
        settings={"h2o": {"compress_every": "0", "n_sink": 2}},
        api_name="/compare",
    )
    assert list(out["results"]) == ["h2o(n_sink=2,compress_every=0)"]


FIGURE_IDS = [
    "budget-fig",
    "attention-fig",
    "timeline-fig",
    "step0-fig",
    "kept-fig",
    "survival-fig",
    "cache-fig",
    "drift-fig",
]


def drawn(ids: list[str]) -> str:
    """A page function: true once each of these figures holds a drawn plotly plot."""
    return f"() => {ids}.every(id => document.querySelector('#' + id + ' .js-plotly-plot'))"


ALL_FIGURES = drawn(FIGURE_IDS)
FIGURE_TEXTS = (
    f"() => Object.fromEntries({FIGURE_IDS}.map(id => [id, document.querySelector('#' + id)?.textContent]))"
)
BOARD_FIGURES = drawn(["board-overview", "board-tasks"])
# In the page, from the start of navigation: the first animation frame after the budget heatmap's own
# SVG exists (a bare "#budget-fig svg" also matches the empty plot's placeholder icon). Read in the
# page because a wait from Python returns only once the page's main thread is free, after the six
# figures drawn next (~0.6 s later here).
FIRST_PAINT_PROBE = """
new MutationObserver((_, observer) => {
  if (document.querySelector('#budget-fig .js-plotly-plot .main-svg')) {
    observer.disconnect();
    requestAnimationFrame(() => { window.__budget_painted_ms = performance.now(); });
  }
}).observe(document, {subtree: true, childList: true});
"""


def stored_run_file(name: str, folder: Path) -> Path:
    """A stored example run, unpacked to the plain JSON a user would upload."""
    import gzip

    from ui.stored_runs import RUNS, slug

    path = folder / f"{slug(name)}.json"
    path.write_bytes(gzip.decompress((RUNS / f"{slug(name)}.json.gz").read_bytes()))
    return path


def open_run(page, path: Path) -> None:
    """Upload `path` through the "Open a run" button, as a user would (its file chooser)."""
    with page.expect_file_chooser() as chooser:
        page.click("#open-run")
    chooser.value.set_files(str(path))


def status_has(page, text: str, timeout: float = 120_000, where: str = "#status") -> None:
    page.wait_for_function(
        "([w, t]) => document.querySelector(w)?.innerText.includes(t)", arg=[where, text], timeout=timeout
    )


def no_toast(page) -> None:
    """No refusal and no error: Gradio shows both as toasts."""
    assert page.locator(".toast-body").count() == 0, page.locator(".toast-body").all_inner_texts()


def test_browser_stored_view_open_run_live_run_download_reopen_and_stop(server, tmp_path):
    missing = missing_browser()
    if missing:
        if os.environ.get("D2O_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    factual = stored_run_file("Factual question", tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.add_init_script(FIRST_PAINT_PROBE)
        # 1. The first view is the stored passkey run, every figure drawn, without running anything.
        last = time.monotonic()
        phases: dict[str, float] = {}

        def phase(name):
            nonlocal last
            now = time.monotonic()
            phases[name], last = now - last, now

        page.goto(server)
        page.wait_for_function("() => window.__budget_painted_ms", timeout=60_000)
        first_paint = page.evaluate("() => window.__budget_painted_ms") / 1000
        # Written at once: the number is kept even when a later phase fails.
        (ARTIFACTS / "first_paint.txt").write_text(f"{first_paint:.2f}\n")
        page.wait_for_function(ALL_FIGURES, timeout=30_000)
        print(f"first paint (navigation -> budget heatmap drawn): {first_paint:.2f} s")
        status_has(page, "Stored run of the example “Passkey in a haystack”", 10_000)
        assert "pass key" in page.input_value("#prompt textarea")
        for i in range(4):  # full, streaming, h2o, d2o
            assert page.input_value(f"#text-{i} textarea").strip() and "% of full" in page.inner_text(
                f"#stats-{i}"
            )
        assert not page.is_visible("#col-4")
        # Pickers work on the stored run: the layer picker redraws the timeline.
        page.fill("#layer input[type=number]", "3")
        page.keyboard.press("Enter")
        page.wait_for_function(
            "() => document.querySelector('#timeline-fig .gtitle')?.textContent.includes('layer 3')",
            timeout=30_000,
        )
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        phase("stored view")
        # 2. Open a saved run: texts and figures change to it.
        open_run(page, factual)
        status_has(page, f"Opened {factual.name}", 30_000)
        page.wait_for_function(
            "() => document.querySelector('#prompt textarea').value.includes('capital of France')",
            timeout=10_000,
        )
        assert "Paris" in page.input_value("#text-0 textarea")
        page.wait_for_function(ALL_FIGURES, timeout=30_000)
        # The file put its own prompt in the box: the status still names the file. A question typed
        # makes the run shown the previous prompt's; cleared again, the run's own status returns.
        assert page.inner_text("#status").startswith(f"Opened {factual.name}")
        page.fill("#question textarea", "Which country?")
        status_has(page, "from the previous prompt; press Run for this one", 10_000)
        page.fill("#question textarea", "")
        status_has(page, f"Opened {factual.name}", 10_000)
        phase("open run")
        # 3. A live comparison (12 tokens are enough to say Paris): columns stream, then every figure.
        page.fill("#max-new input[type=number]", "12")
        page.keyboard.press("Enter")
        page.click("#run")
        status_has(page, "Done")
        assert "Paris" in page.input_value("#text-0 textarea")
        page.wait_for_function(ALL_FIGURES, timeout=30_000)
        phase("live run")
        # 4. Download the run, then reopen it.
        page.get_by_text("Downloads", exact=True).click()  # open the accordion
        page.click("#prepare")
        link = page.locator("#downloads a[href$='run.json']").first  # its text is the file's size
        link.wait_for(timeout=60_000)
        href = link.get_attribute("href")
        saved = tmp_path / "run.json"
        saved.write_bytes(urllib.request.urlopen(urllib.parse.urljoin(server + "/", href), timeout=30).read())
        open_run(page, saved)
        status_has(page, "Opened run.json", 30_000)
        assert "Paris" in page.input_value("#text-0 textarea")
        phase("download+reopen")
        # 5. Stop ends a run mid-stream: the server closes the generation, the page says so once the
        # request has ended, and no token arrives after that.
        page.get_by_text("Make a list").first.click()  # a short prompt, 48 new tokens at most
        status_has(page, "Stored run of the example “Make a list”", 30_000)
        page.click("#run")
        page.wait_for_function(  # a few tokens in: mid-stream
            "() => /Generating… step ([3-9]|[1-9][0-9])/.test(document.querySelector('#status').innerText)",
            timeout=120_000,
        )
        closed_before = server_log().count(STOPPED_LOG)
        clicked = time.monotonic()
        page.click("#stop")
        status_has(page, "Stopped", 60_000)
        latency = time.monotonic() - clicked
        stopped = page.input_value("#text-0 textarea")
        status = page.inner_text("#status")
        print(f"Stop ended the request in {latency:.2f} s ({status.split(';')[0]})")
        assert latency < 30, latency
        step = int(re.search(r"Stopped after step (\d+)", status)[1])
        assert 3 <= step < 47
        assert wait_until(lambda: server_log().count(STOPPED_LOG) > closed_before, timeout=30)
        assert page.input_value("#text-0 textarea") == stopped
        assert page.inner_text("#status") == status
        assert page.locator(".toast-body.error, .toast-wrap .error").count() == 0
        phase("stop")
        # 6. Run with Advanced open and untouched but for H2O's compress_every and two extra columns,
        # with a question kept whole (2 new tokens: the check is that it runs). Its blank fields
        # ("blank: the variant's") stay blank once drawn: gr.Number drew them as 0, and Run refused
        # with "Value 0 is less than minimum value 1."
        page.get_by_text("Advanced", exact=True).click()
        page.get_by_role("tab", name="D2O", exact=True).click()  # draws D2O's optional fields
        # Run and Stop stay on the screen with Advanced open (below it, they were ~1,300 px down).
        for button in ("#run", "#stop"):
            box, height = page.locator(button).bounding_box(), page.evaluate("() => window.innerHeight")
            assert box and 0 <= box["y"] and box["y"] + box["height"] <= height, (button, box, height)
        for blank in ("#set-d2o-recent_share", "#set-d2o-beta", "#extra-0-budget"):
            assert page.input_value(f"{blank} textarea") == "", blank
        page.get_by_role("tab", name="H2O", exact=True).click()
        page.fill("#set-h2o-compress_every input[type=number]", "4")  # every 4 steps
        page.keyboard.press("Enter")  # a number box hands its value over on Enter or blur
        page.click("#extra-0 input")
        page.get_by_role("option", name="D2O", exact=True).click()  # the checkboxes' titles
        # A comma starts a new setting only before `name=`: two protected layers can be typed.
        page.fill("#extra-0-settings textarea", "variant=official, protected_layers=0,1, merge=no")
        page.click("#extra-1 input")
        # The first dropdown's list stays in the page: pick from this one's own.
        page.locator("#extra-1").get_by_role("option", name="H2O", exact=True).click()
        page.fill("#extra-1-settings textarea", "compress_every=0")  # once, after the prompt
        page.fill("#question textarea", "What is the first item?")
        page.fill("#max-new input[type=number]", "2")
        page.keyboard.press("Enter")
        before = page.evaluate(FIGURE_TEXTS)
        page.click("#run")
        status_has(page, "Done: ", 60_000)
        # Every figure is redrawn for this run (its columns, question and settings), none left stale.
        page.wait_for_function(
            f"b => Object.entries(({FIGURE_TEXTS})()).every(([k, v]) => v && v !== b[k])",
            arg=before,
            timeout=30_000,
        )
        assert "kept whole" in page.inner_text("#status")  # the question was read after the compression
        titles = [page.inner_text(f"#title-{i}") for i in range(6)]
        assert "H2O · compress_every=4 · 20 %" in titles[2], titles
        assert "D2O · variant=official, merge=False, protected_layers=(0, 1) · 20 %" in titles[4], titles
        assert "H2O · compress_every=0 · 20 %" in titles[5], titles
        assert all(page.input_value(f"#text-{i} textarea").strip() for i in range(6))
        page.wait_for_function(ALL_FIGURES, timeout=30_000)
        no_toast(page)
        phase("advanced")
        # 7. A budget sweep of the Compare tab's configurations (the ticked four and the two extra
        # columns just added) at two budgets: its status, figures and table are this run's.
        page.get_by_role("tab", name="Budget sweep", exact=True).click()
        page.locator("#sweep-budgets").get_by_label("40", exact=True).uncheck()
        page.fill("#sweep-max-new input[type=number]", "4")
        page.keyboard.press("Enter")
        page.click("#sweep-run")
        status_has(page, "Done: ", 180_000, "#sweep-status")
        assert "configurations" in page.inner_text("#sweep-status")
        table = page.inner_text("#sweep-table")
        assert "compress_every=0" in table and "40" not in table.split("\n")[1:], table
        page.wait_for_function(
            "t => document.querySelector('#sweep-agree .js-plotly-plot')?.textContent.includes(t)",
            arg="compress_every=0",
            timeout=30_000,
        )
        no_toast(page)
        phase("budget sweep")
        # 8. A sweep's cell records as a leaderboard: from a folder on this machine, then uploaded.
        records = tmp_path / "sweep"
        for record in fake_records():
            (records / "cells").mkdir(parents=True, exist_ok=True)
            (records / "cells" / f"{record['key']}.json").write_text(json.dumps(record))
        page.fill("#board-folder textarea", str(records))
        page.click("#board-open")
        status_has(page, "Opened 6 cells", 30_000, "#board-status")
        page.wait_for_function(BOARD_FIGURES, timeout=30_000)
        page.fill("#board-folder textarea", "")
        jsonl = tmp_path / "all.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in fake_records()[:3]))
        page.locator("#board-files input[type=file]").set_input_files(str(jsonl))
        page.click("#board-open")
        status_has(page, "Opened 3 cells", 30_000, "#board-status")
        assert "h2o" in page.inner_text("#board-table")
        no_toast(page)
        phase("leaderboard")
        # 9. Throughput: the stored results, then a small live run (full and H2O at one batch size),
        # then Run and Stop at once.
        page.get_by_role("tab", name="Throughput", exact=True).click()
        page.get_by_text("Run live on this page's model", exact=False).click()  # the accordion
        page.click("#tp-stored")
        status_has(page, "Stored results from", 30_000, "#tp-status")
        for slider, value in (("#tp-prompt", "256"), ("#tp-new", "4"), ("#tp-budget", "25")):
            page.fill(f"{slider} input[type=number]", value)
            page.keyboard.press("Enter")
        page.locator("#tp-policies").get_by_label("D2O", exact=True).uncheck()
        for batch in ("2", "4"):
            page.locator("#tp-batches").get_by_label(batch, exact=True).uncheck()
        page.click("#tp-run")
        status_has(page, "Live run on this page's model", 240_000, "#tp-status")
        live = page.inner_text("#tp-status")
        assert "budget 25 %" in live and "4 new tokens" in live, live  # this run's settings
        assert "h2o" in page.inner_text("#tp-table")
        page.click("#tp-run")
        status_has(page, "Running", 60_000, "#tp-status")
        page.click("#tp-stop")
        status_has(page, "Stopped.", 30_000, "#tp-status")
        no_toast(page)
        phase("throughput")
        # 10. About lists every registered policy and every figure (it is generated from both).
        page.get_by_role("tab", name="About", exact=True).click()
        about = page.inner_text("body")
        assert all(title in about for _, title, _ in policy_rows()), about[:2000]
        phase("about")
        browser.close()
    # The target (<= 3 s on a quiet machine) is reported, not asserted: timings on a shared CPU are noise.
    # 25 s still tells a stored first view (no model work) from a live one (the passkey run alone takes
    # ~20 s to generate, then as long to draw). On this 2-core machine ~1 s of the ~2.2 s it takes is
    # the browser evaluating plotly.js (4.6 MB); the page shell takes ~0.9 s, the heatmap ~0.1 s.
    # (first_paint.txt was written as soon as it was measured.)
    # Where the test's time goes, phase by phase (it is the longest test of the suite).
    (ARTIFACTS / "browser_phases.txt").write_text("".join(f"{k}: {v:.1f} s\n" for k, v in phases.items()))
    assert first_paint < 25, (
        f"first paint took {first_paint:.2f} s: the page computed instead of showing a stored run"
    )
