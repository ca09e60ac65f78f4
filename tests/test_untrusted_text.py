"""Untrusted text stays text: a run file full of markup fills the page with no live element.

A run file is anyone's JSON. Every string in it (model name, created date, labels, settings.policy,
texts, prompt tokens, event tokens, the file's own name) reaches the page through `ui/safe_text.py`:
Markdown outputs render it as the characters it holds, plotly figures carry no tag the figure code
did not write, and an error quoting the file goes out escaped. `tests/test_e2e_hostile.py` uploads
the same file in a real browser and looks at the DOM. Outside the page: `show` prints control
characters as visible escapes, and events.csv keeps formulas from running in a spreadsheet.
"""

from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import pytest
from helpers import TEXT, figure_data
from markdown_it import MarkdownIt

import d2o_core
from d2o_core import __main__ as cli
from d2o_core import run_summary, runfile
from ui import compare_run as H
from ui import throughput_tab as T
from ui.open_run import open_run
from ui.safe_text import html_text, markdown_text

PAYLOADS = (
    '<svg><a href="javascript:alert(1)"><text>x</text></a></svg>',
    '<div style="position:fixed;inset:0;background:red">',
    "<form><input type=password></form>",
    '<img src="http://example.invalid/x.png">',
    "[x](javascript:alert(1))",
    "![](http://example.invalid/a.png)",
    "<http://example.invalid> www.example.invalid mail@example.invalid",
    "$$\\href{javascript:alert(1)}{x}$$ %%%LATEX_BLOCK_0%%% **b** `c`",
    "```mermaid\ngraph TD; A-->B\n```",
)
HOSTILE = " ".join(PAYLOADS)
FILE_NAME = "<img src=x onerror=alert(1)>[x](javascript:alert(1)).json"  # a name has no slash
MARKDOWN_OUTPUTS = ("status", "title:", "stats:")  # gr.Markdown components of the Compare tab
TEXT_OUTPUTS = ("text:", "prompt", "question")  # Textboxes: their value is text whatever it holds
FIGURE_TAGS = {"br", "b", "s", "extra"}  # the only tags the figure code writes in plotly's text
LIVE_HTML = re.compile(r"<\s*/?\s*(svg|a|form|img|input|div|iframe|object|embed|style|script)\b", re.I)
AUTOLINK = re.compile(r"javascript:|https?:|www\.|(?<!\\)@|\$\$|```|%%%", re.I)
MARKDOWN = MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough")


def compared(lm) -> dict:
    """A small comparison (four columns, merges included) to dress up as a hostile file."""
    policies = [d2o_core.POLICIES[n](budget=0.3) for n in ("full", "h2o", "d2o", "cam")]
    return d2o_core.compare(lm, TEXT, policies, max_new_tokens=4)


@pytest.fixture(scope="module")
def results(tiny):
    return compared(tiny)


def hostile_run(results: dict, folder: Path) -> Path:
    """A valid run file of `results` whose every string carries markup (see PAYLOADS)."""
    doc = json.loads(
        runfile.save_run(
            results, {"model": HOSTILE, "prompt": HOSTILE, "question": HOSTILE, "max_new_tokens": 4}
        )
    )
    doc["meta"]["created"] = HOSTILE
    renamed = {}
    for i, (label, rec) in enumerate(doc["results"].items()):
        new = label if i == 0 else f"{label} {HOSTILE}"  # the first keeps a plain label, the rest not
        rec["label"], rec["text"] = new, HOSTILE
        rec["metrics"]["model"] = HOSTILE
        if i == len(doc["results"]) - 1:
            rec["settings"]["policy"] = HOSTILE  # a policy no registry knows
        for name in ("prompt_tokens", "generated_tokens"):
            rec[name] = [PAYLOADS[j % len(PAYLOADS)] for j in range(len(rec[name]))]
        for row in rec["events"]:
            row["token"] = PAYLOADS[row["position"] % len(PAYLOADS)]
        renamed[new] = rec
    doc["results"] = renamed
    path = folder / FILE_NAME
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def assert_markdown_is_text(source: str, where: str) -> None:
    """The Markdown source renders to no element but its own paragraph or heading, and links nothing."""
    rendered = MARKDOWN.render(source)
    assert not LIVE_HTML.search(rendered), (where, rendered)
    assert not AUTOLINK.search(source), (where, source)  # escaped forms are "javascript\:", "\$\$", ...


def figure_strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in figure_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in figure_strings(v)]
    return []


def assert_figure_is_text(fig: go.Figure, where: str) -> None:
    """Every tag in the figure's text (titles, legends, ticks, hover, cells) is one the figure code wrote."""
    for text in figure_strings(figure_data(fig)):
        tags = {t.lower() for t in re.findall(r"<\s*/?\s*([a-zA-Z]+)", text)}
        assert tags <= FIGURE_TAGS, (where, text)


def assert_page_is_text(out: dict) -> None:
    for key, value in out.items():
        if isinstance(value, go.Figure):
            assert_figure_is_text(value, key)
        elif isinstance(value, str):
            assert key.startswith(MARKDOWN_OUTPUTS + TEXT_OUTPUTS), (
                f"{key}: an output this test does not know"
            )
            if key.startswith(MARKDOWN_OUTPUTS):
                assert_markdown_is_text(value, key)


def test_the_escapes_render_as_exactly_the_characters_given():
    for payload in (*PAYLOADS, "a\\b", "C# & <b>", "3.4x at 20 % (batch 5)"):
        rendered = MARKDOWN.render("### " + markdown_text(payload))
        assert html.unescape(re.sub(r"</?h3>", "", rendered)).strip() == " ".join(payload.split())
    assert html_text('<a href="x">&</a>') == '&lt;a href="x"&gt;&amp;&lt;/a&gt;'


def test_opening_a_hostile_run_file_shows_its_strings_as_text_everywhere(results, tmp_path):
    out = open_run(str(hostile_run(results, tmp_path)))
    assert_page_is_text(out)
    # ... and the strings are there, as text: the status names the file, the model and the date.
    status = html.unescape(re.sub(r"<[^>]+>", "", MARKDOWN.render(out["status"])))
    assert FILE_NAME in status and status.count(PAYLOADS[0]) == 2
    titles = [out[f"title:{i}"] for i in range(len(results))]
    assert all(t.startswith("### ") for t in titles) and PAYLOADS[0] in html.unescape(
        MARKDOWN.render(titles[1])
    )
    assert out["text:0"] == HOSTILE and out["prompt"] == HOSTILE  # Textboxes hold the text itself
    state = out["state"]
    for label in state["results"]:  # the pickers redraw every per-policy figure from the same file
        assert_page_is_text(H.policy_views(state, label, 1, 1))


def refused_run(results: dict, folder: Path, field: str = "schema_version") -> Path:
    """A run file the app refuses with a sentence that quotes the offending (hostile) value."""
    doc = json.loads(runfile.save_run(results, {"model": "m"}))
    if field == "schema_version":
        doc["schema_version"] = PAYLOADS[3]
    else:
        next(iter(doc["results"].values()))["metrics"]["n_layers"] = "<svg><a href=javascript:alert(1)>"
    path = folder / "refused.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@pytest.mark.parametrize("field", ["schema_version", "metrics"])
def test_an_error_quoting_a_hostile_file_is_escaped(results, tmp_path, field):
    with pytest.raises(gr.Error) as page:
        open_run(str(refused_run(results, tmp_path, field)))
    message = page.value.message  # the page renders it as HTML
    assert not re.search(r"<[a-zA-Z/]", message) and "&lt;" in message, message


def test_the_throughput_tab_shows_its_document_as_text():
    doc, _ = T.load_stored()
    doc = json.loads(json.dumps(doc))
    doc["machine"] |= {"model": HOSTILE, "cpu": HOSTILE, "device": HOSTILE}
    doc["date"] = HOSTILE
    for row in doc["rows"]:
        if row["policy"] == "h2o":
            row["policy"] = f"h2o {PAYLOADS[0]}"
    out = T.view(doc, T._source(doc, "Stored results"))
    for key in ("tp_status", "tp_explain"):
        for line in out[key].split("\n"):
            assert_markdown_is_text(line.removeprefix("- "), key)
    assert_figure_is_text(out["tp_bars"], "tp_bars")
    assert_figure_is_text(out["tp_lines"], "tp_lines")


def test_cli_show_prints_a_files_control_characters_as_visible_escapes(results, tmp_path, capsys):
    doc = json.loads(runfile.save_run(results, {"model": "\x1b]0;renamed window\x07m", "prompt": "p"}))
    for rec in doc["results"].values():
        rec["text"] = "kept\x1b[2J\x1b[31mred\rover\x08\x9b1mC1\nnext line\tcell"
    doc["results"] = {f"\x1b[8m{label}": rec for label, rec in doc["results"].items()}
    path = tmp_path / "escapes.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    assert cli.main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", out)  # newlines and tabs only
    assert "kept\\x1b[2J\\x1b[31mred\\x0dover\\x08\\x9b1mC1\nnext line\tcell" in out
    assert "\\x1b]0;renamed window\\x07m" in out and "=== \\x1b[8mfull ===" in out


FORMULAS = ('=HYPERLINK("http://example.invalid","x")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\t=1")


def test_events_csv_keeps_spreadsheet_formulas_as_text(results):
    doc = json.loads(runfile.save_run(results))
    doc["results"] = {FORMULAS[i % 2] + label: rec for i, (label, rec) in enumerate(doc["results"].items())}
    for rec in doc["results"].values():
        for row in rec["events"]:
            row["token"] = FORMULAS[row["position"] % len(FORMULAS)]
    back, _ = runfile.load_run(json.dumps(doc))
    text = run_summary.events_csv(back)
    table = pd.read_csv(io.StringIO(text), keep_default_na=False)
    for column in ("policy", "kind", "token"):
        assert not table[column].str.startswith(("=", "+", "-", "@", "\t", "\r")).any(), column
    assert set(table["token"]) == {"'" + f for f in FORMULAS}
    assert table["score"].dtype == float and table["target_position"].min() == -1  # numbers stay numbers
