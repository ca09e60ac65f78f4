"""transformers Cache integration: the shared prompt cache and the per-policy compressed cache.

What this module is: `PrefillCache` (a plain growing cache for the one prompt pass that
all policies share; it also keeps each layer's attention column sums) and `PolicyCache`,
a list of `PolicyLayer`s that apply a policy's `LayerPlan`s: compress once from the
prefill (step 0), then at every generated token update the scores from the policy's score
source (add or replace the new attention row; nothing for prefill-window or key scores) and
evict one entry per kv-head when over budget, merging it when the policy's rule says so.

Storage: one slot pool per cache, `[2, Hkv, slots, D]`, in which each layer owns a
window of `budget + 1` slots (prompt + room for the rest where it never evicts). An evicted
slot is reused by the next token (no concatenation or gather per step); kv-heads may keep
different tokens, so `positions[h, slot]` records each entry's original token position.
Two counts stay apart: `seen` (tokens fed, drives rotary positions) and `stored`
(entries held, drives attention). Batch size 1 per cache; `batching.py` decodes several.

What it is not: it decides nothing about which policy to run and computes no maths
itself (see `ops.py`); all its state is per request.
"""

from __future__ import annotations

import copy
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from . import evict, ops
from .events import EventLog
from .policies import LayerPlan, Merging, Policy, Scoring

# How many last prompt queries a prefill keeps when only told to `record` (bounds SnapKV's window).
MAX_WINDOW = 512


class PrefillLayer(DynamicLayer):
    """A growing layer that also remembers its prompt attention column sums ([Hq, L]) and last queries."""

    col_sums: torch.Tensor | None = None
    queries: torch.Tensor | None = None  # [Hq, W, D]: the last W prompt queries (post-rotary)
    scaling: float = 1.0


class PrefillCache(Cache):
    """Cache for the shared prompt pass.

    record : keep each layer's prompt attention column sums (accumulated scores, D2O's densities).
    queries : how many last prompt queries to keep per layer ("latest"/"window" scores); default
        `MAX_WINDOW` when `record`, else none. `prefill_needs` gives both for a set of policies.
    """

    def __init__(self, n_layers: int, record: bool, queries: int | None = None):
        super().__init__(layers=[PrefillLayer() for _ in range(n_layers)])
        self.record = record
        self.queries = (MAX_WINDOW if record else 0) if queries is None else queries

    @property
    def wants_column_sums(self) -> bool:
        """Ask the attention function for the column sums of its own pass (capture.attention_forward)."""
        return self.record

    def observe(self, layer_idx: int, query, key, scaling: float, col_sums=None) -> None:
        layer = self.layers[layer_idx]
        if self.record:
            layer.col_sums = (
                col_sums if col_sums is not None else ops.prefill_column_sums(query, key, scaling)
            )
        if self.queries:
            layer.queries, layer.scaling = query[0, :, -self.queries :].clone(), scaling


def prefill_needs(policies) -> dict:
    """`PrefillCache` arguments that serve every policy in `policies` from one prompt pass."""
    scorings = [p.scoring() for p in policies]
    return {
        "record": any(s.prompt_attention for s in scorings) or any(p.needs_density for p in policies),
        "queries": max([s.prompt_queries for s in scorings] or [0]),
    }


class PolicyLayer(CacheLayerMixin):
    """One layer's window onto its cache's slot pool: slots `[offset, offset + capacity)`."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: PolicyCache, index: int, offset: int, capacity: int, plan: LayerPlan):
        # No super().__init__(): `keys`/`values` are views of the pool here, not attributes.
        # A weak link back: a cycle between cache and layers would keep large tensors alive until
        # Python's cycle collector happens to run (measured: RSS grew ~300 MB per comparison).
        self._cache = weakref.ref(cache)
        self.index, self.offset, self.capacity, self.plan = index, offset, capacity, plan
        self.used = 0  # slots [offset, offset + used) hold entries whenever attention runs
        self.hole_slots: torch.Tensor | None = None  # [Hkv] pool slots freed by the last eviction
        self.seen = 0
        self.peak = 0
        self.is_initialized = True

    @property
    def cache(self) -> PolicyCache:
        cache = self._cache()
        if cache is None:
            raise RuntimeError("this layer's PolicyCache is gone: keep the cache, not only its layers")
        return cache

    # -- views (always of the current pool, which `PolicyCache.grow` may replace) ------------------
    @property
    def keys(self) -> torch.Tensor:
        return self.cache.kv[0:1, :, self.offset : self.offset + self.capacity]

    @property
    def values(self) -> torch.Tensor:
        return self.cache.kv[1:2, :, self.offset : self.offset + self.capacity]

    @property
    def positions(self) -> torch.Tensor:
        return self.cache.positions[:, self.offset : self.offset + self.capacity]

    @property
    def hole(self) -> torch.Tensor | None:
        """Per kv-head, the layer-relative slot freed by the last eviction (refilled by the next token)."""
        return None if self.hole_slots is None else self.hole_slots - self.offset

    @property
    def stored(self) -> int:
        return self.used - (self.hole_slots is not None)

    # -- transformers' layer interface ----------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:  # the pool exists from the start
        pass

    def claim_slot(self):
        """Book the slot the next token goes to: the last eviction's hole per head, else the next free one.

        Returns an int (the same pool slot for every head) or a [Hkv] tensor of pool slots.
        """
        if self.hole_slots is not None:
            slot, self.hole_slots = self.hole_slots, None  # each head refills its freed slot
        else:
            if self.used == self.capacity:
                self.cache.grow(self)
            slot = self.offset + self.used
            self.used += 1
        self.seen += 1
        self.peak = max(self.peak, self.used)
        return slot

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new token(s) and return the entries to attend.

        One token per forward pass goes into the slot the last eviction freed, if any. Several at once
        are taken only while the cache is holding (a question fed right after the compression), and go
        after every stored entry, so the attention's mask can count them from the end.
        """
        cache, n_new = self.cache, key_states.shape[-2]
        if n_new != 1 and not (cache.holding and self.hole_slots is None):
            raise ValueError("a compressed cache takes one new token per forward pass")
        for i in range(n_new):
            self.store(key_states[0, :, i], value_states[0, :, i])
        end = self.offset + self.used
        return cache.kv[0:1, :, self.offset : end], cache.kv[1:2, :, self.offset : end]

    def store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write one token's [Hkv, D] key and value at its claimed slot, with its position and score."""
        cache, position = self.cache, self.seen
        slot = self.claim_slot()
        index = (slice(None), slot) if isinstance(slot, int) else (cache.heads, slot)
        cache.kv[0][index] = key
        cache.kv[1][index] = value
        cache.positions[index] = position
        if cache.scores is not None:
            cache.scores[index] = cache.scoring.fresh(position)
        if cache.norms is not None:
            cache.norms[index] = ops.norms(key)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def load(self, keys, values, positions, scores, seen: int) -> None:
        """Fill the first slots with the compressed prompt ([Hkv, S, D] / [Hkv, S])."""
        cache, n = self.cache, keys.shape[1]
        window = slice(self.offset, self.offset + n)
        cache.kv[0, :, window], cache.kv[1, :, window] = keys, values
        cache.positions[:, window] = positions
        if cache.scores is not None and scores is not None:
            cache.scores[:, window] = scores
        if cache.norms is not None:
            cache.norms[:, window] = ops.norms(keys)
        self.used, self.seen, self.peak = n, seen, seen

    def reload(self, keys, values, positions, scores) -> None:
        """Replace the layer's entries by a compressed set (a later compression; seen and peak stay)."""
        seen, peak = self.seen, self.peak
        self.load(keys, values, positions, scores, seen)
        self.hole_slots, self.peak = None, peak


class PolicyCache(Cache):
    """A policy's per-request cache: one slot pool shared by its `PolicyLayer`s, plus its event log.

    The pool holds `[2, Hkv, slots, D]` keys and values with per-slot positions, scores and key
    norms. Capped layers come first, so the slots where evictions happen form one region that
    `evict.evict_step` handles for all layers at once.
    """

    stacked = False  # True while the storage is a view into a `batching.StackedBatch`
    every = 1  # compress after every step (1), every N steps (N), or only at the prompt (0)
    holding = False  # True while entries are fed that no compression may evict (a question)

    def __init__(
        self,
        plans: list[LayerPlan],
        merge: Merging | None,
        scoring: Scoring,
        like: torch.Tensor,
        capacities: list[int],
        log: EventLog,
    ):
        _, n_kv, _, dim = like.shape
        device = like.device
        order = [i for i, p in enumerate(plans) if p.budget is not None]
        order += [i for i, p in enumerate(plans) if p.budget is None]
        offsets, total = {}, 0
        for i in order:
            offsets[i], total = total, total + capacities[i]
        super().__init__(
            layers=[PolicyLayer(self, i, offsets[i], capacities[i], p) for i, p in enumerate(plans)]
        )
        self.merge, self.log, self.step = merge, log, 0
        self.scoring = scoring  # how entries are scored: at the prompt, at each step, at eviction
        self.heads = torch.arange(n_kv, device=device)
        self.kv = like.new_empty(2, n_kv, total, dim)
        self.positions = torch.zeros(n_kv, total, dtype=torch.long, device=device)
        self.scores = torch.zeros(n_kv, total, dtype=torch.float32, device=device) if scoring.stored else None
        # Key norms, kept current so D2O's cosine similarities cost one multiply-sum per step.
        with_norms = merge is not None and merge.needs_norms
        self.norms = torch.ones(n_kv, total, dtype=torch.float32, device=device) if with_norms else None
        self.capped = [self.layers[i] for i in order if plans[i].budget is not None]
        self.tau = torch.full(
            (len(self.capped),), float("nan"), device=device
        )  # D2O thresholds, per capped layer
        self._index_region()

    def _index_region(self) -> None:
        """Per-slot constants of the eviction region: owning layer (segment), sinks, recent window."""
        device, caps = self.kv.device, [layer.capacity for layer in self.capped]
        per_slot = lambda values: torch.tensor(values, device=device).repeat_interleave(  # noqa: E731
            torch.tensor(caps, device=device, dtype=torch.long)
        )
        self.region = sum(caps)
        self.segments = ops.Segments.of(caps, device)
        self.segment = per_slot(list(range(len(caps)))) if caps else torch.zeros(0, dtype=torch.long)
        self.slot_sinks = per_slot([layer.plan.n_sink for layer in self.capped]) if caps else self.segment
        self.slot_recent = per_slot([layer.plan.n_recent for layer in self.capped]) if caps else self.segment
        self.slot_index = torch.arange(self.kv.shape[2], device=device)

    @classmethod
    def from_prefill(
        cls, prefill: PrefillCache, policy: Policy, extra: int, log: EventLog, hold: int = 0
    ) -> PolicyCache:
        """Compress the shared prompt cache for `policy` (step 0).

        extra : room for the tokens still to come in layers that never evict (and in every layer when
            the policy compresses only once).
        hold : entries fed after the compression that it must not evict (a question kept whole).
        """
        layers = prefill.layers
        like = layers[0].keys
        n_prompt = like.shape[2]
        col_sums = [layer.col_sums for layer in layers] if policy.needs_density else None
        plans = policy.plans(n_prompt, len(layers), col_sums)
        # A capped layer holds at most its budget, what is held past it, and the tokens it may grow by
        # before it compresses again (1: the token being added).
        room = hold + max(1, policy.decode_room(extra))
        capacities = [n_prompt + hold + extra if p.budget is None else p.budget + room for p in plans]
        scoring = policy.scoring()
        cache = cls(plans, policy.merge_rule(), scoring, like, capacities, log)
        cache.every = policy.compress_every
        column = {layer.index: j for j, layer in enumerate(cache.capped)}
        n_kv = like.shape[1]
        for src, layer in zip(layers, cache.layers):
            capped = layer.plan.budget is not None
            scores = scoring.prompt(src, n_kv) if capped else None
            ranks = capped and scoring.ranks_entries
            ranking = scoring.rank(src.keys[0], src.values[0], scores) if ranks else None
            tau = evict.compress_layer(layer, src.keys, src.values, scores, ranking, cache.merge, log)
            if tau is not None:
                cache.tau[column[layer.index]] = tau
        return cache

    def wants_probs(self, layer_idx: int) -> bool:
        """Whether this layer's scores take the step's attention (the attention function then hands
        its probabilities over instead of this cache computing them again)."""
        return self.scoring.step_attention and self.layers[layer_idx].plan.budget is not None

    def observe(self, layer_idx: int, query, key, scaling: float, probs=None) -> None:
        """At each layer's attention: update the scores as the policy's scoring says; then maybe evict.

        probs : the step's attention [1, Hkv, n_rep, S] when the attention function computed it.
        """
        layer = self.layers[layer_idx]
        if self.wants_probs(layer_idx):
            window = self.scores[:, layer.offset : layer.offset + layer.used]
            n_rep = query.shape[1] // key.shape[1]
            if probs is not None:
                self.scoring.update(window, probs[0].sum(dim=1), n_rep)
            elif query.shape[2] == 1:
                self.scoring.update(window, ops.attention_row(query, key, scaling), n_rep)
            else:  # tokens held after the compression: each query in turn, as if fed one by one
                for row in ops.appended_rows(query, key, scaling):
                    self.scoring.update(window, row, n_rep)
        if layer_idx == len(self.layers) - 1:
            evict.evict_step(self)

    STORES = ("kv", "positions", "scores", "norms")

    def grow(self, layer: PolicyLayer) -> None:
        """Give `layer` twice the room, moving every layer's slots to a new pool (rare: only past `extra`)."""
        if self.stacked:
            raise RuntimeError("a layer outgrew its room inside a stacked batch; give the rows more `extra`")
        grow_by, capacities = layer.capacity, {ly.index: ly.capacity for ly in self.layers}
        capacities[layer.index] *= 2
        offsets = {ly.index: ly.offset + (grow_by if ly.offset > layer.offset else 0) for ly in self.layers}
        total = self.kv.shape[2] + grow_by  # the grown layer is uncapped: it sits after every capped one
        n_kv, dim = self.kv.shape[1], self.kv.shape[3]
        stores = {
            "kv": self.kv.new_empty(2, n_kv, total, dim),
            "positions": self.positions.new_zeros(n_kv, total),
            "scores": None if self.scores is None else self.scores.new_zeros(n_kv, total),
            "norms": None if self.norms is None else self.norms.new_ones(n_kv, total),
        }
        self.relocate(stores, offsets, capacities)

    def relocate(self, stores: dict, offsets: dict[int, int], capacities: dict[int, int]) -> None:
        """Move every layer's entries into new storage (`stores`: the `STORES` tensors, views allowed).

        offsets, capacities : per layer index, its window in the new storage; capacities never shrink
        below what a layer uses, and capped layers must stay first, contiguous, in the same order.
        """
        for ly in self.layers:
            n = ly.used
            src, dst = slice(ly.offset, ly.offset + n), slice(offsets[ly.index], offsets[ly.index] + n)
            stores["kv"][:, :, dst] = self.kv[:, :, src]
            for name in ("positions", "scores", "norms"):
                if getattr(self, name) is not None:
                    stores[name][:, dst] = getattr(self, name)[:, src]
            if ly.hole_slots is not None:
                ly.hole_slots = ly.hole_slots - ly.offset + offsets[ly.index]
        for name in self.STORES:
            setattr(self, name, stores[name])
        for ly in self.layers:
            ly.offset, ly.capacity = offsets[ly.index], capacities[ly.index]
        self._index_region()

    @property
    def plans(self) -> list[LayerPlan]:
        return [layer.plan for layer in self.layers]

    def entry_bytes(self) -> int:
        """Bytes of one entry (key + value) across the kv-heads of one layer."""
        return 2 * self.kv.shape[1] * self.kv.shape[3] * self.kv.element_size()

    def stored_entries(self) -> int:
        return sum(layer.stored for layer in self.layers)

    def peak_entries(self) -> int:
        return sum(layer.peak for layer in self.layers)

    def clone(self) -> PolicyCache:
        """An independent copy that logs nothing (for teacher-forced measurements)."""
        twin = copy.copy(self)
        twin.log = EventLog(enabled=False)
        twin.stacked = False
        for name in ("kv", "positions", "scores", "norms", "tau"):
            value = getattr(self, name)
            setattr(twin, name, value.clone() if value is not None else None)
        twin.layers = []
        for layer in self.layers:
            copied = copy.copy(layer)
            copied._cache = weakref.ref(twin)
            twin.layers.append(copied)
        twin.capped = [twin.layers[layer.index] for layer in self.capped]
        return twin
