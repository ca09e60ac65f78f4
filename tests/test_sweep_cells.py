"""Sweep cells on the tiny model: metrics, data files, RULER-style tasks, keys, resumable runs, the board.

The tiny random model scores ~0; these tests check the plumbing (records, keys, skipping, failures,
tables, figures) and the metrics and tasks on hand-made inputs. The Ray path is tests/test_sweep_ray.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter

import pytest
from helpers import fake_records

from d2o_core.eval import cells, data, executor, leaderboard, ruler, scoring, store

words = lambda s: len(s.split())  # a cheap tokenizer stand-in for the task generators
LENGTH = 300


# -- metrics ----------------------------------------------------------------------------------------


def test_token_f1_is_longbenchs_qa_f1_on_normalised_tokens():
    assert scoring.normalize_answer("The  Eiffel-Tower, in PARIS!") == "eiffeltower in paris"
    assert scoring.token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert scoring.token_f1("Paris.", "paris") == 1.0
    assert scoring.token_f1("London", "Paris") == 0.0 and scoring.token_f1("", "Paris") == 0.0
    assert scoring.token_f1("a an the", "the") == 0.0  # only articles: nothing left to share


def test_exact_and_contains_on_hand_made_outputs():
    assert scoring.exact("The Paris.", "paris") == 1.0 and scoring.exact("Paris, France", "Paris") == 0.0
    assert scoring.contains("It is 51573, I think", "51573") == 1.0
    assert (
        scoring.contains("The  pass\nKEY is", "pass key") == 1.0 and scoring.contains("5157", "51573") == 0.0
    )


def test_rouge_l_comes_from_rouge_score_and_several_answers_take_the_best():
    pytest.importorskip("rouge_score")
    # LCS "cat sat on mat" = 4 of 6 and 6 tokens: P = R = F = 2/3.
    assert scoring.rouge_l("the cat sat on the mat", "a cat sat on a mat") == pytest.approx(2 / 3)
    assert scoring.rouge_l("completely different", "a cat sat") == 0.0
    assert scoring.score("rouge", "a cat sat on a mat", ["dog", "a cat sat on a mat"]) == pytest.approx(1.0)
    assert (
        scoring.score("qa_f1", "Paris", ["London", "paris"]) == 1.0 and scoring.score("em", "x", ["y"]) == 0.0
    )
    with pytest.raises(ValueError, match="metric must be one of contains, exact, f1, rouge_l"):
        scoring.score("bleu", "x", ["x"])


# -- data files -------------------------------------------------------------------------------------


def write_rows(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    ("bad", "sentence"),
    [
        ({"context": "c", "answers": "x"}, "answers must be a list of strings."),
        ({"context": "c", "answers": ["x", 3]}, "answers must be a list of strings."),
        ({"context": "c", "answers": []}, "answers must hold at least one answer."),
        ({"answers": ["x"]}, "context is missing."),
        ({"context": "c"}, "answers is missing."),
        ({"context": ["c"], "answers": ["x"]}, "context must be a string."),
        ({"context": "c", "input": 7, "answers": ["x"]}, "question must be a string."),
        ({"context": "c", "answers": ["x"], "length": "long"}, "length must be a whole number."),
        (
            {"context": "c", "answers": ["x"], "metric": "bleu"},
            "metric must be one of contains, exact, f1, rouge_l.",
        ),
        ('{"context": "c", "answers": ["x"]', "not valid JSON"),
        ("[1, 2]", "each line must be one JSON object"),
    ],
)
def test_a_bad_data_file_gets_one_sentence_naming_its_line_and_field(tmp_path, bad, sentence):
    good = {"context": "fine", "answers": ["a"], "id": "first"}
    path = write_rows(tmp_path / "mine.jsonl", [good, "", bad])  # a blank line in between still counts
    with pytest.raises(ValueError) as info:
        data.load_jsonl(path)
    message = str(info.value)
    assert message.startswith("mine.jsonl line 3: ") and sentence in message
    assert message.count(". ") == 0 and message.endswith(".") and "\n" not in message


def test_longbench_and_ruler_rows_read_as_they_are(tmp_path):
    longbench = {"input": "Who?", "context": "Ann met Bob.", "answers": ["Bob"], "length": 3, "dataset": "qa",
                 "language": "en", "all_classes": None, "_id": "abc"}  # fmt: skip
    ruler_row = {"index": 0, "input": "The key is 7. What is the key?", "outputs": ["7"], "length": 12}
    rows = data.load_jsonl(write_rows(tmp_path / "mix.jsonl", [longbench, ruler_row]))
    assert (rows[0].task, rows[0].id, rows[0].question, rows[0].answers) == ("qa", "abc", "Who?", ("Bob",))
    assert rows[0].prompt() == "Ann met Bob.\n\nWho?"
    assert (rows[1].task, rows[1].id, rows[1].question, rows[1].length) == ("mix", "2", None, 12)
    assert rows[1].prompt() == "The key is 7. What is the key?"
    dup = write_rows(tmp_path / "dup.jsonl", [{"context": "a", "answers": ["x"], "id": 1}] * 2)
    with pytest.raises(ValueError, match="dup.jsonl line 2: id '1' repeats line 1"):
        data.load_jsonl(dup)


# -- synthetic tasks --------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ruler.RULER_TASKS)
def test_new_synthetic_tasks_are_deterministic_from_their_seed_and_hold_their_answers(task):
    sample = ruler.make_sample(task, 800, 0.4, 7, words)
    assert sample == ruler.make_sample(task, 800, 0.4, 7, words)
    assert sample.answers and all(a in sample.prompt for a in sample.answers)
    assert 0.9 * 800 <= sample.n_tokens <= 800
    others = {ruler.make_sample(task, 800, 0.4, seed, words).answer for seed in range(5)}
    assert len(others) == 5  # the seed picks the needles and words
    assert ruler.score(sample, "Sure: " + " ".join(sample.answers)) == 1.0
    assert ruler.score(sample, "no idea") == 0.0


def test_needle_tasks_ask_for_the_needle_at_the_depth_and_distract_with_the_others():
    single = ruler.make_sample("niah_single", 800, 0.25, 1, words)
    offset = single.prompt.index(single.answer) / len(single.prompt)
    assert abs(offset - 0.25) < 0.05 and "Some special magic numbers" in single.prompt
    multikey = ruler.make_sample("niah_multikey", 800, 0.5, 1, words)
    assert multikey.prompt.count("One of the special magic numbers for") == 4 and len(multikey.answers) == 1
    multivalue = ruler.make_sample("niah_multivalue", 800, 0.5, 1, words)
    key = re.search(r"numbers for (\S+) is", multivalue.prompt).group(1)
    assert multivalue.prompt.count(f"numbers for {key} is: ") == 4 and len(multivalue.answers) == 4
    multiquery = ruler.make_sample("niah_multiquery", 800, 0.5, 1, words)
    assert len(multiquery.answers) == 4 and multiquery.prompt.rstrip().endswith(
        "mentioned in the provided text?"
    )


def test_aggregation_tasks_ask_for_the_words_that_are_really_most_common():
    cwe = ruler.make_sample("cwe", 1500, 0.5, 3, words)
    counts = Counter(re.findall(r"^\d+\. (\w+)$", cwe.prompt, re.M))
    top = sorted(counts, key=counts.get, reverse=True)[:10]
    assert set(top) == set(cwe.answers) and min(counts[a] for a in cwe.answers) > max(
        c for w, c in counts.items() if w not in cwe.answers
    )
    fwe = ruler.make_sample("fwe", 1500, 0.5, 3, words)
    counts = Counter(fwe.prompt.split("\n\n")[1].split())
    assert [w for w, _ in counts.most_common(3)] == list(fwe.answers)
    assert counts.most_common(4)[2][1] > counts.most_common(4)[3][1]
    assert math.isnan(cwe.depth) and ruler.make_sample("cwe", 1500, 0.9, 3, words).prompt == cwe.prompt


# -- cells, keys, resumable runs --------------------------------------------------------------------


def small_plan(**kwargs):
    configs = cells.parse_configs(["full", "h2o", "d2o:official"])
    args = dict(tasks=["passkey"], lengths=[LENGTH], depths=[0.5], max_new_tokens=2) | kwargs
    return cells.plan("tiny", configs, [0.25, 0.5], **args)


def test_cells_have_stable_keys_from_their_settings_and_full_runs_once():
    plan = small_plan()
    assert [(c.settings["policy"], c.settings["budget"]) for c in plan] == [
        ("full", 1.0), ("h2o", 0.25), ("h2o", 0.5), ("d2o", 0.25), ("d2o", 0.5),
    ]  # fmt: skip
    assert [c.key for c in plan] == [c.key for c in small_plan()]  # the same settings, the same keys
    assert len({c.key for c in plan}) == 5 and plan[3].settings["policy_settings"] == {"variant": "official"}
    assert {c.key for c in small_plan(max_new_tokens=3)}.isdisjoint(c.key for c in plan)
    assert cells.parse_configs(["d2o:variant=official"])[0] == cells.parse_configs(["d2o:official"])[0]
    with pytest.raises(ValueError, match="has no setting nope"):
        cells.parse_configs(["h2o:nope=1"])
    with pytest.raises(ValueError, match="once"):
        cells.parse_configs(["h2o", "h2o"])


def test_a_data_rows_key_follows_its_content(tmp_path):
    rows = [{"context": "Ann met Bob.", "question": "Who?", "answers": ["Bob"], "id": "q1", "metric": "f1"}]
    first = cells.plan("tiny", cells.parse_configs(["h2o"]), [0.5], examples=data.load_jsonl(
        write_rows(tmp_path / "a.jsonl", rows)))  # fmt: skip
    rows[0]["answers"] = ["Ann"]
    second = cells.plan("tiny", cells.parse_configs(["h2o"]), [0.5], examples=data.load_jsonl(
        write_rows(tmp_path / "a.jsonl", rows)))  # fmt: skip
    assert first[0].settings["metric"] == "f1" and first[0].settings["sample"] == "q1"
    assert first[0].key != second[0].key


def test_every_finished_cell_is_stored_at_once_and_a_rerun_computes_none(tiny, tmp_path, monkeypatch):
    plan = small_plan()
    seen = []
    real = store.write_record
    monkeypatch.setattr(
        store, "write_record", lambda out, r: seen.append(len(store.finished_keys(out))) or real(out, r)
    )
    first = executor.execute(plan, tmp_path, lambda: tiny, progress=False)
    assert (first.planned, first.skipped, first.done, first.failed) == (5, 0, 5, 0)
    assert seen == [0, 1, 2, 3, 4]  # each record lands before the next cell runs
    record = json.loads(next((tmp_path / "cells").glob("*.json")).read_text())
    assert record["format"] == cells.FORMAT and record["key"] == cells.cell_key(record["settings"])
    assert {"d2o_core", "torch", "transformers"} <= set(record["versions"]) and record["versions"]["d2o_core"]
    assert {"platform", "cpus", "gpu"} <= set(record["machine"]) and record["model"]["name"] == tiny.name
    assert {"score", "kv_mb", "tokens_per_second", "output"} <= set(record["result"])
    again = executor.execute(plan, tmp_path, lambda: pytest.fail("nothing is left to load a model for"))
    assert (again.skipped, again.done) == (5, 0)


def test_a_failing_cell_is_noted_the_others_finish_and_a_rerun_retries_it(tiny, tmp_path, monkeypatch):
    plan = small_plan(tasks=["passkey", "niah_single"], lengths=[LENGTH])  # niah needs more than 300 tokens
    out = executor.execute(plan, tmp_path, lambda: tiny, progress=False)
    assert (out.done, out.failed) == (5, 5) and "too small for task 'niah_single'" in out.errors[0]
    failed = sorted(p.stem for p in (tmp_path / "failed").glob("*.json"))
    assert failed == sorted(c.key for c in plan if c.settings["task"] == "niah_single")
    calls = []
    monkeypatch.setattr(
        executor, "try_cell", lambda lm, cell, samples: calls.append(cell.key) or (None, {"error": "x"})
    )
    executor.execute(plan, tmp_path, lambda: tiny, progress=False)
    assert sorted(calls) == failed  # only the failed cells run again


def test_a_data_row_over_the_limit_loses_the_middle_of_its_context(tiny, tmp_path):
    lm = dataclasses.replace(tiny, max_prompt_tokens=200)
    rows = [{"context": "A" * 150 + "B" * 150, "question": "Which?", "answers": ["A"], "id": "long"}]
    plan = cells.plan("tiny", cells.parse_configs(["full"]), [0.5], examples=data.load_jsonl(
        write_rows(tmp_path / "d.jsonl", rows)), max_new_tokens=2)  # fmt: skip
    record = cells.run_cell(lm, plan[0])
    assert record["result"]["prompt_tokens"] <= 200 and record["result"]["truncated_tokens"] > 100
    assert record["settings"]["source"] == "data" and record["result"]["answers"] == ["A"]


def test_a_data_rows_question_is_read_after_its_context_is_compressed(tiny, tmp_path, monkeypatch):
    rows = [
        {
            "context": "Ann met Bob at the fair. " * 4,
            "question": "Who met Ann?",
            "answers": ["Bob"],
            "id": "q",
        }
    ]
    plan = cells.plan("tiny", cells.parse_configs(["h2o"]), [0.3], examples=data.load_jsonl(
        write_rows(tmp_path / "q.jsonl", rows)), max_new_tokens=2)  # fmt: skip
    seen = {}
    real = cells.generate
    monkeypatch.setattr(cells, "generate", lambda lm, prompt, policy, **kw: seen.update(prompt=prompt, **kw)
                        or real(lm, prompt, policy, **kw))  # fmt: skip
    record = cells.run_cell(tiny, plan[0])
    assert seen["question"] == "Who met Ann?" and "Who met Ann?" not in seen["prompt"]
    assert record["settings"]["question_kept_whole"] is True


# -- the leaderboard --------------------------------------------------------------------------------


def test_board_averages_the_task_means_and_keeps_cost_beside_the_score():
    b = leaderboard.board(store.frame(fake_records()))
    average = b[b["task"] == leaderboard.AVERAGE].set_index(["config", "budget"])
    assert average.loc[("full", 1.0), "score"] == pytest.approx(0.9)
    assert average.loc[("h2o", 0.2), "score"] == pytest.approx(0.3)
    assert average.loc[("h2o", 0.4), "kv_mb"] == pytest.approx(4.0)
    assert list(b["config"])[:1] == ["full"] and set(b["task"]) == {"average", "kv", "qa"}
    titles = list(leaderboard.tables(b))
    assert titles[0] == "Score averaged over 2 task(s), by budget"
    assert list(leaderboard.tables(b)[titles[0]].columns) == ["config", "20%", "40%", "100%"]


def test_leaderboard_figures_and_html_draw_every_configuration_once_offline():
    pytest.importorskip("plotly")
    from ui.figures import leaderboard as figures  # noqa: PLC0415
    from ui.leaderboard_html import leaderboard_html  # noqa: PLC0415

    df = store.frame(fake_records())
    b = leaderboard.board(df)
    overview = figures.overview(b)
    names = [t.name for t in overview.data if t.showlegend]
    assert names == ["full", "h2o"] and len(overview.data) == 2 * 3
    full = next(t for t in overview.data if t.name == "full")
    assert list(full.x) == [0.2, 1.0] and full.line.dash == "dash"  # one budget: a level line
    assert len(figures.per_task(b).layout.annotations) == 3  # average, kv, qa
    page = leaderboard_html(df, "My <board>")
    assert page.count("<script") == 3 and "My &lt;board&gt;" in page and "machines: 1" in page


def test_sweep_tab_opens_a_results_folder_or_uploaded_records(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    import gradio as gr  # noqa: PLC0415

    from ui import sweep_tab  # noqa: PLC0415

    for record in fake_records():
        store.write_record(tmp_path, record)
    page = sweep_tab.open_results([], str(tmp_path))
    assert "Opened 6 cells" in page["board_status"] and len(page["board_table"]) == 3
    # Its table names its columns in words, budgets in % (as the rest of the page says them).
    assert list(page["board_table"].columns) == list(sweep_tab.BOARD_HEADERS)
    assert sorted(page["board_table"]["KV budget %"]) == [20, 40, 100]
    jsonl = tmp_path / "all.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in fake_records()))
    assert "Opened 6 cells" in sweep_tab.open_results([str(jsonl)], "")["board_status"]
    monkeypatch.setenv("SPACE_ID", "someone/space")
    with pytest.raises(gr.Error, match="cannot read folders"):
        sweep_tab.open_results([], str(tmp_path))
    other = tmp_path / "other.json"
    other.write_text('{"not": "a record"}')
    with pytest.raises(gr.Error, match="No sweep cell records"):
        sweep_tab.open_results([str(other)], "")
