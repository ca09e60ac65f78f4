"""The shared base of every cache policy: settings, validation, and per-layer plans.

What this module is: the one interface every policy plugs into. `Policy` (a frozen
dataclass: a policy is a configuration, never per-request state) decides three things:

(a) budgets: `layer_caps` turns the prompt length and, when `needs_density` asks for them,
    the prefill's attention column sums into one `LayerPlan` per layer (`split` then places
    sinks and the recent window);
(b) scores: `scoring()` returns a `scoring.Scoring` object that says where an entry's
    importance comes from (age, accumulated attention, the newest query, an observation window,
    the keys, the values: whatever a layer holds) at the prompt, at each step and at eviction;
    the engine computes only what it asks for; higher scores are kept;
(c) what an evicted entry becomes: `merge_rule()` returns None (dropped) or a rule object
    (`MergeRule`: D2O's nearest-key merge; `CamRule`: CaM's value merge).

`LayerPlan` is what one layer may keep.

Settings describe themselves: each dataclass field is declared with `setting(default, help, low=,
high=, step=, choices=)`, and `settings_of(cls)` turns the fields into `Setting` records (kind, range,
default, one-line help) from which the page builds its Advanced controls and the CLI checks `--set`.
A subclass may redeclare a field with a plain new default; its help and range are inherited.

What it is not: it touches no tensors of the cache; `cache.py` and `evict.py` apply the plans.
Budget split (ALGORITHMS.md): `budget_tokens = round(budget * prompt_tokens)` per
(layer, kv-head); sinks first, then `round(recent_share * budget_tokens)` recent
entries, the rest heavy hitters. `budget == 1` means no eviction at all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .merging import Merging
from .scoring import Scoring


@dataclass(frozen=True)
class LayerPlan:
    """What one layer keeps. `budget=None`: never evict (full cache)."""

    budget: int | None
    n_sink: int = 0
    n_recent: int = 0
    density: float = math.nan
    protected: bool = False


def setting(default: Any, help: str, *, low=None, high=None, step=None, choices=None):
    """A policy field with its one-line help and, for the page's controls, its range or choices."""
    meta = {"help": help, "low": low, "high": high, "step": step, "choices": choices}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


@dataclass(frozen=True)
class Setting:
    """One policy setting as the page and the CLI see it.

    kind : "int" | "float" | "bool" | "choice" | "layers" (a tuple of layer numbers).
    optional : None is allowed and means "the policy decides" (e.g. D2O's variant default).
    """

    name: str
    kind: str
    default: Any
    help: str
    optional: bool = False
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple | None = None


def _kind(annotation: str, meta: dict) -> str:
    if "choices" in meta or annotation.startswith("str"):
        return "choice"
    for kind in ("bool", "tuple", "int", "float"):
        if annotation.startswith(kind):
            return "layers" if kind == "tuple" else kind
    raise TypeError(
        f"setting type {annotation!r} has no control; use bool, int, float, str or tuple[int, ...]"
    )


def _metadata(cls: type, name: str) -> dict:
    """A field's metadata: what base classes declared, overridden by what subclasses redeclare."""
    meta: dict = {}
    for klass in reversed(cls.__mro__):
        field_ = getattr(klass, "__dataclass_fields__", {}).get(name)
        if field_ is not None:
            meta |= field_.metadata
    return meta


def _annotation(kind) -> str:
    """A field's type as text, whether annotations are strings (PEP 563) or objects."""
    text = kind.__name__ if isinstance(kind, type) else str(kind)
    return text.replace(" ", "").replace("typing.", "")


def settings_of(cls: type[Policy]) -> list[Setting]:
    """Every setting of a policy class except the budget (set per column) and `unused_settings`."""
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "budget" or f.name in cls.unused_settings:
            continue
        meta, annotation = _metadata(cls, f.name), _annotation(f.type)
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name} needs a one-line help: declare it with setting(...)")
        out.append(
            Setting(
                f.name,
                _kind(annotation, meta),
                f.default,
                meta["help"],
                optional="None" in annotation,
                low=meta.get("low"),
                high=meta.get("high"),
                step=meta.get("step"),
                choices=tuple(meta["choices"]) if "choices" in meta else None,
            )
        )
    return out


def check_setting(policy: Policy, s: Setting) -> None:
    """One setting's value against what its field declares (kind, range, choices); ValueError otherwise.

    The declaration is the one bound: the page's controls, the CLI's `--set`, the API and a run file's
    settings all end here, so the same mistake gets the same sentence everywhere.
    """
    value, name = getattr(policy, s.name), s.name
    if value is None and s.optional:
        return
    shown = repr(value)[:40]  # a hostile value is not echoed back whole
    if s.kind == "bool" and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {shown}.")
    if s.kind == "choice" and value not in s.choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, s.choices))}; got {shown}.")
    if s.kind == "layers" and not (
        isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(
            f"{name} must be layer numbers such as 0, 1, -1 (negative from the end); got {shown}."
        )
    if s.kind in ("int", "float"):
        whole = s.kind == "int"
        number = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)
        number = number and math.isfinite(value)
        low, high = s.low, s.high
        if not number or (low is not None and value < low) or (high is not None and value > high):
            what = "a whole number" if whole else "a number"
            span = (
                f" from {low:g} to {high:g}" if low is not None and high is not None
                else f" >= {low:g}" if low is not None else f" <= {high:g}" if high is not None else ""
            )  # fmt: skip
            raise ValueError(f"{name} must be {what}{span}; got {shown}.")


# The most steps a policy may grow past its budget before it compresses (memory stays bounded by it).
MAX_COMPRESS_EVERY = 4096


@dataclass(frozen=True)
class Policy:
    """Base of all policies; subclasses set `name` and override `layer_caps`/`merge_rule`."""

    budget: float = setting(0.2, "fraction of the prompt kept per layer and kv-head", low=0.01, high=1.0)
    n_sink: int = setting(0, "first positions never evicted (attention sinks)", low=0, high=16, step=1)
    recent_share: float = setting(
        0.5, "share of the budget kept for the most recent tokens", low=0.0, high=1.0, step=0.05
    )
    compress_every: int = setting(
        1,
        "when to compress: 0 once after the prompt (the cache then grows), 1 every step, "
        "N: grow N entries past the budget, then cut back to it",
        low=0,
        high=MAX_COMPRESS_EVERY,
        step=1,
    )

    name: ClassVar[str] = "base"
    title: ClassVar[str] = "Base"
    description: ClassVar[str] = ""  # one line with the paper's link
    # Per-query-head prefill column sums (D2O's layer densities), handed to `layer_caps`.
    needs_density: ClassVar[bool] = False
    # Fields this policy ignores (e.g. TOVA's recent window is fixed): not shown, not recorded.
    unused_settings: ClassVar[tuple[str, ...]] = ()

    def scoring(self) -> Scoring:
        """How this policy scores entries (see scoring.py); the default keeps by age alone."""
        return Scoring()

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise ValueError(f"budget must be a number in (0, 1], e.g. 0.2 for 20 %; got {self.budget!r}.")
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be a fraction in (0, 1], e.g. 0.2 for 20 %; got {self.budget}.")
        for spec in settings_of(type(self)):
            check_setting(self, spec)

    def decode_room(self, new_tokens: int) -> int:
        """Entries a capped layer holds past its budget while decoding `new_tokens` (its peak's excess)."""
        return new_tokens if self.compress_every == 0 else min(self.compress_every, new_tokens)

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

    def merge_rule(self) -> Merging | None:
        """What an evicted entry becomes: None (dropped) or the rule that folds it into kept ones."""
        return None

    # -- how the policy is shown -----------------------------------------------------------
    def settings(self) -> dict:
        """Every setting, for records and JSON."""
        out = {"policy": self.name, **dataclasses.asdict(self)}
        return {k: v for k, v in out.items() if k not in self.unused_settings}

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
