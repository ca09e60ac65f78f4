"""Cache policies, one file each, and the registry the UI, CLI and tests list them from.

Adding a policy: its file here (a `Policy` subclass, see `base.py` for the interface) and one
line in `POLICIES`. The shared test matrices, the CLI, the results tables and the page pick it
up from the registry.
"""

import dataclasses

from .base import LayerPlan, Policy, Setting, setting, settings_of
from .cam import CaM
from .d2o import D2O
from .full import FullCache
from .h2o import H2O
from .keydiff import KeyDiff
from .knorm import KeyNorm
from .merging import CamRule, MergeRule, Merging
from .pyramidkv import PyramidKV
from .scoring import Scoring
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .tova import TOVA
from .vatp import VATP

POLICIES: dict[str, type[Policy]] = {
    "full": FullCache,
    "streaming": StreamingLLM,
    "h2o": H2O,
    "d2o": D2O,
    "tova": TOVA,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "keydiff": KeyDiff,
    "knorm": KeyNorm,
    "cam": CaM,
    "vatp": VATP,
}


def build(name: str, budget: float = 0.2, **settings) -> Policy:
    """A policy from its registry name, e.g. `build("d2o", 0.2, variant="official")`."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {repr(name)[:40]}; choose from {', '.join(POLICIES)}.")
    cls = POLICIES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(
            f"{name} has no setting {', '.join(unknown)}; its settings are {', '.join(sorted(known))}."
        )
    return cls(budget=budget, **settings)


__all__ = [
    "POLICIES",
    "Scoring",
    "build",
    "Policy",
    "Setting",
    "setting",
    "settings_of",
    "LayerPlan",
    "MergeRule",
    "CamRule",
    "Merging",
    "FullCache",
    "StreamingLLM",
    "H2O",
    "D2O",
    "TOVA",
    "SnapKV",
    "PyramidKV",
    "KeyDiff",
    "KeyNorm",
    "CaM",
    "VATP",
]
