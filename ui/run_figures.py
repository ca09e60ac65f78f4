"""The figures of a finished comparison, from its results alone (no gradio, no I/O).

What this module is: the few builders that combine a run's frames (budgets, drift, the prompt's
attention, what each column kept, the step-0 compression, survival with the generated tokens) before
handing them to `ui/figures/`, and `marks`, the spans those views outline (the question kept whole,
and for the built-in tasks the needle, its answer and the task's question); the page
(`compare_run.py`) and the offline HTML report (`report_html.py`) both draw through them, so the two
always show the same data. What it is not: figure styling (`ui/figures/`).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from d2o_core import run_summary
from d2o_core.events import kept_frame, survival_frame
from d2o_core.run_result import RunResult

from . import figures

# The built-in tasks (d2o_core/eval/tasks.py, and the passkey example): their needles and questions.
_PASSKEY = re.compile(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.")
_VARIABLE = re.compile(r"VAR ([A-Z]{5}) = (?:VAR [A-Z]{5}|\d+)\.")
_KV_QUESTION = re.compile(r'What is the value of key "([0-9a-f]{8})"\?')
_QUESTION = re.compile(
    r"What is the pass key\?[^\n]*"
    r'|What is the value of key "[0-9a-f]{8}"\?[^\n]*'
    r"|Question: find all variables[^\n]*"
)


def budget_figure(results: dict):
    return figures.budget_heatmap(run_summary.combined(results, "layer_budgets"))


def drift_figure(results: dict):
    """Drift of every policy but the reference itself."""
    return figures.drift(run_summary.combined({k: v for k, v in results.items() if k != "full"}, "drift"))


def attention_figure(results: dict):
    """The prompt's attention per layer beside each layer's density and budgets (shared by all columns)."""
    attention = next(iter(results.values())).attention
    return figures.attention_map(attention, run_summary.combined(results, "layer_budgets"))


def held_tokens(res: RunResult) -> list[str]:
    """The texts of every position the cache held: the prompt's, then the generated tokens fed back.

    The last generated token is never fed to the model, so the cache never held it.
    """
    return list(res.prompt_tokens) + list(res.generated_tokens[:-1])


def kept_figure(results: dict, layer: int, head: int):
    """For one layer and kv-head: the prompt's attention, and what each column kept of the prompt and of
    its generated tokens."""
    first = next(iter(results.values()))
    kept = pd.concat(
        [
            kept_frame(
                res.events, held_tokens(res), int(layer), int(head), res.settings.get("n_sink", 0)
            ).assign(policy=label)
            for label, res in results.items()
        ],
        ignore_index=True,
    )
    n_prompt = len(first.prompt_tokens)
    return figures.kept_tokens(
        first.attention, kept, int(layer), int(head), n_prompt, marks(first, generated=False)
    )


def survival_frame_of(res: RunResult) -> pd.DataFrame:
    """`res.survival()` over the prompt and then the generated tokens the cache held."""
    n_slots = res.metrics["n_layers"] * res.metrics["n_kv_heads"]
    return survival_frame(res.events, held_tokens(res), n_slots, res.settings.get("n_sink", 0))


def survival_figure(res: RunResult, label: str = ""):
    """Token survival of one column: its prompt and generated tokens, with the question and needle marked."""
    n_prompt = len(res.prompt_tokens)
    return figures.survival(survival_frame_of(res), label, n_prompt=n_prompt, marks=marks(res))


def step0_figure(res: RunResult, layer: int, head: int, label: str = ""):
    """What one column's prompt compression did at one layer and kv-head, token by token."""
    n_sink = res.settings.get("n_sink", 0)
    return figures.step0(res.events, res.prompt_tokens, int(layer), int(head), label, n_sink=n_sink)


def marks(res: RunResult, generated: bool = True) -> pd.DataFrame:
    """Spans to outline in the token views: columns name ("question", "needle", "answer"), start, end.

    The question kept whole (read after the context's compression: the positions past the prompt's
    attention); for the built-in tasks, the needle, its answer and the task's question, found in the
    prompt's text; with `generated`, the answer again wherever this column's generated text has it.
    """
    rows: list[tuple[str, int, int]] = []
    tokens = list(res.prompt_tokens)
    n_context = res.attention["position"].nunique() if not res.attention.empty else len(tokens)
    if 0 < n_context < len(tokens):
        rows.append(("question", n_context, len(tokens)))
    text, starts = _joined(tokens)
    found: list[tuple[str, int, int]] = []  # (name, first, last character)
    answers: set[str] = set()
    for m in _PASSKEY.finditer(text):
        found.append(("needle", m.start(), m.end()))
        found += [("answer", m.start() + a.start(), m.start() + a.end()) for a in re.finditer(m[1], m[0])]
        answers.add(m[1])
    for asked in _KV_QUESTION.finditer(text):
        for m in re.finditer(rf'"{asked[1]}": "([0-9a-f]{{8}})"', text):
            found += [("needle", m.start(), m.end()), ("answer", m.start(1), m.end(1))]
            answers.add(m[1])
    for m in _VARIABLE.finditer(text):
        found += [("needle", m.start(), m.end()), ("answer", m.start(1), m.end(1))]
        answers.add(m[1])
    found += [("question", m.start(), m.end()) for m in _QUESTION.finditer(text)]
    rows += [(name, *_span(starts, first, last)) for name, first, last in found]
    if generated and answers and res.generated_tokens:
        out, out_starts = _joined(list(res.generated_tokens))
        for answer in sorted(answers):
            for m in re.finditer(re.escape(answer), out):
                start, end = _span(out_starts, m.start(), m.end())
                rows.append(("answer", len(tokens) + start, len(tokens) + end))
    return pd.DataFrame(rows, columns=["name", "start", "end"]).astype({"start": "int64", "end": "int64"})


def _joined(tokens: list[str]) -> tuple[str, np.ndarray]:
    """The tokens' texts joined, and each token's first character's offset in it."""
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    return "".join(tokens), np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(tokens) else lengths


def _span(starts: np.ndarray, first: int, last: int) -> tuple[int, int]:
    """Token positions [start, end) covering characters [first, last) of the joined text."""
    start = int(np.searchsorted(starts, first, side="right")) - 1
    end = int(np.searchsorted(starts, last, side="left"))
    return max(start, 0), max(end, start + 1)
