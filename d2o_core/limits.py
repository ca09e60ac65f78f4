"""Every size and time limit of a request, in one place, each read from the environment with a default.

What this module is: `Limits` (a frozen dataclass) and `limits()`, which reads it from the environment
on each call (cheap; tests and operators change the variables without a restart of anything else),
plus the checks that apply them before any work: `check_prompt_chars` before a prompt is tokenised,
`check_upload` before a file is read, `check_request` before a page or API request takes the model.

    D2O_MAX_UPLOAD_MB        largest run file the page opens (default 100: a page run of six columns
                             over a long prompt is ~30-200 MB of JSON)
    D2O_MAX_PROMPT_CHARS     characters of prompt plus question (default: 32 per allowed token,
                             more than any tokenizer puts in one token on average, so a longer text
                             could never fit the token limit and is refused before tokenising it)
    D2O_MAX_PROMPT_TOKENS    tokens of prompt plus question (default 4096 on CPU, 16384 on GPU;
                             a model's position limit lowers it, see `models.from_model`)
    D2O_MAX_COLUMNS          policies per page or API request (default 6, the page's columns)
    D2O_MAX_NEW_TOKENS       new tokens per page or API request (default 256, the page's slider)
    D2O_MAX_REQUEST_SECONDS  wall time of one page or API request (default 300)
    D2O_QUEUE_SIZE           requests waiting for the model before new ones are told "busy" (16)

What it is not: the library's own bounds (`runner.MAX_NEW_TOKENS` for a caller of `generate`, each
policy's settings in `policies/base.py`); these are what a server grants one visitor's request.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CHARS_PER_TOKEN = 32  # no tokenizer we know averages more characters than this per token
MB = 1024 * 1024


def _env_number(name: str, default: float, whole: bool = True) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw[:40]!r} is not a number; unset it or give one.") from None
    if not math.isfinite(value) or value <= 0 or (whole and not value.is_integer()):
        kind = "whole number" if whole else "number"
        raise ValueError(f"{name}={raw[:40]!r} must be a positive {kind}.")
    return int(value) if whole else value


def default_prompt_tokens(device_type: str = "cpu") -> int:
    """`D2O_MAX_PROMPT_TOKENS`, else 4096 on CPU and 16384 on an accelerator."""
    return _env_number("D2O_MAX_PROMPT_TOKENS", 4096 if device_type == "cpu" else 16384)


@dataclass(frozen=True)
class Limits:
    upload_bytes: int = 100 * MB
    prompt_chars: int | None = None  # None: CHARS_PER_TOKEN per allowed prompt token
    columns: int = 6
    new_tokens: int = 256
    request_seconds: float = 300.0
    queue_size: int = 16

    @classmethod
    def from_env(cls) -> Limits:
        chars = os.environ.get("D2O_MAX_PROMPT_CHARS")
        return cls(
            upload_bytes=int(_env_number("D2O_MAX_UPLOAD_MB", 100, whole=False) * MB),
            prompt_chars=_env_number("D2O_MAX_PROMPT_CHARS", 0) if chars and chars.strip() else None,
            columns=_env_number("D2O_MAX_COLUMNS", 6),
            new_tokens=_env_number("D2O_MAX_NEW_TOKENS", 256),
            request_seconds=_env_number("D2O_MAX_REQUEST_SECONDS", 300.0, whole=False),
            queue_size=_env_number("D2O_QUEUE_SIZE", 16),
        )

    def chars_for(self, max_prompt_tokens: int) -> int:
        """Characters allowed in prompt plus question, for a model allowing `max_prompt_tokens` tokens."""
        return self.prompt_chars or CHARS_PER_TOKEN * int(max_prompt_tokens)


def limits() -> Limits:
    """The limits in force now (read from the environment)."""
    return Limits.from_env()


def _size(n: float) -> str:
    return f"{n / MB:.0f} MB" if n >= MB else f"{n / 1024:.0f} KB" if n >= 1024 else f"{n:.0f} bytes"


def check_prompt_chars(prompt, question, max_prompt_tokens: int) -> None:
    """Refuse a prompt (plus question) too long to ever fit, before any tokenisation.

    Token-id lists are counted by the token limit itself (no tokenisation needed); only text is checked here.
    """
    allowed = limits().chars_for(max_prompt_tokens)
    chars = sum(len(part) for part in (prompt, question) if isinstance(part, str))
    if chars > allowed:
        raise ValueError(
            f"The prompt has {chars:,} characters; the limit here is {allowed:,} "
            f"(at most {max_prompt_tokens} tokens; set D2O_MAX_PROMPT_CHARS to change it)."
        )


def check_upload(path: str | Path) -> int:
    """The file's size in bytes, or a sentence when it is over the upload limit (checked before reading)."""
    size = Path(path).stat().st_size
    allowed = limits().upload_bytes
    if size > allowed:
        raise ValueError(
            f"This file is {_size(size)}; the page opens run files of up to {_size(allowed)} "
            "(set D2O_MAX_UPLOAD_MB to change it)."
        )
    return size


def check_request(columns: int, max_new_tokens: int) -> None:
    """A page or API request asks for no more columns and new tokens than a visitor is granted."""
    granted = limits()
    if columns > granted.columns:
        raise ValueError(
            f"{columns} policies were asked for; one request runs at most {granted.columns} "
            "(set D2O_MAX_COLUMNS to change it)."
        )
    if max_new_tokens > granted.new_tokens:
        raise ValueError(
            f"max_new_tokens is {max_new_tokens}; one request generates at most {granted.new_tokens} "
            "(set D2O_MAX_NEW_TOKENS to change it)."
        )
