"""What one policy produced for one prompt: `RunResult`, and its assembly at the end of a run.

What this module is: the result record (texts, token ids, the frames whose schemas live in
events.py, metrics), the function that builds it from a finished run, and `prompt_attention`,
the comparison's one `attention` frame built from the shared prefill (every policy's result
holds the same frame object).

What it is not: no generation (runner.py) and no metric maths (metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import metrics as M
from . import ops
from .cache import PolicyCache, PrefillCache
from .events import ATTENTION_SCHEMA, LAYER_BUDGETS_SCHEMA, attention_frame, frame, survival_frame
from .models import LoadedModel


@dataclass
class RunResult:
    """Everything one policy produced for one prompt (frames follow events.py's schemas)."""

    label: str
    text: str
    token_ids: list[int]
    prompt_tokens: list[str]
    events: pd.DataFrame
    steps: pd.DataFrame
    layer_budgets: pd.DataFrame
    metrics: dict
    drift: pd.DataFrame
    settings: dict
    generated_tokens: list[str] = field(default_factory=list)
    # The prompt's attention (ATTENTION_SCHEMA); one frame shared by every result of a comparison.
    attention: pd.DataFrame = field(default_factory=lambda: frame({}, ATTENTION_SCHEMA))

    def survival(self) -> pd.DataFrame:
        """Per prompt token, the share of (layer, kv-head) slots that kept, merged or dropped it."""
        n_slots = self.metrics["n_layers"] * self.metrics["n_kv_heads"]
        return survival_frame(self.events, self.prompt_tokens, n_slots, self.settings.get("n_sink", 0))

    def to_dict(self) -> dict:
        """JSON-ready form (frames as lists of records).

        `attention` is left out: it is shared by the comparison, and runfile.py stores it once per run.
        """
        records = lambda df: df.astype(object).where(df.notna(), None).to_dict("records")  # noqa: E731
        return {
            "label": self.label,
            "settings": self.settings,
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "metrics": self.metrics,
            "events": records(self.events),
            "steps": records(self.steps),
            "layer_budgets": records(self.layer_budgets),
            "drift": records(self.drift),
        }


def decode_text(lm: LoadedModel, tokens: list[int]) -> str:
    return lm.tokenizer.decode(tokens, skip_special_tokens=True)


def token_texts(lm: LoadedModel, ids: list[int]) -> list[str]:
    return [lm.tokenizer.decode([i]) for i in ids]


def _layer_budgets(cache: PolicyCache, n_prompt: int) -> pd.DataFrame:
    plans = cache.plans
    tokens = [n_prompt if p.budget is None else p.budget for p in plans]
    return frame(
        {
            "layer": range(len(plans)),
            "budget_tokens": tokens,
            "budget_fraction": [t / n_prompt for t in tokens],
            "density": [p.density for p in plans],
            "protected": [p.protected for p in plans],
        },
        LAYER_BUDGETS_SCHEMA,
    )


def prompt_attention(prefill: PrefillCache, n_kv: int, prompt_tokens: list[str]) -> pd.DataFrame:
    """The prompt's attention frame (ATTENTION_SCHEMA) from a prefill built with ``record=True``.

    Per layer, the ``[Hq, Lp]`` column sums are summed into kv-head groups (`ops.group_heads`, exactly
    H2O's prompt scores) and D2O's F_l is taken over the per-query-head sums (`ops.attention_density`).
    Empty when the prefill recorded nothing.
    """
    cols = [layer.col_sums for layer in prefill.layers]
    if not cols or any(c is None for c in cols):
        return frame({}, ATTENTION_SCHEMA)
    grouped = np.stack([ops.group_heads(c, n_kv).float().cpu().numpy() for c in cols])
    return attention_frame(grouped, [ops.attention_density(c) for c in cols], prompt_tokens)


def make_result(
    lm: LoadedModel, prompt_tokens: list[str], run, with_fidelity: bool, attention: pd.DataFrame | None = None
) -> RunResult:
    """Assemble a policy's `RunResult` once its run is over (`run`: the runner's per-policy state).

    prompt_tokens : the prompt's token texts (`token_texts`), decoded once for every policy.
    attention : the comparison's `prompt_attention` frame, attached as is (not copied); empty if None.
    """
    cache, n_prompt = run.cache, len(prompt_tokens)
    generated = token_texts(lm, run.tokens)
    metrics = {"prompt_tokens": n_prompt, "new_tokens": len(run.tokens)}
    peak = cache.peak_entries()  # each layer's peak starts at the whole prompt, which the prefill held
    metrics |= M.memory_metrics(
        cache.stored_entries(), peak, cache.get_seq_length(), lm.n_layers, cache.entry_bytes()
    )
    metrics |= M.speed_metrics(run.prefill_seconds, run.decode_seconds, run.decode_steps)
    drift = M.drift_frame(run.drift)
    if with_fidelity:
        metrics |= M.fidelity_summary(drift)
    metrics |= {
        "n_layers": lm.n_layers,
        "n_kv_heads": lm.n_kv_heads,
        "head_dim": lm.head_dim,
        "model": lm.name,
        "shape_only": lm.shape_only,  # random weights (shape_models.py): the text is meaningless
    }
    return RunResult(
        label=run.label,
        text=decode_text(lm, run.tokens),
        token_ids=list(run.tokens),
        prompt_tokens=prompt_tokens,
        events=cache.log.events_frame(prompt_tokens + generated),
        steps=cache.log.steps_frame(),
        layer_budgets=_layer_budgets(cache, n_prompt),
        metrics=metrics,
        drift=drift,
        settings=run.policy.settings(),
        generated_tokens=generated,
        attention=frame({}, ATTENTION_SCHEMA) if attention is None else attention,
    )
