"""The full cache: keeps every entry. The reference all other policies are compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import LayerPlan, Policy


@dataclass(frozen=True)
class FullCache(Policy):
    """No eviction. `budget` is accepted (so every policy is built the same way) and ignored."""

    name: ClassVar[str] = "full"
    title: ClassVar[str] = "Full cache"
    description: ClassVar[str] = "Full cache: keeps every entry; the reference the others are compared with"
    unused_settings: ClassVar[tuple[str, ...]] = (
        "n_sink",
        "recent_share",
        "compress_every",
    )  # nothing is ever evicted

    def plans(self, n_prompt, n_layers, col_sums=None) -> list[LayerPlan]:
        return [LayerPlan(None) for _ in range(n_layers)]

    @property
    def label(self) -> str:
        return self.name
