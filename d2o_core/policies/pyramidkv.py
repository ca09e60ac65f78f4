"""PyramidKV (Cai et al., 2024, arXiv 2406.02069): SnapKV scores with budgets falling over depth.

Scores, the window and decoding are SnapKV's (see `snapkv.py`). Layer budgets besides the window
fall linearly from the first layer to the last (as NVIDIA kvpress 0.5.5 computes them): with
`avg = budget * Lp`, `min = avg / beta`, `max = 2 avg - min`; if `max > Lp - window`, `max` is
clipped to it and `min = 2 avg - max`; layer `l` keeps `window + round(max - l (max - min) / (L - 1))`
entries. So the mean per layer is `window + budget * Lp` (the window comes on top, unlike SnapKV's
budget). When the pyramid does not fit (`min < 0`, `min > max`, or one layer) every layer gets
SnapKV's uniform budget instead.

Head granularity: as SnapKV, one decision per kv-head (group mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import LayerPlan, setting
from .snapkv import SnapKV


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV with a linear pyramid of layer budgets; `beta` sets how steep (larger: steeper)."""

    beta: float = setting(20.0, "pyramid steepness: the last layer keeps avg/beta", low=1, high=100, step=1)

    name: ClassVar[str] = "pyramidkv"
    title: ClassVar[str] = "PyramidKV"
    description: ClassVar[str] = (
        "PyramidKV: SnapKV scores, layer budgets falling with depth (https://arxiv.org/abs/2406.02069)"
    )

    def pyramid(self, n_prompt: int, n_layers: int) -> list[int] | None:
        """Entries besides the window per layer, or None when the pyramid does not fit."""
        avg = n_prompt * self.budget
        low = avg / self.beta
        high = 2 * avg - low
        room = n_prompt - self.window
        if high > room:
            high = room
            low = 2 * avg - high
        if n_layers < 2 or not 0 <= low <= high:
            return None
        step = (high - low) / (n_layers - 1)
        return [round(high - layer * step) for layer in range(n_layers)]

    def layer_caps(self, n_prompt, n_layers, col_sums) -> list[LayerPlan]:
        if n_prompt <= self.window:
            return [LayerPlan(None) for _ in range(n_layers)]
        extra = self.pyramid(n_prompt, n_layers)
        if extra is None:
            return super().layer_caps(n_prompt, n_layers, col_sums)
        return [LayerPlan(self.window + e) for e in extra]
