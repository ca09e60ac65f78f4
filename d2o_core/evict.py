"""Applying a policy to a cache: compress the prompt (step 0), then evict one entry per step.

What this module is: the two moments docs/policies.md names. `compress_layer` cuts one
layer's prompt entries down to its budget right after the prefill (keep sinks, the recent
window and the best scores; a merging policy folds what it drops into kept entries). `evict_step`
runs once after every decode forward pass: in each capped layer that is now one entry over
budget, each kv-head evicts its lowest-scoring entry outside the sinks and the recent window
(scores: the cache's stored attention scores, the policy's key scores computed here from the
stored keys, or age), and the policy's merge rule, if any, folds it in: D2O into its most
similar kept key when the similarity passes the layer's threshold, CaM (values only) into the
kept entries that follow it.
Deferring the eviction to the end of the step changes nothing (a layer's cache is not read
again until the next step) and lets one set of tensor operations serve every layer at once,
which is what keeps per-token overhead small on a CPU. `evict_rows` goes one step further for
a stacked batch (`Rows`): every row's kv-heads are heads of one set of operations, with masks
where rows differ (per-prompt budgets, used slots, tokens seen), and each row's thresholds and
events stay its own.

What it is not: storage lives in `cache.py`, the maths in `ops.py`.
"""

from __future__ import annotations

import torch

from . import ops
from .events import EventLog
from .policies import Merging


def compress_layer(layer, keys, values, scores, ranking, merge: Merging | None, log: EventLog):
    """Step 0 for one layer: load the prompt's entries, cut to `layer.plan.budget` per kv-head.

    keys, values : [1, Hkv, L, D] from the prefill; scores : [Hkv, L] float32 attention-based scores
    (stored with the entries) or None; ranking : [Hkv, L] what eviction ranks by when it is not the
    stored scores (computed from the entries), or None. Without either, the oldest entries go first.
    Returns D2O's first threshold for the layer (0-d tensor), or None when nothing could merge.
    """
    _, n_kv, length, _ = keys.shape
    budget = layer.plan.budget
    positions = torch.arange(length, device=keys.device).expand(n_kv, length)
    if budget is None or budget >= length:
        layer.load(keys[0], values[0], positions, scores, length)
        log.record_step(0, layer.index, length, length if budget is None else budget, 0, 0)
        return None
    (k_keep, v_keep), kept, kept_scores, tau = cut(
        layer, keys[0], values[0], positions, scores, ranking, merge, log, step=0, seen=length
    )
    layer.load(k_keep, v_keep, kept, kept_scores, length)
    return tau


def cut(layer, keys, values, positions, scores, ranking, merge: Merging | None, log, step, seen, tau=None):
    """Cut one layer's entries to its budget: the many-at-once eviction of a compression.

    keys, values : [Hkv, S, D]; positions, scores, ranking : [Hkv, S] (scores, ranking may be None),
    entries in position order per head. Logs the evictions and merges at `step`.
    Returns ((kept keys, kept values), kept positions, kept scores or None, the layer's threshold).
    """
    n_kv, _, dim = keys.shape
    plan, budget = layer.plan, layer.plan.budget
    ranking = ranking if ranking is not None else scores
    kept, gone = ops.keep_sets(
        ranking if ranking is not None else positions, positions, budget, plan.n_sink, plan.n_recent, seen
    )
    take = lambda src, idx: src.gather(1, idx[..., None].expand(-1, -1, dim))  # noqa: E731
    keep_kv = take(keys, kept), take(values, kept)
    kept_pos, gone_pos = positions.gather(1, kept), positions.gather(1, gone)
    kept_scores = None if scores is None else scores.gather(1, kept)
    target_pos = sim = on = None
    if merge is not None:
        gone_kv = take(keys, gone), take(values, gone)
        gone_scores = None if scores is None else scores.gather(1, gone)
        k, v, target_pos, sim, on, tau = merge.compress(
            plan, kept_pos, gone_pos, keep_kv, gone_kv, (kept_scores, gone_scores), tau
        )
        keep_kv = k, v
    heads = torch.arange(n_kv, device=keys.device)[:, None].expand_as(gone)
    gone_score = ranking.gather(1, gone) if ranking is not None else None
    log.record(step, layer.index, heads, gone_pos, gone_score, target_pos, sim, on)
    log.record_step(step, layer.index, budget, budget, gone.numel(), 0 if on is None else on)
    return keep_kv, kept_pos, kept_scores, tau


def compress_due(cache) -> None:
    """After a decode step of a policy that compresses every N > 1 steps: every capped layer that has
    grown N entries past its budget is cut back to it in one compression (the prompt's rule)."""
    column = {layer.index: j for j, layer in enumerate(cache.capped)}
    for layer in cache.layers:
        j = column.get(layer.index)
        budget = layer.plan.budget
        if j is None or layer.stored < budget + cache.every:
            if cache.log.enabled:
                cache.log.record_step(cache.step, layer.index, layer.stored, budget or layer.seen, 0, 0)
            continue
        window = slice(layer.offset, layer.offset + layer.used)
        keys, values = cache.kv[0, :, window], cache.kv[1, :, window]
        scores = None if cache.scores is None else cache.scores[:, window]
        ranking = cache.scoring.rank(keys, values, scores) if cache.scoring.ranks_entries else None
        positions, tau = cache.positions[:, window], cache.tau[j]
        tau = None if tau.isnan() else tau
        kept_kv, kept, kept_scores, tau = cut(
            layer,
            keys,
            values,
            positions,
            scores,
            ranking,
            cache.merge,
            cache.log,
            cache.step,
            layer.seen,
            tau,
        )
        if tau is not None:
            cache.tau[j] = tau
        layer.reload(*kept_kv, kept, kept_scores)  # gathered copies: safe to write over their source


class Rows:
    """Caches that share one layout and one storage, seen by eviction as (row, kv-head) pairs.

    Eviction treats every kv-head of every row as one more head: `kv` is `[2, R * Hkv, slots, D]`
    and `positions`, `scores`, `norms` are `[R * Hkv, slots]` (row `r` owns heads
    `[r * Hkv, (r + 1) * Hkv)`). What differs per row (budgets, hence recent windows and used
    slots; tokens seen; thresholds; event logs) is read from the rows' own caches at each step.
    One cache is the case R = 1 (`of_cache`); a `batching.StackedBatch` builds one over its rows.
    """

    def __init__(self, caches: list, kv: torch.Tensor, positions, scores, norms):
        first = caches[0]
        self.caches, self.n_kv = caches, first.kv.shape[1]
        self.kv, self.positions, self.scores, self.norms = kv, positions, scores, norms
        self.heads = torch.arange(kv.shape[1], device=kv.device)
        self.capped = first.capped  # offsets and capacities: the same in every row
        self.region, self.segment, self.segments = first.region, first.segment, first.segments
        self.slot_index, self.merge, self.scoring = first.slot_index, first.merge, first.scoring
        self.layer_ids = torch.tensor([layer.index for layer in first.capped], device=kv.device)
        if len(caches) == 1:  # one row: per-slot limits broadcast over its heads
            self.slot_sinks, self.slot_recent = first.slot_sinks, first.slot_recent
        else:
            self.slot_sinks = self.spread(torch.stack([c.slot_sinks for c in caches]))
            self.slot_recent = self.spread(torch.stack([c.slot_recent for c in caches]))

    @classmethod
    def of_cache(cls, cache) -> Rows:
        return cls([cache], cache.kv, cache.positions, cache.scores, cache.norms)

    def spread(self, per_row: torch.Tensor) -> torch.Tensor:
        """[R, ...] per row -> [R * Hkv, ...] per (row, kv-head)."""
        return per_row.repeat_interleave(self.n_kv, dim=0)

    def row(self, r: int) -> slice:
        return slice(r * self.n_kv, (r + 1) * self.n_kv)

    def table(self, value) -> torch.Tensor:
        """[R, n] tensor of `value(layer)` over every row's capped layers."""
        return torch.tensor(
            [[value(layer) for layer in c.capped] for c in self.caches], device=self.kv.device
        )


def evict_step(cache) -> None:
    """After a decode forward: evict (and maybe merge) one entry per kv-head in every layer over budget."""
    evict_rows(Rows.of_cache(cache))


def evict_rows(rows: Rows) -> None:
    """`evict_step` for every row of `rows` at once: one set of tensor operations, each row's own log.

    Rows share one policy, so one compression schedule: every step (one entry per kv-head of each
    layer over budget), every N steps (`compress_due`, row by row), or never after the prompt.
    Nothing is evicted while the rows are holding (a question being fed after the prompt).
    """
    first = rows.caches[0]
    if first.holding:
        return
    if first.every > 1:
        for cache in rows.caches:
            compress_due(cache)
        return
    over = [[c.every == 1 and layer.stored > layer.plan.budget for layer in c.capped] for c in rows.caches]
    merged = _evict(rows, over) if any(map(any, over)) else None
    for r, cache in enumerate(rows.caches):
        _log_steps(cache, over[r], None if merged is None else merged[rows.row(r)])


def _log_steps(cache, over: list[bool], merged) -> None:
    """One step row per layer in the cache's log (merge decisions stay tensors, summed later)."""
    step, log = cache.step, cache.log
    if not log.enabled:
        return
    column = {layer.index: j for j, layer in enumerate(cache.capped)}
    for layer in cache.layers:
        j = column.get(layer.index)
        if j is None:
            log.record_step(step, layer.index, layer.stored, layer.seen, 0, 0)
            continue
        evicted = len(cache.heads) if over[j] else 0
        merges = merged[:, j] if merged is not None and over[j] else 0
        log.record_step(step, layer.index, layer.stored, layer.plan.budget, evicted, merges)


def _per_row(rows: Rows, values: list[int]):
    """An int when every row agrees (the common case), else a [R * Hkv, 1] tensor."""
    if len(set(values)) == 1:
        return values[0]
    return rows.spread(torch.tensor(values, device=rows.kv.device))[:, None]


def _evict(rows: Rows, over: list[list[bool]]):
    """All capped layers of all rows at once, over the eviction region (their slots, layer after layer).

    Returns the merge decisions [R * Hkv, n] (None without a merge rule).
    """
    region, segment = rows.region, rows.segment
    heads = rows.heads[:, None]
    positions = rows.positions[:, :region]
    seen = _per_row(rows, [c.capped[0].seen for c in rows.caches])
    protect = ops.protected_mask(positions, rows.slot_sinks, rows.slot_recent, seen)  # per-slot limits
    unused = None
    if any(layer.used < layer.capacity for c in rows.caches for layer in c.capped):
        ends = rows.spread(rows.table(lambda layer: layer.offset + layer.used))  # [R * Hkv, n]
        unused = rows.slot_index[:region] >= ends[:, segment]
        protect |= unused
    over_rows = evicting = None  # None: every layer of every row evicts
    if not all(map(all, over)):
        over_rows = torch.tensor(over, device=positions.device)  # [R, n]
        evicting = rows.spread(over_rows)
        protect |= ~evicting[:, segment]
    if rows.scoring.ranks_entries:
        ranking = _entry_ranking(rows)
    else:
        ranking = rows.scores[:, :region] if rows.scores is not None else positions
    victim = ops.segment_argmin(
        ranking.masked_fill(protect, ops.top_value(ranking)), rows.segments
    )  # [R * Hkv, n]
    score = ranking[heads, victim] if ranking is not positions else None
    target = sim = merged = None
    if rows.merge is not None:
        target, sim, merged = rows.merge.step(rows, victim, unused, evicting, over_rows)
    gone = positions[heads, victim]
    for r, cache in enumerate(rows.caches):
        if any(over[r]):
            parts = [
                None if p is None else p[rows.row(r)] for p in (victim, gone, score, target, sim, merged)
            ]
            _record(rows, cache, over[r], *parts)
    return merged


def _record(rows: Rows, cache, over: list[bool], victim, gone, score, target, sim, merged) -> None:
    """One row's holes (the slots its next token refills) and its eviction events."""
    for j, layer in enumerate(cache.capped):
        if over[j]:
            layer.hole_slots = victim[:, j]
    if not cache.log.enabled:
        return
    parts = [rows.layer_ids, gone, score, target, sim, merged]
    if not all(over):  # log only the layers that evicted
        keep = torch.tensor(over, device=gone.device).nonzero()[:, 0]
        parts = [None if p is None else p[..., keep] for p in parts]
    layer_ids, gone, score, target, sim, merged = parts
    heads = cache.heads[:, None].expand_as(gone)
    cache.log.record(cache.step, layer_ids.expand_as(gone), heads, gone, score, target, sim, merged)


def _entry_ranking(rows: Rows) -> torch.Tensor:
    """[R * Hkv, region] float32: the scoring's ranking of every capped layer's stored entries (0 elsewhere).

    Per row and layer: a ranking may depend on all of a layer's stored entries (KeyDiff's anchor),
    and rows store different counts.
    """
    kv = rows.kv
    out = torch.zeros(kv.shape[1], rows.region, device=kv.device)
    for r, cache in enumerate(rows.caches):
        h = rows.row(r)
        for layer in cache.capped:
            window = slice(layer.offset, layer.offset + layer.used)
            stored = None if rows.scores is None else rows.scores[h, window]
            out[h, window] = rows.scoring.rank(kv[0, h, window], kv[1, h, window], stored)
    return out
