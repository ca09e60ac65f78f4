"""docs/policies.md's invariants, one test each, over the shared policy matrix (tiny random GQA models)."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from helpers import TEXT, held_positions, one_step, prefill_cache, slot_of, tiny_model, walk

import d2o_core
from d2o_core.policies import POLICIES

# Every registry entry with its defaults (a new policy is tested without editing this file), plus the
# settings whose code paths differ.
EXTRA = [
    ("h2o", {"n_sink": 2, "recent_share": 0.3}),
    ("d2o", {"variant": "official"}),
    ("d2o", {"merge": False}),
    ("d2o", {"layer_budgets": "uniform"}),
    ("snapkv", {"window": 8, "kernel": 3}),  # the prompt is longer than the window: it compresses
    ("pyramidkv", {"window": 6}),
    ("keydiff", {"n_sink": 2, "recent_share": 0.25}),
    ("cam", {"merge_tokens": 2}),
]
MATRIX = [(name, {}) for name in POLICIES] + EXTRA
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw in MATRIX]


def test_matrix_covers_every_registered_policy():
    assert {name for name, _ in MATRIX} == set(POLICIES)
    assert all(name in POLICIES for name, _ in EXTRA)


def make(name, budget, **kw):
    return POLICIES[name](budget=budget, **kw)


PROMPT = [ord(c) for c in TEXT[:40]]


STEPS_1 = 2 * len(PROMPT) // 3 + len(PROMPT)  # longer than the prompt


@pytest.fixture(scope="module")
def full_walk(tiny):
    """The full cache's logits at every step of invariant 1's walk (the same for every policy)."""
    return [logits for _, _, logits in walk(tiny, PROMPT, make("full", 1.0), STEPS_1)]


@pytest.mark.parametrize("name,kw", MATRIX, ids=IDS)
def test_1_budget_one_reproduces_the_full_cache_bit_for_bit(tiny, full_walk, name, kw):
    ours = [logits for _, _, logits in walk(tiny, PROMPT, make(name, 1.0, **kw), STEPS_1)]
    assert all(torch.equal(a, b) for a, b in zip(full_walk, ours))
    assert len(ours) == STEPS_1 + 1


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("name,kw", MATRIX, ids=IDS)
def test_2_entries_stay_within_budget_and_sinks_and_recent_stay(tiny, name, kw, budget):
    policy = make(name, budget, **kw)
    for step, cache, _ in walk(tiny, PROMPT, policy, 25):
        for layer in cache.layers:
            plan, seen = layer.plan, layer.seen
            for positions in held_positions(layer):
                assert len(positions) == len(set(positions)) == layer.stored
                assert all(0 <= p < seen for p in positions)
                if plan.budget is None:
                    assert positions == list(range(seen))
                    continue
                assert layer.stored <= plan.budget, (step, layer.index)
                must = set(range(min(plan.n_sink, seen))) | set(range(seen - plan.n_recent, seen))
                assert must <= set(positions), (step, layer.index)


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.45])
def test_3_d2o_layer_budgets_total_and_mean_fraction(budget):
    lm = tiny_model(layers=8)
    res = d2o_core.generate(lm, TEXT, make("d2o", budget), max_new_tokens=2, chat=False)
    lb, n_prompt = res.layer_budgets, res.metrics["prompt_tokens"]
    target = 8 * round(budget * n_prompt)
    assert abs(int(lb["budget_tokens"].sum()) - target) <= 8
    assert lb["budget_fraction"].mean() == pytest.approx(budget, abs=1 / n_prompt)
    assert lb["budget_tokens"].nunique() > 1  # the layers' densities differ, so must their budgets
    assert lb["density"].notna().all()


@pytest.mark.parametrize("budget", [0.15, 0.4])
@pytest.mark.parametrize("h2o_kw", [{}, {"n_sink": 3, "recent_share": 0.25}])
def test_4_d2o_without_merge_and_with_uniform_budgets_is_h2o(tiny, budget, h2o_kw):
    h2o = make("h2o", budget, **h2o_kw)
    d2o = make(
        "d2o", budget, merge=False, layer_budgets="uniform", n_sink=h2o.n_sink, recent_share=h2o.recent_share
    )
    for (_, a, la), (_, b, lb) in zip(walk(tiny, PROMPT, h2o, 20), walk(tiny, PROMPT, d2o, 20)):
        assert [held_positions(x) for x in a.layers] == [held_positions(x) for x in b.layers]
        assert torch.equal(la, lb)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_5_merging_never_changes_how_many_entries_are_stored(tiny, variant):
    runs = {}
    for merge in (True, False):
        policy = make("d2o", 0.3, variant=variant, merge=merge)
        runs[merge] = [
            [layer.stored for layer in c.layers] for _, c, _ in walk(tiny, PROMPT, policy, 20, feed=PROMPT)
        ]
    assert runs[True] == runs[False]


def test_5_paper_merge_at_decode_is_a_convex_combination_of_target_and_victim(tiny):
    policy = make("d2o", 0.3)
    checked = 0
    walker = walk(tiny, PROMPT, policy, 15, feed=PROMPT)
    _, cache, _ = next(walker)
    for step in range(1, 16):
        before = cache.clone()
        next(walker)
        events = cache.log.events_frame([""] * 200)
        for row in events[(events.step == step) & (events.kind == "merge")].itertuples():
            old, new = before.layers[row.layer], cache.layers[row.layer]
            if (
                max(row.target_position, row.position) >= old.seen
            ):  # the token fed this step is not in `before`
                continue
            k_target = old.keys[0, row.head, slot_of(old, row.head, row.target_position)]
            k_victim = old.keys[0, row.head, slot_of(old, row.head, row.position)]
            w = math.exp(row.similarity) / (math.e + math.exp(row.similarity))
            expected = (1 - w) * k_target + w * k_victim
            torch.testing.assert_close(
                new.keys[0, row.head, slot_of(new, row.head, row.target_position)], expected
            )
            checked += 1
    assert checked > 0


def test_6_positions_continue_from_tokens_seen_not_entries_stored(tiny):
    policy = make("h2o", 0.2)
    seen_positions = []
    hook = tiny.model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen_positions.append(kwargs["position_ids"].tolist()), with_kwargs=True
    )
    try:
        for step, cache, _ in walk(tiny, PROMPT, policy, 10, feed=PROMPT):
            if step == 0:
                continue
            assert cache.get_seq_length() == len(PROMPT) + step
            assert cache.layers[0].stored < cache.get_seq_length()
    finally:
        hook.remove()
    assert seen_positions[0] == [list(range(len(PROMPT)))]
    assert [p[0][0] for p in seen_positions[1:]] == [len(PROMPT) + s - 1 for s in range(1, 11)]


def test_6_model_default_positions_match_after_eviction(tiny):
    """Feeding without position_ids makes transformers ask the cache: it must answer with tokens seen."""
    policy = make("d2o", 0.2)
    *_, (_, cache, _) = walk(tiny, PROMPT, policy, 5, feed=PROMPT)
    a, b = cache.clone(), cache.clone()
    explicit = one_step(tiny, a, PROMPT[6], 6)
    with torch.no_grad(), d2o_core.capture.observing(b):
        implicit = tiny.model(
            input_ids=torch.tensor([[PROMPT[6]]]), past_key_values=b, use_cache=True
        ).logits[0, -1]
    assert torch.equal(explicit, implicit)


@pytest.mark.parametrize("first,second", [("h2o", "d2o"), ("d2o", "streaming")])
def test_7_concurrent_requests_do_not_share_policy_state(tiny, first, second):
    policies = {first: make(first, 0.25), second: make(second, 0.25)}
    alone = {k: d2o_core.generate(tiny, TEXT, p, max_new_tokens=12, chat=False) for k, p in policies.items()}
    together, errors = {}, []

    def run(key):
        try:
            for _ in range(3):
                together.setdefault(key, []).append(
                    d2o_core.generate(tiny, TEXT, policies[key], max_new_tokens=12, chat=False)
                )
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in policies for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key, results in together.items():
        for res in results:
            assert res.token_ids == alone[key].token_ids
            assert res.events.equals(alone[key].events)
    with pytest.raises(AttributeError):
        policies[first].budget = 0.9  # policies are frozen configs, never per-request state


@pytest.mark.parametrize(
    "name,kw", [("full", {}), ("d2o", {"variant": "official"})], ids=["full", "d2o-official"]
)
def test_layers_that_never_evict_grow_past_their_room_without_changing_anything(tiny, name, kw):
    """Uncapped layers get room for `extra` tokens; going past it moves the pool, keeping every entry."""
    policy = make(name, 0.3, **kw)
    roomy = [logits for _, _, logits in walk(tiny, PROMPT, policy, 15)]
    cache, _ = prefill_cache(tiny, PROMPT, policy, extra=1)
    tight = [one_step(tiny, cache, int(logits.argmax()), step) for step, logits in enumerate(roomy[:-1], 1)]
    assert all(torch.equal(a, b) for a, b in zip(roomy[1:], tight))
    assert cache.kv.shape[2] > sum(layer.plan.budget or 0 for layer in cache.layers) + len(PROMPT) + 1
    *_, (_, reference, _) = walk(tiny, PROMPT, policy, 15)
    assert [held_positions(layer) for layer in cache.layers] == [
        held_positions(layer) for layer in reference.layers
    ]
