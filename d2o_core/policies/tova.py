"""TOVA, token omission via attention (Oren et al., 2024, arXiv 2401.06104).

Scores are the attention of the current query only, averaged over all query heads of the layer,
replaced (never accumulated) at every step; the lowest leaves. No sinks and no
recent window, as in the paper, except that the newest entry is never evicted on the step it
arrives (a recent window of exactly one entry). At prefill the last prompt query scores the prompt.

Head granularity: ONE decision per layer from the newest query's attention averaged over all query
heads, the same entry evicted from every kv-head, as TOVA's official code and kvpress's TOVAPress
(checked against NVIDIA/kvpress@8bb29b9, `tova_press.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .base import LayerPlan, Policy, setting
from .scoring import LatestQuery, Scoring


@dataclass(frozen=True)
class TOVA(Policy):
    """Keep the entries the newest query attends to most; `recent_share` plays no part."""

    n_sink: int = setting(0, "first positions never evicted (the paper keeps none)", low=0, high=16, step=1)

    name: ClassVar[str] = "tova"
    title: ClassVar[str] = "TOVA"
    description: ClassVar[str] = (
        "TOVA: keep what the latest query attends to, no accumulation (https://arxiv.org/abs/2401.06104)"
    )
    unused_settings: ClassVar[tuple[str, ...]] = ("recent_share",)

    def scoring(self) -> Scoring:
        return LatestQuery()

    def split(self, plan: LayerPlan) -> LayerPlan:
        if plan.budget is None:
            return plan
        n_sink = min(self.n_sink, max(plan.budget - 1, 0))
        return dataclasses.replace(plan, n_sink=n_sink, n_recent=min(1, plan.budget - n_sink))
