"""A run's views and labels: what each column kept includes its generated tokens, survival and step 0 are
drawn from a run, the stats lines and titles say what was kept and against which reference, the About
text comes from the registry and the figure list, and the offline report carries every caption."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import TEXT

import d2o_core
from d2o_core import POLICIES, run_summary
from d2o_core.events import DRIFT_SCHEMA, EVENTS_SCHEMA, LAYER_BUDGETS_SCHEMA, STEPS_SCHEMA, frame
from d2o_core.policies.d2o import D2O
from d2o_core.run_result import RunResult
from ui import about, figures
from ui import run_figures as RF
from ui.report_html import report_html

N_PROMPT = 40
PROMPT = [ord(c) for c in TEXT[:N_PROMPT]]
NEW = 12


@pytest.fixture(scope="module")
def results(tiny):
    policies = [POLICIES[k](budget=0.3) for k in ("full", "streaming", "h2o", "d2o")]
    return d2o_core.compare(tiny, PROMPT, policies, max_new_tokens=NEW)


def test_what_each_column_kept_includes_its_generated_tokens(results):
    fig = RF.kept_figure(results, 1, 0)
    strips = fig.data[-1]
    held = N_PROMPT + NEW - 1  # the last generated token is never fed back
    assert list(strips.x) == list(range(held)) and list(strips.y) == list(results)
    codes = {"sink": 0, "kept": 1, "merged": 2, "evicted": 3}
    z = np.asarray(strips.z, dtype=float)
    # The budget holds ~12 prompt entries: after 11 generated tokens, the streaming column keeps
    # its newest ones, not nothing.
    streaming = z[list(results).index("streaming")]
    assert (streaming[N_PROMPT:] == codes["kept"]).sum() >= 5
    assert (z[0] == codes["kept"]).all()  # the full cache keeps everything, generated tokens too
    assert "generated →" in [a.text.strip() for a in fig.layout.annotations]
    assert fig.layout.shapes[0].x0 == N_PROMPT - 0.5


def test_survival_and_step0_are_drawn_from_a_run(results):
    res = results["d2o"]
    fig = RF.survival_figure(res, "d2o")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.isfinite(z).sum() == N_PROMPT + NEW - 1  # the prompt, then the generated tokens held
    assert fig.layout.shapes  # the line where the generated tokens start
    step0 = RF.step0_figure(res, 1, 0, "d2o")
    state = [s for s in np.asarray(step0.data[0].customdata).ravel() if s]
    first = res.events[(res.events["step"] == 0) & (res.events["layer"] == 1) & (res.events["head"] == 0)]
    assert len(state) == N_PROMPT
    assert state.count("merged") + state.count("evicted") == len(first) > 0


def test_marks_find_the_question_kept_whole_and_a_passkey_needle_with_its_answer(tiny):
    context = "Filler text. The pass key is 4821. Remember it. 4821 is the pass key. More filler. "
    res = d2o_core.compare(
        tiny, context * 2, [POLICIES["h2o"](budget=0.5)], max_new_tokens=3, question="Which key?", chat=False
    )["h2o"]
    marks = RF.marks(res)
    text = "".join(res.prompt_tokens)
    spans = {
        name: ["".join(res.prompt_tokens[s:e]) for s, e in zip(g["start"], g["end"])]
        for name, g in marks.groupby("name")
    }
    assert (
        spans["question"][-1].strip().endswith("Which key?") and len(res.prompt_tokens) == marks["end"].max()
    )
    assert spans["needle"] == ["The pass key is 4821. Remember it. 4821 is the pass key."] * 2
    assert spans["answer"] == ["4821"] * 4 and text.count("4821") == 4


def result(label: str, settings: dict, budget_tokens: list[int], protected=None, **metrics) -> RunResult:
    n_layers = len(budget_tokens)
    m = {
        "prompt_tokens": 42,
        "new_tokens": 8,
        "kv_bytes_final": 368_640,
        "kv_bytes_full": 2_257_920,
        "kv_bytes_peak": 2_257_920,
        "kv_fraction": 368_640 / 2_257_920,
        "prefill_seconds": 0.1,
        "decode_seconds": 1.0,
        "decode_ms_per_token": 100.0,
        "tokens_per_second": 10.0,
        "n_layers": n_layers,
        "n_kv_heads": 1,
    } | metrics
    layer_budgets = frame(
        {
            "layer": range(n_layers),
            "budget_tokens": budget_tokens,
            "budget_fraction": [b / m["prompt_tokens"] for b in budget_tokens],
            "density": [math.nan] * n_layers,
            "protected": protected or [False] * n_layers,
        },
        LAYER_BUDGETS_SCHEMA,
    )
    empty = frame({}, EVENTS_SCHEMA)
    return RunResult(
        label, "", [], ["t"] * m["prompt_tokens"], empty, frame({}, STEPS_SCHEMA), layer_budgets, m,
        frame({}, DRIFT_SCHEMA), {"policy": label.split("(")[0]} | settings,
    )  # fmt: skip


def test_percent_of_full_has_one_reference_for_every_column_and_speed_is_the_batchs():
    # The same 368.6 kB in a column that stopped at 8 tokens and one that went on to 32.
    short = result("h2o", {"budget": 0.2}, [8, 8])
    long = result("d2o", {"budget": 0.2}, [8, 8], new_tokens=32, kv_bytes_full=3_363_840, kv_fraction=0.11)
    lines = run_summary.stats_lines({"h2o": short, "d2o": long})
    assert (
        lines["h2o"].split(" · ")[0]
        == lines["d2o"].split(" · ")[0]
        == "KV 368.6 kB (11% of full at 73 tokens)"
    )
    assert "batch speed 10.0 tok/s" in lines["h2o"] and "tok/s" not in lines["h2o"].replace(
        "batch speed 10.0 tok/s", ""
    )
    table = run_summary.summary({"h2o": short, "d2o": long})
    assert table[run_summary.FULL_SHARE].round(3).nunique() == 1 and "batch ms/step" in table
    assert "decode ms/token" not in table and "% of full" not in table  # the old per-column labels


def test_titles_say_what_a_column_kept_when_its_budget_alone_would_mislead():
    assert run_summary.kept_note(result("snapkv", {"budget": 0.2, "window": 64, "n_sink": 4}, [42, 42])) == (
        "prompt shorter than the window (64): kept whole"
    )
    tight = result("snapkv", {"budget": 0.2, "window": 64, "n_sink": 4}, [48, 48], prompt_tokens=241)
    assert run_summary.kept_note(tight) == "window 64 ≥ budget 48 tokens: a sliding window"
    assert run_summary.kept_note(result("snapkv", {"budget": 0.5, "window": 8}, [21, 21])) == ""
    official = result("d2o", {"budget": 0.2}, [42, 42, 9, 9, 42], protected=[True, True, False, False, True])
    assert run_summary.kept_note(official) == "layers 0, 1, 4 kept whole"
    assert run_summary.kept_note(result("full", {"budget": 0.2}, [42, 42])) == ""
    assert run_summary.kept_note(result("h2o", {"budget": 1.0}, [42, 42])) == ""


def test_kept_notes_of_real_runs(tiny):
    short = d2o_core.compare(tiny, PROMPT, [POLICIES["snapkv"](budget=0.2)], max_new_tokens=2)["snapkv"]
    assert run_summary.kept_note(short) == "prompt shorter than the window (64): kept whole"
    official = D2O(budget=0.2, variant="official")
    res = d2o_core.compare(tiny, PROMPT * 2, [official], max_new_tokens=2)
    (label,) = res
    assert run_summary.kept_note(res[label]) == "layers 0, 1, 3 kept whole"  # the tiny model has 4 layers


def test_about_lists_every_registered_policy_and_every_figure_with_its_caption(monkeypatch):
    text = about.about_markdown()
    for name, cls in POLICIES.items():
        assert f"**{cls.title}**" in text and f"`{name}`" in text
    assert "[arXiv 2406.13035](https://arxiv.org/abs/2406.13035)" in text  # D2O's paper, as a link
    for entries in figures.FIGURES.values():
        for name, title in entries:
            assert f"**{title}**: {figures.CAPTIONS[name]}" in text
    assert "<!--" not in text and "What you are looking at" in text
    # A policy registered later appears without editing the About text.
    monkeypatch.setitem(
        POLICIES,
        "newbie",
        type(
            "Newbie",
            (),
            {"title": "Newbie", "description": "Newbie: keeps new (https://arxiv.org/abs/2501.00001)"},
        ),
    )
    assert (
        "| **Newbie** | keeps new ([arXiv 2501.00001](https://arxiv.org/abs/2501.00001)) | `newbie` |"
        in about.about_markdown()
    )


def test_the_report_has_the_step0_view_captions_and_labels(results):
    html = report_html(results, {"prompt": TEXT[:N_PROMPT]})
    assert html.count("How to read this:") == html.count('class="plotly-graph-div"')
    assert figures.CAPTIONS["step0"].replace('"', "&quot;") in html
    assert "Step 0, the prompt compression · d2o" in html and "batch speed" in html
    assert html.count("<script") - html.count("Plotly.newPlot") <= 2  # plotly.js itself, once
    assert html.count("% of full at") == len(results)  # every column against the one reference
