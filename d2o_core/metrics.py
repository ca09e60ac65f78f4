"""What a run cost and how far it drifted: memory, speed and fidelity to the full cache.

What this module is: pure functions. Fidelity is teacher-forced: the policy reads the
full cache's own generated tokens, and each step's next-token distribution is compared
with the full cache's (KL(full || policy), top-1 agreement, NLL of the reference token).

What it is not: it runs no model; `runner.py` feeds it log-probabilities and caches.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from .events import DRIFT_SCHEMA, frame


def step_fidelity(
    ref_logprobs: torch.Tensor, logprobs: torch.Tensor, ref_token: int
) -> tuple[float, bool, float]:
    """One teacher-forced step: (KL(ref || policy), policy top-1 == ref top-1, -log p_policy(ref_token)).

    ref_logprobs, logprobs : [V] log-softmax outputs (any float dtype; computed in float32).
    """
    ref, pol = ref_logprobs.float(), logprobs.float()
    kl = torch.sum(ref.exp() * (ref - pol)).clamp_min(0.0)
    return float(kl), bool(ref.argmax() == pol.argmax()), float(-pol[ref_token])


def drift_frame(rows: list[tuple[int, float, bool, float]]) -> pd.DataFrame:
    """Rows of (step, kl, agrees, nll) -> the drift frame (DRIFT_SCHEMA)."""
    columns = dict(zip(DRIFT_SCHEMA, zip(*rows))) if rows else {}
    return frame(columns, DRIFT_SCHEMA)


def fidelity_summary(drift: pd.DataFrame) -> dict:
    """Means over teacher-forced steps; NaN when there were none (one-token outputs)."""
    if drift.empty:
        return {"token_agreement": math.nan, "mean_kl_to_full": math.nan, "nll_of_reference": math.nan}
    return {
        "token_agreement": float(drift["agrees"].mean()),
        "mean_kl_to_full": float(drift["kl_to_full"].mean()),
        "nll_of_reference": float(drift["nll"].mean()),
    }


def memory_metrics(stored: int, peak: int, seen: int, n_layers: int, entry_bytes: int) -> dict:
    """KV bytes from entry counts summed over layers (`seen`: tokens the full cache would hold per layer)."""
    full = n_layers * seen * entry_bytes
    final = stored * entry_bytes
    return {
        "kv_bytes_peak": peak * entry_bytes,
        "kv_bytes_final": final,
        "kv_bytes_full": full,
        "kv_fraction": final / full if full else math.nan,
    }


def full_reference(metrics: list[dict]) -> dict:
    """The one reference every column's "% of full" is measured against: the full cache of the longest run.

    A comparison's columns stop at different lengths (an end-of-text token ends one, another decodes
    on); each column's own `kv_bytes_full` would make the same bytes a different share in each. This
    is the largest of them: the full cache's keys and values for the longest sequence any column held.

    Returns {"bytes": ..., "tokens": ...} (tokens = prompt + generated tokens fed back, the cache's
    length); NaN bytes and 0 tokens for no metrics.
    """
    if not metrics:
        return {"bytes": math.nan, "tokens": 0}
    return {
        "bytes": max(float(m["kv_bytes_full"]) for m in metrics),
        "tokens": max(int(m["prompt_tokens"]) + max(int(m["new_tokens"]) - 1, 0) for m in metrics),
    }


def speed_metrics(prefill_seconds: float, decode_seconds: float, decode_steps: int) -> dict:
    """Decode throughput over forward passes on the compressed cache (the first token comes from prefill).

    In a comparison the columns decode together, one batched forward pass per step: `decode_seconds`
    is then the batch's wall time over the steps this column took part in, and the speeds are the
    batch's, shared by every column in it (shown as "batch speed"), not this column's alone.
    """
    per_token = decode_seconds / decode_steps if decode_steps else math.nan
    return {
        "prefill_seconds": prefill_seconds,
        "decode_seconds": decode_seconds,
        "decode_ms_per_token": per_token * 1000,
        "tokens_per_second": 1.0 / per_token if decode_steps and per_token > 0 else math.nan,
    }


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 or either is NaN."""
    return a / b if b and not (np.isnan(a) or np.isnan(b)) else math.nan
