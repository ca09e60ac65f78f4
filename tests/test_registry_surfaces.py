"""Every registered policy reaches the CLI, the API, the page's pickers and every figure (tiny model)."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
from helpers import TEXT, tiny_model

import d2o_core
from d2o_core import POLICIES
from d2o_core.__main__ import policies_from_args
from ui import figures
from ui import handlers as H
from ui.engine import Engine


def test_cli_builds_new_policies_with_their_settings():
    tova, snap = policies_from_args("tova,snapkv", 0.3, ["tova.n_sink=2", "snapkv.window=16"])
    assert (tova.name, tova.n_sink, snap.window, snap.budget) == ("tova", 2, 16, 0.3)
    with pytest.raises(ValueError, match="kernel must be odd"):
        policies_from_args("pyramidkv", 0.3, ["pyramidkv.kernel=4"])


def test_page_pickers_and_columns_list_every_registered_policy():
    assert H.NAMES == list(POLICIES)
    built = H.build_policies(list(POLICIES), 30, H.Controls())
    assert [p.name for p in built] == list(POLICIES)


def test_api_and_every_figure_work_for_every_registered_policy():
    engine = Engine(["tiny"], loader=lambda name: tiny_model())
    out = H.api_compare(engine, TEXT, list(POLICIES), 0.3, 4)
    assert set(out["results"]) == set(POLICIES)
    results = d2o_core.compare(
        tiny_model(), TEXT, [POLICIES[n](budget=0.3) for n in POLICIES], max_new_tokens=6
    )
    n_prompt = results["full"].metrics["prompt_tokens"]
    figs = [H.budget_figure(results), H.drift_figure(results)]
    for label, res in results.items():
        figs.append(figures.cache_over_time(res.steps, label))
        figs.append(figures.timeline(res.events, 1, 0, n_prompt, label))
        figs.append(figures.survival(res.survival(), label))
    assert all(isinstance(f, go.Figure) for f in figs)
    evicting = [n for n in POLICIES if n != "full"]
    assert all(len(results[n].events) > 0 for n in evicting)
