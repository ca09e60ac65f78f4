"""Key norm (Devoto et al., 2024, arXiv 2406.11430): keep the keys with the lowest L2 norm.

`score(k) = -||k||_2` in float32, from the stored keys at every eviction; no attention needed.
Sinks and the recent window are H2O's split (no sinks by default).

Head granularity: one decision per kv-head from its own keys, as kvpress's KnormPress (checked
against NVIDIA/kvpress@8bb29b9). Decoding: as KeyDiff, a 10 % recent window by default keeps the
tokens being generated; `recent_share=0` is the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import ops
from .base import Policy
from .scoring import FromKeys, Scoring


@dataclass(frozen=True)
class KeyNorm(Policy):
    """Low key norm correlates with high attention (the paper's observation); no attention scores."""

    recent_share: float = 0.1  # the papers keep none; here the tokens being written stay (docstring)

    name: ClassVar[str] = "knorm"
    title: ClassVar[str] = "Key norm"
    description: ClassVar[str] = (
        "Key norm: keep the lowest-norm keys, no attention (https://arxiv.org/abs/2406.11430)"
    )

    def scoring(self) -> Scoring:
        return FromKeys(ops.key_norm_scores)
