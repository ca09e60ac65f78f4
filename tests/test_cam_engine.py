"""CaM's value merge (policies/cam.py), checked through the cache as it runs on a tiny model.

Expectations are written from the rule in `cam.py`'s docstring: H2O picks the evicted entry; its
value, weighted by `p = clamp(s_i / max kept s, 0, 1)`, is split evenly over the (up to) `m` kept
entries that follow it; keys never change. Scores at prefill are column sums of an eager attention
pass; at decode, a spy records each layer's entries and scores just before the cache sees the step.
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import tiny_model, walk
from test_d2o_engine import (
    FEED,
    LAYERS,
    N_PROMPT,
    PROMPT,
    compressed,
    entry,
    held,
    kept_positions,
    split,
    step,
)

from d2o_core import POLICIES
from d2o_core.__main__ import main
from d2o_core.policies.base import settings_of
from d2o_core.policies.cam import MAX_MERGE_TOKENS


@pytest.fixture(scope="module")
def lm():
    return tiny_model(layers=LAYERS)


@pytest.fixture(scope="module")
def eager_col_sums():
    twin = tiny_model(layers=LAYERS)
    twin.model.set_attn_implementation("eager")
    with torch.no_grad():
        out = twin.model(input_ids=torch.tensor([PROMPT]), output_attentions=True)
    return [
        a[0].double().sum(dim=1).reshape(twin.n_kv_heads, -1, N_PROMPT).sum(dim=1) for a in out.attentions
    ]


def cam_values(values, scores, kept: list[int], gone: list[int], m: int) -> dict[int, torch.Tensor]:
    """Per kept position, its value after every evicted one has been spread forward (one kv-head)."""
    out = {j: values[j].double().clone() for j in kept}
    top = max(float(scores[j]) for j in kept)
    for i in gone:
        targets = [j for j in kept if j > i][:m]
        p = min(max(float(scores[i]) / top, 0.0), 1.0)
        for j in targets:
            out[j] += p * values[i].double() / len(targets)
    return out


@pytest.mark.parametrize("merge_tokens", [None, 3])
def test_prefill_spreads_each_evicted_value_over_the_kept_entries_after_it(lm, eager_col_sums, merge_tokens):
    policy = POLICIES["cam"](budget=0.25, merge_tokens=merge_tokens)
    before, cache = compressed(lm, policy)
    budget = round(0.25 * N_PROMPT)
    n_sink, n_recent = split(budget, 0, 0.5)
    m = merge_tokens or n_recent
    for layer, (keys, values), cols in zip(cache.layers, before, eager_col_sums):
        kept = kept_positions(cols, budget, n_sink, n_recent, N_PROMPT)
        assert held(layer) == kept
        for h, keep in enumerate(kept):
            keep_list = sorted(keep)
            gone = [p for p in range(N_PROMPT) if p not in keep]
            expected = cam_values(values[0, h], cols[h], keep_list, gone, m)
            for j in keep_list:
                torch.testing.assert_close(
                    entry(layer, h, j, "values").double(), expected[j], rtol=1e-5, atol=1e-5
                )
                assert torch.equal(entry(layer, h, j, "keys"), keys[0, h, j])  # keys never change


def test_decode_steps_merge_the_evicted_value_forward_with_weight_p(lm):
    policy = POLICIES["cam"](budget=0.25)
    _, cache = compressed(lm, policy)
    budget = round(0.25 * N_PROMPT)
    _, n_recent = split(budget, 0, 0.5)
    merged = 0
    for number, token in enumerate(FEED, start=1):
        spy = step(lm, cache, token, number)
        seen = N_PROMPT + number
        for layer in cache.layers:
            got = spy.seen[layer.index]
            positions, keys, values, scores = got["positions"], got["keys"], got["values"], got["scores"]
            if positions.shape[1] <= budget:
                continue
            for h in range(positions.shape[0]):
                pos = positions[h].tolist()
                protect = torch.tensor([p >= seen - n_recent for p in pos])
                victim = int(scores[h].masked_fill(protect, float("inf")).argmin())
                kept = sorted(p for s, p in enumerate(pos) if s != victim)
                slot = {p: s for s, p in enumerate(pos)}
                by_pos = {p: values[h, slot[p]] for p in kept + [pos[victim]]}
                score_of = {p: scores[h, slot[p]] for p in kept + [pos[victim]]}
                top = max(float(score_of[p]) for p in kept)
                p_merge = min(max(float(score_of[pos[victim]]) / top, 0.0), 1.0)
                targets = [p for p in kept if p > pos[victim]][:n_recent]
                assert held(layer)[h] == set(kept)
                for p in kept:
                    expected = by_pos[p].double()
                    if p in targets:
                        expected = expected + p_merge * by_pos[pos[victim]].double() / len(targets)
                        merged += 1
                    torch.testing.assert_close(
                        entry(layer, h, p, "values").double(), expected, rtol=1e-5, atol=1e-5
                    )
                    assert torch.equal(entry(layer, h, p, "keys"), keys[h, slot[p]])
    assert merged > 0
    events = cache.log.events_frame([""] * 200)
    assert (events.kind == "merge").any() and (events[events.kind == "merge"].similarity <= 1).all()


# -- bounds: the setting declares one, and the engine never loops past what a layer holds ---------
HUGE = 10**12  # far past any cache; the prompt compression once looped this many times


def unchecked_cam(merge_tokens: int):
    """A CaM policy whose merge_tokens skipped validation (a hand-built policy or a future entry point)."""
    policy = POLICIES["cam"](budget=0.25)
    object.__setattr__(policy, "merge_tokens", merge_tokens)
    return policy


def within(seconds: float, work):
    """`work()`'s result; the test fails if it runs longer than `seconds` (left running as a daemon)."""
    out: dict = {}

    def run():
        try:
            out["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test below
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s: the loop is not bounded by the cache")
    if "error" in out:
        raise out["error"]
    return out["result"]


def cache_states(lm, policy, steps: int = 3) -> list[list[torch.Tensor]]:
    """Every layer's stored values after the prompt's compression and after each decode step."""
    return [
        [layer.values[:, :, : layer.used].clone() for layer in cache.layers]
        for _, cache, _ in walk(lm, PROMPT, policy, steps, feed=FEED)
    ]


def test_a_huge_merge_tokens_costs_no_more_than_the_cache_holds_and_merges_as_all_of_it(lm):
    # With more targets than any layer holds, every kept entry after an evicted one is a target:
    # the same as merge_tokens = the prompt's length, and as quick.
    huge = within(60, lambda: cache_states(lm, unchecked_cam(HUGE)))
    whole = cache_states(lm, POLICIES["cam"](budget=0.25, merge_tokens=N_PROMPT))
    for got, expected in zip(huge, whole, strict=True):
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("value", [0, MAX_MERGE_TOKENS + 1, 100_000, 1.5, True])
def test_cam_refuses_merge_tokens_outside_its_declared_range_naming_the_setting(value):
    declared = {s.name: s for s in settings_of(POLICIES["cam"])}["merge_tokens"]
    assert (declared.low, declared.high) == (1, MAX_MERGE_TOKENS)
    with pytest.raises(ValueError, match=f"merge_tokens must be a whole number from 1 to {MAX_MERGE_TOKENS}"):
        POLICIES["cam"](budget=0.2, merge_tokens=value)
    assert POLICIES["cam"](budget=0.2, merge_tokens=MAX_MERGE_TOKENS).merge_tokens == MAX_MERGE_TOKENS


def test_the_command_line_refuses_a_huge_merge_tokens_before_loading_a_model(capsys):
    argv = ["compare", "--policies", "cam", "--set", "cam.merge_tokens=100000", "--prompt", "hi"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "merge_tokens" in err and f"from 1 to {MAX_MERGE_TOKENS}" in err and "Traceback" not in err
