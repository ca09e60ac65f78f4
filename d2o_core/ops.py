"""Pure tensor maths for the cache policies: scores, keep sets, similarity, merges, layer budgets.

What this module is: stateless functions on hand-made-testable tensors. Shapes use
`Hq` query heads, `Hkv` kv-heads, `S` stored entries, `L` prompt tokens, `D` head dim.
Query head `h` reads kv-head `h // n_rep` (transformers' `repeat_kv` layout), so a
`[Hq, ...]` tensor groups into kv-heads with a reshape to `[Hkv, n_rep, ...]`.

What it is not: it holds no state and knows nothing of models, caches or requests;
`cache.py` decides when these are called. docs/policies.md is the reference for every formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Float32 elements of one prefill probability block; with at most 128 queries per chunk, blocks stay
# cache-sized, which measured ~4x faster on CPU than a few huge blocks.
_CHUNK_ELEMENTS = 1 << 22
_MAX_CHUNK = 128


def prefill_column_sums(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Column sums of the causal prompt attention, per query head, in query chunks.

    Parameters
    ----------
    query : [1, Hq, L, D]
    key : [1, Hkv, L, D] (not repeated for GQA)
    scaling : softmax scale used by the model (``module.scaling``)

    Returns
    -------
    [Hq, L] float32: ``col[h, j]`` = total attention key ``j`` received from all prompt queries of head ``h``.
    Memory is O(Hq x chunk x L); the full [Hq, L, L] matrix is never built.
    """
    return prompt_attention(query, key, None, scaling)[1]


def prompt_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The prompt's causal attention output and its column sums from ONE pass over query chunks.

    value : [1, Hkv, L, D] or None (column sums only). Returns (output [1, L, Hq, D] in SDPA's
    layout and `value`'s dtype, or None; column sums [Hq, L] float32 as `prefill_column_sums`).
    The probabilities are float32; the output is their product with the values (to float tolerance
    of SDPA's, which the model would otherwise run as a second pass over the same queries).
    """
    _, n_q, length, dim = query.shape
    n_kv = key.shape[1]
    n_rep = n_q // n_kv
    q = query[0].reshape(n_kv, n_rep, length, dim)
    k = key[0]
    col = torch.zeros(n_kv, length, n_rep, dtype=torch.float32, device=query.device)
    out = None if value is None else value.new_empty(n_kv, length, n_rep, value.shape[-1])
    chunk = max(1, min(_MAX_CHUNK, length, _CHUNK_ELEMENTS // max(1, n_q * length)))
    future = (
        torch.full((chunk, chunk), float("-inf"), device=query.device)
        .triu(1)[:, None, :]
        .expand(-1, n_rep, -1)
    )
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        # One batched product per kv-head: the group's queries of the chunk as rows ([Hkv, c * r, D]),
        # never a broadcast copy of the keys. Keys before `start` are visible to the whole chunk; only
        # the diagonal block needs the causal mask.
        rows = q[:, :, start:end].transpose(1, 2).reshape(n_kv, (end - start) * n_rep, dim)
        logits = torch.bmm(rows, k[:, :end].transpose(1, 2)).float().mul_(scaling)
        logits = logits.view(n_kv, end - start, n_rep, end)
        logits[..., start:end] += future[: end - start, :, : end - start]
        probs = torch.softmax(logits, dim=-1)
        col[:, :end] += probs.sum(dim=1).transpose(1, 2)
        if out is not None:
            flat = probs.view(n_kv, (end - start) * n_rep, end).to(value.dtype)
            out[:, start:end] = torch.bmm(flat, value[0, :, :end]).view(n_kv, end - start, n_rep, -1)
    col = col.transpose(1, 2)
    if out is not None:
        out = out.permute(1, 0, 2, 3).reshape(length, n_q, -1)[None]
    return out, col.reshape(n_q, length)


def attention_row(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention probabilities of one new query over the stored keys, summed per kv-head.

    Parameters
    ----------
    query : [1, Hq, 1, D]
    key : [1, Hkv, S, D]

    Returns
    -------
    [Hkv, S] float32; each row sums to ``n_rep`` (one per query head of the group).
    """
    n_q, n_kv = query.shape[1], key.shape[1]
    q = query[0, :, 0].reshape(n_kv, n_q // n_kv, -1)
    logits = torch.bmm(q, key[0].transpose(1, 2)) * scaling
    return logits.softmax(dim=-1, dtype=torch.float32).sum(dim=1)


def appended_mask(n_new: int, n_entries: int, device=None) -> torch.Tensor:
    """[q, S] bool: `q` new tokens, the last `q` of `S` entries, each seeing all before it and itself."""
    return torch.ones(n_new, n_entries, dtype=torch.bool, device=device).tril(n_entries - n_new)


def appended_rows(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of `q` new queries (the last `q` of the `S` stored entries) summed per kv-head.

    query : [1, Hq, q, D]; key : [1, Hkv, S, D]. Returns [q, Hkv, S] float32: row `i` is what
    `attention_row` gives when the new tokens are fed one at a time (masked to the entries before it).
    """
    n_q, n_new, dim = query.shape[1], query.shape[2], query.shape[3]
    n_kv, n_entries = key.shape[1], key.shape[2]
    q = query[0].reshape(n_kv, n_q // n_kv, n_new, dim)
    logits = torch.matmul(q, key[0][:, None].transpose(-1, -2)).float().mul_(scaling)  # [Hkv, r, q, S]
    logits.masked_fill_(~appended_mask(n_new, n_entries, query.device), float("-inf"))
    return logits.softmax(dim=-1).sum(dim=1).transpose(0, 1)


def attention_probs(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """One new query per row over that row's stored keys, for a padded batch, per query head.

    Parameters
    ----------
    query : [B, Hq, 1, D]
    key : [B, Hkv, S, D] (rows padded to S)
    valid : [B, S] bool, False at padding; None: no padding

    Returns
    -------
    [B, Hkv, n_rep, S] float32 probabilities, 0 at padding (query head ``h`` is ``[h // n_rep, h % n_rep]``).
    """
    n_rows, n_q, _, dim = query.shape
    n_kv = key.shape[1]
    q = query.reshape(n_rows, n_kv, n_q // n_kv, dim)
    logits = torch.matmul(q, key.transpose(-1, -2)).float().mul_(scaling)  # [B, Hkv, n_rep, S]
    if valid is not None:
        logits.masked_fill_(~valid[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1)


def attend_one(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, valid=None):
    """One new query per row from explicit probabilities: (output [B, 1, Hq, D] in SDPA's layout,
    probabilities [B, Hkv, n_rep, S] float32). For a policy that scores from the step's attention,
    this computes it once, for the output and the scores, instead of SDPA and a second pass."""
    n_rows, n_q, _, dim = query.shape
    probs = attention_probs(query, key, valid, scaling)
    out = torch.matmul(probs.to(value.dtype), value)  # [B, Hkv, n_rep, D]
    return out.reshape(n_rows, 1, n_q, dim), probs


def attention_rows(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, scaling: float
) -> torch.Tensor:
    """`attention_probs` summed per kv-head: [B, Hkv, S] float32; each row sums to ``n_rep``."""
    return attention_probs(query, key, valid, scaling).sum(dim=2)


def window_scores(queries: torch.Tensor, keys: torch.Tensor, scaling: float, kernel: int = 1) -> torch.Tensor:
    """Scores of the prompt's keys from its last `W` queries (SnapKV; TOVA with ``W = kernel = 1``).

    Parameters
    ----------
    queries : [Hq, W, D], the queries of prompt positions ``L - W .. L - 1`` (post-rotary)
    keys : [Hkv, L, D] (not repeated for GQA)
    kernel : odd width of the average pooling over positions (1: none)

    Returns
    -------
    [Hkv, L] float32: each key's attention (causal softmax over the whole prompt) averaged over the
    `W` queries, then, for the keys before the window, 1-D average pooling (stride 1, zero "same"
    padding counted in the mean, as `avg_pool1d` does), then averaged over the query heads of each
    kv-head group. The window's own keys keep their unpooled mean. Memory is O(Hq x chunk x L).
    """
    n_q, window, dim = queries.shape
    n_kv, length = keys.shape[0], keys.shape[1]
    q = queries.reshape(n_kv, n_q // n_kv, window, dim)
    total = torch.zeros(n_kv, n_q // n_kv, length, dtype=torch.float32, device=keys.device)
    chunk = max(1, min(_MAX_CHUNK, window, _CHUNK_ELEMENTS // max(1, n_q * length)))
    for start in range(0, window, chunk):
        end = min(start + chunk, window)
        logits = torch.matmul(q[:, :, start:end], keys[:, None].transpose(-1, -2)).float().mul_(scaling)
        # Query i of the window sits at position L - W + i and sees keys up to it.
        rows = torch.arange(length - window + start, length - window + end, device=keys.device)
        future = torch.arange(length, device=keys.device)[None, :] > rows[:, None]
        logits.masked_fill_(future, float("-inf"))
        total += torch.softmax(logits, dim=-1).sum(dim=2)
    scores = total.mean(dim=1) / window  # [Hkv, L]
    if kernel > 1 and length > window:
        before = scores[:, : length - window]
        pooled = F.avg_pool1d(before[:, None], kernel, stride=1, padding=kernel // 2)
        scores[:, : length - window] = pooled[:, 0]
    return scores


def keydiff_scores(keys: torch.Tensor) -> torch.Tensor:
    """KeyDiff: ``-cos(k, anchor)`` with ``anchor`` the mean of the normalised keys, per kv-head.

    keys : [Hkv, S, D]. Returns [Hkv, S] float32 (higher = less like the mean direction = kept).
    """
    unit = F.normalize(keys.float(), dim=-1)
    anchor = F.normalize(unit.mean(dim=1, keepdim=True), dim=-1)
    return -(unit * anchor).sum(dim=-1)


def key_norm_scores(keys: torch.Tensor) -> torch.Tensor:
    """Key norm: ``-||k||_2`` in float32; keys : [Hkv, S, D] -> [Hkv, S] (low-norm keys are kept)."""
    return -torch.linalg.vector_norm(keys.float(), dim=-1)


def group_heads(per_query_head: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Sum a ``[Hq, ...]`` tensor into its kv-head groups: ``[Hkv, ...]``."""
    return per_query_head.reshape(n_kv, -1, *per_query_head.shape[1:]).sum(dim=1)


def attention_density(col: torch.Tensor) -> float:
    """D2O's F_l for one layer from its ``[Hq, L]`` column sums (high = sparse, peaked attention)."""
    if col.shape[-1] < 2:
        return 0.0
    var = col.double().var(dim=-1, unbiased=True)
    v_hat = (var - var.min()) / (var.max() - var.min() + 1e-6)
    return float(v_hat.mean())


def dynamic_layer_budgets(density: list[float], fraction: float, n_prompt: int) -> list[int]:
    """D2O per-layer budgets (entries) whose total is ``len(density) * round(fraction * n_prompt)``.

    ``w = softmax(-F)``, ``r_l = clamp(n * fraction * w_l, 0.01, 1)``; the clamped values are then
    rescaled (one common factor, found by bisection) so the total matches the uniform budget,
    and rounded by largest remainder. Dense layers (low F) get more.
    """
    n = len(density)
    target = n * round(fraction * n_prompt)
    low, high = max(1.0, math.floor(0.01 * n_prompt)), float(n_prompt)
    f = np.asarray(density, dtype=np.float64)
    w = np.exp(-(f - f.min()))
    raw = n * fraction * (w / w.sum()) * n_prompt
    target = min(max(target, n * low), n * high)
    lo, hi = 0.0, max(1.0, n_prompt / max(raw.min(), 1e-12))
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.clip(raw * mid, low, high).sum() < target:
            lo = mid
        else:
            hi = mid
    real = np.clip(raw * hi, low, high)
    out = np.floor(real).astype(np.int64)
    short = int(round(target - out.sum()))
    room = np.where(out < high, real - out, -1.0)
    for idx in np.argsort(-room, kind="stable")[: max(short, 0)]:
        out[idx] += 1
    return [int(v) for v in out]


def protected_mask(positions: torch.Tensor, n_sink, n_recent, seen: int) -> torch.Tensor:
    """True for sink positions (``< n_sink``) and the recent window (the last ``n_recent`` seen).

    `n_sink` and `n_recent` are ints, or tensors broadcasting against `positions` (one per slot).
    """
    return (positions < n_sink) | (positions >= seen - n_recent)


def keep_sets(
    scores: torch.Tensor, positions: torch.Tensor, n_keep: int, n_sink: int, n_recent: int, seen: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split stored entries into kept and evicted slots, per kv-head.

    Sinks and the recent window are always kept; the rest of the ``n_keep`` slots go to the
    highest scores, chosen independently per head.

    Parameters
    ----------
    scores : [Hkv, S] float (higher = more important)
    positions : [Hkv, S] long

    Returns
    -------
    kept : [Hkv, n_keep] slot indices, evicted : [Hkv, S - n_keep] slot indices, each in position order.
    """
    protect = protected_mask(positions, n_sink, n_recent, seen)
    ranked = scores.float().masked_fill(protect, float("inf"))
    chosen = torch.zeros_like(protect)
    chosen.scatter_(1, ranked.topk(n_keep, dim=-1).indices, True)
    order = torch.argsort(positions, dim=-1, stable=True)
    by_position = chosen.gather(1, order)
    split = torch.argsort(by_position.to(torch.int8), dim=-1, stable=True)
    slots = order.gather(1, split)
    n_evict = scores.shape[-1] - n_keep
    return slots[:, n_evict:], slots[:, :n_evict]


def top_value(values: torch.Tensor):
    """The largest value of `values`' dtype (+inf for floats), used to mask entries out of a minimum."""
    return float("inf") if values.is_floating_point() else torch.iinfo(values.dtype).max


@dataclass(frozen=True)
class Segments:
    """Consecutive runs of columns (one run per layer), as a padded `[n, width]` index.

    Reducing within each run then takes one gather and one ordinary reduction; measured
    ~10x faster on CPU than `scatter_reduce` over the flat columns.
    """

    index: torch.Tensor  # [n, width]: the column of each run's k-th element (0 at padding)
    valid: torch.Tensor  # [n, width]: False at padding

    @classmethod
    def of(cls, lengths: list[int], device=None) -> Segments:
        runs = torch.tensor(lengths, dtype=torch.long, device=device)
        starts = torch.cumsum(runs, 0) - runs
        k = torch.arange(max(lengths, default=0), device=device)
        valid = k[None, :] < runs[:, None]
        return cls(torch.where(valid, starts[:, None] + k[None, :], 0), valid)


def segment_argmin(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Per row, the column of the smallest value within each run (lowest column on ties).

    values : [H, T] (floats or integers). Returns [H, n] column indices.
    """
    padded = values[:, segments.index].masked_fill(~segments.valid, top_value(values))
    return segments.index[torch.arange(padded.shape[1], device=values.device), padded.argmin(dim=-1)]


def segment_argmax(values: torch.Tensor, segments: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and run, the largest value and its column (lowest column on ties): two [H, n] tensors."""
    padded = values[:, segments.index].masked_fill(~segments.valid, float("-inf"))
    best, k = padded.max(dim=-1)
    return best, segments.index[torch.arange(padded.shape[1], device=values.device), k]


def norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norms over the last dim in float32, never 0 (they divide)."""
    return torch.linalg.vector_norm(x.float(), dim=-1).clamp_min_(1e-12)


def nearest_kept(evicted_keys: torch.Tensor, kept_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of each evicted key to its most similar kept key of the same kv-head.

    Parameters
    ----------
    evicted_keys : [Hkv, E, D]
    kept_keys : [Hkv, K, D]

    Returns
    -------
    sim : [Hkv, E] float32 (``s[h, i] = max_j U``), target : [Hkv, E] long (``argmax_j U``).
    """
    unit = lambda x: F.normalize(x.float(), dim=-1)  # noqa: E731
    return torch.bmm(unit(evicted_keys), unit(kept_keys).transpose(1, 2)).max(dim=-1)


def ema_thresholds(tau: torch.Tensor, sim: torch.Tensor, beta: float, statistic: str) -> torch.Tensor:
    """D2O's per-layer thresholds after one decode step, for several layers at once.

    tau : [n] current thresholds (NaN: the layer has not compressed yet); sim : [Hkv, n], one
    evicted entry per head and layer. First compression: ``mean(s)``; then
    ``beta * new + (1 - beta) * tau`` with ``new`` the max or mean of ``s`` over heads.
    """
    new = sim.amax(dim=0) if statistic == "max" else sim.mean(dim=0)
    return torch.where(torch.isnan(tau), sim.mean(dim=0), torch.lerp(tau, new, beta))


def merge_decision(sim: torch.Tensor, tau: torch.Tensor, shared_by_heads: bool) -> torch.Tensor:
    """[Hkv, E] bool: merge when the similarity passes ``tau`` (per head, or the head mean for all heads)."""
    if shared_by_heads:
        return (sim.mean(dim=0, keepdim=True) >= tau).expand_as(sim)
    return sim >= tau


def merge_weights(
    sim: torch.Tensor, target: torch.Tensor, merged: torch.Tensor, n_kept: int, variant: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights that fold merged entries into their targets.

    ``variant="paper"``: softmax over the target (similarity 1) and its merged set ``M_j``:
    ``w_i = exp(s_i) / (e + sum exp(s_k))``, target weight ``e / (...)`` (sums to 1).
    ``variant="official"``: ``k_j <- (k_j + sum s_i k_i) / (1 + |M_j|)`` (not convex).

    Returns
    -------
    self_weight : [Hkv, K] float32 (exactly 1 for targets that absorb nothing),
    in_weight : [Hkv, E] float32 (0 for entries that are dropped, not merged).
    """
    on = merged.float()
    if variant == "paper":
        own, contrib = math.e, torch.exp(sim.float()) * on
        denom = torch.full((sim.shape[0], n_kept), own, device=sim.device).scatter_add_(1, target, contrib)
        return own / denom, contrib / denom.gather(1, target)
    count = torch.ones(sim.shape[0], n_kept, device=sim.device).scatter_add_(1, target, on)
    return 1.0 / count, sim.float() * on / count.gather(1, target)


def pair_weights(sim: torch.Tensor, merged: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_weights` for one evicted entry per head, each into its own target (the decode step).

    sim, merged : [Hkv]. Returns (self_weight, in_weight), each [Hkv]; exactly (1, 0) where not merged.
    """
    on = merged.float()
    if variant == "paper":
        # exp(s) / (e + exp(s)) == sigmoid(s - 1); the target keeps the rest.
        w_in = torch.sigmoid(sim.float() - 1.0) * on
    else:
        w_in = sim.float() * on / 2
        return 1.0 - on / 2, w_in
    return 1.0 - w_in, w_in


def apply_merge(
    kept: torch.Tensor,
    evicted: torch.Tensor,
    target: torch.Tensor,
    self_weight: torch.Tensor,
    in_weight: torch.Tensor,
) -> torch.Tensor:
    """``kept_j * self_weight_j + sum_i in_weight_i * evicted_i`` over ``i`` merged into ``j``, in float32.

    kept : [Hkv, K, D], evicted : [Hkv, E, D], target : [Hkv, E]. Returns [Hkv, K, D] in ``kept.dtype``.
    Entries that absorb nothing come back bit for bit (weight 1, nothing added).
    """
    out = kept.float() * self_weight[..., None]
    index = target[..., None].expand(-1, -1, kept.shape[-1])
    out.scatter_add_(1, index, evicted.float() * in_weight[..., None])
    return out.to(kept.dtype)
