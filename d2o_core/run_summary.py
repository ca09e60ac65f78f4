"""Turning results into things people read or save: a summary table, JSON, CSV, stats lines.

What this module is: formatting shared by the CLI and the app (no plotting, no I/O
beyond returning strings and frames).
"""

from __future__ import annotations

import importlib
import math
import re

import numpy as np
import pandas as pd

from .metrics import full_reference
from .run_result import RunResult

FULL_SHARE = "% of full (longest run)"  # the summary's column: every row against one reference

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


def reference(results: dict[str, RunResult]) -> dict:
    """`metrics.full_reference` of a comparison: the full cache at the longest column's length."""
    return full_reference([res.metrics for res in results.values()])


def summary(results: dict[str, RunResult]) -> pd.DataFrame:
    """One row per policy: memory, speed and fidelity in human units.

    "% of full (longest run)" divides every column's final KV bytes by one reference (`reference`),
    so equal bytes are an equal share in every row. "batch ms/step" is the shared batch's time per
    decode step over the steps the column took part in (the columns decode together).
    """
    ref = reference(results)["bytes"]
    rows = []
    for label, res in results.items():
        m = res.metrics
        rows.append(
            {
                "policy": label,
                "new tokens": m["new_tokens"],
                "KV MB (final)": m["kv_bytes_final"] / 1e6,
                FULL_SHARE: 100 * m["kv_bytes_final"] / ref if ref else math.nan,
                "KV MB (peak)": m["kv_bytes_peak"] / 1e6,
                "prefill s": m["prefill_seconds"],
                "batch ms/step": m["decode_ms_per_token"],
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


def stats_line(metrics: dict, reference: dict | None = None) -> str:
    """A one-line digest for a policy's column: memory, the batch's speed, agreement with the full cache.

    reference : `reference(results)` of the comparison (the full cache at the longest column's
    length), so that equal bytes read as the same share in every column; without it, this column's
    own full cache. The reference's length is said: "KV 368.6 kB (11% of full at 73 tokens)".
    The speed is the batch's, which every column decoding with it shares ("batch speed").
    """
    reference = reference or full_reference([metrics])
    share = 100 * metrics["kv_bytes_final"] / reference["bytes"] if reference["bytes"] else math.nan
    speed = metrics["tokens_per_second"]
    parts = [
        f"KV {human_bytes(metrics['kv_bytes_final'])} ({share:.0f}% of full at {reference['tokens']} tokens)",
        f"batch speed {speed:.1f} tok/s" if math.isfinite(speed) else "",
    ]
    agreement = metrics.get("token_agreement", math.nan)
    if math.isfinite(agreement):
        parts.append(f"agrees with full on {100 * agreement:.0f}% of steps")
    return " · ".join(p for p in parts if p)


def stats_lines(results: dict[str, RunResult]) -> dict[str, str]:
    """Every column's `stats_line`, all against the comparison's one reference."""
    ref = reference(results)
    return {label: stats_line(res.metrics, ref) for label, res in results.items()}


def kept_note(res: RunResult) -> str:
    """What a column kept when its budget alone would mislead, for its title; "" when the budget says it.

    - every layer kept the whole prompt (SnapKV on a prompt not longer than its window, or a budget
      that covers the prompt): "prompt shorter than the window (64): kept whole";
    - protected layers (D2O official: 0, 1 and the last): "layers 0, 1, 29 kept whole";
    - a window (SnapKV, PyramidKV) that fills a layer's budget (sinks aside): the layer keeps only its
      sinks and last tokens, a sliding window: "window 64 ≥ budget 48 tokens: a sliding window".
    """
    settings, budgets = res.settings, res.layer_budgets
    n_prompt = int(res.metrics.get("prompt_tokens", 0))
    if settings.get("policy", res.label) == "full" or budgets.empty or n_prompt <= 0:
        return ""
    whole = budgets["budget_tokens"].to_numpy() >= n_prompt
    window = settings.get("window")
    window = window if isinstance(window, int) and not isinstance(window, bool) else None
    budget = settings.get("budget")
    if whole.all():
        if isinstance(budget, (int, float)) and budget >= 1:
            return ""
        if window is not None and n_prompt <= window:
            return f"prompt shorter than the window ({window}): kept whole"
        return "the budget covers the prompt: kept whole"
    notes = []
    protected = budgets.loc[budgets["protected"].astype(bool), "layer"].tolist()
    if protected:
        names = ", ".join(str(layer) for layer in protected)
        notes.append(f"layer{'s' if len(protected) > 1 else ''} {names} kept whole")
    if window is not None:
        n_sink = int(settings.get("n_sink", 0) or 0)
        filled = ~whole & (budgets["budget_tokens"].to_numpy() - n_sink <= window)
        tight = budgets.loc[filled, "budget_tokens"]
        if len(tight) == int((~whole).sum()) and tight.nunique() == 1:
            notes.append(f"window {window} ≥ budget {int(tight.iloc[0])} tokens: a sliding window")
        elif len(tight):
            notes.append(f"window {window} ≥ budget in {len(tight)} layers: a sliding window there")
    return "; ".join(notes)


def budgets_line(res: RunResult) -> str:
    """Per-layer budgets in tokens, e.g. for D2O: '152 191 177 ...'."""
    return " ".join(str(b) for b in res.layer_budgets["budget_tokens"])


def html_writer(module: str, name: str):
    """`ui.<module>.<name>`, the page's HTML writer, imported only when a command asks for --html
    (d2o_core itself never imports plotly or gradio); ValueError with a sentence without the app."""
    try:
        return getattr(importlib.import_module(f"ui.{module}"), name)
    except ImportError as exc:
        raise ValueError(
            f"--html needs the app's ui package and plotly ({exc}); run it from the repository root."
        ) from None
