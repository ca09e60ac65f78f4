"""A sweep's output folder: one JSON file per finished cell, written the moment it finishes.

Layout of ``OUT/``::

    cells/<key>.json     one record per finished cell (cells.py describes a record)
    failed/<key>.json    the last error of a cell that failed (removed once it succeeds)
    runs/<time>.json     one line per sweep run: its command, cells planned, skipped, done, failed

Each file is written to a temporary name and renamed into place, so a crash (or two sweeps sharing a
folder) never leaves half a record: a rerun finds every finished cell and skips it.

`load_records` reads a folder like this, a folder of record files, a single record file, or a JSONL
file of records (what `leaderboard --jsonl` writes), and `frame` flattens records into one row each.

What it is not: planning or running cells (cells.py, executor.py), aggregation (leaderboard.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from ..run_summary import jsonable
from .cells import FORMAT

CELLS, FAILED, RUNS = "cells", "failed", "runs"


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(jsonable(doc), f, ensure_ascii=False, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finished_keys(out: str | Path) -> set[str]:
    """Keys of the cells whose records are in ``out/cells``."""
    folder = Path(out) / CELLS
    return {p.stem for p in folder.glob("*.json")} if folder.is_dir() else set()


def write_record(out: str | Path, record: dict) -> Path:
    """Store a finished cell's record (atomically) and forget any earlier failure of it."""
    path = Path(out) / CELLS / f"{record['key']}.json"
    _write(path, record)
    (Path(out) / FAILED / path.name).unlink(missing_ok=True)
    return path


def write_failure(out: str | Path, key: str, settings: dict, failure: dict) -> Path:
    """Store why a cell failed (a rerun tries it again)."""
    doc = {"key": key, "settings": settings, "failed": datetime.now(UTC).isoformat(timespec="seconds")}
    path = Path(out) / FAILED / f"{key}.json"
    _write(path, doc | failure)
    return path


def write_run(out: str | Path, doc: dict) -> Path:
    """A note of one sweep run (command, counts, seconds) under ``out/runs``."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")
    path = Path(out) / RUNS / f"{stamp}-{os.getpid()}.json"
    _write(path, doc)
    return path


def _records_in(path: Path) -> Iterable[dict]:
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path.name} line {number} is not valid JSON.") from None
        return
    try:
        yield json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path.name} is not a JSON file.") from None


def load_records(*paths: str | Path) -> list[dict]:
    """Every cell record under the given folders and files (others JSON files are skipped), by key."""
    found: dict[str, dict] = {}
    for path in map(Path, paths):
        if path.is_dir():
            sub = path / CELLS
            files = sorted((sub if sub.is_dir() else path).glob("*.json"))
        elif path.is_file():
            files = [path]
        else:
            raise ValueError(f"{path}: no such results folder or file.")
        for file in files:
            for doc in _records_in(file):
                if isinstance(doc, dict) and doc.get("format") == FORMAT and "key" in doc:
                    found[doc["key"]] = doc
    if not found:
        where = ", ".join(str(p) for p in paths)
        raise ValueError(f"No sweep cell records in {where}: point at a sweep's --out folder or its files.")
    return list(found.values())


COLUMNS = (
    "model", "task", "source", "sample", "length", "depth", "config", "policy", "budget", "metric",
    "score", "kv_mb", "kv_fraction", "tokens_per_second", "prompt_tokens", "new_tokens", "truncated_tokens",
    "kv_mb_peak", "kv_mb_full", "prefill_seconds", "decode_seconds", "wall_seconds", "output", "key",
    "d2o_core", "gpu", "node", "finished",
)  # fmt: skip


def frame(records: Iterable[dict]) -> pd.DataFrame:
    """One row per record: its settings, results, model and where it ran (COLUMNS, then any extra)."""
    rows = []
    for r in records:
        s, res = r["settings"], r["result"]
        row = {
            k: s.get(k) for k in ("task", "source", "sample", "length", "depth", "policy", "budget", "metric")
        }
        row |= {k: v for k, v in res.items() if k != "answers"}
        row |= {"model": s.get("model") or (r.get("model") or {}).get("name"), "config": r.get("config")}
        row |= {"key": r["key"], "d2o_core": (r.get("versions") or {}).get("d2o_core")}
        row |= {"gpu": (r.get("machine") or {}).get("gpu"), "node": (r.get("machine") or {}).get("node")}
        rows.append(row | {"finished": r.get("finished")})
    df = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in df.columns:
            df[column] = None
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df[list(COLUMNS) + extra]
    for column in ("score", "budget", "kv_mb", "kv_fraction", "tokens_per_second", "depth", "length"):
        df[column] = pd.to_numeric(df[column], errors="coerce")
    df["sample"] = df["sample"].astype(str)
    return df
