"""StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): attention sinks plus a recent window.

Keys keep their original rotary positions; the original method re-indexes positions
inside the cache, this one does not (the UI says so).

Head granularity: none needed, positions alone decide (every head keeps the same entries), as in
kvpress 0.5.5's StreamingLLMPress (checked against NVIDIA/kvpress@8bb29b9).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .base import LayerPlan, Policy


@dataclass(frozen=True)
class StreamingLLM(Policy):
    """Keep the first `n_sink` positions and the most recent `budget - n_sink` entries."""

    n_sink: int = 4

    name: ClassVar[str] = "streaming"
    title: ClassVar[str] = "StreamingLLM"
    description: ClassVar[str] = (
        "StreamingLLM: attention sinks plus a recent window (https://arxiv.org/abs/2309.17453)"
    )
    # The whole non-sink budget is the recent window.
    unused_settings: ClassVar[tuple[str, ...]] = ("recent_share",)

    def split(self, plan: LayerPlan) -> LayerPlan:
        n_sink = min(self.n_sink, max(plan.budget - 1, 0))
        return dataclasses.replace(plan, n_sink=n_sink, n_recent=plan.budget - n_sink)
