"""Key norm (Devoto et al., 2024, arXiv 2406.11430): keep the keys with the lowest L2 norm.

`score(k) = -||k||_2` in float32, from the stored keys at every eviction; no attention needed.
Sinks and the recent window are H2O's split, off by default (the paper keeps neither).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import ops
from .base import Policy


@dataclass(frozen=True)
class KeyNorm(Policy):
    """Low key norm correlates with high attention (the paper's observation); no attention scores."""

    recent_share: float = 0.0  # the papers keep no recent window

    name: ClassVar[str] = "knorm"
    title: ClassVar[str] = "Key norm"
    description: ClassVar[str] = (
        "Key norm: keep the lowest-norm keys, no attention (https://arxiv.org/abs/2406.11430)"
    )
    score_source: ClassVar[str] = "key"

    def key_scores(self, keys):
        return ops.key_norm_scores(keys)
