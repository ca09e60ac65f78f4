"""Sweeps on the tiny random model: tidy rows, one shared prefill per sample, scores, the CLI, README block.

A tiny random model scores ~0 on the tasks; these tests check the plumbing, not the numbers.
With the CharTokenizer one character is one token, and the smallest task prompts take ~240.
"""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
from helpers import TEXT

from d2o_core import models, runner
from d2o_core.__main__ import main
from d2o_core.eval import readme_tables, store, sweep, tasks
from d2o_core.policies import build

LENGTH = 300
SMALL = dict(tasks=["passkey", "kv"], lengths=[LENGTH], depths=[0.5], budgets=[0.25, 0.5])


@pytest.fixture(scope="module")
def frame(tiny):
    return sweep.run_sweep(tiny, **SMALL, policy_names=["full", "h2o", "d2o"], samples=1, max_new_tokens=4)


def test_run_sweep_has_one_row_per_sample_policy_and_budget(frame):
    assert list(frame.columns) == list(sweep.SWEEP_COLUMNS)
    assert len(frame) == 2 * (1 + 2 * 2)
    for _, rows in frame.groupby(["task", "target_tokens", "depth", "sample"]):
        pairs = sorted(zip(rows["policy"], rows["budget"]))
        assert pairs == [("d2o", 0.25), ("d2o", 0.5), ("full", 1.0), ("h2o", 0.25), ("h2o", 0.5)]


def test_sweep_rows_carry_their_own_policy_metrics(frame):
    full = frame[frame["policy"] == "full"]
    assert (full["kv_fraction"] == 1.0).all() and (full["token_agreement"] == 1.0).all()
    assert (full["mean_kl_to_full"] == 0.0).all()
    for (task, policy), rows in frame[frame["policy"] != "full"].groupby(["task", "policy"]):
        rows = rows.sort_values("budget")
        assert list(rows["kv_fraction"]) == sorted(rows["kv_fraction"]), (task, policy)
        assert (rows["kv_fraction"] <= rows["budget"] + 0.02).all()
    assert (frame["prompt_tokens"] <= LENGTH).all() and (frame["prompt_tokens"] > LENGTH - 20).all()
    assert set(frame["answer"]) == {
        tasks.make_sample(t, LENGTH, 0.5, 0, len).answer for t in ("passkey", "kv")
    }


def test_score_is_tasks_score_of_each_policys_own_output(tiny, monkeypatch):
    real = runner.compare

    def h2o_answers(lm, prompt, policies, **kwargs):  # only h2o@25% "finds" the answer
        results = real(lm, prompt, policies, **kwargs)
        sample = next(s for s in suite if s.prompt == prompt)
        results["h2o@25%"].text = f"it is {sample.answer}."
        return results

    suite = tasks.make_suite(SMALL["tasks"], [LENGTH], [0.5], 1, 0, len)
    monkeypatch.setattr(sweep, "compare", h2o_answers)
    df = sweep.run_sweep(tiny, **SMALL, policy_names=["full", "h2o"], samples=1, max_new_tokens=3)
    hit = (df["policy"] == "h2o") & (df["budget"] == 0.25)
    assert (df.loc[hit, "score"] == 1.0).all() and (df.loc[~hit, "score"] == 0.0).all()
    by_task = {s.task: s for s in suite}
    assert all(tasks.score(by_task[r.task], r.output) == r.score for r in df.itertuples())


def test_every_sample_is_one_compare_call_with_the_full_cache_once(tiny, monkeypatch):
    calls = []

    def spy(lm, prompt, policies, **kwargs):
        calls.append([(p.name, p.budget) for p in policies])
        return runner.compare(lm, prompt, policies, **kwargs)

    monkeypatch.setattr(sweep, "compare", spy)
    progress = []
    sweep.run_sweep(
        tiny, ["kv"], [LENGTH], [0.2, 0.8], [0.3, 1.0], ["streaming"], 1, max_new_tokens=2,
        progress=lambda *a: progress.append(a),
    )  # fmt: skip
    assert calls == [[("full", 1.0), ("streaming", 0.3), ("streaming", 1.0)]] * 2
    assert [p[:2] for p in progress] == [(0, 2), (1, 2), (2, 2)]


def test_full_rows_only_when_asked_but_fidelity_is_still_measured(tiny):
    df = sweep.run_sweep(tiny, ["kv"], [LENGTH], [0.5], [0.5], ["h2o"], 1, max_new_tokens=4)
    assert list(df["policy"]) == ["h2o"]
    assert math.isfinite(df["token_agreement"].iloc[0]) and math.isfinite(df["mean_kl_to_full"].iloc[0])


def test_run_sweep_is_deterministic(tiny, frame):
    again = sweep.run_sweep(tiny, **SMALL, policy_names=["full", "h2o", "d2o"], samples=1, max_new_tokens=4)
    timing = ["decode_ms_per_token"]
    pd.testing.assert_frame_equal(frame.drop(columns=timing), again.drop(columns=timing))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(policy_names=["full", "nope"]), "Choose policies"),
        (dict(policy_names=[]), "Choose policies"),
        (dict(policy_names=["h2o", "h2o"]), "once"),
        (dict(budgets=[0.0]), r"\(0, 1\]"),
        (dict(budgets=[1.5]), r"\(0, 1\]"),
        (dict(budgets=[]), r"\(0, 1\]"),
        (dict(budgets=[0.2, 0.2]), "once"),
        (dict(tasks=["nope"]), "Choose tasks"),
        (dict(lengths=[10_000]), "limit"),
    ],
)
def test_run_sweep_rejects_bad_input(tiny, kwargs, message):
    args = dict(SMALL, policy_names=["full", "h2o"], samples=1) | kwargs
    with pytest.raises(ValueError, match=message):
        sweep.run_sweep(tiny, **args)


def test_fidelity_sweep_has_one_row_per_policy_and_budget(tiny):
    steps = []
    df = sweep.fidelity_sweep(
        tiny, TEXT, [0.25, 0.5], ["full", "streaming", "h2o"], 6, progress=lambda *a: steps.append(a)
    )
    assert list(df.columns) == list(sweep.FIDELITY_COLUMNS)
    assert list(zip(df["policy"], df["budget"])) == [
        ("full", 1.0), ("streaming", 0.25), ("streaming", 0.5), ("h2o", 0.25), ("h2o", 0.5),
    ]  # fmt: skip
    assert df["token_agreement"].iloc[0] == 1.0 and df["kv_fraction"].iloc[0] == 1.0
    for name in ("streaming", "h2o"):
        rows = df[df["policy"] == name]
        assert rows["kv_fraction"].iloc[0] < rows["kv_fraction"].iloc[1] < 1.0
    solo = runner.generate(tiny, TEXT, build("h2o", 0.25), max_new_tokens=6, chat=True)
    assert df["text"].iloc[3] == solo.text
    assert max(s[0] for s in steps) == 5 and all(s[1] == 6 for s in steps)


def test_cli_sweep_stores_one_record_per_cell_writes_the_csv_and_prints_the_board(cli_tiny, tmp_path, capsys):
    csv, out = tmp_path / "sweep.csv", tmp_path / "runs"
    argv = [
        "sweep",
        "--tasks",
        "kv",
        "--lengths",
        str(LENGTH),
        "--budgets",
        "0.25,0.5",
        "--policies",
        "full,h2o",
    ]
    argv += [
        "--samples",
        "2",
        "--depths",
        "0.5",
        "--max-new-tokens",
        "3",
        "--csv",
        str(csv),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    df = pd.read_csv(csv)
    assert list(df.columns)[: len(store.COLUMNS)] == list(store.COLUMNS)
    assert len(df) == 2 * 3 and sorted(set(df["sample"])) == [0, 1]
    assert (df.groupby("sample")["policy"].apply(lambda p: (p == "full").sum()) == 1).all()
    assert sorted(p.stem for p in (out / "cells").glob("*.json")) == sorted(df["key"])
    out_text = capsys.readouterr().out
    assert "Score averaged over 1 task(s)" in out_text and "h2o" in out_text and "kv" in out_text
    assert main(argv) == 0  # a rerun finds every cell and computes none
    assert "6 cells, 6 already done, 0 computed" in capsys.readouterr().err
    assert len(list((out / "runs").glob("*.json"))) == 2


def test_cli_leaderboard_prints_the_board_and_writes_one_offline_html(cli_tiny, tmp_path, capsys):
    out, html = tmp_path / "runs", tmp_path / "board.html"
    argv = [
        "sweep",
        "--tasks",
        "passkey",
        "--lengths",
        str(LENGTH),
        "--budgets",
        "0.5",
        "--policies",
        "full,h2o",
    ]
    assert main([*argv, "--depths", "0.5", "--max-new-tokens", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["leaderboard", str(out), "--html", str(html), "--jsonl", str(tmp_path / "all.jsonl")]) == 0
    assert "2 cells: 1 model(s), 1 task(s), 2 policy configuration(s)" in capsys.readouterr().out
    page = html.read_text()
    assert page.count("<script") == 1 + 2  # plotly.js once, then the 2 figures
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I), "an external script"
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "bad",
    [
        ["--budgets", "0,0.5"],
        ["--budgets", "a,b"],
        ["--policies", "full,nope"],
        ["--policies", "h2o:nope=1"],
        ["--tasks", "nope"],
        ["--data", "missing.jsonl"],
    ],
)
def test_cli_sweep_rejects_bad_input_before_loading(monkeypatch, capsys, bad, tmp_path):
    def fail(*args, **kwargs):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr(models, "load_model", fail)
    assert main(["sweep", *bad, "--out", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_sweep_says_in_one_sentence_which_line_and_field_of_a_data_file_is_bad(
    monkeypatch, capsys, tmp_path
):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    mine = tmp_path / "mine.jsonl"
    rows = [
        {"context": "a", "answers": ["x"]},
        {"context": "b", "answers": ["y"]},
        {"context": "c", "answers": "z"},
    ]
    mine.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["sweep", "--data", str(mine), "--out", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == "error: mine.jsonl line 3: answers must be a list of strings.\n"


def test_replace_block_replaces_only_between_the_markers():
    text = f"# T\n\nintro\n{readme_tables.START}\nold 1\nold 2\n{readme_tables.END}\nrest\n"
    assert (
        readme_tables.replace_block(text, "new\n")
        == f"# T\n\nintro\n{readme_tables.START}\nnew\n{readme_tables.END}\nrest\n"
    )
    assert readme_tables.replace_block(text.replace(readme_tables.END, ""), "new") is None
    assert readme_tables.replace_block(f"{readme_tables.END}\n{readme_tables.START}\n", "new") is None
    assert readme_tables.replace_block(text + readme_tables.START + "\n", "new") is None


def test_markdown_formats_numbers_and_missing_values():
    df = pd.DataFrame({"policy": ["h2o"], "n": [512], "x": [0.123456], "big": [2048.4], "kl": [math.nan]})
    assert (
        readme_tables.markdown(df)
        == "| policy | n | x | big | kl |\n| --- | --- | --- | --- | --- |\n| h2o | 512 | 0.123 | 2048 | – |"
    )


@pytest.fixture
def small_results(cli_tiny, monkeypatch):
    config = dict(SMALL, tasks=("kv",), samples=1, budgets=(0.5,), policy_names=("full", "h2o"))
    monkeypatch.setattr(readme_tables, "RESULTS_SWEEP", config | dict(max_new_tokens=3, seed=0))
    bench = dict(
        prompt_tokens=(LENGTH,), budget=0.5, new_tokens=2, repeats=1, load=False, policy_names=("full", "h2o")
    )
    monkeypatch.setattr(readme_tables, "RESULTS_BENCH", bench)
    throughput = dict(prompt_tokens=LENGTH, budget=0.5, new_tokens=2, policies=("full", "h2o"), batches=(1,))
    monkeypatch.setattr(readme_tables, "RESULTS_THROUGHPUT", throughput)


def test_results_rewrites_the_readme_block_and_writes_the_files(small_results, tmp_path):
    before, after = (
        "# Title\n\nintro\n" + readme_tables.START + "\n",
        readme_tables.END + "\n\n## Next\nrest\n",
    )
    readme = tmp_path / "README.md"
    readme.write_text(before + "old results\n" + after)
    assert main(["results", "--readme", str(readme), "--out", str(tmp_path / "out")]) == 0
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after) and "old results" not in text
    block = text[len(before) : -len(after)]
    assert f"| policy | budget | kv {LENGTH} |" in block and "| h2o | 50 % |" in block
    assert "tiny-4x4q2kv" in block and "cores" in block
    # The targets are judged at 2048 tokens and 20 % only; this small run marks them "not measured".
    assert "compare/single" in block and "prefill H2O/full <= 1.10" in block and "n/a" in block
    assert len(pd.read_csv(tmp_path / "out" / "sweep.csv")) == 2
    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert {"compare_seconds", "single_full_seconds", "prompt_tokens", "full", "h2o", "runs"} <= set(doc)
    stored = json.loads((tmp_path / "assets" / "throughput.json").read_text())  # beside the README
    modes = [(r["policy"], r["mode"]) for r in stored["rows"]]
    assert modes == [("full", "cap"), ("h2o", "cap"), ("full", "sweep"), ("h2o", "sweep")]


def test_results_without_markers_prints_the_tables_and_leaves_the_file(small_results, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\nno markers here\n")
    assert main(["results", "--readme", str(readme), "--out", str(tmp_path / "out")]) == 0
    assert readme.read_text() == "# Title\nno markers here\n"
    captured = capsys.readouterr()
    assert f"| policy | budget | kv {LENGTH} |" in captured.out and "was not changed" in captured.out
    assert "no <!-- results:start -->" in captured.err


@pytest.mark.integration
def test_cli_sweep_on_the_bundled_model(bundled, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: bundled)
    csv = tmp_path / "sweep.csv"
    argv = ["sweep", "--tasks", "passkey", "--lengths", "256", "--budgets", "0.5", "--policies", "full,h2o"]
    assert (
        main([*argv, "--depths", "0.5", "--max-new-tokens", "12", "--csv", str(csv), "--out", str(tmp_path)])
        == 0
    )
    df = pd.read_csv(csv)
    assert list(df["policy"]) == ["full", "h2o"]
    assert 200 < df["prompt_tokens"].iloc[0] <= 256 + 40  # the chat template adds ~30 tokens
    assert df["kv_fraction"].iloc[1] == pytest.approx(0.5, abs=0.05)
    assert set(df["score"]) <= {0.0, 1.0} and df["output"].str.len().min() > 0
