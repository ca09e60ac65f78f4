"""Limits in one place (`d2o_core/limits.py`), applied before any work.

A 10 MB prompt is refused by its characters before the tokenizer sees it (it took 10.5 s and 2.7 GB);
the limits read from the environment, and a bad value there is a sentence, not a crash at start.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
from helpers import TEXT, CharTokenizer

import d2o_core
from d2o_core import limits, models, serving
from d2o_core.runner import iter_compare

HUGE = "x" * 10_000_000


class CountingTokenizer(CharTokenizer):
    """The tiny model's tokenizer, counting the characters it was asked to read."""

    def __init__(self):
        self.read = 0

    def __call__(self, text: str, **kwargs) -> dict:
        self.read += len(text)
        return super().__call__(text, **kwargs)


@pytest.fixture
def counted(tiny):
    return dataclasses.replace(tiny, tokenizer=CountingTokenizer())


def first_update(lm, prompt, **kwargs):
    return next(iter_compare(lm, prompt, [d2o_core.POLICIES["h2o"](budget=0.3)], max_new_tokens=2, **kwargs))


@pytest.mark.parametrize("where", ["prompt", "question"])
def test_a_10_mb_prompt_is_refused_by_its_characters_before_tokenisation(counted, where):
    prompt, question = (HUGE, None) if where == "prompt" else (TEXT, HUGE)
    start = time.perf_counter()
    with pytest.raises(
        ValueError, match=r"The prompt has 10,00\d,\d{3} characters; the limit here is 65,536"
    ):
        first_update(counted, prompt, question=question)
    assert counted.tokenizer.read == 0
    assert time.perf_counter() - start < 1.0


def test_a_prompt_under_the_character_limit_still_meets_the_token_limit(counted):
    assert counted.max_prompt_tokens == 2048  # the tiny model's position limit
    with pytest.raises(ValueError, match="The prompt has 3000 tokens; the limit here is 2048"):
        first_update(counted, "y" * 3000)  # 3000 characters: well under 32 per token, so tokenised


def test_serve_batch_refuses_a_huge_prompt_before_tokenising_any(counted):
    with pytest.raises(ValueError, match="characters; the limit here is"):
        serving.serve_batch(counted, [TEXT, HUGE], d2o_core.POLICIES["h2o"](budget=0.3), max_new_tokens=2)
    assert counted.tokenizer.read == 0


def test_the_character_limit_comes_from_the_environment(counted, monkeypatch):
    monkeypatch.setenv("D2O_MAX_PROMPT_CHARS", "100")
    with pytest.raises(ValueError, match="101 characters; the limit here is 100 .*D2O_MAX_PROMPT_CHARS"):
        first_update(counted, "z" * 101)
    assert first_update(counted, "z" * 100).kind == "status"


@pytest.mark.parametrize(
    "name,value",
    [
        ("D2O_MAX_PROMPT_CHARS", "lots"),
        ("D2O_MAX_UPLOAD_MB", "-5"),
        ("D2O_MAX_NEW_TOKENS", "2.5"),
        ("D2O_MAX_REQUEST_SECONDS", "nan"),
        ("D2O_QUEUE_SIZE", "0"),
    ],
)
def test_a_bad_limit_in_the_environment_is_a_sentence_naming_it(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"^{name}="):
        limits.limits()


def test_a_bad_token_limit_in_the_environment_is_a_sentence(tiny, monkeypatch):
    monkeypatch.setenv("D2O_MAX_PROMPT_TOKENS", "nan")
    with pytest.raises(ValueError, match="D2O_MAX_PROMPT_TOKENS='nan' must be a positive whole number"):
        models.from_model(tiny.model, tiny.tokenizer)
    monkeypatch.setenv("D2O_MAX_PROMPT_TOKENS", "512")
    assert models.from_model(tiny.model, tiny.tokenizer).max_prompt_tokens == 512


def test_the_defaults_are_what_the_page_allows(monkeypatch):
    for name in ("D2O_MAX_UPLOAD_MB", "D2O_MAX_COLUMNS", "D2O_MAX_NEW_TOKENS", "D2O_MAX_PROMPT_CHARS"):
        monkeypatch.delenv(name, raising=False)
    granted = limits.limits()
    assert (granted.columns, granted.new_tokens, granted.upload_bytes) == (6, 256, 100 * limits.MB)
    assert granted.chars_for(4096) == 32 * 4096
    limits.check_request(6, 256)
    with pytest.raises(ValueError, match="7 policies were asked for; one request runs at most 6"):
        limits.check_request(7, 64)
    with pytest.raises(ValueError, match="max_new_tokens is 2048; one request generates at most 256"):
        limits.check_request(3, 2048)


def test_an_upload_over_the_limit_is_refused_by_its_size_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("D2O_MAX_UPLOAD_MB", "0.001")  # 1 KB
    small, big = tmp_path / "small.json", tmp_path / "big.json"
    small.write_bytes(b"{}" * 100)
    big.write_bytes(b" " * 2000)
    assert limits.check_upload(small) == 200
    with pytest.raises(ValueError, match="This file is 2 KB; the page opens run files of up to 1 KB"):
        limits.check_upload(big)


def test_a_request_past_its_time_limit_is_stopped_and_its_stream_closed():
    from ui.compare_run import within_time_limit

    closed = []

    def stream():
        try:
            yield from range(100)
        finally:
            closed.append(True)

    got = []
    with pytest.raises(ValueError, match="time limit of 0 s"):
        for update in within_time_limit(stream(), seconds=0):
            got.append(update)
    assert got == [0] and closed == [True]  # the model is freed at once, not after 100 steps


def test_the_api_is_no_looser_than_the_page_and_speaks_in_fractions(monkeypatch):
    from ui.api import check_args

    with pytest.raises(ValueError, match="fraction from 0.01 to 1"):
        check_args("hi", ["h2o"], 0.001, 8)
    with pytest.raises(ValueError, match="at most 6"):
        check_args("hi", ["full", "streaming", "h2o", "d2o", "tova", "snapkv", "knorm"], 0.2, 8)
    with pytest.raises(ValueError, match="at most 256"):
        check_args("hi", ["h2o"], 0.2, 2048)


def test_generate_refuses_a_temperature_that_is_not_a_number(tiny):
    import math

    for bad in (math.nan, math.inf, -1.0, True):
        with pytest.raises(ValueError, match="temperature"):
            d2o_core.generate(tiny, "Hello", d2o_core.POLICIES["h2o"](), temperature=bad, max_new_tokens=2)


def test_an_unknown_policy_name_is_not_echoed_back_whole():
    from d2o_core.policies import build

    with pytest.raises(ValueError) as err:
        build("x" * 100_000)
    assert len(str(err.value)) < 300
