"""The shared base of every cache policy: settings, validation, and per-layer plans.

What this module is: `Policy` (a frozen dataclass: a policy is a configuration, never
per-request state), `LayerPlan` (what one layer may keep) and `MergeRule` (D2O's
token-level merge settings). A policy turns the prompt length and, when it asks for
them, the prefill's attention column sums into one `LayerPlan` per layer.

What it is not: it touches no tensors of the cache; `cache.py` applies the plans.
Budget split (ALGORITHMS.md): `budget_tokens = round(budget * prompt_tokens)` per
(layer, kv-head); sinks first, then `round(recent_share * budget_tokens)` recent
entries, the rest heavy hitters. `budget == 1` means no eviction at all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class LayerPlan:
    """What one layer keeps. `budget=None`: never evict (full cache)."""

    budget: int | None
    n_sink: int = 0
    n_recent: int = 0
    density: float = math.nan
    protected: bool = False


@dataclass(frozen=True)
class MergeRule:
    """D2O's token-level merge (see ALGORITHMS.md, the two readings)."""

    variant: str  # "paper" | "official": merge weights
    beta: float  # EMA weight of the new statistic
    statistic: str  # "max" | "mean": the EMA's new statistic
    shared_by_heads: bool  # decide per (head, entry) or on the head mean


def _check_int(name: str, value, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}; got {value!r}.")


@dataclass(frozen=True)
class Policy:
    """Base of all policies; subclasses set `name` and override `layer_caps`/`merge_rule`."""

    budget: float = 0.2
    n_sink: int = 0
    recent_share: float = 0.5

    name: ClassVar[str] = "base"
    title: ClassVar[str] = "Base"
    # Accumulate attention per stored entry (H2O-style scores).
    needs_scores: ClassVar[bool] = False
    # Per-query-head prefill column sums (D2O's layer densities).
    needs_density: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise ValueError(f"budget must be a number in (0, 1], e.g. 0.2 for 20 %; got {self.budget!r}.")
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be a fraction in (0, 1], e.g. 0.2 for 20 %; got {self.budget}.")
        _check_int("n_sink", self.n_sink)
        if not isinstance(self.recent_share, (int, float)) or not 0 <= self.recent_share <= 1:
            raise ValueError(f"recent_share must be in [0, 1]; got {self.recent_share!r}.")

    # -- what the policy keeps -------------------------------------------------------------
    def budget_tokens(self, n_prompt: int) -> int:
        """Uniform per-layer cap for this prompt (at least one entry)."""
        return max(1, round(self.budget * n_prompt))

    def layer_caps(self, n_prompt: int, n_layers: int, col_sums) -> list[LayerPlan]:
        """Per-layer budgets before the sink/recent split; uniform unless a subclass says otherwise."""
        return [LayerPlan(self.budget_tokens(n_prompt)) for _ in range(n_layers)]

    def split(self, plan: LayerPlan) -> LayerPlan:
        """Fill in sinks and the recent window for a layer's budget (both clamped to fit)."""
        if plan.budget is None:
            return plan
        n_sink = min(self.n_sink, max(plan.budget - 1, 0))
        n_recent = min(round(self.recent_share * plan.budget), plan.budget - n_sink)
        return dataclasses.replace(plan, n_sink=n_sink, n_recent=n_recent)

    def plans(
        self, n_prompt: int, n_layers: int, col_sums: list[torch.Tensor] | None = None
    ) -> list[LayerPlan]:
        """One `LayerPlan` per layer for a prompt of `n_prompt` tokens."""
        if self.budget >= 1:
            return [LayerPlan(None) for _ in range(n_layers)]
        return [self.split(p) for p in self.layer_caps(n_prompt, n_layers, col_sums)]

    def merge_rule(self) -> MergeRule | None:
        return None

    # -- how the policy is shown -----------------------------------------------------------
    def settings(self) -> dict:
        """Every setting, for records and JSON."""
        return {"policy": self.name, **dataclasses.asdict(self)}

    def _defaults(self) -> Policy:
        return type(self)(budget=self.budget)

    @property
    def label(self) -> str:
        """`name`, plus any setting that differs from the defaults (budget aside)."""
        ref = self._defaults()
        diff = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(ref, f.name)
        ]
        return f"{self.name}({','.join(diff)})" if diff else self.name
