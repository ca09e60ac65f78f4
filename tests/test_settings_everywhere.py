"""Settings are read once: the same mistake gets the same sentence from the CLI, the page and the API.

The CLI's `--set` (`d2o_core.__main__.policies_from_args`), the page's Advanced controls and extra
columns (`ui.policy_controls.Columns`) and the API's `settings` (`ui.api.api_compare`) all read with
`d2o_core.policies.parse` and check when the policy is built (`base.check_setting`); the page and the
API put only where the mistake is in front ("D2O: ", "Extra column 1 (D2O): ").
"""

from __future__ import annotations

import gradio as gr
import pytest
from helpers import TEXT, tiny_model

from d2o_core.__main__ import policies_from_args
from ui import api as A
from ui import policy_controls as P
from ui.engine import Engine

MISTAKES = [  # (setting, as typed) -> the sentence's start, checked on the CLI's own words
    ("recent_share", "1.5", "recent_share must be a number from 0 to 1; got 1.5."),
    ("beta", "0", "beta must be a number from 0.05 to 1; got 0"),
    ("protected_layers", "first", "protected_layers must be layer numbers"),
    ("variant", "offical", "variant must be one of "),
    ("merge", "perhaps", "merge must be true or false"),
    ("compress_every", "-2", "compress_every must be a whole number from 0 to 4096; got -2."),
    ("speed", "3", "D2O has no setting 'speed'; its settings are"),
]


def refusal(run) -> str:
    with pytest.raises(ValueError) as info:
        run()
    return str(info.value)


@pytest.fixture(scope="module")
def engine():
    engine = Engine(["tiny"], loader=lambda name: tiny_model())
    engine.get = lambda *a: pytest.fail("a refused request must not reach the model")
    return engine


@pytest.mark.parametrize("name,typed,start", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_the_same_mistake_gets_the_same_sentence_from_the_cli_the_page_and_the_api(
    engine, name, typed, start
):
    cli = refusal(lambda: policies_from_args("full,d2o", 0.2, [f"d2o.{name}={typed}"]))
    assert cli.startswith(start), cli
    extra = refusal(lambda: P.Columns(["full"], 20, extras=[("d2o", "", f"{name}={typed}")]).policies())
    assert extra == f"Extra column 1 (D2O): {cli}"
    if name != "speed":  # every Advanced control is a setting of its policy
        defaults = {(n, s.name): s.default for n in P.NAMES for s in P.settings_of(P.POLICIES[n])}
        values = [typed if key == ("d2o", name) else defaults[key] for key in P.control_keys()]
        advanced = {"d2o": P.settings_from_values(values)["d2o"]}
        page = refusal(lambda: P.Columns(["full", "d2o"], 20, advanced).policies())
        assert page == f"D2O: {cli}"
    with pytest.raises(gr.Error) as info:
        A.api_compare(engine, TEXT, ["full", "d2o"], 0.2, 4, settings={"d2o": {name: typed}})
    assert info.value.message == f"D2O: {cli}"


def test_what_the_cli_accepts_the_page_and_the_api_accept_alike(engine):
    typed = {"merge": "no", "protected_layers": "0,1", "variant": "official", "compress_every": "4"}
    (cli,) = policies_from_args("d2o", 0.3, [f"d2o.{k}={v}" for k, v in typed.items()])
    text = ", ".join(f"{k}={v}" for k, v in typed.items())
    (extra,) = P.Columns([], 30, extras=[("d2o", "", text)]).policies()
    (page,) = P.Columns(["d2o"], 30, {"d2o": dict(typed)}).policies()
    (api,) = P.Columns(["d2o"], 30, A.check_settings({"d2o": typed}, ["d2o"])).policies(limit=None)
    assert cli == extra == page == api
    assert (cli.merge, cli.protected_layers, cli.compress_every) == (False, (0, 1), 4)
