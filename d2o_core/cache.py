"""transformers Cache integration: the shared prompt cache and the per-policy compressed cache.

What this module is: `PrefillCache` (a plain growing cache for the one prompt pass that
all policies share; it also keeps each layer's attention column sums) and `PolicyCache`,
a list of `PolicyLayer`s that apply a policy's `LayerPlan`s: compress once from the
prefill (step 0), then at every generated token add the new attention row to the
scores and evict one entry per kv-head when over budget, merging it when D2O says so.

Storage: each layer holds `[1, Hkv, capacity, D]` buffers. An evicted slot is reused
by the next token (no concatenation or gather per step); kv-heads may keep different
tokens, so `positions[h, slot]` records each entry's original token position. Two
counts stay apart: `seen` (tokens fed, drives rotary positions) and `stored` (entries
held, drives attention). Batch size 1.

What it is not: it decides nothing about which policy to run and computes no maths
itself (see `ops.py`); all its state is per request.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from . import ops
from .events import EventLog
from .policies import LayerPlan, MergeRule, Policy


class PrefillLayer(DynamicLayer):
    """A growing layer that also remembers its prompt attention column sums ([Hq, L])."""

    col_sums: torch.Tensor | None = None


class PrefillCache(Cache):
    """Cache for the shared prompt pass; records column sums when `record` is set."""

    def __init__(self, n_layers: int, record: bool):
        super().__init__(layers=[PrefillLayer() for _ in range(n_layers)])
        self.record = record

    def observe(self, layer_idx: int, query, key, scaling: float) -> None:
        if self.record:
            self.layers[layer_idx].col_sums = ops.prefill_column_sums(query, key, scaling)


class PolicyLayer(CacheLayerMixin):
    """One layer's compressed storage, scores and D2O threshold for one request."""

    is_sliding = False
    is_compileable = False

    def __init__(
        self,
        index: int,
        plan: LayerPlan,
        merge: MergeRule | None,
        capacity: int,
        like: torch.Tensor,
        with_scores: bool,
    ):
        super().__init__()
        _, n_kv, _, dim = like.shape
        device = like.device
        self.index, self.plan, self.merge = index, plan, merge
        # Keys and values share one buffer so a merge reads and writes both in one indexed op.
        self.kv = like.new_empty(2, n_kv, capacity, dim)
        self.keys, self.values = self.kv[0:1], self.kv[1:2]
        self.positions = torch.zeros(n_kv, capacity, dtype=torch.long, device=device)
        self.scores = torch.zeros(n_kv, capacity, dtype=torch.float32, device=device) if with_scores else None
        # Key norms, kept current so D2O's cosine similarities cost one matmul per step.
        self.norms = torch.ones(n_kv, capacity, dtype=torch.float32, device=device) if merge else None
        self.heads = torch.arange(n_kv, device=device)
        self.used = 0  # slots [0, used) hold entries whenever attention runs
        self.hole: torch.Tensor | None = None  # [Hkv] slot per head freed by the last eviction
        self.seen = 0
        self.peak = 0
        self.tau: torch.Tensor | None = None
        self.is_initialized = True
        self.dtype, self.device = like.dtype, device

    # -- transformers' layer interface ----------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist from the start
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store one new token (into the slot the last eviction freed) and return the entries to attend."""
        if key_states.shape[-2] != 1:
            raise ValueError("a compressed cache takes one new token per forward pass")
        if self.hole is None:
            self._grow(self.used + 1)
            index = (slice(None), self.used)  # one new slot, the same for every head
            self.used += 1
        else:
            index, self.hole = (self.heads, self.hole), None  # each head refills the slot it freed
        self.keys[0][index] = key_states[0, :, 0]
        self.values[0][index] = value_states[0, :, 0]
        self.positions[index] = self.seen
        if self.scores is not None:
            self.scores[index] = 0.0
        if self.norms is not None:
            self.norms[index] = _norm(key_states[0, :, 0])
        self.seen += 1
        self.peak = max(self.peak, self.used)
        return self.keys[:, :, : self.used], self.values[:, :, : self.used]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # -- policy ----------------------------------------------------------------------------------
    @property
    def stored(self) -> int:
        return self.used - (self.hole is not None)

    def load(self, keys, values, positions, scores, seen: int) -> None:
        """Fill the first slots with compressed prompt entries ([Hkv, S, D] / [Hkv, S])."""
        n = keys.shape[1]
        self.kv[0, :, :n], self.kv[1, :, :n] = keys, values
        self.positions[:, :n] = positions
        if self.scores is not None:
            self.scores[:, :n] = scores
        if self.norms is not None:
            self.norms[:, :n] = _norm(keys)
        self.used, self.seen, self.peak = n, seen, seen

    def after_attention(self, query, key, scaling: float, step: int, log: EventLog) -> None:
        """Add the new query's attention row to the scores, then evict one entry per head if over budget."""
        if self.scores is not None:
            self.scores[:, : self.used] += ops.attention_row(query, key, scaling)
        budget = self.plan.budget
        if budget is None or self.stored <= budget:
            log.record_step(step, self.index, self.stored, self.seen if budget is None else budget, 0, 0)
            return
        heads, positions = self.heads, self.positions[:, : self.used]
        ranking = self.scores[:, : self.used] if self.scores is not None else positions
        victim = ops.pick_victim(ranking, positions, self.plan.n_sink, self.plan.n_recent, self.seen)
        score = self.scores[heads, victim] if self.scores is not None else None
        target = sim = merged = None
        if self.merge is not None:
            target, sim, merged = self._merge_one(victim)
        log.record(step, self.index, heads, positions[heads, victim], score, target, sim, merged)
        self.hole = victim
        log.record_step(step, self.index, self.stored, budget, len(heads), 0 if merged is None else merged)

    def _merge_one(self, victim: torch.Tensor):
        """D2O at one step: fold each head's victim into its most similar kept entry when it passes tau.

        Returns the targets' positions, the similarities and the merge decisions, all [Hkv].
        """
        rule, heads, used = self.merge, self.heads, self.used
        kv = self.kv[:, :, :used]
        gone = kv[:, heads, victim]  # [2, Hkv, D]
        dots = torch.bmm(kv[0], gone[0][:, :, None])[..., 0].float()
        cos = dots / (self.norms[:, :used] * self.norms[heads, victim][:, None])
        cos[heads, victim] = float("-inf")
        sim, target = cos.max(dim=-1)
        self.tau = ops.update_threshold(self.tau, sim, rule.beta, rule.statistic)
        merged = ops.merge_decision(sim, self.tau, rule.shared_by_heads)
        w_self, w_in = ops.pair_weights(sim, merged, rule.variant)
        new = kv[:, heads, target].float() * w_self[:, None] + gone.float() * w_in[:, None]
        kv[:, heads, target] = new.to(kv.dtype)
        self.norms[heads, target] = _norm(new[0])
        return self.positions[heads, target], sim, merged

    def _grow(self, need: int) -> None:
        cap = self.kv.shape[2]
        if need <= cap:
            return
        pad = max(need, 2 * cap) - cap
        self.kv = F.pad(self.kv, (0, 0, 0, pad))
        self.keys, self.values = self.kv[0:1], self.kv[1:2]
        self.positions = F.pad(self.positions, (0, pad))
        if self.scores is not None:
            self.scores = F.pad(self.scores, (0, pad))
        if self.norms is not None:
            self.norms = F.pad(self.norms, (0, pad), value=1.0)

    def clone(self) -> PolicyLayer:
        """An independent copy (used to fork a teacher-forced run)."""
        twin = object.__new__(PolicyLayer)
        twin.__dict__.update(self.__dict__)
        for name in ("kv", "positions", "scores", "norms", "hole", "tau"):
            value = getattr(self, name)
            setattr(twin, name, value.clone() if isinstance(value, torch.Tensor) else value)
        twin.keys, twin.values = twin.kv[0:1], twin.kv[1:2]
        return twin


def _norm(keys: torch.Tensor) -> torch.Tensor:
    """Euclidean norms over the last dim in float32, never 0 (they divide)."""
    return torch.linalg.vector_norm(keys.float(), dim=-1).clamp_min_(1e-12)


def compress_layer(
    index: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    col_sums,
    plan: LayerPlan,
    merge: MergeRule | None,
    with_scores: bool,
    extra: int,
    log: EventLog,
) -> PolicyLayer:
    """Step 0 for one layer: cut the prompt's entries down to `plan.budget` per kv-head.

    keys, values : [1, Hkv, L, D] from the prefill; col_sums : [Hq, L] or None.
    `extra`: room for the tokens still to come when the layer never evicts.
    """
    _, n_kv, length, dim = keys.shape
    budget = plan.budget
    capacity = length + extra if budget is None else max(budget, length) + 1
    layer = PolicyLayer(index, plan, merge, capacity, keys, with_scores)
    positions = torch.arange(length, device=keys.device).expand(n_kv, length)
    scores = ops.group_heads(col_sums, n_kv) if with_scores else None
    if budget is None or budget >= length:
        layer.load(keys[0], values[0], positions, scores, length)
        log.record_step(0, index, length, length if budget is None else budget, 0, 0)
        return layer
    ranking = scores if scores is not None else positions
    kept, gone = ops.keep_sets(ranking, positions, budget, plan.n_sink, plan.n_recent, length)
    take = lambda src, idx: src[0].gather(1, idx[..., None].expand(-1, -1, dim))  # noqa: E731
    k_keep, v_keep = take(keys, kept), take(values, kept)
    target_pos = sim = on = None
    if merge is not None and gone.shape[1]:
        k_gone, v_gone = take(keys, gone), take(values, gone)
        sim, target = ops.nearest_kept(k_gone, k_keep)
        layer.tau = ops.update_threshold(None, sim, merge.beta, merge.statistic)
        on = ops.merge_decision(sim, layer.tau, merge.shared_by_heads)
        w_self, w_in = ops.merge_weights(sim, target, on, budget, merge.variant)
        k_keep = ops.apply_merge(k_keep, k_gone, target, w_self, w_in)
        v_keep = ops.apply_merge(v_keep, v_gone, target, w_self, w_in)
        target_pos = kept.gather(1, target)
    layer.load(k_keep, v_keep, kept, scores.gather(1, kept) if scores is not None else None, length)
    heads = torch.arange(n_kv, device=keys.device)[:, None].expand_as(gone)
    gone_score = scores.gather(1, gone) if scores is not None else None
    log.record(0, index, heads, gone, gone_score, target_pos, sim, on)
    log.record_step(0, index, budget, budget, gone.numel(), 0 if on is None else on)
    return layer


class PolicyCache(Cache):
    """A policy's per-request cache: one `PolicyLayer` per model layer, plus its event log."""

    def __init__(self, layers: list[PolicyLayer], log: EventLog):
        super().__init__(layers=layers)
        self.log = log
        self.step = 0

    @classmethod
    def from_prefill(cls, prefill: PrefillCache, policy: Policy, extra: int, log: EventLog) -> PolicyCache:
        """Compress the shared prompt cache for `policy` (step 0)."""
        layers = prefill.layers
        n_prompt = layers[0].keys.shape[2]
        col_sums = [layer.col_sums for layer in layers] if policy.needs_density else None
        plans = policy.plans(n_prompt, len(layers), col_sums)
        merge = policy.merge_rule()
        compressed = [
            compress_layer(
                i, layer.keys, layer.values, layer.col_sums, plan, merge, policy.needs_scores, extra, log
            )
            for i, (layer, plan) in enumerate(zip(layers, plans))
        ]
        return cls(compressed, log)

    def observe(self, layer_idx: int, query, key, scaling: float) -> None:
        self.layers[layer_idx].after_attention(query, key, scaling, self.step, self.log)

    @property
    def plans(self) -> list[LayerPlan]:
        return [layer.plan for layer in self.layers]

    def entry_bytes(self) -> int:
        """Bytes of one entry (key + value) across the kv-heads of one layer."""
        keys = self.layers[0].keys
        return 2 * keys.shape[1] * keys.shape[3] * keys.element_size()

    def stored_entries(self) -> int:
        return sum(layer.stored for layer in self.layers)

    def peak_entries(self) -> int:
        return sum(layer.peak for layer in self.layers)

    def clone(self) -> PolicyCache:
        """An independent copy that logs nothing (for teacher-forced measurements)."""
        twin = PolicyCache([layer.clone() for layer in self.layers], EventLog(enabled=False))
        twin.step = self.step
        return twin
