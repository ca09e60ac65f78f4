"""KeyDiff (Park et al., 2025, arXiv 2504.15364): query-free eviction by key diversity.

`score(k) = -cos(k, anchor)`, `anchor` = the mean of the layer's normalised stored keys (per
kv-head): the keys least like the mean direction are kept. The paper compresses block-wise; here
the anchor is recomputed over the stored entries at every eviction (prefill and each decode
step, the new entry included). Sinks and the recent window are H2O's split, off by default
(the paper keeps neither), so a new entry may leave on the step it arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import ops
from .base import Policy


@dataclass(frozen=True)
class KeyDiff(Policy):
    """Keep the most distinctive keys; no attention scores at all."""

    recent_share: float = 0.0  # the papers keep no recent window

    name: ClassVar[str] = "keydiff"
    title: ClassVar[str] = "KeyDiff"
    description: ClassVar[str] = (
        "KeyDiff: keep keys least similar to the mean key, no attention (https://arxiv.org/abs/2504.15364)"
    )
    score_source: ClassVar[str] = "key"

    def key_scores(self, keys):
        return ops.keydiff_scores(keys)
