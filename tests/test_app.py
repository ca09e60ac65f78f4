"""The app without a browser: the page builds, handlers do what the buttons promise (tiny models)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import pytest
from helpers import TEXT, page_order, page_props, tiny_model

from ui import api as A
from ui import compare_run as C
from ui import figures, stored_runs, sweep_tab
from ui import policy_controls as P
from ui.engine import Engine, allowed_models
from ui.layout import analytics_enabled, build_demo, launch_options
from ui.sweep_tab import run_sweep


@pytest.fixture(scope="module")
def engine():
    return Engine(["tiny"], loader=lambda name: tiny_model())


@pytest.fixture(scope="module")
def finished(engine):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "STREAM_EVERY_S", 0)  # every step's texts go out (the tiny model is fast)
        return list(C.run_comparison(engine, TEXT, P.Columns(["full", "h2o", "d2o"], 30), 12))


def test_streamed_texts_are_sent_together_and_at_most_every_stream_interval(engine, monkeypatch):
    monkeypatch.setattr(C, "STREAM_EVERY_S", 3600)
    outs = list(C.run_comparison(engine, TEXT, P.Columns(["full", "h2o", "d2o"], 30), 12))
    streamed = [o for o in outs if "text:0" in o and "state" not in o]
    # The first step goes out once it is whole, all columns together; the rest waits for the interval
    # (or for the results, which hold every text).
    assert len(streamed) == 1 and {"text:0", "text:1", "text:2"} <= set(streamed[0])
    assert all(outs[-1][f"text:{i}"] for i in range(3))


def test_build_demo_constructs_without_launching(engine):
    demo = build_demo(engine)
    assert isinstance(demo, gr.Blocks)
    api = [d for d in demo.fns.values() if d.api_name == "compare"]
    assert len(api) == 1 and api[0].api_visibility == "public"


def test_gradio_analytics_are_off_unless_the_host_turns_them_on(engine, monkeypatch):
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    assert build_demo(engine).analytics_enabled is False
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")
    assert analytics_enabled() is True  # (building it would now phone home: the network guard stops that)


def test_examples_cover_the_gallery_the_issue_asks_for():
    examples = stored_runs.examples()
    assert len(examples) >= 6
    assert {"name", "prompt", "max_new_tokens", "note"} <= set(examples[0])
    names = [e["name"].lower() for e in examples]
    assert any("passkey" in n for n in names) and any("story" in n for n in names)
    assert sum(len(e["prompt"]) > 2500 for e in examples) >= 2  # the two long-context ones (600+ tokens)


def test_run_streams_each_policy_then_fills_every_output(finished):
    # Columns are slots in the order asked for: full, h2o, d2o -> 0, 1, 2.
    texts = [o for o in finished if "text:2" in o and "state" not in o]
    assert len(texts) >= 10 and all(b["text:2"].startswith(a["text:2"]) for a, b in zip(texts, texts[1:]))
    last = finished[-1]
    for key in (
        "budget_fig",
        "attention_fig",
        "timeline_fig",
        "kept_fig",
        "survival_fig",
        "cache_fig",
        "drift_fig",
    ):
        assert isinstance(last[key], go.Figure) and last[key].data, key
    assert isinstance(last["summary"], pd.DataFrame) and list(last["summary"]["policy"]) == [
        "full",
        "h2o",
        "d2o",
    ]
    assert "% of full" in last["stats:1"] and "agrees with full" in last["stats:2"]
    assert last["title:0"] == "### Full cache" and last["title:2"] == "### D2O · 30 %"
    assert set(last["state"]["results"]) == {"full", "h2o", "d2o"}
    visible = [finished[0][f"col:{i}"]["visible"] for i in C.SLOTS]
    assert visible == [True, True, True, False, False, False]
    # The previous run's figures, summary and state are cleared as the new one starts.
    assert all(finished[0][key] is None for key in (*C.FIGURE_OUTPUTS, "summary", "state"))


def test_a_column_is_a_configuration_so_one_policy_can_run_twice(engine):
    extras = [("d2o", None, "variant=official"), ("d2o", 40, ""), ("", None, "")]
    last = list(C.run_comparison(engine, TEXT, P.Columns(["d2o"], 20, extras=extras), 4))[-1]
    assert list(last["state"]["results"]) == ["d2o@20%", "d2o(variant=official)", "d2o@40%"]
    assert [last[f"title:{i}"] for i in range(3)] == [
        "### D2O · 20 %",
        "### D2O · variant=official · 20 % (layers 0, 1, 3 kept whole)",  # the official code's
        "### D2O · 40 %",
    ]
    assert [last[f"col:{i}"]["visible"] for i in C.SLOTS] == [True, True, True, False, False, False]


def test_pickers_redraw_from_stored_results_without_generating(engine, finished, monkeypatch):
    state = finished[-1]["state"]
    monkeypatch.setattr(engine, "get", lambda *a: pytest.fail("a picker must not run the model"))
    a = C.timeline_view(state, "d2o", 0, 0)["timeline_fig"]
    b = C.timeline_view(state, "d2o", 3, 1)["timeline_fig"]
    assert "layer 0" in a.layout.title.text and "layer 3" in b.layout.title.text
    views = C.policy_views(state, "h2o", 1, 0)
    assert "h2o" in views["cache_fig"].layout.title.text
    assert C.timeline_view(None, "d2o", 0, 0)["timeline_fig"].layout.annotations  # empty, no error


@pytest.mark.parametrize(
    "args,message",
    [
        (("", P.Columns(["h2o"], 20), 8), "prompt is empty"),
        ((TEXT, P.Columns([], 20), 8), "No policy selected"),
        ((TEXT, P.Columns(["h2o"], 20), 0), "max_new_tokens"),
        (("x" * 5000, P.Columns(["h2o"], 20), 8), "limit here is"),
        ((TEXT, P.Columns(list(P.NAMES)[:7], 20), 8), "At most 6 columns"),
        ((TEXT, P.Columns(["d2o"], 20, extras=[("d2o", None, "merge=perhaps")]), 8), "true or false"),
        ((TEXT, P.Columns(["d2o"], 20, extras=[("d2o", None, "speed=3")]), 8), "has no setting 'speed'"),
    ],
)
def test_bad_input_becomes_a_message_not_a_stack_trace(engine, args, message):
    assert re.search(message, refusal(C.run_comparison(engine, *args)))


def refusal(run) -> str:
    """What a refused run says: its last status line and a warning toast (outside Gradio, a
    UserWarning) carry the sentence, and no `gr.Error` fails the event (its pill hid the status line)."""
    with pytest.warns(UserWarning) as toasts:
        outs = list(run)
    assert outs[-1]["status"].startswith("Not run: ") and "Traceback" not in outs[-1]["status"]
    return str(toasts[-1].message)


def advanced(changes: dict) -> list:
    """The Advanced controls' default values, in page order, with `changes` {(policy, setting): value}."""
    specs = {(n, s.name): s.default for n in P.NAMES for s in P.settings_of(P.POLICIES[n])}
    return [changes.get(key, specs[key]) for key in P.control_keys()]


def test_bad_advanced_settings_are_explained(engine):
    def run(values, picked=("d2o",)):
        columns = lambda: P.Columns(list(picked), 20, P.settings_from_values(values))  # noqa: E731
        return refusal(C.run_comparison(engine, TEXT, columns, 4))

    assert "D2O: protected_layers must be layer numbers" in run(
        advanced({("d2o", "protected_layers"): "first, last"})
    )
    assert "does not exist" in run(advanced({("d2o", "protected_layers"): "9"}))
    assert "SnapKV: kernel must be odd" in run(advanced({("snapkv", "kernel"): 4}), ["snapkv"])
    assert "D2O: recent_share must be a number from 0 to 1; got 1.5." in run(
        advanced({("d2o", "recent_share"): "1.5"})
    )


def test_unexpected_failures_are_reported_without_a_trace(monkeypatch):
    broken = Engine(["tiny"], loader=lambda name: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(gr.Error, match="Generation failed .*disk full") as info:
        list(C.run_comparison(broken, TEXT, P.Columns(["h2o"], 20), 4))
    assert "Traceback" not in str(info.value)


def test_a_run_that_ends_early_says_stopped_and_a_finished_one_keeps_done(finished):
    statuses = [o["status"] for o in finished if "status" in o]
    assert statuses[-1].startswith("Done") and C.run_ended(statuses[-1]) == gr.skip()
    for status in statuses[:-1]:  # Stop at any point of the run
        assert C.run_ended(status).startswith("Stopped"), status
    assert C.run_ended("Generating… step 7").startswith("Stopped after step 7;")
    assert C.run_ended("Starting…") == "Stopped before the first token."
    for untouched in ("", None, "Stopped after step 3; ..."):  # a request refused before it started
        assert C.run_ended(untouched) == gr.skip()


def test_closing_a_run_mid_stream_is_logged(engine, caplog):
    run = C.run_comparison(engine, TEXT, P.Columns(["full", "d2o"], 30), 12)
    while "Generating" not in next(run).get("status", ""):
        pass
    with caplog.at_level("INFO", logger="ui.compare_run"):
        run.close()  # what Gradio does on Stop
    assert "Generation stopped before the end" in caplog.text


def test_every_policy_setting_has_a_control_from_its_dataclass_field():
    keys = P.control_keys()
    for name, cls in P.POLICIES.items():
        fields = {f.name for f in dataclasses.fields(cls)} - {"budget"} - set(cls.unused_settings)
        assert {k for n, k in keys if n == name} == fields, name
    assert ("tova", "recent_share") not in keys and ("full", "n_sink") not in keys  # unused: not shown


def test_controls_reach_the_policies():
    values = advanced(
        {
            ("h2o", "n_sink"): 2.0,  # sliders hand over floats
            ("d2o", "variant"): "official",
            ("d2o", "merge"): False,
            ("d2o", "protected_layers"): "0, 1, -1",
            ("snapkv", "window"): 16,
        }
    )
    settings = P.settings_from_values(values)
    policies = {p.name: p for p in P.Columns(["full", "h2o", "d2o", "snapkv"], 25, settings).policies()}
    assert policies["h2o"].n_sink == 2 and isinstance(policies["h2o"].n_sink, int)
    assert policies["h2o"].budget == 0.25 and policies["snapkv"].window == 16
    assert policies["d2o"].variant == "official" and not policies["d2o"].merge
    # Blank optional settings take the variant's values: official's recent share and beta.
    assert (policies["d2o"].recent_share, policies["d2o"].beta) == (0.5, 0.5)
    assert policies["d2o"].label == "d2o(variant=official,merge=False)"


def test_compress_every_shows_in_the_columns_title_and_as_a_saw_tooth_in_the_cache_figure(engine):
    """H2O every 4 steps: the cache grows 3 entries past its budget, then is cut back to it; the line
    above the cache heatmap draws that (a colour scale from 0 hid 48 against 51)."""
    values = advanced({("h2o", "compress_every"): 4.0, ("streaming", "compress_every"): 0.0})
    columns = P.Columns(["streaming", "h2o"], 30, P.settings_from_values(values))
    last = list(C.run_comparison(engine, TEXT, columns, 9))[-1]
    assert [last["title:0"], last["title:1"]] == [
        "### StreamingLLM · compress\\_every=0 · 30 %",  # markdown: shows compress_every=0
        "### H2O · compress\\_every=4 · 30 %",
    ]
    state = last["state"]
    h2o = C.policy_views(state, "h2o(compress_every=4)", 0, 0)["cache_fig"]
    stored, budget = (trace for trace in h2o.data if trace.type == "scatter")
    b = budget.y[0]
    assert list(budget.y) == [b] * 9 and list(stored.y) == [b + k % 4 for k in range(9)]
    assert list(stored.x) == list(range(9))
    once = C.policy_views(state, "streaming(compress_every=0)", 0, 0)["cache_fig"]
    stored, budget = (trace for trace in once.data if trace.type == "scatter")
    assert list(stored.y) == [budget.y[0] + k for k in range(9)]  # once after the prompt: it grows
    full = C.policy_views(state, "nothing", 0, 0)["cache_fig"]
    assert not full.data  # no such column: the empty figure


def test_the_question_is_kept_whole_recorded_and_restored(engine, tmp_path, monkeypatch):
    """The question box reaches the engine (read after the compression), the run file records it and
    opening the file puts it back in the box; a blank box is no question."""
    from d2o_core.runfile import load_run
    from ui.open_run import open_run

    seen = []
    real = C.iter_compare
    monkeypatch.setattr(C, "iter_compare", lambda *a, **k: seen.append(k["question"]) or real(*a, **k))
    columns = P.Columns(["full", "h2o"], 30)
    asked = list(C.run_comparison(engine, TEXT, columns, 3, None, C.Sampling(), "Which fox?"))[-1]
    plain = list(C.run_comparison(engine, TEXT, columns, 3, None, C.Sampling(), "  "))[-1]
    assert seen == ["Which fox?", None]
    tokens = lambda page: page["state"]["results"]["h2o"].metrics["prompt_tokens"]  # noqa: E731
    assert tokens(asked) > tokens(plain)  # the question's tokens are read too
    assert "kept whole" in asked["status"] and "kept whole" not in plain["status"]
    assert asked["state"]["meta"]["question"] == "Which fox?" and "question" not in plain["state"]["meta"]
    paths = C.prepare_downloads(asked["state"], "h2o", 0, 0)["downloads"]
    (run_json,) = [p for p in paths if p.endswith("run.json")]
    assert json.loads(Path(run_json).read_text())["meta"]["question"] == "Which fox?"
    # The attention covers the context (the question is read after the compression): reopened as live.
    reopened, _ = load_run(run_json)
    pd.testing.assert_frame_equal(reopened["h2o"].attention, asked["state"]["results"]["h2o"].attention)
    assert open_run(run_json)["question"] == "Which fox?"
    paths = C.prepare_downloads(plain["state"], "h2o", 0, 0)["downloads"]
    assert open_run(next(p for p in paths if p.endswith("run.json")))["question"] == ""
    assert stored_runs.first_view().get("question", "") == ""  # an example's stored run: no question


def test_downloads_hold_csv_json_and_standalone_figures(finished, tmp_path):
    paths = C.prepare_downloads(finished[-1]["state"], "d2o", 1, 0)["downloads"]
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == [
        "attention.html",
        "budget_heatmap.html",
        "cache_over_time.html",
        "drift.html",
        "events.csv",
        "kept_tokens.html",
        "report.html",
        "run.json",
        "step0.html",
        "survival.html",
        "timeline.html",
    ]
    by_name = {p.rsplit("/", 1)[-1]: p for p in paths}
    doc = json.loads(open(by_name["run.json"]).read())
    assert set(doc["results"]) == {"full", "h2o", "d2o"} and doc["results"]["d2o"]["events"]
    csv = pd.read_csv(by_name["events.csv"])
    assert csv.columns[0] == "policy" and set(csv["policy"]) == {"h2o", "d2o"}
    assert "<html>" in open(by_name["timeline.html"]).read()[:200].lower()
    with pytest.raises(gr.Error, match="run a prompt first"):
        C.prepare_downloads(None, "d2o", 0, 0)


def test_api_compare_returns_texts_and_metrics(engine):
    out = A.api_compare(engine, TEXT, ["full", "d2o"], 0.3, 5)
    assert set(out["results"]) == {"full", "d2o"}
    assert out["results"]["d2o"]["metrics"]["new_tokens"] == 5
    json.dumps(out, allow_nan=False)  # strict JSON
    with pytest.raises(gr.Error, match="fraction"):
        A.api_compare(engine, TEXT, ["full"], 20, 5)
    with pytest.raises(gr.Error, match="Unknown policy H2O"):  # not silently dropped
        A.api_compare(engine, TEXT, ["full", "H2O"], 0.2, 5)


def inside(thread: threading.Thread, fn) -> bool:
    """Whether `thread` is executing `fn` right now (anywhere on its stack, e.g. waiting in it)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code is fn.__code__:
            return True
        frame = frame.f_back
    return False


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_engine_loads_each_model_once_and_only_allowed_ones():
    """Two first requests overlap for real: the second is inside Engine.get while the first still loads."""
    calls, got = [], []
    second: list[threading.Thread] = []
    both_loading = threading.Barrier(2)

    def slow_loader(name):
        calls.append(name)
        if name != "a":
            return f"model {name}"
        # Hold the load open until the second request has entered Engine.get ...
        assert wait_until(lambda: second and inside(second[0], Engine.get), timeout=30)
        # ... and give it a second to reach the loader as well: without the lock in get it does, at once.
        try:
            both_loading.wait(timeout=1.0)
        except threading.BrokenBarrierError:
            pass  # the second request waited: what the lock is for
        return f"model {name}"

    engine = Engine(["a", "b"], loader=slow_loader)
    threads = [threading.Thread(target=lambda: got.append(engine.get()), daemon=True) for _ in range(2)]
    threads[0].start()
    assert wait_until(lambda: calls, timeout=30)  # the first request is loading
    second.append(threads[1])
    threads[1].start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert calls == ["a"] and got == ["model a", "model a"]
    assert engine.get("b") == "model b" and calls == ["a", "b"]
    assert engine.get("a") == "model a" and calls == ["a", "b"]  # loaded once, then kept
    with pytest.raises(ValueError, match="not offered"):
        engine.get("someone/else")


def test_allowlist_comes_from_the_host(monkeypatch):
    monkeypatch.setenv("D2O_MODELS", "org/big-model, org/other ,org/big-model")
    assert allowed_models() == ["org/big-model", "org/other"]
    monkeypatch.delenv("D2O_MODELS")
    monkeypatch.delenv("D2O_MODEL", raising=False)
    assert allowed_models() == ["SmolLM2-135M-Instruct"]


def test_sweep_tab_handler_draws_fidelity_against_budget(engine):
    outs = list(run_sweep(engine, TEXT, ["full", "h2o", "d2o"], [20, 60], 6))
    last = outs[-1]
    table = last["sweep_table"]
    assert set(table["configuration"]) == {"h2o", "d2o"}
    assert sorted(table["KV budget %"].unique()) == [20, 60]  # a percentage, as everywhere on the page
    assert list(table.columns) == list(sweep_tab.TABLE_HEADERS)
    assert isinstance(last["agree_fig"], go.Figure) and last["agree_fig"].data
    for fig in (last["agree_fig"], last["kl_fig"]):  # words, not the frame's field names
        words = fig.layout.title.text + fig.layout.yaxis.title.text + fig.data[0].hovertemplate
        assert "_" not in words and "mean mean" not in words, words
    assert "KL" in last["kl_fig"].layout.title.text and "Agreement" in last["agree_fig"].layout.title.text
    with pytest.raises(gr.Error, match="other than the full cache"):
        list(run_sweep(engine, TEXT, ["full"], [20], 6))


def test_the_sweep_runs_the_compare_tabs_settings_and_extra_columns(engine):
    """A sweep runs the same configurations as the Compare tab: ticked policies with their Advanced
    settings and each filled extra column, every one at every ticked budget (an extra column's own
    budget is not used, and the status says so)."""
    extras = [("d2o", "", "variant=official"), ("h2o", "40", "compress_every=0"), ("", "", "")]
    settings = {"h2o": {"n_sink": 2}}
    last = list(run_sweep(engine, TEXT, ["full", "h2o"], [20, 60], 3, None, None, settings, extras))[-1]
    table = last["sweep_table"]
    configs = ["h2o(n_sink=2)", "d2o(variant=official)", "h2o(n_sink=2,compress_every=0)"]
    assert list(pd.unique(table["configuration"])) == configs
    assert list(table["KV budget %"]) == [20, 60] * 3
    assert {t.name for t in last["kl_fig"].data} == set(configs)
    assert "Extra column 2" in last["sweep_status"] and "not used" in last["sweep_status"]
    with pytest.raises(gr.Error, match="Extra column 1 \\(D2O\\): .*merge"):
        list(run_sweep(engine, TEXT, ["h2o"], [20], 3, None, None, {}, [("d2o", "", "merge=perhaps")]))
    # An extra column alone is enough to sweep.
    alone = list(run_sweep(engine, TEXT, [], [20], 3, None, None, {}, [("h2o", "", "n_sink=1")]))[-1]
    assert list(alone["sweep_table"]["configuration"]) == ["h2o(n_sink=1)"]


def test_the_sweep_button_reads_the_advanced_panel_and_the_extra_columns(engine):
    demo = build_demo(engine)
    ids = {b.elem_id: i for i, b in demo.blocks.items() if getattr(b, "elem_id", None)}
    (dep,) = [d for d in demo.config["dependencies"] if (ids["sweep-run"], "click") in d["targets"]]
    for elem_id in ("extra-0", "extra-2-settings", "set-d2o-variant", "set-h2o-n_sink"):
        assert ids[elem_id] in dep["inputs"], elem_id


def test_the_sweep_tab_opens_on_the_stored_sweep_with_real_headers(engine, tmp_path):
    """results/sweep.csv is drawn as the tab's first view (nothing run); every table names its
    columns (an empty Dataframe showed the headers "1 2 3") and says budgets in %."""
    props = page_props(build_demo(engine))
    table = props["sweep-table"]["value"]
    assert table["headers"][:2] == ["configuration", "KV budget %"] and table["data"]
    assert set(table["headers"]) <= set(sweep_tab.TABLE.values())
    budgets = {row[table["headers"].index("KV budget %")] for row in table["data"]}
    assert budgets == {20, 40, 100}
    assert "results/sweep.csv" in props["sweep-status"]["value"]
    for elem_id in ("sweep-agree", "sweep-kl"):
        plot = json.loads(props[elem_id]["value"]["plot"])
        assert plot["data"] and "_" not in plot["layout"]["title"]["text"], elem_id
    board = props["board-table"]["value"]
    assert board["headers"] == list(sweep_tab.BOARD_HEADERS) and "1" not in board["headers"]
    # No stored sweep, or a broken one: a sentence, empty figures, the headers still there.
    plain = tmp_path / "plain.csv"  # the measures without the task columns: shown, counted as runs
    plain.write_text("policy,budget,token_agreement,mean_kl_to_full\nh2o,0.2,0.5,1.0\nh2o,0.4,0.75,0.5\n")
    view = sweep_tab.stored_view(plain)
    assert "2 runs" in view["sweep_status"] and list(view["sweep_table"]["KV budget %"]) == [20, 40]
    for bad in (tmp_path / "missing.csv", tmp_path / "broken.csv"):
        if bad.name == "broken.csv":
            bad.write_text("task,policy\npasskey,h2o\n")
        view = sweep_tab.stored_view(bad)
        assert "Run sweep" in view["sweep_status"] and bad.name in view["sweep_status"]
        assert not view["agree_fig"].data
        assert list(view["sweep_table"].columns) == list(sweep_tab.TABLE_HEADERS)


def test_every_figure_has_its_how_to_read_caption_in_its_tab(engine):
    demo = build_demo(engine)
    for tab, entries in figures.FIGURES.items():
        order = page_order(demo, tab)
        texts = [c["props"].get("value") or "" for c in order if c["type"] == "markdown"]
        for name, _ in entries:
            assert any(f"How to read this:* {figures.CAPTIONS[name]}" in t for t in texts), (tab, name)
        plots = [i for i, c in enumerate(order) if c["type"] == "plot"]
        captions = [i for i, c in enumerate(order) if "How to read this" in str(c["props"].get("value"))]
        # Every figure has a caption after it, and before the next figure but one (two side by side
        # may share one).
        for k, i in enumerate(plots):
            following = plots[k + 2] if k + 2 < len(plots) else len(order)
            assert any(i < j < following for j in captions), (tab, order[i]["props"].get("label"))


def test_run_and_stop_stay_above_the_advanced_panel(engine):
    """Opening Advanced (~1,300 px of settings) pushed Run and Stop off the screen below it."""
    order = page_order(build_demo(engine), "Compare")
    where = {c["props"].get("elem_id") or c["props"].get("label"): i for i, c in enumerate(order)}
    assert where["run"] < where["Advanced"] and where["stop"] < where["Advanced"]


def test_typing_a_new_prompt_says_the_run_shown_is_the_previous_prompts(engine, finished):
    """The prompt and question boxes only relabel the run shown (no figure redrawn, nothing cleared);
    the shown run's prompt typed back restores its own status line."""
    state = finished[-1]["state"]
    said = C.prompt_edited(TEXT + " And then?", "", state)
    assert "previous prompt" in said and "press Run" in said
    assert C.prompt_edited(TEXT, "Which fox?", state) == said  # the question is part of the run too
    assert C.prompt_edited(TEXT, "", state) == finished[-1]["status"]
    assert C.prompt_edited("anything", "", None) == gr.skip()  # nothing shown, or a run under way
    page = stored_runs.first_view()
    assert C.prompt_edited(page["prompt"], "", page["state"]) == page["status"]
    assert "previous prompt" in C.prompt_edited(page["prompt"][:-1], "", page["state"])
    # An example button puts its prompt in the box and says itself which run is shown.
    other = next(e["prompt"] for e in stored_runs.examples() if e["prompt"] != page["prompt"])
    examples = {e["prompt"] for e in stored_runs.examples()}
    assert C.prompt_edited(other, "", page["state"], examples) == gr.skip()
    assert "previous prompt" in C.prompt_edited(page["prompt"], "Which?", page["state"], examples)
    demo = build_demo(engine)
    ids = {b.elem_id: i for i, b in demo.blocks.items() if getattr(b, "elem_id", None)}
    for box in ("prompt", "question"):  # `change`: a Textbox's `input` misses deleting and pasting
        (dep,) = [d for d in demo.config["dependencies"] if (ids[box], "change") in d["targets"]]
        assert dep["outputs"] == [ids["status"]] and dep["queue"] is False, box
        assert dep["show_progress"] == "hidden", box


def test_a_columns_title_shows_its_settings_whole():
    d2o = P.Columns([], 20, extras=[("d2o", "", "protected_layers=0,1, merge=no")]).policies()[0]
    assert C.column_title(d2o.label, d2o.settings()) == (
        "### D2O · merge=False, protected\\_layers=\\(0, 1\\) · 20 %"  # markdown: protected_layers=(0, 1)
    )


def test_pickers_redraw_only_when_a_person_moves_them(engine):
    """A finished run sets the pickers itself, its figures already drawn: a `change` event would
    redraw four of them a second time (the first view sent them twice before this)."""
    demo = build_demo(engine)
    ids = {b.elem_id: i for i, b in demo.blocks.items() if getattr(b, "elem_id", None)}
    pickers = {ids["view"], ids["layer"], ids["head"]}
    targets = [target for dep in demo.config["dependencies"] for target in dep["targets"]]
    events = [event for target, event in targets if target in pickers]
    assert events and set(events) == {"input"}


def test_the_page_arrives_with_the_first_view_and_only_its_state_waits_for_load(engine):
    """The first view is in the page's own config (no round trip before the figures can draw); the
    load event fills the State alone, which the browser never receives."""
    demo = build_demo(engine)
    props = page_props(demo)
    page = stored_runs.first_view()
    assert props["text-0"]["value"] == page["text:0"] and props["text-0"]["value"]
    assert props["col-3"]["visible"] is True and props["col-4"]["visible"] is False
    assert props["run"]["value"] == "Run again" and props["layer"]["maximum"] == page["layer"]["maximum"]
    assert [v for _, v in props["view"]["choices"]] == page["view"]["choices"]
    for elem_id in ("budget-fig", "attention-fig", "timeline-fig", "kept-fig"):
        assert json.loads(props[elem_id]["value"]["plot"])["data"], elem_id
    loads = [d for d in demo.config["dependencies"] if any(event == "load" for _, event in d["targets"])]
    (load,) = loads
    (state,) = [b for b in demo.blocks.values() if isinstance(b, gr.State)]
    assert load["outputs"] == [state._id]
    assert demo.fns[load["id"]].fn() is page["state"]  # the shared stored run, not a copy per visitor


def test_the_page_preloads_the_plotly_chunk_that_gradios_plot_imports():
    head = launch_options()["head"]
    (name,) = re.findall(r'href="./assets/([^"]+)"', head)
    assets = Path(gr.__file__).parent / "templates" / "frontend" / "assets"
    importers = [p.name for p in assets.glob("Plot-*.js") if name in p.read_text(encoding="utf-8")]
    assert importers, f"no Plot chunk of this Gradio imports {name}"


def test_the_status_line_shows_the_time_to_first_token_and_speed_as_the_run_goes(monkeypatch):
    times = iter([10.0, 12.5, 14.5])  # the first token 2.5 s after the start, 4 steps 2 s later
    monkeypatch.setattr(C.time, "monotonic", lambda: next(times))
    clock = C.Progress(started=next(times))
    assert clock.line(0) == "Generating… step 0 · first token after 2.5 s"
    line = clock.line(4)
    assert line.startswith("Generating… step 4 · first token after 2.5 s · 2.0 steps/s")
    assert C.run_ended(line).startswith("Stopped after step 4;")
