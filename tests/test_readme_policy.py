"""The README's "Write your own policy" example runs as printed (on a tiny model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
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
    monkeypatch.setitem(POLICIES, "peakkey", None)  # the example registers itself; undone after the test
    namespace: dict = {}
    # dont_inherit: run it as a file would, without this module's `from __future__ import annotations`.
    exec(compile(example_code(), str(README), "exec", dont_inherit=True), namespace)
    PeakKey = namespace["PeakKey"]
    assert POLICIES["peakkey"] is PeakKey
    policy = PeakKey(budget=0.3)
    ids = [ord(c) for c in TEXT[:40]]
    for _, cache, _ in walk(tiny, ids, policy, 8):
        for layer in cache.layers:
            budget = layer.plan.budget
            for row in held_positions(layer):
                assert len(row) <= budget and {0, 1} <= set(row)  # two sinks
    with pytest.raises(ValueError, match="n_sink"):
        PeakKey(n_sink=-1)
    # Its settings reach the page's Advanced controls: help and range inherited or declared.
    specs = {s.name: s for s in settings_of(PeakKey)}
    assert (
        specs["n_sink"].default == 2
        and specs["n_sink"].high == 16
        and "never evicted" in specs["n_sink"].help
    )
    assert (
        specs["recent_share"].help == "share of the budget kept recent" and specs["recent_share"].step == 0.05
    )
