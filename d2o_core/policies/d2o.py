"""D2O, dynamic discriminative operations (Wan et al., 2024, arXiv 2406.13035).

Two levels on top of H2O-style eviction: per-layer budgets from the prefill's
attention density (dense layers get more), and merging of evicted entries into their
most similar kept entry when the similarity passes a per-layer EMA threshold.
Two readings of the method exist; `variant` picks one ("paper" or "official") and
every setting can still be overridden. `merge=False` with `layer_budgets="uniform"`
is exactly H2O (with the same sinks and recent share).

Head granularity: eviction per kv-head (H2O's); the merge decision per (head, entry) in the paper's
reading, shared by the heads of a layer in the official code's (docs/policies.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import ops
from .base import LayerPlan, Policy, setting
from .merging import MergeRule
from .scoring import Accumulated, Scoring

VARIANTS = {
    # recent_share, beta, EMA statistic, decision shared by heads, protected layers
    "paper": dict(recent_share=0.25, beta=0.7, statistic="max", shared_by_heads=False, protected_layers=()),
    "official": dict(
        recent_share=0.5, beta=0.5, statistic="mean", shared_by_heads=True, protected_layers=(0, 1, -1)
    ),
}


@dataclass(frozen=True)
class D2O(Policy):
    """D2O. Settings left as None take the chosen variant's value (see `VARIANTS`)."""

    n_sink: int = 4
    recent_share: float | None = setting(
        None, "share of each layer's budget kept for recent tokens (blank: the variant's)", low=0.0, high=1.0
    )
    variant: str = setting(
        "paper",
        "paper: 3:1 heavy:recent, EMA of max similarity, per-head merges, softmax weights; "
        "official code: 1:1, EMA of mean, shared decisions, layers 0, 1 and last kept whole",
        choices=tuple(VARIANTS),
    )
    merge: bool = setting(True, "merge evicted tokens into similar kept ones (off: H2O with D2O budgets)")
    beta: float | None = setting(
        None,
        "weight of the newest similarity in the merge threshold's EMA (blank: the variant's)",
        low=0.05,
        high=1.0,
    )
    layer_budgets: str = setting(
        "dynamic",
        "dynamic: dense-attention layers get more budget; uniform: all the same",
        choices=("dynamic", "uniform"),
    )
    protected_layers: tuple[int, ...] | None = setting(
        None, "layers that keep their full cache, e.g. 0, 1, -1 (blank: the variant's)"
    )

    name: ClassVar[str] = "d2o"
    title: ClassVar[str] = "D2O"
    description: ClassVar[str] = (
        "D2O: H2O with layer budgets from attention density, evicted keys merged (https://arxiv.org/abs/2406.13035)"
    )
    needs_density: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            # The sentence base.check_setting gives (the variant is needed before that check runs).
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {repr(self.variant)[:40]}.")
        defaults = VARIANTS[self.variant]
        for key in ("recent_share", "beta", "protected_layers"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, defaults[key])
        if isinstance(self.protected_layers, list):  # JSON and the page give lists
            object.__setattr__(self, "protected_layers", tuple(self.protected_layers))
        super().__post_init__()

    def _defaults(self) -> D2O:
        return D2O(budget=self.budget, variant=self.variant)

    @property
    def label(self) -> str:
        base = super().label
        if self.variant == "paper":
            return base
        # Show the variant first, then whatever differs from that variant's defaults.
        rest = base[len(self.name) + 1 : -1] if base != self.name else ""
        return f"{self.name}(variant={self.variant}{',' + rest if rest else ''})"

    def protected(self, n_layers: int) -> set[int]:
        """Resolve protected layer numbers (negative from the end) for a model of `n_layers`."""
        out = set()
        for layer in self.protected_layers:
            if not -n_layers <= layer < n_layers:
                raise ValueError(f"protected layer {layer} does not exist in a model with {n_layers} layers.")
            out.add(layer % n_layers)
        return out

    def layer_caps(self, n_prompt, n_layers, col_sums) -> list[LayerPlan]:
        density = [ops.attention_density(c) for c in col_sums] if col_sums else [float("nan")] * n_layers
        protected = self.protected(n_layers)
        free = [i for i in range(n_layers) if i not in protected]
        if self.layer_budgets == "dynamic" and col_sums and free:
            tokens = ops.dynamic_layer_budgets([density[i] for i in free], self.budget, n_prompt)
        else:
            tokens = [self.budget_tokens(n_prompt)] * len(free)
        budget_of = dict(zip(free, tokens))
        return [
            LayerPlan(budget_of.get(i), density=density[i], protected=i in protected) for i in range(n_layers)
        ]

    def scoring(self) -> Scoring:
        return Accumulated()

    def merge_rule(self) -> MergeRule | None:
        if not self.merge:
            return None
        v = VARIANTS[self.variant]
        return MergeRule(self.variant, float(self.beta), v["statistic"], v["shared_by_heads"])
