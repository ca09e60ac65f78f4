"""Several policy caches decoding as one batch: row `b` of the model's batch reads `caches[b]`.

What this module is: two ways to put per-request `PolicyCache`s side by side in one forward pass.

- `StackedBatch` (the fast one, for rows that share a layer layout: one policy, as in
  `serve_batch`): every row's slot pool is moved into one `[2, B, Hkv, slots, D]` tensor with
  the same window per layer (each as wide as the widest row's), so a layer's keys for all rows
  are one strided view. Attention is one SDPA call per layer with a padding mask (rows of one
  layer may hold different entry counts: D2O's budgets differ per prompt), new tokens are
  written for all rows with one indexed store, and attention scores for all rows come from one
  batched product. Eviction then runs once for all rows (`evict.Rows`: each (row, kv-head)
  pair is one more head), each row with its own budgets, thresholds and event log.
- `RaggedBatch` (any mix of policies, as in `compare`): each row keeps its own pool and
  attention runs row by row over a `Ragged` key list.

What it is not: it decides nothing about eviction (`evict.py`) and owns no per-request state
beyond the rows it was built from; build a new batch when the set of rows changes.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import evict, ops
from .cache import PolicyCache
from .capture import Padded, Ragged


class _RowsLayer(CacheLayerMixin):
    """Layer `index` of several policy caches; subclasses say how keys come back."""

    is_sliding = False
    is_compileable = False

    def __init__(self, index: int, caches: list[PolicyCache]):
        super().__init__()
        self.index, self.caches, self.is_initialized = index, caches, True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def get_seq_length(self) -> int:
        return self.caches[0].layers[self.index].seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return max(c.layers[self.index].stored for c in self.caches) + query_length, 0

    def get_max_length(self) -> int:
        return -1


class _RaggedLayer(_RowsLayer):
    def update(self, key_states, value_states, *args, **kwargs):
        pairs = [
            cache.layers[self.index].update(key_states[b : b + 1], value_states[b : b + 1])
            for b, cache in enumerate(self.caches)
        ]
        wants = [cache.wants_probs(self.index) for cache in self.caches]
        return Ragged([k for k, _ in pairs], wants), Ragged([v for _, v in pairs])


class RaggedBatch(Cache):
    """Rows with their own pools (any policies); attention and scores per row."""

    def __init__(self, caches: list[PolicyCache]):
        super().__init__(layers=[_RaggedLayer(i, caches) for i in range(len(caches[0].layers))])
        self.caches = caches

    def observe(self, layer_idx: int, query, key: Ragged, scaling: float) -> None:
        probs = key.probs or [None] * len(self.caches)
        for b, cache in enumerate(self.caches):
            cache.observe(layer_idx, query[b : b + 1], key.rows[b], scaling, probs=probs[b])


def layout_key(cache: PolicyCache) -> tuple:
    """Rows can be stacked when these agree: which layers are capped, and which stores exist."""
    return (
        tuple(layer.plan.budget is None for layer in cache.layers),
        cache.scoring,
        cache.merge,
        cache.scores is not None,
        cache.norms is not None,
        cache.kv.dtype,
        cache.kv.device,
    )


def can_stack(caches: list[PolicyCache]) -> bool:
    return len({layout_key(c) for c in caches}) == 1


class _StackedLayer(_RowsLayer):
    def update(self, key_states, value_states, *args, **kwargs):
        batch = self.batch
        layers = [cache.layers[self.index] for cache in self.caches]
        positions = [layer.seen for layer in layers]
        slots = torch.stack([batch.slot_row(layer.claim_slot()) for layer in layers])  # [B, Hkv]
        index = (batch.rows, batch.heads, slots)
        batch.kv[0][index] = key_states[:, :, 0]
        batch.kv[1][index] = value_states[:, :, 0]
        batch.positions[index] = torch.tensor(positions, device=slots.device)[:, None]
        if batch.scores is not None:
            batch.scores[index] = self.caches[0].scoring.fresh(
                torch.tensor(positions, device=slots.device)[:, None]
            )
        if batch.norms is not None:
            batch.norms[index] = ops.norms(key_states[:, :, 0])
        used = torch.tensor([layer.used for layer in layers], device=slots.device)
        start, width = layers[0].offset, int(used.max())
        window = slice(start, start + width)
        mask = batch.slot_index[:width][None, :] < used[:, None]  # [B, S]: False at padding
        mask = mask[:, None, None, :]
        wants = self.caches[0].scoring.step_attention and layers[0].plan.budget is not None
        keys = Padded(batch.kv[0, :, :, window], mask, wants_probs=wants)
        return keys, Padded(batch.kv[1, :, :, window], mask)


class StackedBatch(Cache):
    """Rows of one layout in one shared storage: one SDPA call and one score update per layer.

    batched_eviction : evict all rows with one set of operations (default); False evicts row by
        row, each as its own cache would (the reference the batched path is tested against).
    """

    def __init__(self, caches: list[PolicyCache], batched_eviction: bool = True):
        if not can_stack(caches):
            raise ValueError("rows of a stacked batch must share a layer layout (one policy)")
        super().__init__(layers=[_StackedLayer(i, caches) for i in range(len(caches[0].layers))])
        for layer in self.layers:
            layer.batch = self
        self.caches = caches
        first = caches[0]
        order = [ly.index for ly in first.layers if ly.plan.budget is not None]
        order += [ly.index for ly in first.layers if ly.plan.budget is None]
        capacities = {i: max(c.layers[i].capacity for c in caches) for i in order}
        offsets, total = {}, 0
        for i in order:
            offsets[i], total = total, total + capacities[i]
        n_rows, (_, n_kv, _, dim) = len(caches), first.kv.shape
        device = first.kv.device
        self.kv = first.kv.new_zeros(2, n_rows, n_kv, total, dim)  # padding is read (masked): no garbage
        self.positions = torch.zeros(n_rows, n_kv, total, dtype=torch.long, device=device)
        self.scores = None if first.scores is None else torch.zeros(n_rows, n_kv, total, device=device)
        self.norms = None if first.norms is None else torch.ones(n_rows, n_kv, total, device=device)
        for b, cache in enumerate(caches):
            stores = {
                "kv": self.kv[:, b],
                "positions": self.positions[b],
                "scores": None if self.scores is None else self.scores[b],
                "norms": None if self.norms is None else self.norms[b],
            }
            cache.relocate(stores, offsets, capacities)
            cache.stacked = True
        self.rows = torch.arange(n_rows, device=device)[:, None]
        self.heads = torch.arange(n_kv, device=device)[None, :]
        self.slot_index = torch.arange(total, device=device)
        self._same_slot = {}
        self.batched_eviction = batched_eviction
        flat = lambda t: None if t is None else t.flatten(0, 1)  # noqa: E731  views: one storage
        self.eviction = evict.Rows(
            caches, self.kv.flatten(1, 2), flat(self.positions), flat(self.scores), flat(self.norms)
        )

    def slot_row(self, slot) -> torch.Tensor:
        """A claimed slot as a [Hkv] tensor (an int slot is the same for every head)."""
        if isinstance(slot, torch.Tensor):
            return slot
        row = self._same_slot.get(slot)
        if row is None:
            row = self._same_slot[slot] = torch.full((self.heads.shape[1],), slot, device=self.kv.device)
        return row

    def release(self) -> None:
        """Give every row compact storage of its own again (to use a row apart from this batch)."""
        for cache in self.caches:
            for name in cache.STORES:
                value = getattr(cache, name)
                setattr(cache, name, None if value is None else value.clone())
            cache.stacked = False

    def observe(self, layer_idx: int, query, key: Padded, scaling: float) -> None:
        """Scores for every row at once (capped layers, as the rows' score source says), then eviction."""
        first, scoring = self.caches[0].layers[layer_idx], self.caches[0].scoring
        if scoring.step_attention and first.plan.budget is not None:
            width = key.tensor.shape[2]
            if key.probs is not None:  # the attention computed them for its output
                rows = key.probs.sum(dim=2)  # [B, Hkv, S]
            else:
                rows = ops.attention_rows(query, key.tensor, key.mask[:, 0, 0], scaling)
            # Padding slots may get scores (0 from their 0 probabilities); they are rewritten when claimed.
            window = self.scores[:, :, first.offset : first.offset + width]
            scoring.update(window, rows, query.shape[1] // key.tensor.shape[1])
        if layer_idx == len(self.layers) - 1 and self.batched_eviction:
            evict.evict_rows(self.eviction)
        elif layer_idx == len(self.layers) - 1:
            for cache in self.caches:
                evict.evict_step(cache)
