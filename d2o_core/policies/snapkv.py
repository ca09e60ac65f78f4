"""SnapKV (Li et al., 2024, arXiv 2404.14469): prompt scores from an observation window.

At the end of the prompt, the last `window` prompt queries attend to the whole prompt (causal
softmax); each key's score is the mean over those queries, average-pooled over positions
(`kernel`, "same" zero padding) and averaged over the query heads of its kv-head group. The
window itself is always kept, inside the budget (`round(budget * Lp)` entries per layer and
kv-head, window included; a budget smaller than the window keeps the window's last entries).
Prompts not longer than the window are not compressed at all.

Decoding (the paper compresses the prompt only; this is our choice): the prompt scores stay
fixed; new tokens enter the recent window (the last `window` tokens are never evicted) and,
when a layer is over budget, the lowest-scoring prompt entry outside it leaves. Entries from the
window on (the window's prompt tokens, every generated token) score `1 + position`, above every
prompt score, so once no scored prompt entry is left the oldest of them leaves first.

Head granularity: one decision per kv-head from the mean over its group's query heads, as kvpress's
SnapKVPress averages per group (checked against NVIDIA/kvpress@8bb29b9, `snapkv_press.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .base import LayerPlan, Policy, setting
from .scoring import ObservationWindow, Scoring


@dataclass(frozen=True)
class SnapKV(Policy):
    """Observation-window scores, fixed at prefill; `recent_share` plays no part (the window is recent)."""

    window: int = setting(64, "last prompt queries that score the prompt (kept)", low=1, high=256, step=1)
    kernel: int = setting(5, "odd width of the average pooling over positions", low=1, high=15, step=2)

    name: ClassVar[str] = "snapkv"
    title: ClassVar[str] = "SnapKV"
    description: ClassVar[str] = (
        "SnapKV: prompt scores from the last prompt queries, pooled (https://arxiv.org/abs/2404.14469)"
    )
    unused_settings: ClassVar[tuple[str, ...]] = ("recent_share",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (pooling keeps positions aligned); got {self.kernel}.")

    def scoring(self) -> Scoring:
        return ObservationWindow(self.window, self.kernel)

    def layer_caps(self, n_prompt, n_layers, col_sums) -> list[LayerPlan]:
        if n_prompt <= self.window:  # nothing to observe outside the window: keep the prompt whole
            return [LayerPlan(None) for _ in range(n_layers)]
        return super().layer_caps(n_prompt, n_layers, col_sums)

    def split(self, plan: LayerPlan) -> LayerPlan:
        if plan.budget is None:
            return plan
        n_sink = min(self.n_sink, max(plan.budget - 1, 0))
        return dataclasses.replace(plan, n_sink=n_sink, n_recent=min(self.window, plan.budget - n_sink))
