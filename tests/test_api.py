"""The named `/compare` endpoint: a prompt alone is enough; a wrong type is a sentence naming the field;
a question and per-policy settings run what the page runs."""

from __future__ import annotations

import inspect
import json
import re

import gradio as gr
import pytest
from helpers import TEXT, tiny_model

from ui import api as H
from ui.engine import Engine
from ui.layout import build_demo


@pytest.fixture(scope="module")
def engine():
    return Engine(["tiny"], loader=lambda name: tiny_model())


def test_a_prompt_alone_runs_full_h2o_and_d2o_at_the_documented_defaults(engine):
    out = H.api_compare(engine, TEXT)
    assert list(out["results"]) == ["full", "h2o", "d2o"]
    d2o = out["results"]["d2o"]
    assert d2o["metrics"]["new_tokens"] == 64 and isinstance(d2o["text"], str)
    assert out["results"]["full"]["metrics"]["kv_fraction"] == 1 and d2o["metrics"]["kv_fraction"] < 0.5
    json.dumps(out, allow_nan=False)
    assert H.api_compare(engine, TEXT, None, 0.5, 2.0)["results"]["h2o"]["metrics"]["new_tokens"] == 2


def test_the_endpoint_advertises_the_same_defaults_as_the_handler(engine):
    """gradio_client fills a parameter it is not given from these, so `predict(prompt=...)` works."""
    info = build_demo(engine).get_api_info()["named_endpoints"]["/compare"]["parameters"]
    params = {p["parameter_name"]: p for p in info}
    assert list(params) == ["prompt", "policies", "budget", "max_new_tokens", "question", "settings"]
    assert not params["prompt"]["parameter_has_default"]
    handler = inspect.signature(H.api_stream).parameters  # what the endpoint runs
    for name in ("policies", "budget", "max_new_tokens", "question", "settings"):
        assert params[name]["parameter_has_default"], name
        default = handler[name].default
        assert params[name]["parameter_default"] == (list(default) if isinstance(default, tuple) else default)
    assert params["policies"]["parameter_default"] == ["full", "h2o", "d2o"]
    assert (params["budget"]["parameter_default"], params["max_new_tokens"]["parameter_default"]) == (0.2, 64)
    assert params["question"]["parameter_default"] is None and params["settings"]["parameter_default"] is None


def test_settings_and_a_question_run_what_the_page_runs(engine):
    settings = {"d2o": {"merge": "no", "protected_layers": "0,1"}, "h2o": {"compress_every": 0}}
    out = H.api_compare(engine, TEXT, ["h2o", "d2o"], 0.3, 3, settings=settings)["results"]
    assert list(out) == ["h2o(compress_every=0)", "d2o(merge=False,protected_layers=(0, 1))"]
    plain = H.api_compare(engine, TEXT, ["h2o"], 0.3, 3)["results"]["h2o"]["metrics"]
    asked = H.api_compare(engine, TEXT, ["h2o"], 0.3, 3, "Which fox?")["results"]["h2o"]["metrics"]
    assert asked["prompt_tokens"] > plain["prompt_tokens"]  # the question is read, after the compression
    blank = H.api_compare(engine, TEXT, ["h2o"], 0.3, 3, "  ", {})["results"]["h2o"]["metrics"]
    assert blank["prompt_tokens"] == plain["prompt_tokens"]  # a blank question is none


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"prompt": [TEXT]}, "prompt must be text .*got list"),
        ({"prompt": "  "}, "prompt is empty"),
        ({"max_new_tokens": 3.5}, "max_new_tokens must be a whole number .*got float 3.5"),
        ({"max_new_tokens": "64"}, "max_new_tokens must be a whole number .*got str '64'"),
        ({"budget": "0.2"}, "budget must be a number.*got str '0.2'"),
        ({"budget": True}, "budget must be a number"),
        ({"budget": 20}, "budget is a fraction from 0.01 to 1"),
        ({"policies": "d2o"}, "policies must be a list of names .*got str 'd2o'"),
        ({"policies": ["full", 3]}, "policies must be a list of names"),
        ({"policies": ["full", "H2O"]}, "Unknown policy H2O"),
        ({"question": 3}, "question must be text .*got int 3"),
        ({"settings": "d2o.merge=no"}, "settings must be an object of objects"),
        ({"settings": {"d2o": "merge=no"}}, "settings must be an object of objects"),
        ({"settings": {"h2o": {"n_sink": 1}}}, "settings names h2o, which is not among policies"),
        ({"settings": {"d2o": {"beta": 3}}}, "D2O: beta must be a number from 0.05 to 1; got 3"),
    ],
)
def test_a_wrong_type_is_a_sentence_naming_the_field(engine, monkeypatch, kwargs, message):
    monkeypatch.setattr(engine, "get", lambda *a: pytest.fail("bad arguments must not reach the model"))
    args = {"prompt": TEXT, "policies": ["full", "d2o"]} | kwargs
    with pytest.raises(gr.Error) as info:
        H.api_compare(engine, **args)
    assert re.search(message, info.value.message), info.value.message
    assert "Traceback" not in info.value.message and "\n" not in info.value.message
