"""The run record: schemas of the frames a run produces, and the log that fills them.

What this module is: the single place that defines the columns and dtypes of
`events`, `steps`, `layer_budgets`, `drift` and the derived `survival` frame,
plus `EventLog`, which the cache writes to while generating (tensors only, no
per-step host syncs) and which turns into DataFrames once at the end.

What it is not: it computes no policy decisions and draws nothing; figures in
`ui/figures.py` consume these frames and never see tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

EVENTS_SCHEMA = {
    "step": "int64",  # 0 = prefill compression, k = forward pass that fed the k-th generated token
    "layer": "int64",
    "head": "int64",  # kv-head
    "kind": "str",  # "evict" | "merge"
    "position": "int64",  # original token position (prompt + generated)
    "token": "str",
    "target_position": "int64",  # merge target, -1 for plain evictions
    "similarity": "float64",  # cosine to the nearest kept key; NaN for plain evictions
    "score": "float64",  # accumulated attention of the entry when it left
}

STEPS_SCHEMA = {
    "step": "int64",
    "layer": "int64",
    "stored": "int64",  # entries per kv-head after the step
    "budget": "int64",  # cap in force; for an uncapped layer, the tokens seen so far
    "evicted": "int64",  # entries that left this step, summed over kv-heads (merges included)
    "merged": "int64",  # of those, entries folded into a kept one
}

LAYER_BUDGETS_SCHEMA = {
    "layer": "int64",
    "budget_tokens": "int64",
    "budget_fraction": "float64",
    "density": "float64",  # D2O's F_l; NaN for other policies
    "protected": "bool",
}

DRIFT_SCHEMA = {
    "step": "int64",  # same numbering as STEPS_SCHEMA; teacher-forced on the reference tokens
    "kl_to_full": "float64",  # KL(full || policy) of the next-token distributions
    "agrees": "bool",  # policy's top-1 equals the reference token
    "nll": "float64",  # policy's negative log-likelihood of the reference token
}

SURVIVAL_SCHEMA = {
    "position": "int64",
    "token": "str",
    "kept_share": "float64",  # share of (layer, kv-head) slots still holding the token at the end
    "merged_share": "float64",  # share whose entry was folded into another token
    "evicted_share": "float64",  # share that dropped it outright
    "is_sink": "bool",
}


def frame(columns: dict, schema: dict[str, str]) -> pd.DataFrame:
    """Build a DataFrame with exactly `schema`'s columns and dtypes, even when empty."""
    unknown = set(columns) - set(schema)
    if unknown:
        raise KeyError(f"columns not in schema: {sorted(unknown)}")
    data = {name: pd.Series(columns.get(name, []), dtype=dtype) for name, dtype in schema.items()}
    return pd.DataFrame(data, columns=list(schema))


def check_schema(df: pd.DataFrame, schema: dict[str, str]) -> None:
    """Raise ValueError when `df` does not have exactly `schema`'s columns and dtypes."""
    if list(df.columns) != list(schema):
        raise ValueError(f"columns {list(df.columns)} != {list(schema)}")
    for name, dtype in schema.items():
        if str(df[name].dtype) != str(pd.Series([], dtype=dtype).dtype):
            raise ValueError(f"column {name!r} has dtype {df[name].dtype}, expected {dtype}")


@dataclass
class _Chunk:
    """One batch of evictions from one (step, layer): tensors stay on the model's device."""

    step: int
    layer: int | torch.Tensor  # one layer, or a layer id per entry (all layers evict together)
    heads: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long
    scores: torch.Tensor | None  # [N] float; None: the policy keeps no scores
    targets: torch.Tensor | None  # [N] long target positions; None: nothing could merge
    similarity: torch.Tensor | None  # [N] float
    merged: torch.Tensor | None  # [N] bool: merged (True) or dropped


@dataclass
class EventLog:
    """Per-request record of evictions, merges and cache sizes, filled by the cache layers.

    Recording keeps raw tensors (no per-step host syncs or bookkeeping ops on the hot path);
    the frames are built once, at the end.
    """

    enabled: bool = True
    chunks: list[_Chunk] = field(default_factory=list)
    step_rows: list[tuple] = field(default_factory=list)

    def record(self, step, layer, heads, positions, scores=None, targets=None, similarity=None, merged=None):
        if self.enabled and heads.numel():
            self.chunks.append(_Chunk(step, layer, heads, positions, scores, targets, similarity, merged))

    def record_step(self, step: int, layer: int, stored: int, budget: int, evicted: int, merged) -> None:
        """`merged` may be a count or a bool tensor of decisions (summed at the end, not now)."""
        if self.enabled:
            self.step_rows.append((step, layer, stored, budget, evicted, merged))

    def events_frame(self, tokens: list[str]) -> pd.DataFrame:
        """All evictions and merges as one frame; `tokens[p]` is the text of position `p`."""
        if not self.chunks:
            return frame({}, EVENTS_SCHEMA)
        sizes = [c.heads.numel() for c in self.chunks]

        def cat(name, fill, dtype):
            parts = [
                getattr(c, name).reshape(-1).cpu().numpy()
                if getattr(c, name) is not None
                else np.full(n, fill)
                for c, n in zip(self.chunks, sizes)
            ]
            return np.concatenate(parts).astype(dtype)

        merged = cat("merged", False, bool)
        positions = cat("positions", 0, np.int64)
        token_arr = np.asarray(tokens, dtype=object)
        return frame(
            {
                "step": np.repeat([c.step for c in self.chunks], sizes),
                "layer": np.concatenate([_per_entry(c.layer, n) for c, n in zip(self.chunks, sizes)]),
                "head": cat("heads", 0, np.int64),
                "kind": np.where(merged, "merge", "evict"),
                "position": positions,
                "token": token_arr[positions] if len(token_arr) else np.full(len(positions), ""),
                "target_position": np.where(merged, cat("targets", -1, np.int64), -1),
                "similarity": np.where(merged, cat("similarity", np.nan, np.float64), np.nan),
                "score": cat("scores", np.nan, np.float64),
            },
            EVENTS_SCHEMA,
        )

    def steps_frame(self) -> pd.DataFrame:
        count = lambda v: int(v.sum()) if isinstance(v, torch.Tensor) else int(v)  # noqa: E731
        rows = [tuple(count(v) for v in row) for row in self.step_rows]
        columns = dict(zip(STEPS_SCHEMA, zip(*rows))) if rows else {}
        return frame(columns, STEPS_SCHEMA)


def _per_entry(layer, n: int) -> np.ndarray:
    if isinstance(layer, torch.Tensor):
        return layer.reshape(-1).cpu().numpy().astype(np.int64)
    return np.full(n, layer, dtype=np.int64)


def survival_frame(events: pd.DataFrame, prompt_tokens: list[str], n_slots: int, n_sink: int) -> pd.DataFrame:
    """Per prompt token: the share of the `n_slots` (layer, kv-head) slots that kept, merged or dropped it."""
    n = len(prompt_tokens)
    in_prompt = events[events["position"] < n]
    merged = np.bincount(in_prompt.loc[in_prompt["kind"] == "merge", "position"], minlength=n)[:n]
    dropped = np.bincount(in_prompt.loc[in_prompt["kind"] == "evict", "position"], minlength=n)[:n]
    slots = max(n_slots, 1)
    return frame(
        {
            "position": np.arange(n),
            "token": list(prompt_tokens),
            "kept_share": 1.0 - (merged + dropped) / slots,
            "merged_share": merged / slots,
            "evicted_share": dropped / slots,
            "is_sink": np.arange(n) < n_sink,
        },
        SURVIVAL_SCHEMA,
    )
