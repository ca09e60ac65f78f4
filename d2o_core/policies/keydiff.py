"""KeyDiff (Park et al., 2025, arXiv 2504.15364): query-free eviction by key diversity.

`score(k) = -cos(k, anchor)`, `anchor` = the mean of the layer's normalised stored keys (per
kv-head): the keys least like the mean direction are kept. The paper compresses block-wise; here
the anchor is recomputed over the stored entries at every eviction (prefill and each decode
step, the new entry included). Sinks and the recent window are H2O's split (no sinks by default).

Head granularity: one decision per kv-head from its own keys, as kvpress's KeyDiffPress (checked
against NVIDIA/kvpress@8bb29b9). Decoding: the papers say nothing about it; this project keeps a 10 %
recent window by default so the tokens being generated stay long enough to be attended to (with no
window, the digits of an answer were evicted as they were written); `recent_share=0` is the papers'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import ops
from .base import Policy
from .scoring import FromKeys, Scoring


@dataclass(frozen=True)
class KeyDiff(Policy):
    """Keep the most distinctive keys; no attention scores at all."""

    recent_share: float = 0.1  # the papers keep none; here the tokens being written stay (docstring)

    name: ClassVar[str] = "keydiff"
    title: ClassVar[str] = "KeyDiff"
    description: ClassVar[str] = (
        "KeyDiff: keep keys least similar to the mean key, no attention (https://arxiv.org/abs/2504.15364)"
    )

    def scoring(self) -> Scoring:
        return FromKeys(ops.keydiff_scores)
