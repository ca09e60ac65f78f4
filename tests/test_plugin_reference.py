"""The plug-in policies against independent readings of their papers: masked full-cache references.

Like `test_reference.py`: the reference keeps every key in a plain transformers cache, hides evicted
ones with a per-layer, per-kv-head mask in its own attention function, and scores entries from the
full probability matrix or the raw keys, written here from docs/policies.md and the
papers, sharing no code with the engine (no `ops`, no slot storage). Budgets are computed here too.
The engine must keep the same positions after the prompt and after every decode step.
"""

from __future__ import annotations

import pytest
import torch
from helpers import held_positions, prefill_cache, walk
from transformers import AttentionInterface, DynamicCache

from d2o_core import POLICIES, engine
from d2o_core.cache import PolicyCache, PrefillCache
from d2o_core.events import EventLog
from d2o_core.policies import Scoring

# Distinct tokens: a repeated token has the same first-layer key up to rotation, so the same norm, and
# key-based scores would tie (the engine breaks ties by slot, a reference by position).
IDS = list(range(33, 81))
FEED = list(range(81, 105))


def layer_mean(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[Hq, ...] -> [Hkv, ...]: the mean over ALL query heads of the layer, the same for every kv-head."""
    return x.mean(dim=0, keepdim=True).expand(n_kv, *x.shape[1:])


def group_sum(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[Hq, ...] -> [Hkv, ...]: the sum over the query heads of each kv-head group."""
    return x.reshape(n_kv, -1, *x.shape[1:]).sum(dim=1)


def group_mean(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[Hq, ...] -> [Hkv, ...]: the mean over the query heads of each kv-head group."""
    return x.reshape(n_kv, -1, *x.shape[1:]).mean(dim=1)


def pool(row: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average pooling over the last dim, window `kernel` centred, zeros beyond the ends counted."""
    n, half = row.shape[-1], kernel // 2
    out = torch.zeros_like(row)
    for j in range(n):
        lo, hi = max(0, j - half), min(n, j + half + 1)
        out[..., j] = row[..., lo:hi].sum(-1) / kernel
    return out


def pyramid_budgets(n_prompt: int, n_layers: int, budget: float, window: int, beta: float) -> list[int]:
    """PyramidKV's per-layer entries (window included), from docs/policies.md's formula."""
    cap = window + n_prompt * budget
    low = (cap - window) / beta
    high = 2 * (cap - window) - low
    if high > n_prompt - window:
        high = n_prompt - window
        low = 2 * (cap - window) - high
    return [window + round(high - layer * (high - low) / (n_layers - 1)) for layer in range(n_layers)]


class PaperReference:
    """One policy over a full cache; `keep[l]` is a [Hkv, T] bool mask of the positions it holds."""

    def __init__(self, name: str, settings: dict, budgets: list[int], n_prompt: int):
        self.name, self.settings, self.budgets, self.n_prompt = name, settings, budgets, n_prompt
        self.keep, self.score, self.acc = {}, {}, {}

    # -- what each paper protects and how it scores --------------------------------------------
    def protected(self, layer: int, total: int, prefill: bool) -> torch.Tensor:
        pos, budget = torch.arange(total), self.budgets[layer]
        if self.name == "tova":  # no sinks, no window; the newest entry stays on its first step
            return pos == total - 1
        if self.name in ("snapkv", "pyramidkv"):  # the observation window, then the last `window` seen
            return pos >= total - min(self.settings["window"], budget)
        recent = round(self.settings.get("recent_share", 0.0) * budget)
        sinks = self.settings.get("n_sink", 0)
        return (pos < sinks) | (pos >= total - recent)

    def prompt_scores(self, probs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """[Hkv, L] from the prompt's [Hq, L, L] probabilities or its [Hkv, L, D] keys and values."""
        n_kv, length = keys.shape[0], keys.shape[1]
        if self.name == "tova":
            return layer_mean(probs[:, -1, :], n_kv)  # the last prompt query, over all heads of the layer
        if self.name == "vatp":
            self.acc[self.layer] = group_sum(probs.sum(dim=1), n_kv)  # H2O's accumulated attention
            return self.acc[self.layer] * values.double().abs().sum(-1)
        if self.name in ("snapkv", "pyramidkv"):
            w, k = self.settings["window"], self.settings.get("kernel", 5)
            mean = probs[:, length - w :, :].mean(dim=1)  # [Hq, L]: the window's queries
            pooled = torch.cat([pool(mean[:, : length - w], k), mean[:, length - w :]], dim=1)
            scores = group_mean(pooled, n_kv)
            scores[:, length - w :] = torch.arange(length - w, length) + 1.0  # the window ranks by recency
            return scores
        return self.key_scores(keys)

    def key_scores(self, keys: torch.Tensor) -> torch.Tensor:
        """keys : [Hkv, S, D] of the entries held -> [Hkv, S]."""
        keys = keys.double()
        if self.name == "knorm":
            return -keys.norm(dim=-1)
        unit = keys / keys.norm(dim=-1, keepdim=True)
        anchor = unit.mean(dim=1)  # [Hkv, D]
        return -(unit @ anchor[:, :, None])[..., 0] / anchor.norm(dim=-1)[:, None]

    # -- the attention function -------------------------------------------------------------------
    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer, (_, n_q, n_new, _), n_kv = module.layer_idx, query.shape, key.shape[1]
        n_rep, total = n_q // n_kv, key.shape[2]
        k, v = key[0].repeat_interleave(n_rep, 0), value[0].repeat_interleave(n_rep, 0)
        logits = (query[0].double() @ k.double().transpose(1, 2)) * scaling  # [Hq, q, T]
        visible = torch.ones(n_q, n_new, total, dtype=torch.bool).tril(total - n_new)
        prefill = layer not in self.keep
        if not prefill:
            grown = torch.cat([self.keep[layer], torch.ones(n_kv, n_new, dtype=torch.bool)], dim=1)
            visible &= grown.repeat_interleave(n_rep, 0)[:, None, :]
        probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
        out = (probs.to(v.dtype) @ v).transpose(0, 1)[None]
        self.layer = layer
        if prefill:
            self._compress(layer, probs, key[0], value[0], total)
        else:
            self.keep[layer] = grown
            self._evict_one(layer, probs, key[0], value[0], total)
        return out, None

    def _compress(self, layer, probs, keys, values, total):
        n_kv, budget = keys.shape[0], self.budgets[layer]
        self.keep[layer] = torch.ones(n_kv, total, dtype=torch.bool)
        if budget is None:
            return
        scores = self.score[layer] = self.prompt_scores(probs, keys, values)
        if budget >= total:
            return
        rank = scores.masked_fill(self.protected(layer, total, True), float("inf"))
        keep = torch.zeros(n_kv, total, dtype=torch.bool)
        keep.scatter_(1, rank.topk(budget, dim=-1).indices, True)
        self.keep[layer] = keep

    def _evict_one(self, layer, probs, keys, values, total):
        budget, keep = self.budgets[layer], self.keep[layer]
        if budget is None:
            return
        n_kv = keep.shape[0]
        if self.name == "tova":
            scores = layer_mean(probs[:, 0, :], n_kv)  # replaced by the newest query's attention
        elif self.name == "vatp":
            grown = torch.cat([self.acc[layer], torch.zeros(n_kv, 1, dtype=self.acc[layer].dtype)], dim=1)
            self.acc[layer] = grown + group_sum(probs[:, 0, :], n_kv)
            scores = self.acc[layer] * values.double().abs().sum(-1)
        elif self.name in ("snapkv", "pyramidkv"):
            scores = torch.cat(
                [self.score[layer], torch.full((n_kv, 1), float(total))], dim=1
            )  # 1 + position
            self.score[layer] = scores
        else:
            scores = torch.full((n_kv, total), float("inf"), dtype=torch.float64)
            for h in range(n_kv):
                held = keep[h].nonzero()[:, 0]
                scores[h, held] = self.key_scores(keys[h : h + 1, held])[0]
        if int(keep[0].sum()) <= budget:
            return
        rank = scores.double().masked_fill(~keep | self.protected(layer, total, False), float("inf"))
        keep[torch.arange(n_kv), rank.argmin(-1)] = False


def reference_trace(lm, ref: PaperReference, feed):
    AttentionInterface.register("paper_reference", ref.attention)
    lm.model.set_attn_implementation("paper_reference")
    try:
        cache, kept = DynamicCache(), []
        for chunk in [IDS] + [[t] for t in feed]:
            start = cache.get_seq_length()
            with torch.no_grad():
                lm.model(
                    input_ids=torch.tensor([chunk]),
                    position_ids=torch.arange(start, start + len(chunk))[None],
                    past_key_values=cache,
                    use_cache=True,
                )
            kept.append([[m.nonzero()[:, 0].tolist() for m in ref.keep[i]] for i in range(lm.n_layers)])
        return kept
    finally:
        lm.model.set_attn_implementation("d2o_sdpa")


CASES = [
    ("tova", {}),
    ("snapkv", {"window": 8, "kernel": 3}),
    ("snapkv", {"window": 5, "kernel": 5, "n_sink": 0}),
    ("pyramidkv", {"window": 6, "kernel": 3}),
    ("keydiff", {"recent_share": 0.1}),  # the defaults
    ("keydiff", {"recent_share": 0.0}),  # the papers' (no window)
    ("keydiff", {"n_sink": 2, "recent_share": 0.25}),
    ("knorm", {"recent_share": 0.1}),
    ("knorm", {"recent_share": 0.0}),
    ("knorm", {"recent_share": 0.5}),
    ("vatp", {"n_sink": 4, "recent_share": 0.5}),
    ("vatp", {"n_sink": 1, "recent_share": 0.25}),
]


@pytest.mark.parametrize("name,settings", CASES, ids=[f"{n}-{s}" for n, s in CASES])
@pytest.mark.parametrize("budget", [0.2, 0.45])
def test_engine_keeps_what_an_independent_reading_of_the_paper_keeps(tiny, name, settings, budget):
    n = len(IDS)
    if name == "pyramidkv":
        budgets = pyramid_budgets(n, tiny.n_layers, budget, settings["window"], 20.0)
    else:
        budgets = [round(budget * n)] * tiny.n_layers
    policy = POLICIES[name](budget=budget, **settings)
    engine = [
        [held_positions(layer) for layer in cache.layers]
        for _, cache, _ in walk(tiny, IDS, policy, len(FEED), FEED)
    ]
    ref = reference_trace(tiny, PaperReference(name, settings, budgets, n), FEED)
    assert [len(engine[0][i][0]) for i in range(tiny.n_layers)] == budgets
    for step, (a, b) in enumerate(zip(engine, ref)):
        assert a == b, step


def test_pyramid_budgets_fall_with_depth_and_fall_back_to_snapkv_when_they_do_not_fit():
    plans = POLICIES["pyramidkv"](budget=0.3, window=6).plans(48, 4)
    assert [p.budget for p in plans] == pyramid_budgets(48, 4, 0.3, 6, 20.0) == [34, 25, 16, 7]
    assert all(p.n_recent == 6 for p in plans)
    # 100 tokens, window 64, half kept: the pyramid would need more room than the prompt has.
    assert [p.budget for p in POLICIES["pyramidkv"](budget=0.5).plans(100, 4)] == [50] * 4


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
def test_prompts_not_longer_than_the_window_are_not_compressed(tiny, name):
    cache, _ = prefill_cache(tiny, IDS, POLICIES[name](budget=0.2))  # default window 64 > 48 tokens
    assert all(layer.plan.budget is None and layer.stored == len(IDS) for layer in cache.layers)


@pytest.mark.parametrize(
    "name,settings,message",
    [
        ("snapkv", {"window": 0}, "window"),
        ("snapkv", {"window": -3}, "window"),
        ("snapkv", {"kernel": 4}, "kernel must be odd"),
        ("pyramidkv", {"beta": 0.5}, "beta"),
        ("tova", {"n_sink": -1}, "n_sink"),
        ("keydiff", {"recent_share": 2}, "recent_share"),
        ("knorm", {"n_sink": 1.5}, "n_sink"),
        ("cam", {"merge_tokens": 0}, "merge_tokens"),
        ("d2o", {"variant": "cam"}, "variant"),
    ],
)
def test_bad_settings_get_a_sentence(name, settings, message):
    with pytest.raises(ValueError, match=message):
        POLICIES[name](**settings)


def test_a_prefill_without_the_window_queries_says_how_to_build_one(tiny):

    prefill = PrefillCache(tiny.n_layers, record=True, queries=2)
    engine.prefill(tiny, prefill, IDS)
    with pytest.raises(ValueError, match="prefill_needs"):
        PolicyCache.from_prefill(prefill, POLICIES["snapkv"](budget=0.3, window=8), 1, EventLog())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_says_where_it_comes_from(name):
    cls = POLICIES[name]
    assert isinstance(cls().scoring(), Scoring)
    if name != "full":
        assert "https://" in cls.description and "\n" not in cls.description
