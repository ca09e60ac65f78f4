"""The engine against a slow, obvious reference: eviction by masking a full cache.

The reference keeps every key in a plain transformers cache and hides evicted ones
with a per-layer, per-kv-head mask inside its own attention function, recomputing
everything from the full probability matrix. It shares no code with the engine's
slot storage, scores, or eviction, so agreement checks the engine's bookkeeping
(kept sets per step, scores, and the logits that come out).
"""

from __future__ import annotations

import pytest
import torch
from helpers import TEXT, held_positions, prefill_cache, walk
from transformers import AttentionInterface, DynamicCache

from d2o_core import POLICIES


class MaskedReference:
    """H2O/StreamingLLM over a full cache: `keep[l]` is a [Hkv, T] bool mask of surviving positions."""

    def __init__(self, plans, use_scores: bool):
        self.plans, self.use_scores = plans, use_scores
        self.keep, self.score = {}, {}

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer, (_, n_q, n_new, _), n_kv = module.layer_idx, query.shape, key.shape[1]
        n_rep, total = n_q // n_kv, key.shape[2]
        k, v = key[0].repeat_interleave(n_rep, 0), value[0].repeat_interleave(n_rep, 0)
        logits = (query[0] @ k.transpose(1, 2)) * scaling  # [Hq, q, T]
        visible = torch.ones(n_q, n_new, total, dtype=torch.bool).tril(total - n_new)
        if layer in self.keep:  # decode: the new token plus the kept ones
            grown = torch.cat([self.keep[layer], torch.ones(n_kv, n_new, dtype=torch.bool)], dim=1)
            visible &= grown.repeat_interleave(n_rep, 0)[:, None, :]
        probs = logits.masked_fill(~visible, float("-inf")).softmax(-1, dtype=torch.float32)
        out = (probs.to(v.dtype) @ v).transpose(0, 1)[None]
        per_kv = probs.sum(1).reshape(n_kv, n_rep, total).sum(1)  # column sums per kv-head
        if layer not in self.keep:
            self._compress(layer, per_kv, total)
        else:
            self.score[layer] = torch.cat([self.score[layer], torch.zeros(n_kv, 1)], 1) + per_kv
            self.keep[layer] = grown
            self._evict_one(layer, total)
        return out, None

    def _protected(self, layer, total):
        plan = self.plans[layer]
        pos = torch.arange(total)
        return (pos < plan.n_sink) | (pos >= total - plan.n_recent)

    def _compress(self, layer, per_kv, total):
        plan, n_kv = self.plans[layer], per_kv.shape[0]
        self.score[layer] = per_kv
        keep = torch.ones(n_kv, total, dtype=torch.bool)
        if plan.budget is not None and plan.budget < total:
            rank = (per_kv if self.use_scores else torch.arange(total).float().expand(n_kv, -1)).clone()
            protected = self._protected(layer, total)
            rank[:, protected] = float("inf")
            keep = torch.zeros(n_kv, total, dtype=torch.bool)
            keep.scatter_(1, rank.topk(plan.budget, dim=-1).indices, True)
        self.keep[layer] = keep

    def _evict_one(self, layer, total):
        plan, keep = self.plans[layer], self.keep[layer]
        if plan.budget is None or int(keep[0].sum()) <= plan.budget:
            return
        rank = self.score[layer] if self.use_scores else torch.arange(total).float().expand(keep.shape[0], -1)
        rank = rank.masked_fill(~keep | self._protected(layer, total), float("inf"))
        keep[torch.arange(keep.shape[0]), rank.argmin(-1)] = False


def engine_trace(lm, ids, policy, feed):
    """The engine's logits and held positions (per layer, per kv-head) after the prompt and each fed token."""
    logits, kept = [], []
    for _, cache, out in walk(lm, ids, policy, len(feed), feed=feed):
        logits.append(out)
        kept.append([held_positions(layer) for layer in cache.layers])
    return logits, kept


def reference_trace(lm, ids, plans, use_scores, feed):
    ref = MaskedReference(plans, use_scores)
    AttentionInterface.register("masked_reference", ref.attention)
    lm.model.set_attn_implementation("masked_reference")
    try:
        cache, logits, kept = DynamicCache(), [], []
        for chunk in [ids] + [[t] for t in feed]:
            start = cache.get_seq_length()
            with torch.no_grad():
                out = lm.model(
                    input_ids=torch.tensor([chunk]),
                    position_ids=torch.arange(start, start + len(chunk))[None],
                    past_key_values=cache,
                    use_cache=True,
                )
            logits.append(out.logits[0, -1])
            kept.append([[m.nonzero()[:, 0].tolist() for m in ref.keep[i]] for i in range(lm.n_layers)])
        return logits, kept
    finally:
        lm.model.set_attn_implementation("d2o_sdpa")


@pytest.mark.parametrize(
    "name,kw",
    [("h2o", {}), ("h2o", {"n_sink": 2, "recent_share": 0.2}), ("streaming", {}), ("d2o", {"merge": False})],
)
@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_engine_keeps_what_a_masked_full_cache_reference_keeps(tiny, name, kw, budget):
    ids = [ord(c) for c in TEXT[:48]]
    feed = [ord(c) for c in TEXT[48:72]]
    policy = POLICIES[name](budget=budget, **kw)
    logits, kept = engine_trace(tiny, ids, policy, feed)
    plans = [layer.plan for layer in prefill_cache(tiny, ids, policy)[0].layers]
    ref_logits, ref_kept = reference_trace(
        tiny, ids, plans, name != "streaming", feed
    )  # StreamingLLM keeps by age
    assert kept == ref_kept
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
