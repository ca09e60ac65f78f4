"""d2o_core: see what KV-cache compression does to a language model.

Public API (DESIGN.md):

    lm = load_model()                                   # bundled SmolLM2-135M-Instruct, CPU, offline
    policy = POLICIES["d2o"](budget=0.2)               # "full", "streaming", "h2o", "d2o"
    res = generate(lm, "prompt", policy, max_new_tokens=64)
    many = compare(lm, "prompt", [POLICIES[k](budget=0.2) for k in ("full", "h2o", "d2o")])
    for update in iter_compare(lm, "prompt", policies): ...   # streaming form
    out = serve_batch(lm, prompts, policy, max_new_tokens=32, kv_cap_mb=None)  # rows under a KV cap

This package never imports gradio or plotly.
"""

from .models import LoadedModel, from_model, load_model
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
    "Update",
    "compare",
    "from_model",
    "generate",
    "iter_compare",
    "load_model",
    "serve_batch",
]
