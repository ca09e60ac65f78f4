"""The Compare tab's Advanced panel as the browser sends it: blank stays blank, refusals name the field.

Gradio's Number component draws a None value as 0 (its page code sets `value ??= 0`) and its server
side refuses a value below `minimum` with a sentence that names no field. So the values tested here
are what the page sends once Advanced is open (`sent`), through each component's own `preprocess`,
as Gradio's server does before our handler sees them.

Settings are read by `d2o_core.policies.parse` and checked when each policy is built; a refusal is
the policy's own sentence behind where on the page it comes from ("D2O: ...", "Extra column 2 (D2O): ...").
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
    position = {getattr(c, "elem_id", None): i for i, c in enumerate(event.inputs)}
    values[position["prompt"]], values[position["max-new"]] = TEXT, 4  # a short run on the tiny model
    assert values[position["question"]] == ""  # the question box, blank: no question
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
        (("d2o", "recent_share"), "1.5", "D2O: recent_share must be a number from 0 to 1; got 1.5."),
        (("d2o", "beta"), "0", "D2O: beta must be a number from 0.05 to 1; got 0.0."),
        (("d2o", "beta"), "nan", "D2O: beta must be a number; got 'nan'."),
        (("d2o", "protected_layers"), "first, last", "D2O: protected_layers must be layer numbers"),
        (("cam", "merge_tokens"), "0", "CaM: merge_tokens must be a whole number from 1 to "),
        (("h2o", "recent_share"), 2.0, "H2O: recent_share must be a number from 0 to 1; got 2.0."),
        (("h2o", "compress_every"), -1, "H2O: compress_every must be a whole number from 0 to 4096; got -1."),
        (("snapkv", "window"), "8.5", "SnapKV: window must be a whole number; got '8.5'."),
    ],
)
def test_an_out_of_range_setting_is_refused_naming_its_policy_and_setting(key, value, message):
    values = [value if k == key else s for k, s in zip(P.control_keys(), defaults())]
    columns = P.Columns([key[0]], 20, P.settings_from_values(values))
    with pytest.raises(ValueError) as info:
        columns.policies()
    assert str(info.value).startswith(message), str(info.value)


def defaults() -> list:
    specs = {(n, s.name): s.default for n in P.NAMES for s in P.settings_of(P.POLICIES[n])}
    return [specs[key] for key in P.control_keys()]


@pytest.mark.parametrize(
    "extra,message",
    [
        (("d2o", "150", ""), "Extra column 2 (D2O): budget % must be a percentage from 1 to 100; got 150."),
        (("d2o", "", "beta=3"), "Extra column 2 (D2O): beta must be a number from 0.05 to 1; got 3.0."),
        (("d2o", "", "merge=perhaps"), "Extra column 2 (D2O): merge must be true or false"),
        (("snapkv", "", "kernel=4"), "Extra column 2 (SnapKV): kernel must be odd"),
        (("h2o", "", "compress_every=0.5"), "Extra column 2 (H2O): compress_every must be a whole number"),
    ],
)
def test_an_extra_columns_refusal_names_the_column(extra, message):
    columns = P.Columns(["h2o"], 20, extras=[("", "", ""), extra])
    with pytest.raises(ValueError) as info:
        columns.policies()
    assert str(info.value).startswith(message), str(info.value)


def test_an_extra_columns_box_takes_layer_lists_words_and_compress_every():
    """ "protected_layers=0,1, merge=no": a comma starts a new setting only before `name=` (the box
    split on every comma, so two protected layers could not be typed, and "no" was refused)."""
    extras = [
        ("d2o", "", "protected_layers=0,1, merge=no, variant=official"),
        ("h2o", "40", "compress_every=0"),
    ]
    d2o, h2o = P.Columns([], 20, extras=extras).policies()
    assert (d2o.protected_layers, d2o.merge, d2o.variant, d2o.budget) == ((0, 1), False, "official", 0.2)
    assert (h2o.compress_every, h2o.budget) == (0, 0.4)
    assert h2o.label == "h2o(compress_every=0)"


def test_every_evicting_policys_tab_has_a_compress_every_box_that_reaches_it():
    """compress_every comes from the registry (base.Policy's field); 0 to 4096 is a number box, not a
    slider whose 4096 steps could not pick 4."""
    with gr.Blocks():
        controls = P.advanced_controls()
    by_key = dict(zip(P.control_keys(), controls))
    evicting = [n for n in P.NAMES if n != "full"]
    assert all(isinstance(by_key[(n, "compress_every")], gr.Number) for n in evicting)
    assert by_key[("h2o", "compress_every")].label == "compress_every"  # the name the box and CLI use
    values = [sent(c) for c in controls]
    values[P.control_keys().index(("h2o", "compress_every"))] = 4.0  # gr.Number sends a float
    (h2o,) = P.Columns(["h2o"], 20, P.settings_from_values(values)).policies()
    assert h2o.compress_every == 4 and isinstance(h2o.compress_every, int)


def test_extra_columns_offer_the_checkboxes_titles_and_send_registry_names(demo):
    checkbox_choices = by_id(demo, "policies").choices
    dropdown = by_id(demo, "extra-0")
    assert dropdown.choices[1:] == checkbox_choices and dropdown.choices[0] == ("none", "")
    assert dropdown.preprocess("d2o") == "d2o"
