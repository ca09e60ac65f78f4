"""The Compare tab's Advanced panel as the browser sends it: blank stays blank, refusals name the field.

Gradio's Number component draws a None value as 0 (its page code sets `value ??= 0`) and its server
side refuses a value below `minimum` with a sentence that names no field. So the values tested here
are what the page sends once Advanced is open (`sent`), through each component's own `preprocess`,
as Gradio's server does before our handler sees them.
"""

from __future__ import annotations

import gradio as gr
import pytest
from helpers import TEXT, tiny_model

from d2o_core.policies import build
from ui import policy_controls as P
from ui.engine import Engine
from ui.layout import build_demo


def sent(component):
    """What the browser sends for `component` once drawn (Advanced opened) and left untouched."""
    value = component.value
    if isinstance(component, gr.Number) and value is None:
        value = 0  # what Gradio's Number shows and sends for None
    return component.preprocess(value)


def by_id(demo: gr.Blocks, elem_id: str):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


@pytest.fixture(scope="module")
def demo():
    return build_demo(Engine(["tiny"], loader=lambda name: tiny_model()))


def test_run_with_advanced_open_and_untouched_runs_every_column_with_its_defaults(demo):
    run = by_id(demo, "run")
    event = next(f for f in demo.fns.values() if (run._id, "click") in f.targets)
    values = [sent(c) for c in event.inputs]  # before the fix: "Value 0 is less than minimum value 0.05."
    values[0], values[3] = TEXT, 4  # the prompt and max new tokens: a short run on the tiny model
    page: dict = {}
    for out in event.fn(*values):
        page |= out
    assert page[by_id(demo, "status")].startswith("Done"), page[by_id(demo, "status")]
    state = next(v for c, v in page.items() if isinstance(c, gr.State))
    # A column's label names the settings that differ from its policy's defaults: none here.
    assert list(state["results"]) == list(P.DEFAULT_PICKED)


def test_each_blank_advanced_field_means_the_policy_default():
    with gr.Blocks():
        controls, extras = P.advanced_controls(), P.extra_columns()
    settings = P.settings_from_values([sent(c) for c in controls])
    columns = P.Columns(P.NAMES, 20, settings, P.extras_from_values([sent(c) for c in extras]))
    assert columns.policies(limit=None) == [build(name, 0.2) for name in P.NAMES]


@pytest.mark.parametrize(
    "key,value,message",
    [
        (("d2o", "recent_share"), "1.5", "D2O · recent share: must be between 0 and 1; got 1.5."),
        (("d2o", "beta"), "0", "D2O · beta: must be between 0.05 and 1; got 0."),
        (("d2o", "beta"), "nan", "D2O · beta: must be a number; got 'nan'."),
        (("cam", "merge_tokens"), "0", "CaM · merge tokens: must be "),  # its maximum may change
        (("h2o", "recent_share"), 2.0, "H2O · recent share: must be between 0 and 1; got 2."),
        (("snapkv", "window"), "8.5", "SnapKV · window: must be a whole number; got '8.5'."),
    ],
)
def test_an_out_of_range_setting_is_refused_naming_its_field(key, value, message):
    values = [value if k == key else s for k, s in zip(P.control_keys(), defaults())]
    with pytest.raises(ValueError) as info:
        P.settings_from_values(values)
    assert str(info.value).startswith(message), str(info.value)


def test_one_sided_bounds_say_which_side():
    with pytest.raises(ValueError, match=r"^Seed: must be at least 0; got -1\.$"):
        P.in_range("Seed", -1, 0, None)
    with pytest.raises(ValueError, match=r"^Top: must be at most 2; got 3\.$"):
        P.in_range("Top", 3, None, 2)
    assert P.in_range("Any", 5, None, None) == 5


def defaults() -> list:
    specs = {(n, s.name): s.default for n in P.NAMES for s in P.settings_of(P.POLICIES[n])}
    return [specs[key] for key in P.control_keys()]


@pytest.mark.parametrize(
    "extra,message",
    [
        (("d2o", "150", ""), "Extra column 2 (D2O) · budget %: must be a percentage from 1 to 100; got 150."),
        (("d2o", "", "beta=3"), "Extra column 2 (D2O) · settings: D2O · beta: must be between 0.05 and 1"),
        (("snapkv", "", "kernel=4"), "Extra column 2 (SnapKV): kernel must be odd"),
    ],
)
def test_an_extra_columns_refusal_names_the_column_and_field(extra, message):
    columns = P.Columns(["h2o"], 20, extras=[("", "", ""), extra])
    with pytest.raises(ValueError) as info:
        columns.policies()
    assert str(info.value).startswith(message), str(info.value)


def test_extra_columns_offer_the_checkboxes_titles_and_send_registry_names(demo):
    checkbox_choices = by_id(demo, "policies").choices
    dropdown = by_id(demo, "extra-0")
    assert dropdown.choices[1:] == checkbox_choices and dropdown.choices[0] == ("none", "")
    assert dropdown.preprocess("d2o") == "d2o"
