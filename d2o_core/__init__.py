"""d2o_core: see what KV-cache compression does to a language model.

Public API (README.md; docs/engine.md for how a run flows):

    lm = load_model()                                   # bundled SmolLM2-135M-Instruct, CPU, offline
    policy = POLICIES["d2o"](budget=0.2)               # "full", "streaming", "h2o", "d2o"
    res = generate(lm, "prompt", policy, max_new_tokens=64)
    many = compare(lm, "prompt", [POLICIES[k](budget=0.2) for k in ("full", "h2o", "d2o")])
    for update in iter_compare(lm, "prompt", policies): ...   # streaming form
    out = serve_batch(lm, prompts, policy, max_new_tokens=32, kv_cap_mb=None)  # rows under a KV cap
    cache = cache_for(model, policy)                    # a transformers Cache for model.generate()

This package never imports gradio or plotly.
"""

from ._version import __version__
from .interop import GenerateCache, cache_for
from .models import LoadedModel, bundled_folder, from_model, load_model
from .policies import POLICIES, Policy
from .run_result import RunResult
from .runner import Update, compare, generate, iter_compare
from .serving import BatchResult, serve_batch

__all__ = [
    "POLICIES",
    "LoadedModel",
    "Policy",
    "RunResult",
    "BatchResult",
    "GenerateCache",
    "Update",
    "bundled_folder",
    "cache_for",
    "compare",
    "from_model",
    "generate",
    "iter_compare",
    "load_model",
    "serve_batch",
    "__version__",
]
