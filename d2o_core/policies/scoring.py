"""How a policy scores its cache entries: one small object per way of scoring, used at every moment.

What this module is: `Scoring`, the interface the engine calls, and the ways of scoring the
registered policies use. A policy returns one from `Policy.scoring()`; the engine asks it, and
never a kind string, what to compute:

- at the prefill: `prompt_attention` (the prompt's attention column sums) and `prompt_queries`
  (the last N prompt queries) say what the shared prompt pass must record;
- at the prompt compression (step 0): `prompt(layer, n_kv)` gives the scores stored with the
  prompt's entries (None: nothing stored);
- at each decode step: when `step_attention`, the engine computes the new query's attention row
  and `update(stored, row, n_rep)` folds it into the stored scores; a new entry starts at
  `fresh(position)`;
- at every eviction: entries are ranked by `rank(keys, values, stored)` when `ranks_entries`
  (from whatever the layer holds: keys, values, stored scores), else by the stored scores, else by
  age (oldest first). Higher is kept.

A new way of scoring is one subclass here or in a policy's own file (see the README's example).

What it is not: it decides no budgets (`Policy.layer_caps`) and no merging (`merging.py`).
Shapes: `stored` and `row` are `[..., Hkv, S]` (a leading row dimension in stacked batches);
`keys`/`values` are `[Hkv, S, D]`, `stored` then `[Hkv, S]` or None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import ops


@dataclass(frozen=True)
class Scoring:
    """Age only: no scores; the oldest entry outside the sinks and the recent window leaves first."""

    prompt_attention = False
    prompt_queries = 0
    step_attention = False
    stored = False
    ranks_entries = False

    def prompt(self, layer, n_kv: int) -> torch.Tensor | None:
        """[Hkv, L] float32 scores of one layer's prompt entries (`layer`: a `cache.PrefillLayer`)."""
        return None

    def update(self, stored: torch.Tensor, row: torch.Tensor, n_rep: int) -> None:
        """Fold one decode step's attention `row` (summed over each group's `n_rep` query heads) in place."""

    def fresh(self, position):
        """The score a new entry starts with (`position`: an int or a tensor of positions)."""
        return 0.0

    def rank(self, keys: torch.Tensor, values: torch.Tensor, stored: torch.Tensor | None) -> torch.Tensor:
        """[Hkv, S] float32 ranking of one layer's stored entries (higher is kept)."""
        raise NotImplementedError(f"{type(self).__name__} ranks by stored scores, not by entries")


@dataclass(frozen=True)
class Accumulated(Scoring):
    """H2O: prompt column sums, then each new query's attention row added (per kv-head group)."""

    prompt_attention = True
    step_attention = True
    stored = True

    def prompt(self, layer, n_kv):
        return ops.group_heads(layer.col_sums, n_kv)

    def update(self, stored, row, n_rep):
        stored += row


@dataclass(frozen=True)
class LatestQuery(Scoring):
    """TOVA: the newest query's attention only, averaged over ALL query heads of the layer.

    One score per entry per layer, the same in every kv-head, so every head evicts the same entry
    (schwartz-lab-NLP/TOVA `src/tova_cache.py` and kvpress average over the layer's heads too).
    At the prompt, the last prompt query scores it the same way.
    """

    prompt_queries = 1
    step_attention = True
    stored = True

    def prompt(self, layer, n_kv):
        need_queries(layer, 1)
        per_group = ops.window_scores(layer.queries[:, -1:], layer.keys[0], layer.scaling, 1)
        return per_group.mean(dim=0, keepdim=True).expand(n_kv, -1).contiguous()

    def update(self, stored, row, n_rep):
        n_heads = n_rep * row.shape[-2]
        stored.copy_((row.sum(dim=-2, keepdim=True) / n_heads).expand_as(stored))


@dataclass(frozen=True)
class ObservationWindow(Scoring):
    """SnapKV: the last `window` prompt queries score the prompt once (mean, pooled over `kernel` positions).

    Fixed during decoding; every entry from the window on (the window's prompt tokens, every generated
    token) ranks by recency above any score: it scores `1 + position`.
    """

    window: int = 64
    kernel: int = 5

    stored = True

    @property
    def prompt_queries(self) -> int:
        return self.window

    def prompt(self, layer, n_kv):
        length = layer.keys.shape[2]
        window = min(self.window, length)
        need_queries(layer, window)
        scores = ops.window_scores(layer.queries[:, -window:], layer.keys[0], layer.scaling, self.kernel)
        scores[:, length - window :] = torch.arange(length - window, length, device=scores.device) + 1.0
        return scores

    def fresh(self, position):
        return position + 1.0


@dataclass(frozen=True)
class FromKeys(Scoring):
    """Query-free: a function of a layer's stored keys, recomputed at every eviction (KeyDiff, key norm)."""

    score: Callable[[torch.Tensor], torch.Tensor] = ops.key_norm_scores

    ranks_entries = True

    def rank(self, keys, values, stored):
        return self.score(keys)


def need_queries(layer, count: int) -> None:
    """Refuse a prefill that kept fewer than `count` last queries (built without `prefill_needs`)."""
    kept = 0 if layer.queries is None else layer.queries.shape[1]
    if kept < count:
        raise ValueError(
            f"this policy scores the prompt from its last {count} queries, but the prefill kept {kept}; "
            "build the prefill with cache.prefill_needs(policies)."
        )
