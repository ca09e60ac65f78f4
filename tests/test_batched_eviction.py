"""Batched decode-time eviction (`evict.evict_rows`) == eviction row by row, bit for bit.

A stacked batch evicts every row at once, treating each (row, kv-head) pair as one more head.
These tests decode the same rows twice inside a `StackedBatch`, once with the batched eviction
and once with `evict.evict_step` called per row (the single-cache path), and require the same
events, step records, thresholds, kept positions and stored keys and values (merges included).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import TEXT, held_positions, tiny_model

from d2o_core import POLICIES, engine
from d2o_core.batching import StackedBatch, can_stack
from d2o_core.cache import PolicyCache, PrefillCache, prefill_needs
from d2o_core.events import EventLog

# Rows of different lengths: per-row budgets, recent windows, used slots and tokens seen all differ.
PROMPTS = [TEXT[i : i + 40 + 3 * i] for i in range(0, 30, 6)]
FEED = [ord(c) for c in TEXT[100:112]]
MATRIX = [
    ("d2o", {}),
    ("d2o", {"variant": "official"}),
    ("d2o", {"merge": False}),
    ("h2o", {}),
    ("tova", {}),
    ("keydiff", {}),
    ("knorm", {}),
    ("cam", {}),
    ("streaming", {}),
    ("snapkv", {"window": 8}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw in MATRIX]


def admit(lm, policy, text: str) -> PolicyCache:
    ids = engine.encode(lm, text, False)
    prefill = PrefillCache(lm.n_layers, **prefill_needs([policy]))
    engine.prefill(lm, prefill, ids)
    return PolicyCache.from_prefill(prefill, policy, extra=len(FEED) + 1, log=EventLog())


def decode(lm, caches, batched: bool) -> None:
    batch = StackedBatch(caches, batched_eviction=batched)
    for step, token in enumerate(FEED):
        engine.decode_step(lm, batch, [token] * len(caches), step + 1)


def state(cache) -> dict:
    layers = cache.layers
    return {
        "events": cache.log.events_frame([""] * 512).fillna(-7.0),
        "steps": cache.log.steps_frame(),
        "tau": cache.tau.nan_to_num(-7.0),
        "held": [held_positions(layer) for layer in layers],
        "keys": [layer.keys[0, :, : layer.used].clone() for layer in layers],
        "values": [layer.values[0, :, : layer.used].clone() for layer in layers],
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["held"] == b["held"]
    assert a["events"].equals(b["events"])
    assert a["steps"].equals(b["steps"])
    assert torch.equal(a["tau"], b["tau"])
    assert all(torch.equal(x, y) for x, y in zip(a["keys"], b["keys"]))
    assert all(torch.equal(x, y) for x, y in zip(a["values"], b["values"]))


# Two shapes: the default tiny model, and one with 32 (layer, kv-head) pairs per row, so a row's
# thresholds and weights fill several CPU vector lanes (where rounding could depend on layout).
@pytest.mark.parametrize("shape", [{}, {"layers": 8, "heads": 8, "kv_heads": 4}], ids=["4x2", "8x4"])
@pytest.mark.parametrize("name,kw", MATRIX, ids=IDS)
def test_batched_eviction_matches_row_by_row(name, kw, shape):
    lm = tiny_model(**shape)
    policy = POLICIES[name](budget=0.25, **kw)
    batched, alone = ([admit(lm, policy, p) for p in PROMPTS] for _ in range(2))
    assert can_stack(batched)
    decode(lm, batched, batched=True)
    decode(lm, alone, batched=False)
    for a, b in zip(batched, alone):
        assert_same(state(a), state(b))
    if policy.merge_rule() is not None:
        assert any(c.log.events_frame([""] * 512)["kind"].eq("merge").any() for c in batched)


@pytest.mark.parametrize("name,kw", [("d2o", {}), ("d2o", {"variant": "official"}), ("cam", {}), ("h2o", {})])
def test_rows_and_layers_under_budget_are_left_alone_in_a_batch(name, kw):
    """Some rows' layers have room left (budget raised after compression): those skip evicting, alone
    and batched alike, while the other rows and layers evict and merge as usual."""
    lm = tiny_model()
    policy = POLICIES[name](budget=0.25, **kw)

    def rows():
        caches = [admit(lm, policy, p) for p in PROMPTS]
        # Row 0 (the shortest prompt) has the smallest windows, so its budgets can grow within the
        # batch's slots: layers 0 and 2 get room for 3 and 5 more entries, layers 1 and 3 none.
        for layer, extra in zip(caches[0].capped, (3, 0, 5, 0)):
            layer.plan = dataclasses.replace(layer.plan, budget=layer.plan.budget + extra)
        return caches

    batched, alone = rows(), rows()
    decode(lm, batched, batched=True)
    decode(lm, alone, batched=False)
    for a, b in zip(batched, alone):
        assert_same(state(a), state(b))
    evicted = batched[0].log.steps_frame()
    assert (evicted[(evicted.step == 1) & (evicted.layer == 0)]["evicted"] == 0).all()
