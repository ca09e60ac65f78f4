"""CaM, cache merging (Zhang et al., ICML 2024, "CaM: Cache Merging for Memory-efficient LLMs
Inference", https://proceedings.mlr.press/v235/zhang24n.html): H2O eviction, then evicted values
are merged into the entries that follow them.

The rule (what `evict.py` applies; keys are never changed, only values): when entry `i` with
accumulated score `s_i` leaves a (layer, kv-head), let `T_i` be the (up to) `m` kept entries of
that layer and head whose positions follow `i` most closely (`m = merge_tokens`, default the
layer's recent window size, as CaM's code merges into the whole recent window), and
`p_i = clamp(s_i / max_{j kept} s_j, 0, 1)` (CaM's merge probability: the evicted entry's mean
attention over the largest mean attention of a kept entry; the accumulated sums share the same
query count, so their ratio is the same). Then for every `j` in `T_i`:
`v_j <- v_j + p_i * v_i / |T_i|`. The paper draws a Bernoulli(`p_i`) mask and adds `v_i / m`
when it fires; we use its expectation, so runs are deterministic. At prefill every evicted entry
merges at once, from the values as they were before the compression. With no later kept entry
the evicted one is simply dropped. A merge leaves every score unchanged.

Head granularity: one decision per kv-head (H2O's), each head merging its own evicted value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import setting
from .h2o import H2O
from .merging import CamRule

# No layer keeps more entries than the longest prompt the app reads (LoadedModel.max_prompt_tokens's
# default), so more targets than this cannot be filled; the engine also stops at what a layer holds.
MAX_MERGE_TOKENS = 4096


@dataclass(frozen=True)
class CaM(H2O):
    """H2O plus CaM's value merging of what H2O evicts."""

    merge_tokens: int | None = setting(
        None,
        "kept entries after an evicted one that share its value (blank: the recent window)",
        low=1,
        high=MAX_MERGE_TOKENS,
    )

    name: ClassVar[str] = "cam"
    title: ClassVar[str] = "CaM"
    description: ClassVar[str] = (
        "CaM: H2O, evicted values merged into the next kept ones (https://proceedings.mlr.press/v235/zhang24n.html)"
    )

    def merge_rule(self) -> CamRule:
        return CamRule(self.merge_tokens)
