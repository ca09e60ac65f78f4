"""Throughput under a KV cap: the largest batch found, sweeps as asked, sentences for bad input, the CLI,
the figures, and the Throughput tab (stored results and a live run) on tiny models.

No assertion here depends on how fast anything ran: only on rows, batch sizes and memory.
"""

from __future__ import annotations

import json
import statistics
import threading
import time

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import pytest
from conftest import tiny_model

from d2o_core import shape_models
from d2o_core.__main__ import main
from d2o_core.eval import throughput, throughput_tables
from d2o_core.eval.throughput import make_policies, run_throughput
from d2o_core.run_summary import jsonable
from ui import throughput_tab as T
from ui.engine import Engine
from ui.figures import throughput as TF
from ui.layout import build_demo

LENGTH = 300  # the smallest passkey prompt is ~240 characters (= tokens with the CharTokenizer)
SETTINGS = dict(prompt_tokens=LENGTH, budget=0.4, new_tokens=3)  # 2 compressed rows fit


@pytest.fixture(scope="module")
def lm():
    return tiny_model()


@pytest.fixture(scope="module")
def doc(lm):
    return run_throughput(lm, **SETTINGS, policies=("full", "h2o", "d2o"), batches=[1, 2])


def by_mode(doc: dict, mode: str) -> dict:
    return {(r["policy"], r["batch"]): r for r in doc["rows"] if r["mode"] == mode}


def test_the_document_has_every_documented_key_and_is_strict_json(doc):
    keys = {"rows", "machine", "prompt_tokens", "new_tokens", "ratios", "ratio_runs", "repeats", "kv_mb_cap"}
    assert keys | {"date"} <= set(doc)
    for row in doc["rows"]:
        assert set(throughput_tables.ROW_KEYS) <= set(row) and row["mode"] in ("cap", "sweep")
        assert (
            len(row["tokens_per_second_runs"]) == len(row["decode_ms_per_step_runs"]) == doc["repeats"] == 3
        )
        assert row["tokens_per_second"] == statistics.median(row["tokens_per_second_runs"])
    assert LENGTH - 30 < doc["prompt_tokens"] <= LENGTH and doc["new_tokens"] == 3
    assert {"cpu", "cores", "torch", "device", "model"} <= set(doc["machine"])
    assert set(doc["ratios"]) == {f"{p}_over_full_{k}" for p in ("h2o", "d2o") for k in ("at_cap", "single")}
    json.dumps(jsonable(doc), allow_nan=False)


def test_compressed_rows_fit_more_under_the_cap_and_no_batch_exceeds_it(doc):
    cap = {r["policy"]: r for r in doc["rows"] if r["mode"] == "cap"}
    assert cap["full"]["batch"] == 1  # the default cap is one full-cache row
    for name in ("h2o", "d2o"):
        assert cap[name]["batch"] > cap["full"]["batch"]
    for row in cap.values():
        assert row["kv_mb_decode_peak"] <= row["kv_mb_cap"] == doc["kv_mb_cap"] and row["fits_cap"]
        assert (row["batch"] + 1) * row["kv_mb_row"] > row[
            "kv_mb_cap"
        ]  # the cap, not the prompts, stopped it


def test_the_sweep_runs_the_batch_sizes_asked_regardless_of_the_cap(doc):
    sweep = by_mode(doc, "sweep")
    assert sorted(sweep) == sorted((p, b) for p in ("full", "h2o", "d2o") for b in (1, 2))
    assert not sweep[("full", 2)]["fits_cap"] and sweep[("h2o", 2)]["fits_cap"]
    for (_, batch), row in sweep.items():
        assert row["kv_mb_decode_peak"] == pytest.approx(batch * row["kv_mb_row"])


def test_points_are_timed_in_interleaved_rounds_from_one_admission_per_prompt(lm, monkeypatch):
    """Every round decodes every point once (policies alternate, so load drifts hit all alike), from
    fresh copies of rows admitted once: each prompt is prefilled once for all policies."""
    decoded, admitted = [], []
    decode, admit = throughput._Point.decode, throughput.admit_shared

    def spy_decode(point, *args):
        decoded.append((point.admitted.policy.label, point.batch))
        return decode(point, *args)

    def spy_admit(lm, index, ids, policies, *args):
        admitted.append((index, [p.label for p in policies]))
        return admit(lm, index, ids, policies, *args)

    monkeypatch.setattr(throughput._Point, "decode", spy_decode)
    monkeypatch.setattr(throughput, "admit_shared", spy_admit)
    doc = run_throughput(lm, **SETTINGS, policies=("full", "h2o"), batches=[1, 2], repeats=2)
    warm, rounds = decoded[0], decoded[1:]
    first = [("full", 1), ("h2o", 1), ("h2o", 2), ("full", 2)]  # alone, at the cap, then the sweep
    assert warm == ("full", 1) and rounds == first + first
    assert [i for i, _ in admitted] == list(range(len(admitted))) and admitted[0][1] == ["full", "h2o"]
    assert len(admitted) == 3  # h2o's third row shows that two fit; full needed two for the sweep
    runs = doc["ratio_runs"]["h2o_over_full_at_cap"]
    cap = {r["policy"]: r for r in doc["rows"] if r["mode"] == "cap"}
    assert runs == pytest.approx(
        [h / f for h, f in zip(cap["h2o"]["tokens_per_second_runs"], cap["full"]["tokens_per_second_runs"])]
    )


def test_a_row_served_alone_equals_its_admitted_copy(lm):
    """What is timed is what serve_batch would decode: same tokens from a shared admission's copies."""
    from d2o_core import POLICIES, serve_batch, serving

    policy = POLICIES["d2o"](budget=0.4)
    prompts = [throughput.bench.bench_prompt(lm, LENGTH, seed=i) for i in range(2)]
    rows = [
        serving.admit_shared(lm, i, ids, [POLICIES["full"](), policy], 4)[0][1]
        for i, ids in enumerate(prompts)
    ]
    copies = [row.fresh() for row in rows]
    serving.decode_rows(lm, copies, 4, stop_at_eos=False)
    again = [row.fresh() for row in rows]
    serving.decode_rows(lm, again, 4, stop_at_eos=False)
    alone = serve_batch(lm, prompts, policy, max_new_tokens=4, batch=2, chat=False, stop_at_eos=False)
    assert [r.tokens for r in copies] == [r.tokens for r in again] == alone.token_ids


def test_policy_specs_read_variants_and_settings():
    labels = [p.label for p in make_policies(["full", "d2o", "d2o:official"], 0.2)]
    assert labels == ["full", "d2o", "d2o(variant=official)"]
    (official,) = make_policies(["d2o"], 0.2, {"d2o": {"variant": "official"}})
    assert official.variant == "official" and official.budget == 0.2
    assert make_policies(["full"], 0.2)[0].budget == 1.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(policies=()), "No policy given"),
        (dict(batches=[0, 2]), "Batch sizes are whole numbers"),
        (dict(budget=0.0), "budget is the fraction"),
        (dict(budget=1.5), "budget is the fraction"),
        (dict(policies=("h2o:official",)), "h2o has no setting variant"),
        (dict(policies=("d2o", "d2o")), "List each policy once"),
        (dict(policies=("nope",)), "unknown policy"),
        (dict(prompt_tokens=100_000), "prompt_tokens must be"),
        (dict(new_tokens=1), "new_tokens must be"),
        (dict(repeats=0), "repeats must be"),
        (dict(settings={"h2o": {"n_sink": 2}}, policies=("full",)), "not among the policies"),
        (dict(kv_cap_mb=0.01), "smaller than one compressed row"),
    ],
)
def test_bad_input_gets_a_sentence(lm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_throughput(lm, **(SETTINGS | {"policies": ("h2o",)} | kwargs))


def test_rows_under_cap_counts_like_serve_batch():
    assert throughput_tables.rows_under_cap(10.0, 2.5) == 4
    assert throughput_tables.rows_under_cap(10.0, 3.0) == 3
    assert throughput_tables.rows_under_cap(1.0, 2.0) == 0


def hand_doc() -> dict:
    """Numbers made up: full fits 1 row at 10 tok/s, d2o 5 rows at 34 tok/s, plus a sweep."""
    size = lambda policy: 100.0 if policy == "full" else 20.0
    row = lambda policy, batch, tps, mode, single=None: {
        "policy": policy, "budget": 0.2, "batch": batch, "tokens_per_second": tps,
        "decode_ms_per_step": 1000 * batch / tps, "kv_mb_cap": 100.0,
        "kv_mb_decode_peak": size(policy) * batch,
        "kv_mb_admission_peak": 150.0, "rss_mb": 900.0, "fits_cap": size(policy) * batch <= 100, "mode": mode,
        "kv_mb_row": size(policy), "single_tokens_per_second": single,
    }  # fmt: skip
    rows = [row("full", 1, 10.0, "cap", 10.0), row("d2o", 5, 34.0, "cap", 9.0)]
    rows += [
        row(p, b, t, "sweep") for p, ts in (("full", (10, 18)), ("d2o", (9, 17))) for b, t in zip((1, 2), ts)
    ]
    return {
        "rows": rows,
        "ratios": throughput_tables.ratios(rows),
        "machine": {"model": "m"},
        "date": "2026-01-01",
    }


def test_ratios_tables_and_sentences_from_hand_made_numbers():
    doc = hand_doc()
    assert doc["ratios"]["d2o_over_full_at_cap"] == pytest.approx(3.4)
    assert doc["ratios"]["d2o_over_full_single"] == pytest.approx(0.9)
    assert throughput_tables.ratio_lines(doc) == [
        "d2o at the cap: 3.4x the full cache's tokens/s (batch 5 against 1; one row alone: 0.90x)"
    ]
    cap = throughput_tables.cap_table(doc)
    assert list(cap["policy"]) == ["full", "d2o"] and list(cap["x full"]) == pytest.approx([1.0, 3.4])
    sweep = throughput_tables.sweep_table(doc)
    assert list(sweep.columns) == ["policy", "batch 1 tok/s", "batch 2 tok/s"]
    assert len(throughput_tables.table(doc)) == 6


def test_figures_draw_a_hand_made_frame():
    df = pd.DataFrame(hand_doc()["rows"])
    lines = TF.tokens_vs_batch(df)
    assert isinstance(lines, go.Figure)
    stars = [t for t in lines.data if t.marker.symbol == "star" and t.x[0] is not None]
    assert [t.mode for t in lines.data].count("lines+markers") == 2 and [list(t.x) for t in stars] == [
        [1],
        [5],
    ]
    assert any(
        "largest batch under the KV cap" in t.name for t in lines.data
    )  # the legend says what a star is
    bars = TF.cap_bars(df)
    assert list(bars.data[0].x) == ["full", "d2o"] and "3.4x full" in bars.data[0].text[1]
    for fig in (TF.tokens_vs_batch(pd.DataFrame()), TF.cap_bars(df.iloc[0:0])):
        assert not fig.data and fig.layout.annotations  # a message, not an error


@pytest.mark.parametrize(
    "content,message",
    [(None, "is missing"), ("{not json", "could not be read"), ('{"rows": []}', "holds no throughput rows")],
)
def test_the_tab_says_why_when_stored_results_are_missing_or_broken(tmp_path, content, message):
    path = tmp_path / "throughput.json"
    if content is not None:
        path.write_text(content)
    doc, sentence = T.load_stored(path)
    assert doc is None and message in sentence
    out = T.stored_view(path)
    assert message in out["tp_status"] and not out["tp_bars"].data and out["tp_explain"] == T.GENERIC


def test_the_tab_shows_stored_results_without_a_model(tmp_path):
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps(jsonable(hand_doc())))
    out = T.stored_view(path)
    assert "measured 2026-01-01" in out["tp_status"] and "3.4x" in out["tp_status"]
    assert out["tp_bars"].data and out["tp_lines"].data and len(out["tp_table"]) == 6
    assert "a d2o row needs 20.0 MB" in out["tp_explain"]
    assert "5 of its rows fit where 1 full-cache row did" in out["tp_explain"]


@pytest.fixture(scope="module")
def engine(lm):
    """An engine with its model already loaded: which test runs first (and loads it) varies with
    the order pytest-xdist hands tests out in, and a first run says "Loading the model…"."""
    engine = Engine(["tiny"], loader=lambda name: lm)
    engine.get()
    return engine


def test_build_demo_still_builds_with_the_throughput_tab(engine):
    demo = build_demo(engine)
    assert isinstance(demo, gr.Blocks)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"tp-bars", "tp-lines", "tp-run", "tp-stop"} <= ids


def test_a_live_run_fills_the_tab_and_bad_input_is_a_message(engine):
    outs = list(T.run_live(engine, LENGTH, 3, 25, ["full", "h2o"], [1, 2]))
    last = outs[-1]
    assert "Live run" in last["tp_status"] and last["tp_bars"].data and len(last["tp_table"]) == 6
    assert any("Running" in str(o.get("tp_status")) for o in outs[:-1])
    with pytest.raises(gr.Error, match="Tick at least one policy"):
        list(T.run_live(engine, LENGTH, 3, 25, [], [1]))
    with pytest.raises(gr.Error, match="Batch sizes"):
        list(T.run_live(engine, LENGTH, 3, 25, ["full"], [0]))


def test_stop_ends_the_worker_thread(engine):
    run = T.run_live(engine, LENGTH, 3, 25, ["full", "h2o", "d2o"], [1, 2, 3])
    assert "Starting" in next(run)["tp_status"]
    next(run)  # the worker is running
    run.close()  # what Gradio does on Stop
    deadline = time.monotonic() + 30
    while any(t.name == "throughput-live" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "throughput-live" for t in threading.enumerate())


def test_cli_writes_the_json(tmp_path, capsys):
    try:
        shape_models.tokenizer()
    except ValueError as exc:
        pytest.skip(f"no tokenizer for random: models here ({exc})")
    out = tmp_path / "tp.json"
    argv = ["throughput", "--model", "random:tiny", "--prompt-tokens", str(LENGTH), "--new-tokens", "3"]
    assert main([*argv, "--policies", "full,d2o", "--set", "d2o.variant=official", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["policy"] for r in doc["rows"]] == ["full", "d2o(variant=official)"] and doc["machine"][
        "shape_only"
    ]
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "the full cache's tokens/s" in printed


@pytest.mark.parametrize(
    "bad",
    [["--policies", ""], ["--batches", "1,x"], ["--batches", "0"], ["--budget", "2"], ["--set", "d2o=1"]],
)
def test_cli_rejects_bad_input_with_a_sentence(capsys, bad):
    assert main(["throughput", "--model", "random:tiny", *bad]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: ")


def test_results_rewrites_only_the_throughput_block_from_a_saved_file(tmp_path):
    saved, readme, stored = tmp_path / "saved.json", tmp_path / "README.md", tmp_path / "assets" / "tp.json"
    machine = {"model": "m", "dtype": "float32", "cpu": "c", "cores": 2, "device": "cpu"}
    doc = hand_doc() | {"prompt_tokens": 2048, "new_tokens": 32, "budget": 0.2, "kv_mb_cap": 100.0}
    saved.write_text(json.dumps(doc | {"wall_seconds": 300.0, "machine": machine}))
    text = "intro\n<!-- results:start -->\nold results\n<!-- results:end -->\n"
    readme.write_text(text + "<!-- throughput:start -->\nold\n<!-- throughput:end -->\nafter\n")
    argv = ["results", "--readme", str(readme), "--throughput-only", "--throughput-json", str(stored)]
    assert main([*argv, "--throughput-from", str(saved)]) == 0
    new = readme.read_text()
    assert new.startswith(text) and new.endswith("<!-- throughput:end -->\nafter\n") and "old\n" not in new
    assert "| d2o | 20 | 5 | 34 | 3.4 |" in new and "- d2o at the cap: 3.4x" in new and "batch 2 tok/s" in new
    assert json.loads(stored.read_text())["rows"] == doc["rows"]
    assert main(["results", "--readme", str(readme), "--throughput-from", str(saved)]) == 2
