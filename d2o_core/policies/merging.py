"""What an evicted entry becomes: merge rules, each serving the prompt compression and decode steps.

What this module is: `Merging`, the interface the engine calls when a policy merges instead of
dropping (`Policy.merge_rule()`; None: dropped), and the two registered rules:
- `MergeRule`, D2O's (arXiv 2406.13035): an evicted key/value pair folds into its most similar kept
  key when the similarity passes the layer's EMA threshold (docs/policies.md: both readings);
- `CamRule`, CaM's (Zhang et al., ICML 2024): an evicted value, weighted by its attention share, is
  spread over the kept entries that follow it (keys untouched).
The engine calls `compress` at the prompt compression (many entries of one layer evicted at once)
and `step` after each decode forward (one entry per kv-head of every capped layer at once, over the
eviction region of `evict.Rows`); it never asks which rule it has.

What it is not: which entries leave (`evict.py`, from the policy's scoring); tensor maths shared
with other code (`ops.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops


class Merging:
    """A merge rule. `needs_norms`: the cache keeps every entry's key norm current for it."""

    needs_norms = False

    def compress(self, plan, kept, gone, keep_kv, gone_kv, scores, tau):
        """Fold one layer's evicted entries into its kept ones at a compression (many at once).

        plan : the layer's `LayerPlan`; kept, gone : [Hkv, K] / [Hkv, E] positions, each in position
        order; keep_kv, gone_kv : (keys, values), [Hkv, K, D] / [Hkv, E, D]; scores : (kept, gone)
        stored scores or (None, None); tau : the layer's threshold so far (None: first compression).
        Returns (kept keys, kept values, target position [Hkv, E], similarity or weight [Hkv, E],
        merged [Hkv, E] bool, the layer's threshold or None).
        """
        raise NotImplementedError

    def step(self, rows, victim, unused, evicting, over_rows):
        """Fold each (row, kv-head, capped layer)'s victim slot into kept entries, in place in `rows.kv`.

        victim : [R * Hkv, n] slots; unused : [R * Hkv, region] bool or None (slots holding nothing);
        evicting, over_rows : None when every layer evicts, else which ones do.
        Returns (target positions, similarities or weights, merged), each [R * Hkv, n].
        """
        raise NotImplementedError


@dataclass(frozen=True)
class MergeRule(Merging):
    """D2O's token-level merge (docs/policies.md, the two readings): keys and values into the nearest key."""

    variant: str  # "paper" | "official": merge weights
    beta: float  # EMA weight of the new statistic
    statistic: str  # "max" | "mean": the EMA's new statistic
    shared_by_heads: bool  # decide per (head, entry) or on the head mean

    needs_norms = True  # cosine similarities need current key norms

    def compress(self, plan, kept, gone, keep_kv, gone_kv, scores, tau):
        (k_keep, v_keep), (k_gone, v_gone) = keep_kv, gone_kv
        sim, target = ops.nearest_kept(k_gone, k_keep)
        if tau is None:  # the first threshold: mean similarity over heads and evicted entries
            tau = sim.mean()
        else:  # a later compression: the EMA with this one's statistic, as at decode steps
            tau = ops.ema_thresholds(tau.reshape(1), sim.reshape(-1, 1), self.beta, self.statistic)[0]
        on = ops.merge_decision(sim, tau, self.shared_by_heads)
        w_self, w_in = ops.merge_weights(sim, target, on, plan.budget, self.variant)
        k_keep = ops.apply_merge(k_keep, k_gone, target, w_self, w_in)
        v_keep = ops.apply_merge(v_keep, v_gone, target, w_self, w_in)
        return k_keep, v_keep, kept.gather(1, target), sim, on, tau

    def step(self, rows, victim, unused, evicting, over_rows):
        return _d2o_step(rows, victim, unused, evicting, over_rows)


@dataclass(frozen=True)
class CamRule(Merging):
    """CaM's value merge (policies/cam.py): an evicted value is spread over the kept entries after it.

    `merge_tokens`: how many kept entries (the nearest after the evicted one) share it; None: the
    layer's recent window size (CaM's code merges into the whole recent window).
    """

    merge_tokens: int | None = None

    def targets(self, plan) -> int:
        return max(1, self.merge_tokens if self.merge_tokens is not None else plan.n_recent)

    def compress(self, plan, kept, gone, keep_kv, gone_kv, scores, tau):
        (k_keep, v_keep), (_, v_gone) = keep_kv, gone_kv
        v_keep, target_pos, weight, on = _cam_compress(self, plan, scores, kept, gone, v_keep, v_gone)
        return k_keep, v_keep, target_pos, weight, on, None

    def step(self, rows, victim, unused, evicting, over_rows):
        return _cam_step(rows, victim, unused, evicting)


def _d2o_step(rows, victim: torch.Tensor, unused, evicting, over_rows):
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


def _decide(rows, rule: MergeRule, sim: torch.Tensor, over_rows):
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


def _weights(rows, rule: MergeRule, sim: torch.Tensor, merged: torch.Tensor):
    """`ops.pair_weights` row by row, for the same reason as `_decide` (a sigmoid)."""
    if len(rows.caches) == 1:
        return ops.pair_weights(sim, merged, rule.variant)
    parts = [
        ops.pair_weights(sim[rows.row(r)], merged[rows.row(r)], rule.variant) for r in range(len(rows.caches))
    ]
    return torch.cat([w for w, _ in parts]), torch.cat([w for _, w in parts])


def _cam_compress(rule: CamRule, plan, scores, kept, gone, v_keep, v_gone):
    """CaM at a compression: each evicted value is spread over the kept entries just after it.

    kept, gone : [Hkv, K] / [Hkv, E] positions, each in position order; scores : their stored scores.
    Returns (new kept values, first target position, merge weight p, merged) per evicted entry.
    """
    n_keep, dim = kept.shape[1], v_keep.shape[-1]
    # No more targets than kept entries, whatever the setting says: the loop below runs m times.
    m = min(rule.targets(plan), n_keep)
    first = torch.searchsorted(
        kept.contiguous(), gone.contiguous()
    )  # index (into kept) of the first kept entry after each evicted one
    count = (n_keep - first).clamp(max=m)
    kept_scores, gone_scores = scores
    top = kept_scores.amax(dim=1, keepdim=True).clamp_min(1e-30)
    p = (gone_scores / top).clamp(0.0, 1.0)
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


def _cam_step(rows, victim: torch.Tensor, unused, evicting):
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
    # [R * Hkv, n]: rows' budgets differ. No layer has more targets than slots, whatever the setting.
    m = rows.spread(rows.table(lambda layer: min(rule.targets(layer.plan), layer.capacity)))
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
