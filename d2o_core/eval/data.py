"""Your own evaluation data: JSONL files in LongBench's or RULER's shape, validated row by row.

One JSON object per line:

- ``context`` (string, required): the long text the cache has to hold;
- ``question`` (string, optional; LongBench's ``input`` is accepted as is): asked after the context;
- ``answers`` (list of strings, at least one; RULER's ``outputs`` is accepted as is);
- ``id`` (string or number, optional; LongBench's ``_id`` accepted; default: the line number);
- ``length`` (whole number, optional, informational: LongBench's length in words);
- ``metric`` (optional): contains, exact, f1 or rouge_l (scoring.py); default: the sweep's ``--metric``;
- ``dataset`` (optional): the task name the row is reported under; default: the file's name.

A RULER row (``input`` is the whole prompt, ``outputs`` the answers, no ``context``) reads as a row
whose context is that input. Other keys are ignored. Blank lines are skipped. A bad file raises
``ValueError`` with one sentence naming the file, the line and the field, e.g.
"mine.jsonl line 3: answers must be a list of strings."

What it is not: prompt building or scoring (cells.py, scoring.py); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .scoring import METRICS, canonical

RULES = {
    "context": "must be a string",
    "question": "must be a string",
    "answers": "must be a list of strings",
    "id": "must be a string or a number",
    "length": "must be a whole number",
    "metric": f"must be one of {', '.join(METRICS)}",
    "dataset": "must be a string",
}


class DataRow(BaseModel):
    """One validated row (field rules in RULES; unknown keys ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    context: str
    question: str | None = Field(None, validation_alias=AliasChoices("question", "input"))
    answers: list[str] = Field(validation_alias=AliasChoices("answers", "outputs"))
    id: str | int | None = Field(None, validation_alias=AliasChoices("id", "_id"))
    length: int | None = None
    metric: str | None = None
    dataset: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _ruler_row(cls, data):
        if isinstance(data, dict) and "context" not in data and "input" in data and "outputs" in data:
            data = {k: v for k, v in data.items() if k not in ("input", "question")} | {
                "context": data["input"]
            }
        return data

    @field_validator("answers")
    @classmethod
    def _some_answer(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("empty")
        return value

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str | None) -> str | None:
        return None if value is None else canonical(value)


@dataclass(frozen=True)
class Example:
    """A row ready for the sweep: where it came from, its prompt parts and a hash of its content."""

    task: str
    id: str
    context: str
    question: str | None
    answers: tuple[str, ...]
    metric: str | None
    length: int | None
    digest: str  # sha256 of context, question, answers and metric: a cell key changes when the row does

    def prompt(self) -> str:
        """Context, a blank line, then the question: the whole prompt (the sweep holds the question apart)."""
        return f"{self.context}\n\n{self.question}" if self.question else self.context


ALIASES = {"input": "question", "outputs": "answers", "_id": "id"}


def _sentence(where: str, error: dict) -> str:
    """One pydantic error as "FILE line N: FIELD what is wrong."."""
    loc = [ALIASES.get(str(p), str(p)) for p in error.get("loc", ())]
    field = next((p for p in loc if p in RULES), loc[0] if loc else "row")
    if error.get("type") == "missing":
        return f"{where}: {field} is missing."
    if field == "answers" and "empty" in str(error.get("msg", "")):
        return f"{where}: answers must hold at least one answer."
    return f"{where}: {field} {RULES.get(field, 'is not valid')}."


def digest(row: DataRow) -> str:
    text = json.dumps([row.context, row.question, row.answers, row.metric], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def load_jsonl(path: str | Path) -> list[Example]:
    """Every row of one JSONL file as an Example; ValueError (one sentence: file, line, field) when bad."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file.")
    out: list[Example] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: each line must be one JSON object with context and answers.")
            try:
                row = DataRow.model_validate(obj)
            except ValidationError as exc:
                raise ValueError(_sentence(where, exc.errors()[0])) from None
            row_id = str(row.id) if row.id is not None else str(number)
            if row_id in seen:
                raise ValueError(f"{where}: id {row_id!r} repeats line {seen[row_id]}; ids must be unique.")
            seen[row_id] = number
            task = row.dataset or path.stem
            question = row.question if row.question and row.question.strip() else None
            out.append(
                Example(
                    task,
                    row_id,
                    row.context,
                    question,
                    tuple(row.answers),
                    row.metric,
                    row.length,
                    digest(row),
                )
            )
    if not out:
        raise ValueError(f"{path.name} has no rows: give one JSON object per line with context and answers.")
    return out
