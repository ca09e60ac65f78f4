"""The saved-run format: one JSON file holding a whole comparison, written and read back exactly.

What this module is: the pydantic schema of a run file (`schema_version` "d2o-run/2"), `save_run`
(results -> JSON text) and `load_run` (JSON text or a path -> `RunResult`s whose frames follow
`events.py`'s schemas, so every figure drawn from a reopened run shows the same data as the live run).
The page's "Download run (JSON)", `python -m d2o_core compare --json` and `show` all use it.

Layout of a file::

    {"schema_version": "d2o-run/2",
     "meta": {"model", "prompt", "max_new_tokens", "question"?, "created", "d2o_core_version", ...},
     "results": {label: {"label", "text", "token_ids", "prompt_tokens", "generated_tokens",
                         "settings", "metrics", "events", "steps", "layer_budgets", "drift"}},
     "prompt_attention": {"n_layers", "n_kv_heads", "density": [L],
                          "column_sums": [L][Hkv][Lp]} | null}

Frames are lists of records (one object per row, columns as in events.py); NaN is stored as null.
The prompt's attention is shared by every policy of a comparison, so it is stored once, as nested
lists rather than ~L x Hkv x Lp records, and put back onto every result when the file is read.
Its `column_sum` values are rounded to 5 significant digits when the frame is first built
(events.ATTENTION_DIGITS), so a reopened run holds exactly the live run's frame; densities are
stored in full.

Versions: "d2o-run/2" added `prompt_attention`. "d2o-run/1" files (which lack it) still open, with
an empty attention frame on every result.

What it is not: no drawing (ui/report_html.py) and no generation. Reading is plain JSON parsing
and validation: nothing in a file is executed or imported. A file this version cannot read (not
JSON, another schema_version, a missing field, a wrong type, attention of the wrong shape) raises
ValueError with one sentence.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pydantic_core
from pydantic import BaseModel, ConfigDict, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

from ._version import __version__
from .events import (
    ATTENTION_SCHEMA,
    DRIFT_SCHEMA,
    EVENTS_SCHEMA,
    LAYER_BUDGETS_SCHEMA,
    STEPS_SCHEMA,
    attention_array,
    attention_frame,
    check_schema,
    frame,
)
from .run_result import RunResult

SCHEMA_VERSION = "d2o-run/2"
READS = ("d2o-run/1", SCHEMA_VERSION)  # what load_run opens; /1 has no prompt_attention
FRAMES = {
    "events": EVENTS_SCHEMA,
    "steps": STEPS_SCHEMA,
    "layer_budgets": LAYER_BUDGETS_SCHEMA,
    "drift": DRIFT_SCHEMA,
}
_PY_TYPES = {"int64": int, "float64": float | None, "str": str, "bool": bool}  # float None = NaN


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


def _row_model(name: str, schema: dict[str, str]) -> type:
    """A record of one frame row, with exactly the schema's columns (so the two never drift apart).

    A TypedDict, not a model: a run holds ~60k event rows per policy, and pydantic checks dicts
    ~6x faster than it builds a model object per row (2.4 s -> 0.5 s for the passkey example).
    """
    row = TypedDict(name, {col: _PY_TYPES[dt] for col, dt in schema.items()})
    return with_config(ConfigDict(strict=True, extra="forbid"))(row)


EventRow = _row_model("EventRow", EVENTS_SCHEMA)
StepRow = _row_model("StepRow", STEPS_SCHEMA)
LayerBudgetRow = _row_model("LayerBudgetRow", LAYER_BUDGETS_SCHEMA)
DriftRow = _row_model("DriftRow", DRIFT_SCHEMA)


class Metrics(BaseModel):
    """The metrics the summary, stats lines and figures need; others (fidelity, model, ...) pass through."""

    model_config = ConfigDict(strict=True, extra="allow")
    prompt_tokens: int
    new_tokens: int
    kv_bytes_peak: float
    kv_bytes_final: float
    kv_bytes_full: float
    kv_fraction: float | None
    prefill_seconds: float | None
    decode_seconds: float | None
    decode_ms_per_token: float | None
    tokens_per_second: float | None
    n_layers: int
    n_kv_heads: int


class PolicyRecord(_Strict):
    """Everything one policy's `RunResult` holds."""

    label: str
    text: str
    token_ids: list[int]
    prompt_tokens: list[str]
    generated_tokens: list[str] = []
    settings: dict[str, Any]
    metrics: Metrics
    events: list[EventRow]
    steps: list[StepRow]
    layer_budgets: list[LayerBudgetRow]
    drift: list[DriftRow]


class Meta(BaseModel):
    """Where the run came from; hosts may add keys of their own."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    prompt: str | None = None
    max_new_tokens: int | None = None
    question: str | None = None  # kept whole, read after the prompt's compression; absent: none
    created: str | None = None
    d2o_core_version: str | None = None


class PromptAttention(_Strict):
    """The prompt's attention, once per run: `column_sums[l][h][p]`, `density[l]` (None = NaN)."""

    n_layers: int
    n_kv_heads: int
    density: list[float | None]
    column_sums: list[list[list[float | None]]]


class RunFile(_Strict):
    schema_version: Literal["d2o-run/1", "d2o-run/2"]
    meta: Meta
    results: dict[str, PolicyRecord]
    prompt_attention: PromptAttention | None = None


def _jsonable(value):
    """Plain JSON types, NaN/inf as null (strict JSON has no NaN)."""
    from .run_summary import jsonable  # noqa: PLC0415 - report delegates its JSON to this module

    return jsonable(value)


def save_run(results: dict[str, RunResult], meta: dict | None = None) -> str:
    """The comparison as run-file JSON text (`meta`: model, prompt, max_new_tokens, ...; `created` added)."""
    created = datetime.now(UTC).isoformat(timespec="seconds")
    head = {"created": created, "d2o_core_version": __version__}
    doc = {
        "schema_version": SCHEMA_VERSION,
        "meta": head | dict(meta or {}),
        "results": {label: res.to_dict() for label, res in results.items()},
        "prompt_attention": _attention_record(results),
    }
    return json.dumps(_jsonable(doc), ensure_ascii=False, allow_nan=False)


def load_run(source: str | Path | bytes) -> tuple[dict[str, RunResult], dict]:
    """Read a run file (JSON text, bytes, or a path): (results by label, meta).

    Raises ValueError with one sentence when the file cannot be read as a d2o-run/1 or /2 file.
    """
    doc = _parse(source)
    if not isinstance(doc, dict):
        raise ValueError(f"This is not a D2O run file: it holds a JSON {type(doc).__name__}, not an object.")
    if "schema_version" not in doc:
        if "results" in doc:
            raise ValueError(
                f"This run file has no schema_version: it was saved by an older version of the app, "
                f"which this version cannot read; run the prompt again to save it as {SCHEMA_VERSION}."
            )
        raise ValueError("This is not a D2O run file: it has no schema_version.")
    if doc["schema_version"] not in READS:
        raise ValueError(
            f"This run file has schema_version {str(doc['schema_version'])[:40]!r}; "
            f"this version of the app reads {' and '.join(map(repr, READS))} only."
        )
    if doc["schema_version"] == "d2o-run/1" and "prompt_attention" in doc:
        raise ValueError("This run file cannot be opened: prompt_attention is not a field of d2o-run/1.")
    try:
        RunFile.model_validate(doc)
    except ValidationError as exc:
        raise ValueError(_sentence(exc)) from None
    results = {label: _result(label, rec) for label, rec in doc["results"].items()}
    attention = _attention(doc.get("prompt_attention"), results)
    for res in results.values():
        res.attention = attention  # one frame for the whole comparison, as in a live run
    return results, doc["meta"]


def _attention_record(results: dict[str, RunResult]) -> dict | None:
    """The comparison's attention as nested lists (from the first result that has one), or None."""
    attention = next((r.attention for r in results.values() if not r.attention.empty), None)
    if attention is None:
        return None
    col, density = attention_array(attention)
    return {
        "n_layers": col.shape[0],
        "n_kv_heads": col.shape[1],
        "density": density.tolist(),
        "column_sums": col.tolist(),
    }


def _attention(rec: dict | None, results: dict[str, RunResult]) -> pd.DataFrame:
    """The attention frame of a validated `prompt_attention` record; empty when the file has none."""
    if rec is None:
        return frame({}, ATTENTION_SCHEMA)
    tokens = next(iter(results.values())).prompt_tokens if results else []
    try:  # ragged lists make numpy raise; a regular array of another shape is caught below
        col = np.array(rec["column_sums"], dtype=np.float64)
    except ValueError:
        col = None
    if col is not None and col.ndim == 3 and col.shape[2] < len(tokens):
        # A run with a question (meta "question"): the prefill read the context alone, the question
        # after its compression, so the attention covers the prompt's first tokens (as in the live run).
        tokens = tokens[: col.shape[2]]
    shape = (rec["n_layers"], rec["n_kv_heads"], len(tokens))
    if col is None or col.shape != shape or len(rec["density"]) != shape[0]:
        got = "ragged lists" if col is None else f"shape {col.shape} with {len(rec['density'])} densities"
        raise ValueError(
            "This run file cannot be opened: prompt_attention should hold n_layers x n_kv_heads x "
            f"prompt tokens = {shape} column sums, got {got}."
        )
    frame_ = attention_frame(col, np.array(rec["density"], dtype=np.float64), tokens)
    check_schema(frame_, ATTENTION_SCHEMA)
    return frame_


def _parse(source) -> Any:
    """JSON text, bytes, or a path (a Path, or a str naming an existing file or ending in .json)."""
    if isinstance(source, bytes):
        text = _decode(source)
    elif isinstance(source, Path) or _is_file(source) or str(source).strip().endswith(".json"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"There is no run file at {str(path)[:200]}.")
        text = _decode(path.read_bytes())
    else:
        text = source
    try:
        return pydantic_core.from_json(text)  # ~3x faster than json.loads on a 30 MB run
    except ValueError:
        pass
    try:  # not JSON: json's error says where, in words a user can follow
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ValueError(f"This is not a D2O run file: it is not valid JSON{where}.") from None


def _is_file(text: str) -> bool:
    try:
        return "\n" not in text and Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("This is not a D2O run file: it is not UTF-8 text (JSON).") from None


def _sentence(exc: ValidationError) -> str:
    """The first problem pydantic found, as a sentence naming the field, e.g. results.d2o.events[3].step."""
    err = exc.errors()[0]
    where = ""
    for part in err["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    if err["type"] == "missing":
        detail = f"{where} is missing"
    elif err["type"] == "extra_forbidden":
        detail = f"{where} is not a field of {SCHEMA_VERSION}"
    else:
        got = repr(err.get("input"))
        got = got if len(got) <= 40 else got[:37] + "..."
        detail = f"{where}: {err['msg'][0].lower()}{err['msg'][1:]}, got {got}"
    more = exc.error_count() - 1
    tail = f" ({more} more problem{'s' if more > 1 else ''} after this one)" if more else ""
    return f"This run file cannot be opened: {detail}{tail}."


def _result(label: str, rec: dict) -> RunResult:
    frames = {}
    for name, schema in FRAMES.items():
        rows = rec[name]
        frames[name] = frame({col: [row[col] for row in rows] for col in schema}, schema)
        check_schema(frames[name], schema)
    metrics = {k: math.nan if v is None else v for k, v in rec["metrics"].items()}
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in rec["settings"].items()}
    return RunResult(
        label=label,
        text=rec["text"],
        token_ids=list(rec["token_ids"]),
        prompt_tokens=list(rec["prompt_tokens"]),
        metrics=metrics,
        settings=settings,
        generated_tokens=list(rec.get("generated_tokens", [])),
        **frames,
    )
