"""H2O, the heavy-hitter oracle (Zhang et al., 2023, arXiv 2306.14048).

Scores are accumulated attention per (layer, kv-head, entry); keep the recent window
and the top-scoring heavy hitters, same budget for every layer, no sinks by default.

Head granularity: one decision per kv-head, the query heads of a group summed. The official code
(FMInference/H2O) targets multi-head models, where that is one decision per head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Policy
from .scoring import Accumulated, Scoring


@dataclass(frozen=True)
class H2O(Policy):
    """Heavy hitters + recent window; `recent_share` of the budget is the recent window."""

    name: ClassVar[str] = "h2o"
    title: ClassVar[str] = "H2O"
    description: ClassVar[str] = (
        "H2O: heavy hitters by accumulated attention plus a recent window (https://arxiv.org/abs/2306.14048)"
    )

    def scoring(self) -> Scoring:
        return Accumulated()
