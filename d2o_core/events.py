"""The run record: schemas of the frames a run produces, and the log that fills them.

What this module is: the single place that defines the columns and dtypes of
`events`, `steps`, `layer_budgets`, `drift`, the prompt's `attention` and the derived
`survival` and `kept` frames, plus `EventLog`, which the cache writes to while generating (tensors only, no
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

ATTENTION_SCHEMA = {
    "layer": "int64",
    "head": "int64",  # kv-head
    "position": "int64",  # prompt position (the key)
    "token": "str",
    "column_sum": "float64",  # attention the key received from all prompt queries of the kv-head's group
    "density": "float64",  # the layer's D2O F_l (same on every row of a layer)
}

KEPT_SCHEMA = {
    "position": "int64",  # prompt position
    "token": "str",
    "state": "str",  # KEPT_STATES: what one (layer, kv-head) did with the token by the end of the run
}
KEPT_STATES = ("sink", "kept", "merged", "evicted")

# Significant digits of `column_sum`: the frame is rounded when built, so a saved run reopens bit-identical.
ATTENTION_DIGITS = 5


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


def round_significant(values: np.ndarray, digits: int = ATTENTION_DIGITS) -> np.ndarray:
    """`values` (any shape) rounded to `digits` significant digits, as float64 with short decimal forms.

    Formatting through text gives the float nearest the rounded decimal, whose JSON form is that
    decimal (numpy's scale-and-round can land one ulp off and print 17 digits).
    """
    flat = np.asarray(values, dtype=np.float64).ravel().tolist()
    spec = f"%.{digits}g"
    return np.array([float(spec % v) for v in flat], dtype=np.float64).reshape(np.shape(values))


def attention_frame(column_sums: np.ndarray, density, prompt_tokens: list[str]) -> pd.DataFrame:
    """The prompt's attention per (layer, kv-head, position), in that order (ATTENTION_SCHEMA).

    Parameters
    ----------
    column_sums : [L, Hkv, Lp] array
        Column sums of the causal prompt attention, the query heads of each kv-head group summed;
        rounded here to ATTENTION_DIGITS significant digits.
    density : [L] sequence of float
        Each layer's D2O F_l (computed over the per-query-head sums, before grouping).
    prompt_tokens : list of str, length Lp
    """
    col = np.asarray(column_sums, dtype=np.float64)
    if col.size == 0:
        return frame({}, ATTENTION_SCHEMA)
    n_layers, n_kv, n_prompt = col.shape
    if len(prompt_tokens) != n_prompt or len(density) != n_layers:
        raise ValueError(
            f"attention of {n_layers} layers x {n_prompt} positions needs as many densities and tokens; "
            f"got {len(density)} and {len(prompt_tokens)}"
        )
    rows = n_kv * n_prompt
    return frame(
        {
            "layer": np.repeat(np.arange(n_layers), rows),
            "head": np.tile(np.repeat(np.arange(n_kv), n_prompt), n_layers),
            "position": np.tile(np.arange(n_prompt), n_layers * n_kv),
            "token": np.tile(np.asarray(prompt_tokens, dtype=object), n_layers * n_kv),
            "column_sum": round_significant(col).ravel(),
            "density": np.repeat(np.asarray(density, dtype=np.float64), rows),
        },
        ATTENTION_SCHEMA,
    )


def attention_array(attention: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `attention_frame`: ([L, Hkv, Lp] column sums, [L] densities); empty arrays when empty."""
    if attention.empty:
        return np.zeros((0, 0, 0)), np.zeros(0)
    df = attention.sort_values(["layer", "head", "position"], kind="stable")
    shape = (df["layer"].nunique(), df["head"].nunique(), df["position"].nunique())
    if shape[0] * shape[1] * shape[2] != len(df):
        raise ValueError(
            f"attention frame is not a full layer x head x position grid: {shape}, {len(df)} rows"
        )
    density = df.drop_duplicates("layer")["density"].to_numpy(dtype=np.float64)
    return df["column_sum"].to_numpy(dtype=np.float64).reshape(shape), density


def kept_frame(
    events: pd.DataFrame, prompt_tokens: list[str], layer: int, head: int, n_sink: int = 0
) -> pd.DataFrame:
    """What one (layer, kv-head) did with each prompt token by the end of a run (KEPT_SCHEMA).

    Parameters
    ----------
    events : DataFrame
        EVENTS_SCHEMA rows of one policy's run.
    prompt_tokens : list of str, length Lp
    layer, head : the layer and kv-head
    n_sink : the policy's sinks (its ``settings["n_sink"]``); kept positions below it read "sink"

    Returns
    -------
    DataFrame, one row per prompt position: "merged" or "evicted" when the entry left (an entry
    leaves a slot at most once: nothing comes back), else "sink" or "kept".
    """
    n = len(prompt_tokens)
    state = np.where(np.arange(n) < n_sink, "sink", "kept").astype(object)
    gone = events[(events["layer"] == layer) & (events["head"] == head) & (events["position"] < n)]
    state[gone["position"].to_numpy(dtype=np.int64)] = np.where(gone["kind"] == "merge", "merged", "evicted")
    return frame({"position": np.arange(n), "token": list(prompt_tokens), "state": state}, KEPT_SCHEMA)
