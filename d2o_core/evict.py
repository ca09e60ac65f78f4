"""Applying a policy to a cache: compress the prompt (step 0), then evict one entry per step.

What this module is: the two moments ALGORITHMS.md names. `compress_layer` cuts one
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
from .policies import CamRule, MergeRule


def compress_layer(layer, keys, values, scores, ranking, merge: MergeRule | CamRule | None, log: EventLog):
    """Step 0 for one layer: load the prompt's entries, cut to `layer.plan.budget` per kv-head.

    keys, values : [1, Hkv, L, D] from the prefill; scores : [Hkv, L] float32 attention-based scores
    (stored with the entries) or None; ranking : [Hkv, L] key-based scores (not stored) or None.
    Without either, the oldest entries go first.
    Returns D2O's first threshold for the layer (0-d tensor), or None when nothing could merge.
    """
    _, n_kv, length, dim = keys.shape
    plan, budget = layer.plan, layer.plan.budget
    positions = torch.arange(length, device=keys.device).expand(n_kv, length)
    if budget is None or budget >= length:
        layer.load(keys[0], values[0], positions, scores, length)
        log.record_step(0, layer.index, length, length if budget is None else budget, 0, 0)
        return None
    ranking = ranking if ranking is not None else scores
    kept, gone = ops.keep_sets(
        ranking if ranking is not None else positions, positions, budget, plan.n_sink, plan.n_recent, length
    )
    take = lambda src, idx: src[0].gather(1, idx[..., None].expand(-1, -1, dim))  # noqa: E731
    k_keep, v_keep = take(keys, kept), take(values, kept)
    tau = target_pos = sim = on = None
    if merge is not None and merge.kind == "cam":
        v_gone = take(values, gone)
        v_keep, target_pos, sim, on = _cam_prefill(merge, plan, scores, kept, gone, v_keep, v_gone)
    elif merge is not None:
        k_gone, v_gone = take(keys, gone), take(values, gone)
        sim, target = ops.nearest_kept(k_gone, k_keep)
        tau = sim.mean()  # the first threshold: mean similarity over heads and evicted entries
        on = ops.merge_decision(sim, tau, merge.shared_by_heads)
        w_self, w_in = ops.merge_weights(sim, target, on, budget, merge.variant)
        k_keep = ops.apply_merge(k_keep, k_gone, target, w_self, w_in)
        v_keep = ops.apply_merge(v_keep, v_gone, target, w_self, w_in)
        target_pos = kept.gather(1, target)
    layer.load(k_keep, v_keep, kept, scores.gather(1, kept) if scores is not None else None, length)
    heads = torch.arange(n_kv, device=keys.device)[:, None].expand_as(gone)
    gone_score = ranking.gather(1, gone) if ranking is not None else None
    log.record(0, layer.index, heads, gone, gone_score, target_pos, sim, on)
    log.record_step(0, layer.index, budget, budget, gone.numel(), 0 if on is None else on)
    return tau


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
        self.slot_index, self.merge, self.key_scores = first.slot_index, first.merge, first.key_scores
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
    """`evict_step` for every row of `rows` at once: one set of tensor operations, each row's own log."""
    over = [[layer.stored > layer.plan.budget for layer in c.capped] for c in rows.caches]
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
    if rows.key_scores is not None:
        ranking = _key_ranking(rows)
    else:
        ranking = rows.scores[:, :region] if rows.scores is not None else positions
    victim = ops.segment_argmin(
        ranking.masked_fill(protect, ops.top_value(ranking)), rows.segments
    )  # [R * Hkv, n]
    score = ranking[heads, victim] if ranking is not positions else None
    target = sim = merged = None
    if rows.merge is not None and rows.merge.kind == "cam":
        target, sim, merged = _cam_merge(rows, victim, unused, evicting)
    elif rows.merge is not None:
        target, sim, merged = _merge(rows, victim, unused, evicting, over_rows)
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


def _merge(rows: Rows, victim: torch.Tensor, unused, evicting, over_rows):
    """D2O's token-level merge for every capped layer at once; returns target positions, sims, decisions."""
    rule, kv, norms = rows.merge, rows.kv, rows.norms
    heads, region = rows.heads[:, None], rows.region
    gone = kv[:, heads, victim]  # [2, R * Hkv, n, D]
    # Cosine to every slot of the victim's own layer: dot products (one small matmul per layer;
    # spreading the victims over all slots instead copies the whole region and is much slower),
    # over key norms, which are kept current.
    victims = gone[0].float()
    dots = torch.cat(
        [
            torch.bmm(
                victims[:, j : j + 1], kv[0, :, layer.offset : layer.offset + layer.capacity].float().mT
            )[:, 0]
            for j, layer in enumerate(rows.capped)
        ],
        dim=1,
    )
    cos = dots / norms[:, :region]
    if unused is not None:
        cos.masked_fill_(unused, float("-inf"))
    cos[heads, victim] = float("-inf")
    best, target = ops.segment_argmax(cos, rows.segments)
    sim = best / norms[heads, victim]
    merged = _decide(rows, rule, sim, over_rows)
    if evicting is not None:
        merged = merged & evicting
    w_self, w_in = _weights(rows, rule, sim, merged)
    new = kv[:, heads, target].float() * w_self[..., None] + gone.float() * w_in[..., None]
    kv[:, heads, target] = new.to(kv.dtype)
    norms[heads, target] = ops.norms(new[0])
    return rows.positions[heads, target], sim, merged


def _decide(rows: Rows, rule: MergeRule, sim: torch.Tensor, over_rows):
    """Each row's new per-layer thresholds and merge decisions ([R * Hkv, n] bool) from this step's sims.

    Row by row on purpose (a few small operations each): thresholds are per request, and CPU kernels
    round transcendental and fused operations (lerp) differently in their vector lanes and their
    scalar tail, so the same row laid out inside a bigger tensor could differ in the last bit from
    that row alone. Row by row, a stacked row decides exactly as it would alone.
    """
    decided = []
    for r, cache in enumerate(rows.caches):
        row_sim = sim[rows.row(r)]
        tau = ops.ema_thresholds(cache.tau, row_sim, rule.beta, rule.statistic)
        if over_rows is not None:  # layers that did not evict keep their threshold
            tau = torch.where(over_rows[r], tau, cache.tau)
        cache.tau = tau
        decided.append(ops.merge_decision(row_sim, tau, rule.shared_by_heads))
    return decided[0] if len(decided) == 1 else torch.cat(decided)


def _weights(rows: Rows, rule: MergeRule, sim: torch.Tensor, merged: torch.Tensor):
    """`ops.pair_weights` row by row, for the same reason as `_decide` (a sigmoid)."""
    if len(rows.caches) == 1:
        return ops.pair_weights(sim, merged, rule.variant)
    parts = [
        ops.pair_weights(sim[rows.row(r)], merged[rows.row(r)], rule.variant) for r in range(len(rows.caches))
    ]
    return torch.cat([w for w, _ in parts]), torch.cat([w for _, w in parts])


def _key_ranking(rows: Rows) -> torch.Tensor:
    """[R * Hkv, region] float32: the key scores of every capped layer's stored entries (0 elsewhere).

    Per row and layer: a key score may depend on all of a layer's stored keys (KeyDiff's anchor),
    and rows store different counts.
    """
    kv = rows.kv
    out = torch.zeros(kv.shape[1], rows.region, device=kv.device)
    for r, cache in enumerate(rows.caches):
        h = rows.row(r)
        for layer in cache.capped:
            window = slice(layer.offset, layer.offset + layer.used)
            out[h, window] = rows.key_scores(kv[0, h, window])
    return out


def _cam_prefill(rule: CamRule, plan, scores, kept, gone, v_keep, v_gone):
    """CaM at prompt compression: each evicted value is spread over the kept entries just after it.

    kept, gone : [Hkv, K] / [Hkv, E] slots (= positions at prefill), each in position order.
    Returns (new kept values, first target position, merge weight p, merged) per evicted entry.
    """
    n_keep, dim = kept.shape[1], v_keep.shape[-1]
    m = rule.targets(plan)
    first = torch.searchsorted(
        kept.contiguous(), gone.contiguous()
    )  # index (into kept) of the first kept entry after each evicted one
    count = (n_keep - first).clamp(max=m)
    top = scores.gather(1, kept).amax(dim=1, keepdim=True).clamp_min(1e-30)
    p = (scores.gather(1, gone) / top).clamp(0.0, 1.0)
    on = (count > 0) & (p > 0)
    w = torch.where(on, p / count.clamp_min(1), 0.0)
    out, add = v_keep.float(), v_gone.float()
    for r in range(m):
        index = first + r
        ok = index < n_keep
        index = index.clamp(max=n_keep - 1)[..., None].expand(-1, -1, dim)
        out.scatter_add_(1, index, add * (w * ok)[..., None])
    target = kept.gather(1, first.clamp(max=n_keep - 1))
    return out.to(v_keep.dtype), target, p, on


def _cam_merge(rows: Rows, victim: torch.Tensor, unused, evicting):
    """CaM at a decode step, every capped layer at once: the victim's value, weighted by
    ``p = clamp(s_victim / max kept s, 0, 1)``, is split evenly over the (up to) m kept entries
    whose positions follow it most closely. Keys are untouched. Returns first target positions, p, merged.
    """
    rule, kv, segments = rows.merge, rows.kv, rows.segments
    heads, region = rows.heads[:, None], rows.region
    n_layers = len(rows.capped)
    positions, scores = rows.positions[:, :region], rows.scores[:, :region]
    never = torch.iinfo(positions.dtype).max
    v_pos = positions[heads, victim]  # [R * Hkv, n]
    after = positions > v_pos[:, rows.segment]
    stored = torch.ones_like(after) if unused is None else ~unused
    after &= stored
    m = rows.spread(rows.table(lambda layer: rule.targets(layer.plan)))  # [R * Hkv, n]: rows' budgets differ
    width = min(int(m.max()), segments.index.shape[1])
    later = torch.where(after, positions, never)[:, segments.index].masked_fill(~segments.valid, never)
    nearest, k = later.topk(width, dim=-1, largest=False)  # [Hkv, n, width]
    layer_ids = torch.arange(n_layers, device=kv.device)
    slots = segments.index[layer_ids[None, :, None], k]  # [Hkv, n, width]
    ok = (nearest < never) & (torch.arange(width, device=kv.device) < m[..., None])
    if evicting is not None:
        ok &= evicting[..., None]
    count = ok.sum(dim=-1)
    others = scores.masked_fill(~stored, float("-inf"))
    others[heads, victim] = float("-inf")
    top = others[:, segments.index].masked_fill(~segments.valid, float("-inf")).amax(dim=-1)
    p = (scores[heads, victim] / top.clamp_min(1e-30)).clamp(0.0, 1.0)
    merged = (count > 0) & (p > 0)
    w = torch.where(merged, p / count.clamp_min(1), 0.0)
    into_heads = rows.heads[:, None, None].expand_as(slots)[ok]
    into = slots[ok]
    add = (kv[1, heads, victim].float()[:, :, None, :] * w[..., None, None]).expand(-1, -1, width, -1)[ok]
    kv[1][into_heads, into] = (kv[1][into_heads, into].float() + add).to(kv.dtype)
    first = rows.positions[heads, slots[..., 0]]
    return first, p, merged
