"""Sweeps: task scores and fidelity of every policy across budgets, lengths and needle depths.

What this module is: `run_sweep` (tasks.py's retrieval samples; one `compare` call per sample,
so the full cache and every (policy, budget) pair share one prefill) and `fidelity_sweep` (the
app's "Budget sweep" tab: the user's prompt, fidelity to the full cache per policy and budget),
both returning tidy DataFrames in memory, and their summary tables (readme_tables.py uses them).
The `sweep` subcommand (resumable cells, your data, Ray) is sweep_cli.py.

What it is not: no plotting (ui/figures.py's `sweep_curves` draws these frames), no timing
method of its own (bench.py), no new metric: numbers come from `RunResult.metrics` and
`tasks.score`. The full cache always runs (it is the fidelity reference); it gets rows only
when "full" is among the policies asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pandas as pd

from ..policies import POLICIES, build
from ..runner import compare, result_labels
from .tasks import TASKS, make_suite, score

FIDELITY = ("token_agreement", "mean_kl_to_full", "nll_of_reference", "kv_fraction")
METRICS = ("kv_fraction", "token_agreement", "mean_kl_to_full", "nll_of_reference", "decode_ms_per_token")
SWEEP_COLUMNS = (
    "task", "target_tokens", "prompt_tokens", "depth", "sample", "policy", "budget", "score", "output",
    "answer", *METRICS,
)  # fmt: skip
FIDELITY_COLUMNS = ("policy", "budget", *FIDELITY, "text")
Progress = Callable[[int, int, str], None]


def _grid(policy_names: Sequence[str], budgets: Sequence[float]) -> tuple[list, bool]:
    """[(name, budget, Policy)]: full once at 1.0, then every other policy at every budget."""
    names, budgets = list(policy_names), list(budgets)
    unknown = [n for n in names if n not in POLICIES]
    if not names or unknown:
        raise ValueError(f"Choose policies from {', '.join(POLICIES)}; got {names or 'none'}.")
    if len(set(names)) != len(names):
        raise ValueError(f"List each policy once; got {names}.")
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, int | float) or not 0 < b <= 1]
    if not budgets or bad:
        raise ValueError(f"Budgets are fractions in (0, 1], e.g. 0.1,0.2,0.4; got {budgets or 'none'}.")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"List each budget once; got {budgets}.")
    pairs = [("full", 1.0)] + [(n, float(b)) for n in names if n != "full" for b in budgets]
    return [(n, b, build(n, b)) for n, b in pairs], "full" in names


def _check_tasks(tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ValueError(f"Choose tasks from {', '.join(TASKS)}; got {list(tasks) or 'none'}.")


def _compare(lm, prompt: str, grid: list, max_new_tokens: int, on_update=None) -> list[tuple]:
    """One shared-prefill compare of the grid -> [(name, budget, RunResult)] in grid order."""
    policies = [p for _, _, p in grid]
    # No attention frame: the sweep reads metrics only.
    results = compare(
        lm, prompt, policies, max_new_tokens=max_new_tokens, chat=True, on_update=on_update, attention=False
    )
    return [(n, b, results[label]) for (n, b, _), label in zip(grid, result_labels(policies))]


def run_sweep(
    lm,
    tasks: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    budgets: Sequence[float],
    policy_names: Sequence[str],
    samples: int,
    seed: int = 0,
    max_new_tokens: int = 16,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Score every policy and budget on every task sample; one tidy row per (sample, policy, budget).

    Parameters
    ----------
    lm : LoadedModel.
    tasks, lengths, depths, samples, seed : as in `tasks.make_suite` (lengths counted with the
        model's tokenizer on the user message; `prompt_tokens` is what the model read, chat
        template included).
    budgets : fractions in (0, 1]; every policy but "full" runs at each.
    policy_names : registry names; "full" runs once per sample at budget 1.0.
    max_new_tokens : greedy decoding, chat template on; kv answers need ~24 with the bundled model.
    progress : optional `callable(done, total, message)`, called before each sample and at the end.

    Returns
    -------
    DataFrame with `SWEEP_COLUMNS`.
    """
    grid, keep_full = _grid(policy_names, budgets)
    tasks, lengths = [tasks] if isinstance(tasks, str) else list(tasks), list(lengths)
    _check_tasks(tasks)
    if lengths and max(lengths) > lm.max_prompt_tokens:
        raise ValueError(f"Length {max(lengths)} is over this model's limit of {lm.max_prompt_tokens}.")
    count = lambda text: len(lm.tokenizer(text)["input_ids"])  # the user message, as tasks.py expects
    suite = make_suite(tasks, lengths, depths, samples, seed, count)
    rows = []
    for i, sample in enumerate(suite):
        if progress:
            progress(i, len(suite), f"{sample.task} {sample.target_tokens} depth {sample.depth:g}")
        for name, budget, res in _compare(lm, sample.prompt, grid, max_new_tokens):
            if name == "full" and not keep_full:
                continue
            rows.append(
                {
                    "task": sample.task, "target_tokens": sample.target_tokens,
                    "prompt_tokens": res.metrics["prompt_tokens"], "depth": sample.depth,
                    "sample": sample.seed - seed, "policy": name, "budget": budget,
                    "score": score(sample, res.text), "output": res.text, "answer": sample.answer,
                    **{k: res.metrics.get(k, math.nan) for k in METRICS},
                }
            )  # fmt: skip
    if progress:
        progress(len(suite), len(suite), "done")
    return pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))


def fidelity_sweep(
    lm,
    prompt: str,
    budgets: Sequence[float],
    policy_names: Sequence[str],
    max_new_tokens: int = 64,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Fidelity to the full cache of every policy at every budget on one prompt (one compare call).

    Returns one row per (policy, budget) with `FIDELITY_COLUMNS`; `progress(step, max_new_tokens,
    message)` follows the decoding steps.
    """
    grid, keep_full = _grid(policy_names, budgets)

    def on_update(update) -> None:
        if progress and update.kind != "done":
            message = update.text if update.kind == "status" else f"{update.label} step {update.step}"
            progress(update.step, max_new_tokens, message)

    rows = [
        (name, budget, *[res.metrics.get(k, math.nan) for k in FIDELITY], res.text)
        for name, budget, res in _compare(lm, prompt, grid, max_new_tokens, on_update)
        if name != "full" or keep_full
    ]
    return pd.DataFrame(rows, columns=list(FIDELITY_COLUMNS))


def score_table(df: pd.DataFrame, columns: Sequence[str] = ("task",)) -> pd.DataFrame:
    """Mean score: rows (policy, budget) in run order, one column per value of `columns`."""
    table = df.pivot_table(index=["policy", "budget"], columns=list(columns), values="score", sort=False)
    table.columns = [" ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in table.columns]
    return table.reset_index()


def fidelity_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean KV fraction, agreement, KL, NLL and decode time per (policy, budget)."""
    return df.groupby(["policy", "budget"], sort=False)[list(METRICS)].mean().reset_index()
