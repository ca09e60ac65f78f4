"""D2O's token-level rules, checked through the cache as it runs on a tiny model.

Every expectation here is written from docs/policies.md, not read from the engine's plan:
budgets are `round(b * Lp)` and the recent window `round(recent_share * budget)` (Python's
half-to-even `round`), prompt scores are column sums of an *eager* attention pass of an
identical model, similarities are cosines computed here, and the merge threshold is an EMA
tracked by the test itself. At each compression the test compares the keys AND values the
engine holds with what the variant's weights give from the entries as they were before it.

A spy observer sits between the model's attention and the cache during decode steps: it
records each layer's stored keys, values, positions and scores just before the cache sees
the step's attention (and before the end-of-step eviction), then hands over unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TEXT, held_positions, policy_cache, shared_prefill, tiny_model

from d2o_core import POLICIES
from d2o_core.cache import PolicyCache
from d2o_core.capture import observing

LAYERS, N_PROMPT, STEPS = 5, 48, 24
PROMPT = [ord(c) for c in (TEXT * 2)[:N_PROMPT]]
FEED = [ord(c) for c in (TEXT * 2)[N_PROMPT : N_PROMPT + STEPS]]
VARIANTS = {
    # beta, EMA statistic, decision shared by heads (docs/policies.md's table)
    "paper": (0.7, "max", False),
    "official": (0.5, "mean", True),
}


@pytest.fixture(scope="module")
def lm():
    return tiny_model(layers=LAYERS)


@pytest.fixture(scope="module")
def prompt_attention():
    """Per layer, the prompt's [Hq, Lp, Lp] attention probabilities from a plain eager pass."""
    twin = tiny_model(layers=LAYERS)  # same seed, same weights; its own attention implementation
    twin.model.set_attn_implementation("eager")
    with torch.no_grad():
        out = twin.model(input_ids=torch.tensor([PROMPT]), output_attentions=True)
    return [a[0].double() for a in out.attentions]


@pytest.fixture(scope="module")
def eager_col_sums(lm, prompt_attention):
    """Per layer, [Hkv, Lp] scores: each key's total attention, the query heads of a group summed."""
    n_kv = lm.n_kv_heads
    return [a.sum(dim=1).reshape(n_kv, -1, N_PROMPT).sum(dim=1) for a in prompt_attention]


# -- expectations from the definitions ----------------------------------------------------------------


def split(budget: int, n_sink: int, recent_share: float) -> tuple[int, int]:
    """Sinks (inside the budget) and the recent window; Python's round is half to even."""
    sinks = min(n_sink, budget - 1)
    return sinks, min(round(recent_share * budget), budget - sinks)


def kept_positions(scores: torch.Tensor, budget: int, n_sink: int, n_recent: int, seen: int) -> list[set]:
    """Per kv-head: sinks, the recent window, then the highest scores up to `budget`."""
    out = []
    for row in scores:
        must = set(range(n_sink)) | set(range(seen - n_recent, seen))
        rest = sorted((p for p in range(seen) if p not in must), key=lambda p: -float(row[p]))
        out.append(must | set(rest[: budget - len(must)]))
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a @ b.T) / (a.norm(dim=-1)[:, None] * b.norm(dim=-1)[None, :])


def weights(variant: str, sims: list[float]) -> tuple[float, list[float]]:
    """(target weight, weight of each merged entry) for one target absorbing entries of these sims."""
    if variant == "paper":
        denom = math.e + sum(math.exp(s) for s in sims)
        return math.e / denom, [math.exp(s) / denom for s in sims]
    return 1 / (1 + len(sims)), [s / (1 + len(sims)) for s in sims]


def decide(sims: torch.Tensor, tau: float, shared: bool) -> torch.Tensor:
    """sims : [Hkv] or [Hkv, E] -> merge decisions of the same shape."""
    if shared:
        return (sims.mean(dim=0, keepdim=True) >= tau).expand_as(sims)
    return sims >= tau


def entry(layer, head: int, position: int, which: str = "keys") -> torch.Tensor:
    """The engine's stored key or value of one original position (one kv-head)."""
    n = layer.used
    slots = (layer.positions[head, :n] == position).nonzero()[:, 0].tolist()
    if layer.hole is not None:
        slots = [s for s in slots if s != int(layer.hole[head])]
    assert len(slots) == 1, (layer.index, head, position, slots)
    return getattr(layer, which)[0, head, slots[0]]


def held(layer) -> list[set]:
    return [set(row) for row in held_positions(layer)]


# -- the engine, as it runs ---------------------------------------------------------------------------


def compressed(lm, policy) -> tuple[list, PolicyCache]:
    """The prompt's uncompressed (keys, values) per layer, and the policy's compressed cache."""
    prefill, _ = shared_prefill(lm, PROMPT)
    keep = [(layer.keys.clone(), layer.values.clone()) for layer in prefill.layers]
    return keep, policy_cache(prefill, policy, extra=STEPS + 1)


class Spy:
    """Records each layer's entries and scores just before the cache observes the step, then delegates."""

    def __init__(self, cache: PolicyCache):
        self.cache, self.seen = cache, {}

    def observe(self, layer_idx, query, key, scaling):
        layer, n = self.cache.layers[layer_idx], self.cache.layers[layer_idx].used
        n_kv = key.shape[1]
        q = query[0, :, 0].double().reshape(n_kv, -1, query.shape[-1])
        row = torch.softmax(torch.einsum("hrd,hsd->hrs", q, key[0].double()) * scaling, -1).sum(1)
        scores = self.cache.scores[:, layer.offset : layer.offset + n].double() if layer.plan.budget else None
        self.seen[layer_idx] = dict(
            keys=key[0].clone(),
            values=layer.values[0, :, :n].clone(),
            positions=layer.positions[:, :n].clone(),
            scores=None if scores is None else scores + row,
        )
        self.cache.observe(layer_idx, query, key, scaling)


def step(lm, cache: PolicyCache, token: int, number: int) -> Spy:
    cache.step, spy = number, Spy(cache)
    with torch.no_grad(), observing(spy):
        lm.model(
            input_ids=torch.tensor([[token]]),
            position_ids=torch.tensor([[cache.get_seq_length()]]),
            past_key_values=cache,
            use_cache=True,
        )
    return spy


# -- the prefill compression --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_prefill_merge_updates_keys_and_values_of_targets_with_the_variants_weights(
    lm, eager_col_sums, variant
):
    policy = POLICIES["d2o"](budget=0.2, variant=variant, layer_budgets="uniform")
    _, _, shared = VARIANTS[variant]
    before, cache = compressed(lm, policy)
    budget = round(0.2 * N_PROMPT)  # 9.6 -> 10 (flooring would keep 9)
    n_sink, n_recent = split(budget, 4, policy.recent_share)
    merges = drops = 0
    for layer, (keys, values), cols in zip(cache.layers, before, eager_col_sums):
        if layer.plan.protected:
            assert [sorted(p) for p in held(layer)] == [list(range(N_PROMPT))] * len(held(layer))
            continue
        kept = kept_positions(cols, budget, n_sink, n_recent, N_PROMPT)
        assert held(layer) == kept, layer.index
        k, v = keys[0].double(), values[0].double()
        sims, targets = [], []
        for h, keep in enumerate(kept):
            keep_list = sorted(keep)
            gone = [p for p in range(N_PROMPT) if p not in keep]
            best, arg = cosine(k[h, gone], k[h, keep_list]).max(dim=-1)
            sims.append(best)
            targets.append([keep_list[a] for a in arg.tolist()])
        sims = torch.stack(sims)  # [Hkv, E]
        tau = float(sims.mean())  # the first threshold: the mean over heads and evicted entries
        on = decide(sims, tau, shared)
        merges, drops = merges + int(on.sum()), drops + int((~on).sum())
        for h, keep in enumerate(kept):
            gone = [p for p in range(N_PROMPT) if p not in keep]
            for target in keep:
                into = [i for i, p in enumerate(gone) if targets[h][i] == target and on[h, i]]
                w_self, w_in = weights(variant, [float(sims[h, i]) for i in into])
                for which, src in (("keys", k), ("values", v)):
                    expected = w_self * src[h, target] + sum(w * src[h, gone[i]] for w, i in zip(w_in, into))
                    got = entry(layer, h, target, which).double()
                    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{which} {target}")
    assert merges > 0 and drops > 0  # both outcomes happen, so the rule is exercised


# -- decode steps -------------------------------------------------------------------------------------


def first_thresholds(cache_layers, before, eager_col_sums, budget, n_sink, n_recent) -> dict[int, float]:
    """Each capped layer's first tau: the mean similarity of its prefill evictions."""
    taus = {}
    for layer, (keys, _), cols in zip(cache_layers, before, eager_col_sums):
        if layer.plan.protected:
            continue
        sims = []
        for h, keep in enumerate(kept_positions(cols, budget, n_sink, n_recent, N_PROMPT)):
            gone = [p for p in range(N_PROMPT) if p not in keep]
            sims.append(cosine(keys[0, h, gone], keys[0, h, sorted(keep)]).max(dim=-1).values)
        taus[layer.index] = float(torch.stack(sims).mean())
    return taus


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_decode_steps_evict_the_lowest_score_and_merge_keys_and_values_past_an_ema_threshold(
    lm, eager_col_sums, variant
):
    beta, statistic, shared = VARIANTS[variant]
    policy = POLICIES["d2o"](budget=0.2, variant=variant, layer_budgets="uniform")
    before, cache = compressed(lm, policy)
    budget = round(0.2 * N_PROMPT)
    n_sink, n_recent = split(budget, 4, policy.recent_share)
    tau = first_thresholds(cache.layers, before, eager_col_sums, budget, n_sink, n_recent)
    stale = dict(tau)  # what a threshold that is never carried forward would stay at
    seen_merge = seen_drop = heads_disagree = stale_differs = 0
    for number, token in enumerate(FEED, start=1):
        spy = step(lm, cache, token, number)
        seen = N_PROMPT + number
        for layer in cache.layers:
            if layer.plan.protected:
                continue
            got = spy.seen[layer.index]
            positions, keys, values, scores = got["positions"], got["keys"], got["values"], got["scores"]
            n_kv, n = positions.shape
            if n <= budget:
                continue
            protect = (positions < n_sink) | (positions >= seen - n_recent)
            victim = scores.masked_fill(protect, math.inf).argmin(dim=-1)  # [Hkv] slots
            heads = torch.arange(n_kv)
            cos = torch.stack([cosine(keys[h, victim[h]][None], keys[h])[0] for h in range(n_kv)])
            cos[heads, victim] = -math.inf
            sim, target = cos.max(dim=-1)
            new = float(sim.max() if statistic == "max" else sim.mean())
            tau[layer.index] = beta * new + (1 - beta) * tau[layer.index]
            on = decide(sim, tau[layer.index], shared)
            per_head, by_mean = sim >= tau[layer.index], (sim.mean() >= tau[layer.index]).expand(n_kv)
            heads_disagree += int((per_head != by_mean).any())
            stale_differs += int((decide(sim, stale[layer.index], shared) != on).any())
            assert held(layer) == [
                {int(p) for s, p in enumerate(positions[h]) if s != int(victim[h])} for h in range(n_kv)
            ], (number, layer.index)
            for h in range(n_kv):
                t = int(positions[h, target[h]])
                w_self, w_in = weights(variant, [float(sim[h])]) if on[h] else (1.0, [0.0])
                for which, src in (("keys", keys), ("values", values)):
                    expected = w_self * src[h, target[h]].double() + w_in[0] * src[h, victim[h]].double()
                    torch.testing.assert_close(
                        entry(layer, h, t, which).double(),
                        expected,
                        rtol=1e-5,
                        atol=1e-5,
                        msg=f"step {number} layer {layer.index} head {h} {which}",
                    )
                seen_merge, seen_drop = seen_merge + int(on[h]), seen_drop + int(not on[h])
    assert seen_merge > 0 and seen_drop > 0
    assert heads_disagree > 0  # per-head and shared decisions differ somewhere: the rule is visible
    assert stale_differs > 0  # carrying the threshold forward changes decisions somewhere


# -- budgets and the split, from the definitions -------------------------------------------------------


@pytest.mark.parametrize(
    "name,budget,settings,n_sink",
    [
        ("h2o", 0.2, {}, 0),  # 0.2 x 48 = 9.6: round keeps 10, floor would keep 9; recent 5
        ("h2o", 0.2, {"recent_share": 0.35, "n_sink": 2}, 2),  # recent 3.5 -> 4 (half to even)
        ("h2o", 0.3, {"recent_share": 0.3}, 0),  # 14.4 -> 14; recent 4.2 -> 4
        ("d2o", 0.2, {"merge": False, "layer_budgets": "uniform"}, 4),  # paper: recent 2.5 -> 2
        ("d2o", 0.3, {"merge": False, "layer_budgets": "uniform", "recent_share": 0.45}, 4),  # 6.3 -> 6
        ("streaming", 0.2, {}, 4),
    ],
)
def test_prompt_compression_keeps_round_b_lp_entries_split_by_round_recent_share(
    lm, eager_col_sums, name, budget, settings, n_sink
):
    policy = POLICIES[name](budget=budget, **settings)
    _, cache = compressed(lm, policy)
    tokens = round(budget * N_PROMPT)
    if name == "streaming":
        sinks, recent = min(n_sink, tokens - 1), tokens - min(n_sink, tokens - 1)
    else:
        sinks, recent = split(tokens, n_sink, policy.recent_share)
    for layer, cols in zip(cache.layers, eager_col_sums):
        ranking = cols if name != "streaming" else torch.zeros_like(cols)
        assert held(layer) == kept_positions(ranking, tokens, sinks, recent, N_PROMPT), layer.index


def test_d2o_layer_budgets_follow_softmax_of_negative_density(lm, prompt_attention):
    b = 0.2
    _, cache = compressed(lm, POLICIES["d2o"](budget=b))
    density = []
    for att in prompt_attention:  # per query head: variance of column sums, min-max scaled, mean
        var = att.sum(dim=1).var(dim=-1, unbiased=True)  # [Hq]
        density.append(float(((var - var.min()) / (var.max() - var.min() + 1e-6)).mean()))
    budgets = [layer.plan.budget for layer in cache.layers]
    assert [layer.plan.density for layer in cache.layers] == pytest.approx(density, abs=1e-6)
    total = LAYERS * round(b * N_PROMPT)
    assert sum(budgets) == total  # equal memory to H2O at the same budget
    w = torch.softmax(-torch.tensor(density), 0).tolist()
    raw = [min(max(LAYERS * b * x, 0.01), 1.0) for x in w]  # r_l, none clamped here
    assert all(0.01 < r < 1.0 for r in raw)
    for got, r in zip(budgets, raw):  # redistributed to the total: proportional to r_l within a token
        assert abs(got - r * total / sum(raw)) <= 1.0
    order = sorted(range(LAYERS), key=lambda i: density[i])
    assert [budgets[i] for i in order] == sorted(budgets, reverse=True)  # denser layers keep more
    assert len(set(budgets)) > 1
