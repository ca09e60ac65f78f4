"""Throughput results in words and tables: pure functions from `run_throughput`'s document.

What this module is: how many rows fit under a cap (`rows_under_cap`), the ratios to the full
cache (`ratios`), the tables the CLI, README and app show (`table`, `cap_table`, `sweep_table`)
and the ratio sentences (`ratio_lines`). Plain dicts and numbers in, numbers, frames or text out.

What it is not: the measurement (throughput.py) or the figures (ui/figures/throughput.py); it runs
no model and does no I/O.
"""

from __future__ import annotations

import math

import pandas as pd

from ..metrics import ratio

MB = 1024 * 1024  # as serving.py counts
ROW_KEYS = (
    "policy", "budget", "batch", "tokens_per_second", "decode_ms_per_step", "kv_mb_cap", "kv_mb_decode_peak",
    "kv_mb_admission_peak", "rss_mb", "fits_cap", "mode",
)  # fmt: skip


def rows_under_cap(cap_mb: float, row_mb: float) -> int:
    """How many rows of `row_mb` fit under `cap_mb` (as serve_batch counts: in bytes, k * row <= cap)."""
    cap, row = cap_mb * MB, round(row_mb * MB)
    if row <= 0:
        return 0
    k = int(cap // row)
    while (k + 1) * row <= cap:
        k += 1
    while k > 0 and k * row > cap:
        k -= 1
    return k


def ratios(rows: list[dict]) -> dict:
    """`<label>_over_full_at_cap` (tokens/s at each policy's largest batch under the cap, over the
    full cache's; medians over rounds when rounds were run) and `<label>_over_full_single` (one row
    alone each); NaN without a full-cache row."""
    cap = {r["policy"]: r for r in rows if r["mode"] == "cap"}
    full = cap.get("full", {})
    out = {}
    for label, r in cap.items():
        if label != "full":
            out[f"{label}_over_full_at_cap"] = ratio(r["tokens_per_second"], full.get("tokens_per_second", 0))
            out[f"{label}_over_full_single"] = ratio(
                r.get("single_tokens_per_second", math.nan), full.get("single_tokens_per_second", 0)
            )
    return out


def ratio_runs(rows: list[dict]) -> dict:
    """`ratios` round by round: round i of a policy over round i of the full cache (the rounds are
    interleaved, so each pair was measured side by side); lists, empty without rounds."""
    cap = {r["policy"]: r for r in rows if r["mode"] == "cap"}
    full = cap.get("full", {}).get("tokens_per_second_runs") or []
    return {
        f"{label}_over_full_at_cap": [
            ratio(x, y) for x, y in zip(r.get("tokens_per_second_runs") or [], full)
        ]
        for label, r in cap.items()
        if label != "full"
    }


def table(doc: dict) -> pd.DataFrame:
    """Every row in human units: policy, mode, batch, tok/s, ms/step, KV MB peak and cap, admission, RSS."""
    columns = {
        "policy": "policy", "mode": "mode", "batch": "batch", "tokens_per_second": "tok/s",
        "decode_ms_per_step": "ms/step", "kv_mb_decode_peak": "KV MB peak", "kv_mb_cap": "cap MB",
        "kv_mb_admission_peak": "admission MB", "rss_mb": "RSS MB", "fits_cap": "fits cap",
    }  # fmt: skip
    df = pd.DataFrame(doc.get("rows") or [], columns=list(columns))
    return df.rename(columns=columns)


def cap_table(doc: dict) -> pd.DataFrame:
    """One row per policy at its largest batch under the cap, with the ratio to the full cache."""
    rows = [r for r in doc.get("rows") or [] if r["mode"] == "cap"]
    r = doc.get("ratios") or {}
    x_full = lambda label: 1.0 if label == "full" else r.get(f"{label}_over_full_at_cap", math.nan)
    out = [
        {
            "policy": row["policy"],
            "KV MB per row": row["kv_mb_row"],
            "rows under the cap": row["batch"],
            "tok/s": row["tokens_per_second"],
            "x full": x_full(row["policy"]),
            "ms/step": row["decode_ms_per_step"],
            "KV MB peak / cap": f"{row['kv_mb_decode_peak']:.1f} / {row['kv_mb_cap']:.1f}",
            "one row alone, tok/s": row.get("single_tokens_per_second", math.nan),
        }
        for row in rows
    ]
    return pd.DataFrame(out)


def sweep_table(doc: dict) -> pd.DataFrame:
    """Tokens/s per policy (rows) and batch size (columns) from the sweep; empty without one."""
    df = pd.DataFrame([r for r in doc.get("rows") or [] if r["mode"] == "sweep"])
    if df.empty:
        return pd.DataFrame()
    wide = df.pivot_table(index="policy", columns="batch", values="tokens_per_second", sort=False)
    wide.columns = [f"batch {b} tok/s" for b in wide.columns]
    return wide.reset_index()


def ratio_lines(doc: dict) -> list[str]:
    """One sentence per compressed policy, e.g. "d2o at the cap: 3.4x the full cache's tokens/s ..."."""
    cap = {r["policy"]: r for r in doc.get("rows") or [] if r["mode"] == "cap"}
    r, lines = doc.get("ratios") or {}, []
    rounds = doc.get("ratio_runs") or {}
    for label, row in cap.items():
        at_cap = r.get(f"{label}_over_full_at_cap", math.nan)
        if label == "full" or at_cap is None or math.isnan(at_cap):
            continue
        single = r.get(f"{label}_over_full_single")
        alone = "" if single is None or math.isnan(single) else f"; one row alone: {single:.2f}x"
        each = [x for x in rounds.get(f"{label}_over_full_at_cap") or [] if not math.isnan(x)]
        spread = f"; {len(each)} rounds: {min(each):.1f}x to {max(each):.1f}x" if len(each) > 1 else ""
        lines.append(
            f"{label} at the cap: {at_cap:.1f}x the full cache's tokens/s (batch {row['batch']} against "
            f"{cap['full']['batch']}{alone}{spread})"
        )
    return lines
