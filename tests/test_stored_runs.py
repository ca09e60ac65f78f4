"""Stored example runs: the page's instant first view is what a live run would show."""

from __future__ import annotations

import json

import pytest
from helpers import PAGE_FIGURES, figure_data, page_props, tiny_model

from ui import compare_run as C
from ui import stored_runs as S
from ui.engine import Engine
from ui.policy_controls import DEFAULT_PICKED, Columns

FIGURES = PAGE_FIGURES
SHORT = (
    {"name": "Short one", "prompt": "The quick brown fox jumps over the lazy dog. " * 6, "max_new_tokens": 6},
    {"name": "Another", "prompt": "Tell me about caches. " * 8, "max_new_tokens": 5},
)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Stored runs of two short examples made with a tiny model, in a temporary folder."""
    folder = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "examples", lambda: SHORT)
        mp.setattr(S, "RUNS", folder)
        S._stored.cache_clear()
        S.example_page.cache_clear()
        engine = Engine(["tiny"], loader=lambda name: tiny_model())
        paths = S.write_stored_runs(engine, folder, say=lambda *_: None)
        yield engine, paths
    S._stored.cache_clear()
    S.example_page.cache_clear()


def test_a_stored_run_and_a_fresh_run_give_identical_figures(tiny_runs):
    engine, paths = tiny_runs
    assert [p.name for p in paths] == ["short-one.json.gz", "another.json.gz"]
    for example in SHORT:
        stored = S.example_page(example["name"])
        columns = Columns(list(DEFAULT_PICKED), S.BUDGET_PERCENT)
        fresh = list(C.run_comparison(engine, example["prompt"], columns, example["max_new_tokens"]))[-1]
        for key in FIGURES:
            assert figure_data(stored[key]) == figure_data(fresh[key]), key
        for i in range(len(DEFAULT_PICKED)):
            assert stored[f"text:{i}"] == fresh[f"text:{i}"] and stored[f"title:{i}"] == fresh[f"title:{i}"]
        assert stored["prompt"] == example["prompt"] and stored["status"].startswith("Stored run")


def test_an_example_click_shows_its_stored_run_and_one_without_says_run(tiny_runs):
    page = S.show_example(SHORT[1]["prompt"], 5)
    assert list(page["state"]["results"]) == list(DEFAULT_PICKED) and page["run"]["value"] == "Run again"
    assert S.show_example("a prompt that is no example", 5)["status"].startswith("No stored run")


def test_regenerating_a_stored_run_gives_the_same_texts_and_frames(tiny_runs, tmp_path):
    """Only timings (metrics, meta.created) may change when `make results` runs again."""
    engine, paths = tiny_runs
    again = S.write_stored_runs(engine, tmp_path / "again", say=lambda *_: None)
    for old, new in zip(paths, again):
        a, b = (json.loads(S.gzip.decompress(p.read_bytes())) for p in (old, new))
        assert a["prompt_attention"] == b["prompt_attention"]
        for label in a["results"]:
            for key in ("text", "token_ids", "events", "steps", "layer_budgets", "settings"):
                assert a["results"][label][key] == b["results"][label][key], (label, key)


def test_without_stored_runs_the_page_builds_and_invites_a_run(tmp_path, monkeypatch):
    from ui.layout import build_demo

    monkeypatch.setattr(S, "RUNS", tmp_path)  # e.g. a checkout before `make results`
    S._stored.cache_clear()
    S.example_page.cache_clear()
    try:
        demo = build_demo(Engine(["tiny"], loader=lambda name: tiny_model()))
    finally:
        S._stored.cache_clear()
        S.example_page.cache_clear()
    props = page_props(demo)
    assert props["status"]["value"].startswith("Pick an example or type a prompt")
    assert props["run"]["value"] == "Run" and props["col-0"]["visible"] is False
    assert props["budget-fig"].get("value") is None
