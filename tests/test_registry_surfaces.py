"""Every registered policy reaches the CLI, the API, the page's pickers and every figure (tiny model)."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
from helpers import TEXT, tiny_model

import d2o_core
from d2o_core import POLICIES
from d2o_core.__main__ import policies_from_args
from d2o_core.policies.base import settings_of
from ui import api as A
from ui import figures
from ui import policy_controls as P
from ui import run_figures as RF
from ui.engine import Engine


def test_cli_builds_new_policies_with_their_settings():
    tova, snap = policies_from_args("tova,snapkv", 0.3, ["tova.n_sink=2", "snapkv.window=16"])
    assert (tova.name, tova.n_sink, snap.window, snap.budget) == ("tova", 2, 16, 0.3)
    with pytest.raises(ValueError, match="kernel must be odd"):
        policies_from_args("pyramidkv", 0.3, ["pyramidkv.kernel=4"])


def test_page_pickers_and_columns_list_every_registered_policy():
    assert P.NAMES == list(POLICIES)
    for start in range(0, len(POLICIES), P.MAX_COLUMNS):  # at most six columns a run
        names = list(POLICIES)[start : start + P.MAX_COLUMNS]
        assert [p.name for p in P.Columns(names, 30).policies()] == names
    # Every policy's Advanced controls come from its dataclass fields.
    assert {name for name, _ in P.control_keys()} == {n for n in POLICIES if settings_of(POLICIES[n])}


def test_api_and_every_figure_work_for_every_registered_policy():
    engine = Engine(["tiny"], loader=lambda name: tiny_model())
    names = list(POLICIES)
    for start in range(0, len(names), P.MAX_COLUMNS):  # a request runs at most the page's columns
        chunk = names[start : start + P.MAX_COLUMNS]
        assert set(A.api_compare(engine, TEXT, chunk, 0.3, 4)["results"]) == set(chunk)
    results = d2o_core.compare(
        tiny_model(), TEXT, [POLICIES[n](budget=0.3) for n in POLICIES], max_new_tokens=6
    )
    n_prompt = results["full"].metrics["prompt_tokens"]
    figs = [RF.budget_figure(results), RF.drift_figure(results), RF.attention_figure(results)]
    for label, res in results.items():
        figs.append(figures.cache_over_time(res.steps, label))
        figs.append(figures.timeline(res.events, 1, 0, n_prompt, label))
        figs.append(figures.survival(res.survival(), label))
    figs.append(RF.kept_figure(results, 1, 0))
    assert all(isinstance(f, go.Figure) for f in figs)
    evicting = [n for n in POLICIES if n != "full"]
    assert all(len(results[n].events) > 0 for n in evicting)
