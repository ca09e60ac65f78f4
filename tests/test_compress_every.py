"""When a policy compresses: once after the prompt (0), every step (1) or every N steps (N)."""

from __future__ import annotations

import pytest
from helpers import TEXT, held_positions, walk

import d2o_core
from d2o_core import POLICIES, serving

IDS = [ord(c) for c in TEXT[:60]]
STEPS = 9
CAPPING = [n for n in POLICIES if n != "full"]


def trace(tiny, policy) -> list:
    """Per step: per layer, (stored entries, held positions per kv-head)."""
    return [
        [(layer.stored, held_positions(layer)) for layer in cache.layers]
        for _, cache, _ in walk(tiny, IDS, policy, STEPS)
    ]


@pytest.mark.parametrize("name", CAPPING)
def test_once_after_the_prompt_keeps_step_zero_and_never_evicts_again(tiny, name):
    """docs/policies.md's invariant: with compress_every=0, the kept prompt entries equal those of
    compress_every=1 at step 0, and no entry is ever evicted after step 0."""
    every_step = trace(tiny, POLICIES[name](budget=0.3))
    once = trace(tiny, POLICIES[name](budget=0.3, compress_every=0))
    assert once[0] == every_step[0]
    for step in range(1, STEPS + 1):
        for (stored, held), (before, held_before) in zip(once[step], once[step - 1]):
            assert stored == before + 1
            assert all(set(b) <= set(a) for a, b in zip(held, held_before))  # nothing left


@pytest.mark.parametrize("name", ["h2o", "d2o", "cam", "keydiff", "tova", "vatp"])
def test_every_n_steps_grows_n_past_the_budget_then_cuts_back(tiny, name):
    n = 3
    policy = POLICIES[name](budget=0.3, compress_every=n)
    saw = []
    for step, cache, _ in walk(tiny, IDS, policy, STEPS):
        layer = cache.capped[0]
        budget = layer.plan.budget
        assert budget <= layer.stored < budget + n  # the saw-tooth, never past budget + n - 1 after a step
        saw.append(layer.stored - budget)
        if step:
            events = cache.log.events_frame([""] * (len(IDS) + STEPS + 1))
            evicted_now = events[(events.step == step) & (events.layer == layer.index)]
            assert len(evicted_now) == (n * len(cache.heads) if saw[-1] == 0 else 0)
    assert saw == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


def test_every_step_is_the_default_and_compress_every_is_a_recorded_setting():
    policy = POLICIES["h2o"](budget=0.2, compress_every=4)
    assert POLICIES["h2o"]().compress_every == 1
    assert policy.settings()["compress_every"] == 4 and policy.label == "h2o(compress_every=4)"
    with pytest.raises(ValueError, match="compress_every"):
        POLICIES["h2o"](compress_every=-1)
    with pytest.raises(ValueError, match="compress_every"):
        POLICIES["d2o"](compress_every=1.5)


@pytest.mark.parametrize("every", [0, 3])
def test_a_stacked_batch_decodes_each_row_as_it_would_alone(tiny, every):
    policy = POLICIES["d2o"](budget=0.3, compress_every=every)
    prompts = [TEXT[:50], TEXT[20:80], TEXT[40:85]]
    out = d2o_core.serve_batch(tiny, prompts, policy, max_new_tokens=8, batch=3, chat=False)
    alone = [
        d2o_core.generate(tiny, p, policy, max_new_tokens=8, chat=False, fidelity=False) for p in prompts
    ]
    assert out.token_ids == [r.token_ids for r in alone]


@pytest.mark.parametrize("every", [0, 1, 4])
def test_the_kv_cap_counts_the_larger_peak(tiny, every):
    policy = POLICIES["h2o"](budget=0.25, compress_every=every)
    row = serving.admit(tiny, 0, IDS, policy, 10)[0]
    budget = row.cache.capped[0].plan.budget
    room = {0: 10, 1: 1, 4: 4}[every]
    assert row.peak_entries == tiny.n_layers * (budget + room)
    assert all(layer.capacity >= budget + room for layer in row.cache.capped)  # room booked up front


@pytest.mark.parametrize("every", [0, 3])
def test_cache_for_compresses_on_the_same_schedule(tiny, every):
    import torch

    policy = POLICIES["d2o"](budget=0.3, compress_every=every)
    ref = d2o_core.generate(tiny, IDS, policy, max_new_tokens=8)
    cache = d2o_core.cache_for(tiny, policy)
    inputs = torch.tensor([IDS])
    out = tiny.model.generate(
        inputs, past_key_values=cache, max_new_tokens=8, do_sample=False, pad_token_id=0
    )
    assert out[0, len(IDS) :].tolist() == ref.token_ids
    assert cache.result(out).steps.equals(ref.steps)
