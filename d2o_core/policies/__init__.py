"""Cache policies, one file each, and the registry the UI, CLI and tests list them from.

Adding a policy: its file here, one line in `POLICIES`, one row in the shared test matrix.
"""

import dataclasses

from .base import LayerPlan, MergeRule, Policy
from .d2o import D2O
from .full import FullCache
from .h2o import H2O
from .streaming import StreamingLLM

POLICIES: dict[str, type[Policy]] = {
    "full": FullCache,
    "streaming": StreamingLLM,
    "h2o": H2O,
    "d2o": D2O,
}


def build(name: str, budget: float = 0.2, **settings) -> Policy:
    """A policy from its registry name, e.g. `build("d2o", 0.2, variant="official")`."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}.")
    cls = POLICIES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(
            f"{name} has no setting {', '.join(unknown)}; its settings are {', '.join(sorted(known))}."
        )
    return cls(budget=budget, **settings)


__all__ = ["POLICIES", "build", "Policy", "LayerPlan", "MergeRule", "FullCache", "StreamingLLM", "H2O", "D2O"]
