"""In a real browser: a run file full of markup, opened with "Open a run", adds no live element.

The page (`ui.layout.build_demo` with its launch options, served from this process; no model is
loaded, since opening a run generates nothing) gets the hostile file of `test_untrusted_text.py`,
then a file it refuses with a message quoting markup. Afterwards the DOM holds no `javascript:`
link, no link inside an SVG, no form or password field, no image from another origin, no frame
and no new `position: fixed` element; the browser asked no outside host for anything; and the
file's strings are on the page as text. Drives Debian's chromium with playwright (never
`playwright install`); skips when either is missing, unless D2O_REQUIRE_BROWSER=1 (CI sets it).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from helpers import CHROMIUM, CHROMIUM_FLAGS, missing_browser
from test_untrusted_text import PAYLOADS, compared, hostile_run, refused_run

pytestmark = [pytest.mark.browser]

# Counted in the page: what a file could insert that acts (runs script on a click, sends a form,
# fetches from elsewhere, covers the page). Each must stay as the page itself had it.
LIVE_ELEMENTS = """() => {
  const all = s => [...document.querySelectorAll(s)];
  const href = e => e.getAttribute('href') || e.getAttribute('xlink:href') || e.getAttribute('src') || '';
  const outside = e => {
    const url = new URL(href(e), location.href);
    return url.protocol.startsWith('http') && url.origin !== location.origin;
  };
  return {
    javascript_links: all('[href], [src], [action], [formaction]').concat(all('[*|href]'))
      .filter(e => /^\\s*javascript:/i.test(href(e) || e.getAttribute('action') || '')).length,
    svg_links: all('svg a').length,
    forms: all('form, input[type=password]').length,
    outside_images: all('img[src], image, video, audio, source').filter(outside).length,
    frames: all('iframe, object, embed, frame').length,
    fixed_by_style: all('[style]')
      .filter(e => /position\\s*:\\s*fixed/i.test(e.getAttribute('style'))).length,
  };
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refuse_loading(name: str):
    raise AssertionError(f"opening a run loaded the model {name}")


@pytest.fixture(scope="module")
def page_url():
    """The real page, served from this process until the module's tests end."""
    missing = missing_browser()
    if missing:
        if os.environ.get("D2O_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    from ui.engine import Engine
    from ui.layout import build_demo, launch_options

    demo = build_demo(Engine(loader=refuse_loading))
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        show_error=False,
        quiet=True,
        **launch_options(),
    )
    yield demo.local_url
    demo.close()


def upload(page, path: Path) -> None:
    """Through the "Open a run" button, as a user would (its file chooser)."""
    with page.expect_file_chooser() as chooser:
        page.click("#open-run")
    chooser.value.set_files(str(path))


def test_a_hostile_run_file_adds_no_live_element_to_the_page(page_url, tiny, tmp_path):
    from playwright.sync_api import sync_playwright

    results = compared(tiny)
    hostile, refused = hostile_run(results, tmp_path), refused_run(results, tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        asked = []  # every URL the page requested from another origin
        page.on("request", lambda r: asked.append(r.url) if not r.url.startswith(page_url) else None)
        page.goto(page_url)
        page.wait_for_function("() => document.querySelector('#budget-fig .js-plotly-plot')", timeout=60_000)
        before = page.evaluate(LIVE_ELEMENTS)
        assert not any(v for k, v in before.items() if k != "fixed_by_style"), before

        upload(page, hostile)
        page.wait_for_function(
            "() => document.querySelector('#status').innerText.includes('Opened')", timeout=30_000
        )
        # The figures are redrawn from the file: its labels are in the heatmap's ticks, as text.
        page.wait_for_function(
            "() => document.querySelector('#budget-fig').textContent.includes('javascript:alert(1)')",
            timeout=30_000,
        )
        page.click("#view input")  # the picker's list shows every label
        page.wait_for_timeout(300)
        assert page.evaluate(LIVE_ELEMENTS) == before
        # The file's strings are there as text (Gradio already strips "<>:" from an upload's name).
        status, title = page.inner_text("#status"), page.inner_text("#title-1")
        assert PAYLOADS[0] in status and "%%%LATEX_BLOCK_0%%%" in status and PAYLOADS[3] in title
        page.keyboard.press("Escape")

        upload(page, refused)
        toast = page.locator("[data-testid='toast-body']").filter(has_text="schema_version")
        toast.wait_for(timeout=30_000)
        assert PAYLOADS[3] in toast.inner_text()  # the quoted value, as text
        assert page.evaluate(LIVE_ELEMENTS) == before
        browser.close()
    assert not [url for url in asked if "example.invalid" in url], asked
