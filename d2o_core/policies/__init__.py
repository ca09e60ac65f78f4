"""Cache policies, one file each, and the registry the UI, CLI and tests list them from.

Adding a policy: its file here, one line in `POLICIES`, one row in the shared test matrix.
"""

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

__all__ = ["POLICIES", "Policy", "LayerPlan", "MergeRule", "FullCache", "StreamingLLM", "H2O", "D2O"]
