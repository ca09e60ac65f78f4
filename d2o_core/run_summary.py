"""Turning results into things people read or save: a summary table, JSON, CSV, stats lines.

What this module is: formatting shared by the CLI and the app (no plotting, no I/O
beyond returning strings and frames).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from .run_result import RunResult

# C0 controls but tab and newline, DEL and C1: ESC (and U+009B) start terminal escape sequences,
# CR and backspace overwrite what was printed, BEL rings.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# A spreadsheet reads a cell starting with one of these as a formula (=HYPERLINK(...), +cmd|...);
# tab and CR are how a leading sign hides from a check (OWASP's "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def jsonable(value):
    """Plain JSON types, NaN/inf as null (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def comparison_json(results: dict[str, RunResult], meta: dict | None = None) -> str:
    """The whole comparison as a run file (runfile.py's d2o-run format, which `load_run` reopens)."""
    from .runfile import save_run  # noqa: PLC0415 - runfile uses `jsonable` from here

    return save_run(results, meta)


def events_csv(results: dict[str, RunResult]) -> str:
    """Every policy's events in one CSV, with a leading `policy` column.

    Text cells (labels, tokens) come from a prompt, a model or a run file; one that a spreadsheet
    would run as a formula gets a leading single quote (numbers stay numbers).
    """
    events = combined(results, "events")
    text = events.select_dtypes(include=["object", "string"]).columns
    return events.assign(**{c: events[c].map(inert_cell) for c in text}).to_csv(index=False)


def inert_cell(value):
    """A text cell a spreadsheet shows as text: "'=HYPERLINK(...)" for "=HYPERLINK(...)"."""
    return f"'{value}" if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def printable(text) -> str:
    """`text` safe to print on a terminal: control characters shown as escapes such as "\\x1b".

    A run file's strings and a model's text are printed by the CLI; raw, an escape sequence in
    them could clear the screen, move the cursor, rename the window or hide what came before.
    Newlines and tabs stay.
    """
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def combined(results: dict[str, RunResult], attr: str) -> pd.DataFrame:
    """One frame (events, steps, layer_budgets or drift) across policies, `policy` column first."""
    frames = [getattr(res, attr).assign(policy=label) for label, res in results.items()]
    if not frames:
        return pd.DataFrame({"policy": pd.Series([], dtype="str")})
    out = pd.concat(frames, ignore_index=True)
    return out[["policy", *[c for c in out.columns if c != "policy"]]]


def summary(results: dict[str, RunResult]) -> pd.DataFrame:
    """One row per policy: memory, speed and fidelity in human units."""
    rows = []
    for label, res in results.items():
        m = res.metrics
        rows.append(
            {
                "policy": label,
                "new tokens": m["new_tokens"],
                "KV MB (final)": m["kv_bytes_final"] / 1e6,
                "% of full": 100 * m["kv_fraction"],
                "KV MB (peak)": m["kv_bytes_peak"] / 1e6,
                "prefill s": m["prefill_seconds"],
                "decode ms/token": m["decode_ms_per_token"],
                "agreement %": 100 * m.get("token_agreement", math.nan),
                "KL to full": m.get("mean_kl_to_full", math.nan),
            }
        )
    return pd.DataFrame(rows)


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as memory figures are usually quoted)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def stats_line(metrics: dict) -> str:
    """A one-line digest for a policy's column: memory, speed, agreement with the full cache."""
    parts = [
        f"KV {human_bytes(metrics['kv_bytes_final'])} ({100 * metrics['kv_fraction']:.0f}% of full)",
        f"{metrics['tokens_per_second']:.1f} tok/s" if math.isfinite(metrics["tokens_per_second"]) else "",
    ]
    agreement = metrics.get("token_agreement", math.nan)
    if math.isfinite(agreement):
        parts.append(f"agrees with full on {100 * agreement:.0f}% of steps")
    return " · ".join(p for p in parts if p)


def budgets_line(res: RunResult) -> str:
    """Per-layer budgets in tokens, e.g. for D2O: '152 191 177 ...'."""
    return " ".join(str(b) for b in res.layer_budgets["budget_tokens"])
