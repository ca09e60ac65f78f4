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
which is what keeps per-token overhead small on a CPU.

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


def evict_step(cache) -> None:
    """After a decode forward: evict (and maybe merge) one entry per kv-head in every layer over budget."""
    capped = cache.capped
    over = [layer.stored > layer.plan.budget for layer in capped]
    merged = _evict(cache, capped, over) if any(over) else None
    step, log = cache.step, cache.log
    column = {layer.index: j for j, layer in enumerate(capped)}
    for layer in cache.layers:
        j = column.get(layer.index)
        if j is None:
            log.record_step(step, layer.index, layer.stored, layer.seen, 0, 0)
            continue
        evicted = len(cache.heads) if over[j] else 0
        merges = merged[:, j] if merged is not None and over[j] else 0
        log.record_step(step, layer.index, layer.stored, layer.plan.budget, evicted, merges)


def _evict(cache, capped: list, over: list[bool]):
    """All capped layers at once, over the cache's eviction region (their slots, layer after layer)."""
    region, segment = cache.region, cache.segment
    rows = cache.heads[:, None]
    positions = cache.positions[:, :region]
    seen = capped[0].seen
    protect = ops.protected_mask(positions, cache.slot_sinks, cache.slot_recent, seen)  # per-slot limits
    unused = None
    if any(layer.used < layer.capacity for layer in capped):
        ends = torch.tensor([layer.offset + layer.used for layer in capped], device=positions.device)
        unused = cache.slot_index[:region] >= ends[segment]
        protect |= unused
    evicting = None
    if not all(over):
        evicting = torch.tensor(over, device=positions.device)
        protect |= ~evicting[segment]
    if cache.key_scores is not None:
        ranking = _key_ranking(cache, capped)
    else:
        ranking = cache.scores[:, :region] if cache.scores is not None else positions
    victim = ops.segment_argmin(
        ranking.masked_fill(protect, ops.top_value(ranking)), cache.segments
    )  # [Hkv, n]
    score = ranking[rows, victim] if ranking is not positions else None
    target = sim = merged = None
    if cache.merge is not None and cache.merge.kind == "cam":
        target, sim, merged = _cam_merge(cache, victim, unused, evicting)
    elif cache.merge is not None:
        target, sim, merged = _merge(cache, victim, unused, evicting)
    for j, layer in enumerate(capped):
        if over[j]:
            layer.hole_slots = victim[:, j]
    gone = positions[rows, victim]
    layer_ids = torch.tensor([layer.index for layer in capped], device=positions.device)
    parts = [layer_ids, gone, score, target, sim, merged]
    if evicting is not None:  # log only the layers that evicted
        keep = evicting.nonzero()[:, 0]
        parts = [None if p is None else p[..., keep] for p in parts]
    layer_ids, gone, score, target, sim, merged_log = parts
    heads = cache.heads[:, None].expand_as(gone)
    cache.log.record(cache.step, layer_ids.expand_as(gone), heads, gone, score, target, sim, merged_log)
    return merged


def _merge(cache, victim: torch.Tensor, unused, evicting):
    """D2O's token-level merge for every capped layer at once; returns target positions, sims, decisions."""
    rule, kv, norms = cache.merge, cache.kv, cache.norms
    rows, region = cache.heads[:, None], cache.region
    gone = kv[:, rows, victim]  # [2, Hkv, n, D]
    # Cosine to every slot of the victim's own layer: dot products (one small matmul per layer;
    # spreading the victims over all slots instead copies the whole region and is much slower),
    # over key norms, which are kept current.
    victims = gone[0].float()
    dots = torch.cat(
        [
            torch.bmm(
                victims[:, j : j + 1], kv[0, :, layer.offset : layer.offset + layer.capacity].float().mT
            )[:, 0]
            for j, layer in enumerate(cache.capped)
        ],
        dim=1,
    )
    cos = dots / norms[:, :region]
    if unused is not None:
        cos.masked_fill_(unused, float("-inf"))
    cos[rows, victim] = float("-inf")
    best, target = ops.segment_argmax(cos, cache.segments)
    sim = best / norms[rows, victim]
    tau = ops.ema_thresholds(cache.tau, sim, rule.beta, rule.statistic)
    merged = ops.merge_decision(sim, tau, rule.shared_by_heads)
    if evicting is not None:
        tau = torch.where(evicting, tau, cache.tau)
        merged = merged & evicting
    cache.tau = tau
    w_self, w_in = ops.pair_weights(sim, merged, rule.variant)
    new = kv[:, rows, target].float() * w_self[..., None] + gone.float() * w_in[..., None]
    kv[:, rows, target] = new.to(kv.dtype)
    norms[rows, target] = ops.norms(new[0])
    return cache.positions[rows, target], sim, merged


def _key_ranking(cache, capped: list) -> torch.Tensor:
    """[Hkv, region] float32: the policy's key scores of every capped layer's stored entries (0 elsewhere)."""
    kv, out = cache.kv, torch.zeros(cache.kv.shape[1], cache.region, device=cache.kv.device)
    for layer in capped:
        window = slice(layer.offset, layer.offset + layer.used)
        out[:, window] = cache.key_scores(kv[0, :, window])
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


def _cam_merge(cache, victim: torch.Tensor, unused, evicting):
    """CaM at a decode step, every capped layer at once: the victim's value, weighted by
    ``p = clamp(s_victim / max kept s, 0, 1)``, is split evenly over the (up to) m kept entries
    whose positions follow it most closely. Keys are untouched. Returns first target positions, p, merged.
    """
    rule, kv, segments = cache.merge, cache.kv, cache.segments
    rows, region = cache.heads[:, None], cache.region
    n_layers = len(cache.capped)
    positions, scores = cache.positions[:, :region], cache.scores[:, :region]
    never = torch.iinfo(positions.dtype).max
    v_pos = positions[rows, victim]  # [Hkv, n]
    after = positions > v_pos[:, cache.segment]
    stored = torch.ones_like(after) if unused is None else ~unused
    after &= stored
    m = torch.tensor([rule.targets(layer.plan) for layer in cache.capped], device=kv.device)
    width = min(int(m.max()), segments.index.shape[1])
    later = torch.where(after, positions, never)[:, segments.index].masked_fill(~segments.valid, never)
    nearest, k = later.topk(width, dim=-1, largest=False)  # [Hkv, n, width]
    layer_ids = torch.arange(n_layers, device=kv.device)
    slots = segments.index[layer_ids[None, :, None], k]  # [Hkv, n, width]
    ok = (nearest < never) & (torch.arange(width, device=kv.device) < m[:, None])
    if evicting is not None:
        ok &= evicting[:, None]
    count = ok.sum(dim=-1)
    others = scores.masked_fill(~stored, float("-inf"))
    others[rows, victim] = float("-inf")
    top = others[:, segments.index].masked_fill(~segments.valid, float("-inf")).amax(dim=-1)
    p = (scores[rows, victim] / top.clamp_min(1e-30)).clamp(0.0, 1.0)
    merged = (count > 0) & (p > 0)
    w = torch.where(merged, p / count.clamp_min(1), 0.0)
    heads = cache.heads[:, None, None].expand_as(slots)[ok]
    into = slots[ok]
    add = (kv[1, rows, victim].float()[:, :, None, :] * w[..., None, None]).expand(-1, -1, width, -1)[ok]
    kv[1][heads, into] = (kv[1][heads, into].float() + add).to(kv.dtype)
    first = cache.positions[rows, slots[..., 0]]
    return first, p, merged
