"""Helpers the test files share: tiny random models, a sample text, and the engine step by step.

Import them with `from helpers import ...` (tests/ is on sys.path under pytest; `conftest` re-exports
the same names). Fixtures (`tiny`, `bundled`, `cli_tiny`) live in `conftest.py`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import d2o_core
from d2o_core import engine
from d2o_core.cache import PolicyCache, PrefillCache
from d2o_core.eval.cells import FORMAT
from d2o_core.events import EventLog

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
)


class CharTokenizer:
    """One token per ASCII character; no chat template, no EOS (tiny models never stop early)."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text: str, **kwargs) -> dict:
        return {"input_ids": [min(ord(c), 127) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(int(i)) for i in ids)


def tiny_model(layers: int = 4, heads: int = 4, kv_heads: int = 2, seed: int = 0, dtype=torch.float32):
    """A random Llama-style causal LM with grouped-query attention, built from a config (no downloads)."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=2048,
        initializer_range=0.2,  # peakier attention than the default, so scores differ between tokens
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return d2o_core.from_model(model, CharTokenizer(), name=f"tiny-{layers}x{heads}q{kv_heads}kv")


def shared_prefill(lm, ids: list[int]) -> tuple[PrefillCache, torch.Tensor]:
    """The prompt read once, attention scores recorded (any policy may need them): (prefill, last logits)."""
    prefill = PrefillCache(lm.n_layers, record=True)
    logits = engine.prefill(lm, prefill, ids)
    return prefill, logits


def policy_cache(prefill: PrefillCache, policy, extra: int = 1) -> PolicyCache:
    """`policy`'s compressed cache from a shared prefill, with room for `extra` tokens and its own log."""
    return PolicyCache.from_prefill(prefill, policy, extra=extra, log=EventLog())


def prefill_cache(lm, ids: list[int], policy, extra: int = 1) -> tuple[PolicyCache, torch.Tensor]:
    """Prefill `ids` and compress for `policy`: (cache, the prompt's last logits)."""
    prefill, logits = shared_prefill(lm, ids)
    return policy_cache(prefill, policy, extra), logits


def walk(lm, ids, policy, steps: int, feed=None) -> Iterator[tuple[int, PolicyCache, torch.Tensor]]:
    """Prefill, compress, then decode `steps` tokens; yields (step, cache, logits) after each.

    Step 0 is the compressed prompt. Each step feeds `feed[step - 1]`, or the greedy choice without `feed`.
    The cache is the same object throughout (clone it to keep a step's state).
    """
    cache, logits = prefill_cache(lm, ids, policy, extra=steps + 1)
    yield 0, cache, logits
    for step in range(1, steps + 1):
        token = feed[step - 1] if feed is not None else int(logits.argmax())
        logits = one_step(lm, cache, token, step)
        yield step, cache, logits


def one_step(lm, cache: PolicyCache, token: int, step: int) -> torch.Tensor:
    """One decode step of a single cache: [V] logits."""
    return engine.decode_step(lm, [cache], [token], step)[0]


def held_positions(layer) -> list[list[int]]:
    """Per kv-head, the original positions of the entries the layer holds now."""
    out = []
    for h in range(layer.keys.shape[1]):
        slots = set(range(layer.used))
        if layer.hole is not None:
            slots.discard(int(layer.hole[h]))
        out.append(sorted(int(layer.positions[h, s]) for s in slots))
    return out


def slot_of(layer, head: int, position: int) -> int:
    """The slot where kv-head `head` of `layer` holds original position `position`."""
    return int((layer.positions[head, : layer.used] == position).nonzero()[0])


# The page's figure outputs (ui/compare_run.results_page fills them all).
PAGE_FIGURES = (
    "budget_fig",
    "attention_fig",
    "drift_fig",
    "cache_fig",
    "timeline_fig",
    "step0_fig",
    "kept_fig",
    "survival_fig",
)


def figure_data(fig) -> dict:
    """A figure as plain JSON: what two figures must share to show the same data."""
    import json  # noqa: PLC0415

    return json.loads(fig.to_json())


def page_props(demo) -> dict:
    """{elem_id: props} of a built page's components, as its config sends them to the browser."""
    return {c["props"].get("elem_id"): c["props"] for c in demo.config["components"] if "props" in c}


def page_order(demo, tab: str | None = None) -> list[dict]:
    """A built page's components in page order (depth first through its layout config), each as its
    config entry ({"id", "type", "props", ...}); with `tab`, only those inside the tab of that label."""
    components = {c["id"]: c for c in demo.config["components"]}

    def visit(node) -> list[dict]:
        here = [components[node["id"]]] if node["id"] in components else []
        return here + [c for child in node.get("children", []) for c in visit(child)]

    def find(node):
        c = components.get(node["id"])
        if c is not None and c["type"] == "tabitem" and c["props"].get("label") == tab:
            return node
        return next((hit for child in node.get("children", []) if (hit := find(child))), None)

    root = demo.config["layout"] if tab is None else find(demo.config["layout"])
    assert root is not None, f"no tab {tab!r}"
    return visit(root)


# The browser tests' Debian chromium, driven by playwright (never `playwright install`), offline.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [  # no background services; only the app's host resolves
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    # Offline: every host name but the app's fails to resolve, so background services
    # (and the page's web fonts) look nothing up.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-pings",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-breakpad",
    "--disable-client-side-phishing-detection",
    "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication,"
    "CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
]


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        return "Debian chromium is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401, PLC0415
    except ImportError:
        return "python playwright is not installed"
    return None


def fake_records() -> list[dict]:
    """Hand-made records: two tasks, full once, h2o at two budgets."""
    out = []
    for task, scores in (("kv", {1.0: 1.0, 0.2: 0.5, 0.4: 1.0}), ("qa", {1.0: 0.8, 0.2: 0.1, 0.4: 0.3})):
        for budget, score in scores.items():
            name = "full" if budget == 1.0 else "h2o"
            settings = {"model": "m", "task": task, "source": "synthetic", "sample": 0, "length": 512,
                        "depth": 0.5, "policy": name, "budget": budget, "metric": "contains"}  # fmt: skip
            result = {
                "score": score,
                "kv_mb": 10 * budget,
                "tokens_per_second": 20 - 5 * budget,
                "output": "",
            }
            where = {"versions": {"d2o_core": "1"}, "machine": {"gpu": None, "node": "n"}}
            record = {"format": FORMAT, "key": f"{task}{budget}", "settings": settings, "config": name}
            out.append(record | {"result": result} | where)
    return out
