"""Saved runs: one format (d2o-run/2) written by the page and the CLI, reopened with exactly the same data,
drawn offline as an HTML report, and refused with a sentence when a file is foreign, old or corrupt."""

from __future__ import annotations

import json
import math
import pickle
import re

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import pytest
from helpers import PAGE_FIGURES, TEXT, figure_data

import d2o_core
from d2o_core import __main__ as cli
from d2o_core import run_summary, runfile
from ui import compare_run as H
from ui.open_run import open_run
from ui.report_html import report_figures, report_html

FRAMES = ("events", "steps", "layer_budgets", "drift")
FIGURES = PAGE_FIGURES


@pytest.fixture(scope="module")
def results(tiny):
    policies = [
        d2o_core.POLICIES["full"](budget=0.3),
        d2o_core.POLICIES["streaming"](budget=0.3),
        d2o_core.POLICIES["h2o"](budget=0.3),
        d2o_core.POLICIES["d2o"](budget=0.3, protected_layers=(0,)),
    ]
    return d2o_core.compare(tiny, TEXT, policies, max_new_tokens=8)


@pytest.fixture(scope="module")
def saved(results, tiny):
    return runfile.save_run(results, {"model": tiny.name, "prompt": TEXT, "max_new_tokens": 8})


def same_metrics(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a
    )


def test_a_reopened_run_holds_exactly_the_same_frames_texts_and_metrics(results, saved):
    back, meta = runfile.load_run(saved)
    assert list(back) == list(results)
    assert meta["model"] == "tiny-4x4q2kv" and meta["prompt"] == TEXT and meta["max_new_tokens"] == 8
    assert meta["created"] and json.loads(saved)["schema_version"] == "d2o-run/2"
    assert any(r.events["kind"].eq("merge").any() for r in results.values())  # merges, NaNs: both kinds
    for label, res in results.items():
        got = back[label]
        for name in FRAMES:
            pd.testing.assert_frame_equal(getattr(got, name), getattr(res, name), check_exact=True)
        pd.testing.assert_frame_equal(got.survival(), res.survival(), check_exact=True)
        assert (got.label, got.text, got.token_ids) == (res.label, res.text, res.token_ids)
        assert (got.prompt_tokens, got.generated_tokens) == (res.prompt_tokens, res.generated_tokens)
        assert got.settings == res.settings and same_metrics(got.metrics, res.metrics)
    pd.testing.assert_frame_equal(run_summary.summary(back), run_summary.summary(results))
    assert runfile.load_run(runfile.save_run(back, meta))[0].keys() == back.keys()  # saves again


def test_every_figure_drawn_from_a_reopened_run_has_the_same_data(results, saved):
    back, meta = runfile.load_run(saved)
    live, opened = H.results_page(results, "", meta), H.results_page(back, "", meta)
    for key in FIGURES:
        assert figure_data(opened[key]) == figure_data(live[key]), key
    pd.testing.assert_frame_equal(opened["summary"], live["summary"])
    for label in results:  # results_page drew the middle layer's head 0: another layer and head too
        a = H.policy_views(live["state"], label, 3, 1)
        b = H.policy_views(opened["state"], label, 3, 1)
        assert all(figure_data(a[k]) == figure_data(b[k]) for k in a), label
    a, b = report_figures(results), report_figures(back)
    assert a.keys() == b.keys() and all(figure_data(a[k]) == figure_data(b[k]) for k in a)


def test_opening_a_run_fills_the_page_as_a_finished_run_does(results, saved, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(saved, encoding="utf-8")
    out = open_run(str(path))
    for key in FIGURES:
        assert isinstance(out[key], go.Figure) and out[key].data, key
    assert out["status"].startswith("Opened run.json: 4 columns") and out["prompt"] == TEXT
    assert set(out["state"]["results"]) == set(results)
    for i, res in enumerate(results.values()):  # one column slot per result, in order
        assert out[f"text:{i}"] == res.text and "% of full" in out[f"stats:{i}"]
        assert out[f"col:{i}"]["visible"] is True
    assert out["view"]["choices"] == list(results) and out["layer"]["maximum"] == 3
    # ... and what was opened downloads again in the same format
    files = H.prepare_downloads(out["state"], "h2o", 1, 0)["downloads"]
    again, meta = runfile.load_run(next(p for p in files if p.endswith("run.json")))
    assert meta["prompt"] == TEXT
    pd.testing.assert_frame_equal(again["h2o"].events, results["h2o"].events)


def broken(saved: str, change) -> str:
    doc = json.loads(saved)
    change(doc)
    return json.dumps(doc)


CASES = {
    "not json": (lambda s: "this is not { json", "not valid JSON"),
    "a list": (lambda s: "[1, 2]", "holds a JSON list"),
    "older app": (lambda s: broken(s, lambda d: d.pop("schema_version")), "older version"),
    "foreign": (lambda s: json.dumps({"name": "something else"}), "not a D2O run file"),
    "newer": (lambda s: broken(s, lambda d: d.update(schema_version="d2o-run/3")), "'d2o-run/3'"),
    "missing text": (
        lambda s: broken(s, lambda d: d["results"]["h2o"].pop("text")),
        r"results\.h2o\.text is missing",
    ),
    "wrong type": (
        lambda s: broken(s, lambda d: d["results"]["h2o"]["events"][3].update(step="3")),
        r"results\.h2o\.events\[3\]\.step: input should be a valid integer, got '3'",
    ),
    "null int": (
        lambda s: broken(s, lambda d: d["results"]["h2o"]["steps"][0].update(stored=None)),
        r"results\.h2o\.steps\[0\]\.stored",
    ),
    "missing metric": (
        lambda s: broken(s, lambda d: d["results"]["full"]["metrics"].pop("n_layers")),
        r"results\.full\.metrics\.n_layers is missing",
    ),
    "extra column": (
        lambda s: broken(s, lambda d: d["results"]["h2o"]["layer_budgets"][0].update(code="rm -rf")),
        r"results\.h2o\.layer_budgets\[0\]\.code is not a field",
    ),
    "pickle": (lambda s: pickle.dumps({"a": 1}), "not UTF-8|not valid JSON"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_foreign_old_or_corrupt_file_is_refused_with_one_sentence(saved, tmp_path, case):
    make, message = CASES[case]
    content = make(saved)
    with pytest.raises(ValueError, match=message) as info:
        runfile.load_run(content)
    text = str(info.value)
    assert "\n" not in text and text.endswith(".") and "Traceback" not in text and len(text) < 300
    path = tmp_path / "bad.json"  # the page says the same sentence
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(gr.Error) as page:
        open_run(str(path))
    assert page.value.message == text


def test_a_missing_file_or_no_upload_is_a_sentence(tmp_path):
    with pytest.raises(ValueError, match="There is no run file at"):
        runfile.load_run(tmp_path / "nope.json")
    with pytest.raises(gr.Error, match="No file was uploaded"):
        open_run(None)


def offline(html: str) -> None:
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I), "an external script"
    assert not re.search(r"<link[^>]*\bhref\s*=\s*['\"]https?:", html, re.I), "an external stylesheet"
    assert html.count("Plotly.newPlot") >= 1 and len(html) > 1_000_000  # plotly.js itself is inside


def test_the_html_report_has_every_figure_and_works_offline(results, saved):
    back, meta = runfile.load_run(saved)
    html = report_html(back, meta)
    offline(html)
    # 4 shared, 3 per policy, and the step-0 view of each policy that compressed
    assert html.count('class="plotly-graph-div"') == 4 + 3 * len(results) + sum(
        label != "full" for label in results
    )
    for title in ("Per-layer budgets", "Drift from the full cache", "Eviction and merge timeline · h2o"):
        assert title in html
    assert "<table" in html and "KV MB (final)" in html
    assert all(res.text[:20].replace("&", "&amp;").replace("<", "&lt;") in html for res in results.values())


def test_cli_show_prints_texts_and_summary_and_writes_the_report(saved, tmp_path, capsys):
    path, out = tmp_path / "run.json", tmp_path / "report.html"
    path.write_text(saved, encoding="utf-8")
    assert cli.main(["show", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "=== h2o ===" in printed and "KV MB (final)" in printed and not out.exists()
    assert cli.main(["show", str(path), "--html", str(out)]) == 0
    offline(out.read_text(encoding="utf-8"))
    (tmp_path / "bad.json").write_text('{"results": {}}')
    assert cli.main(["show", str(tmp_path / "bad.json")]) == 2
    assert "older version" in capsys.readouterr().err


def test_cli_compare_json_writes_the_run_format(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: tiny)
    path = tmp_path / "out.json"
    argv = ["compare", "--prompt", TEXT, "--max-new-tokens", "3", "--no-chat", "--json", str(path)]
    assert cli.main(argv) == 0
    back, meta = runfile.load_run(path)
    assert list(back) == ["full", "h2o", "d2o"] and meta["prompt"] == TEXT and meta["max_new_tokens"] == 3
    assert back["d2o"].metrics["new_tokens"] == 3
