"""The README's "Write your own policy" example runs as printed (on a tiny model) and keeps by value norm."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import TEXT, held_positions, walk

import d2o_core
from d2o_core import POLICIES
from d2o_core.policies import settings_of

README = Path(__file__).resolve().parent.parent / "README.md"


def example_code() -> str:
    section = README.read_text().split("## Write your own policy", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_policy_runs_and_evicts_by_its_own_scores(tiny, monkeypatch):
    monkeypatch.setattr(d2o_core, "load_model", lambda *a, **k: tiny)
    monkeypatch.setitem(POLICIES, "valuenorm", None)  # the example registers itself; undone after the test
    namespace: dict = {}
    # dont_inherit: run it as a file would, without this module's `from __future__ import annotations`.
    exec(compile(example_code(), str(README), "exec", dont_inherit=True), namespace)
    ValueNorm = namespace["ValueNorm"]
    assert POLICIES["valuenorm"] is ValueNorm
    policy = ValueNorm(budget=0.3)
    ids = [ord(c) for c in TEXT[:40]]
    with torch.no_grad():  # the prompt's values, read independently of the engine
        values = [
            layer.values[0]
            for layer in tiny.model(torch.tensor([ids]), use_cache=True).past_key_values.layers
        ]
    for step, cache, _ in walk(tiny, ids, policy, 8):
        for layer in cache.layers:
            budget = layer.plan.budget
            for h, row in enumerate(held_positions(layer)):
                assert len(row) <= budget and {0, 1} <= set(row)  # two sinks
                if step > 0:
                    continue
                # The prompt: besides the sinks and the recent window, the largest values stay.
                norms = values[layer.index][h].float().norm(dim=-1)
                free = range(2, len(ids) - layer.plan.n_recent)
                kept = [p for p in free if p in row]
                dropped = [p for p in free if p not in row]
                assert kept and dropped and min(norms[kept]) > max(norms[dropped])
    with pytest.raises(ValueError, match="n_sink"):
        ValueNorm(n_sink=-1)
    # Its settings reach the page's Advanced controls: help and range inherited or declared.
    specs = {s.name: s for s in settings_of(ValueNorm)}
    assert (
        specs["n_sink"].default == 2
        and specs["n_sink"].high == 16
        and "never evicted" in specs["n_sink"].help
    )
    assert (
        specs["recent_share"].help == "share of the budget kept recent" and specs["recent_share"].step == 0.05
    )
