"""Policy settings on the page, generated from the registry, and columns as configurations.

What this module is: (1) `advanced_controls()` builds one tab of controls per registered policy
from its dataclass fields (`d2o_core.policies.base.settings_of`: kind, range, default, one-line
help), so a new policy's settings appear without touching the page; (2) `Columns`, which turns the
controls' values and a request's columns into `Policy` objects. A column is a configuration
(policy, budget, settings), not a name: the ticked policies run with their Advanced settings at the
main budget, and up to `EXTRA` extra columns each name a policy, an optional budget and settings
such as ``variant=official, protected_layers=0,1`` — D2O paper beside D2O official, or D2O at 20 %
beside D2O at 40 %.

Settings are read by `d2o_core.policies.parse` (the CLI's, the API's and run files' parser too) and
checked where every surface ends, when the policy is built (`base.check_setting`). A refusal is
that one sentence behind where on the page it comes from: "D2O: recent_share must be a number from
0 to 1; got 1.5." for an Advanced control, "Extra column 2 (D2O): ..." for an extra column.

What it is not: no generation and no figures; `compare_run.py` runs the columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from d2o_core import POLICIES
from d2o_core.policies import build
from d2o_core.policies.base import Setting, settings_of
from d2o_core.policies.parse import blank, parse_pairs, parse_settings

MAX_COLUMNS = 6
EXTRA = 3  # extra-column rows in the page
DEFAULT_PICKED = ("full", "streaming", "h2o", "d2o")
NAMES = list(POLICIES)
# Whole-number settings with a wider range than this get a number box, not a slider (compress_every:
# 0 to 4096, where 0, 1, 4 and 16 are the values worth choosing).
SLIDER_SPAN = 256


def control_keys() -> list[tuple[str, str]]:
    """(policy, setting) for every Advanced control, in page order."""
    return [(name, s.name) for name in NAMES for s in settings_of(POLICIES[name])]


def settings_from_values(values: list) -> dict[str, dict]:
    """The Advanced controls' values (in `control_keys()` order) -> {policy: {setting: value}}.

    The values stay as the page sent them: `Columns.policies` reads them (`parse_settings`) for the
    policies that run, and building each policy checks them.
    """
    keys = control_keys()
    if len(values) != len(keys):
        raise ValueError(f"expected {len(keys)} Advanced values, got {len(values)}")
    out: dict[str, dict] = {name: {} for name in NAMES}
    for (name, key), value in zip(keys, values):
        out[name][key] = value
    return out


def _at(where: str, read, *args, **kwargs):
    """`read(*args, **kwargs)`, its refusal prefixed with where on the page it comes from."""
    try:
        return read(*args, **kwargs)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass
class Columns:
    """What the user asked to run: ticked policies at the main budget, plus extra configurations.

    settings : {policy: {setting: value}}, values typed or as text (the Advanced controls, the API).
    extras : (policy name or "", budget % or None for the main one, settings text) per extra row.
    """

    picked: list[str]
    budget_percent: float = 20
    settings: dict[str, dict] = field(default_factory=dict)
    extras: list[tuple] = field(default_factory=list)

    def policies(self, limit: int | None = MAX_COLUMNS) -> list:
        """The columns' `Policy` objects; at most `limit` (the page's column slots; None for the API)."""
        unknown = sorted(set(self.picked or []) - set(NAMES))
        if unknown:
            raise ValueError(f"Unknown policy {', '.join(unknown)}; choose from {', '.join(NAMES)}.")
        main = _budget(self.budget_percent, "KV budget %")
        out = [
            _build(n, main, self._advanced(n), POLICIES[n].title) for n in NAMES if n in (self.picked or [])
        ]
        for i, (name, budget, text) in enumerate(self.extras, 1):
            if blank(name):
                continue
            if name not in POLICIES:
                raise ValueError(
                    f"Unknown policy {str(name)[:40]!r} in extra column {i}; choose from {', '.join(NAMES)}."
                )
            where = f"Extra column {i} ({POLICIES[name].title})"
            given = self._advanced(name) | _at(where, parse_pairs, name, text)
            share = main if blank(budget) else _budget(budget, f"{where}: budget %")
            out.append(_build(name, share, given, where))
        if not out:
            raise ValueError("No policy selected: tick at least one cache policy or fill an extra column.")
        if limit is not None and len(out) > limit:
            raise ValueError(f"At most {limit} columns run at once; you asked for {len(out)}.")
        return out

    def _advanced(self, name: str) -> dict:
        """Policy `name`'s Advanced settings, typed; a refusal names the policy's tab."""
        return _at(POLICIES[name].title, parse_settings, name, self.settings.get(name) or {})


def _build(name: str, budget: float, settings: dict, where: str):
    """`build`, its refusal (a sentence about the setting, `base.check_setting`) prefixed with `where`."""
    return _at(where, build, name, budget, **settings)


def _budget(percent, where: str) -> float:
    """A budget % typed or slid on the page -> a fraction; ValueError naming the field `where`."""
    try:
        value = float(percent)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a percentage from 1 to 100; got {str(percent)[:40]!r}.") from None
    if not 1 <= value <= 100:  # also refuses nan
        raise ValueError(f"{where} must be a percentage from 1 to 100; got {value:g}.")
    return value / 100


# -- building the controls (Gradio components) -----------------------------------------------
def _control(policy: str, s: Setting) -> gr.components.Component:
    # Labelled with the setting's own name: the one the extra columns' box, the CLI's --set, the API
    # and every refusal use ("D2O: recent_share must be ...").
    label, elem_id = s.name, f"set-{policy}-{s.name}"
    default = s.default
    if s.kind == "bool":
        return gr.Checkbox(default, label=label, info=s.help, elem_id=elem_id)
    if s.kind == "choice":
        return gr.Radio(list(s.choices), value=default, label=label, info=s.help, elem_id=elem_id)
    if s.kind == "layers":
        text = "" if default is None else ", ".join(str(i) for i in default)
        return gr.Textbox(text, label=label, info=s.help, placeholder="blank", elem_id=elem_id)
    if s.optional:
        # A textbox, not gr.Number: Gradio's Number shows and sends 0 for None once it is drawn
        # (its page code sets `value ??= 0`), so "blank: the variant's" could not stay blank.
        text = "" if default is None else f"{default:g}"
        return gr.Textbox(text, label=label, info=s.help, placeholder="blank", elem_id=elem_id)
    if s.low is None or s.high is None or (s.kind == "int" and s.high - s.low > SLIDER_SPAN):
        # No minimum/maximum for Gradio to check (its refusal names no field): building the policy
        # checks the bounds and says which setting is wrong.
        span = f" ({s.low:g} to {s.high:g})" if s.low is not None and s.high is not None else ""
        return gr.Number(default, label=label, info=s.help + span, elem_id=elem_id)
    step = s.step or (1 if s.kind == "int" else 0.01)
    return gr.Slider(s.low, s.high, default, step=step, label=label, info=s.help, elem_id=elem_id)


def advanced_controls() -> list[gr.components.Component]:
    """One tab per policy that has settings, controls in `control_keys()` order (call inside a Blocks)."""
    out = []
    with gr.Tabs():
        for name in NAMES:
            specs = settings_of(POLICIES[name])
            if not specs:
                continue
            with gr.Tab(POLICIES[name].title):
                gr.Markdown(POLICIES[name].description, elem_classes=["policy-about"])
                with gr.Row():
                    out += [_control(name, s) for s in specs]
    return out


def extra_columns() -> list[gr.components.Component]:
    """EXTRA rows of (policy, budget %, settings); flattened in that order."""
    out = []
    gr.Markdown(
        "Extra columns: the same policy again with other settings or another budget, e.g. D2O with "
        "`variant=official, protected_layers=0,1`, H2O with `compress_every=0` (compress once, after "
        "the prompt), or D2O at 40 %. Settings are the names shown in each policy's tab above."
    )
    # The same titles as the policy checkboxes; the values stay the registry names.
    choices = [("none", ""), *((POLICIES[n].title, n) for n in NAMES)]
    for i in range(EXTRA):
        with gr.Row(equal_height=True):
            out.append(gr.Dropdown(choices, value="", label=f"Extra column {i + 1}", elem_id=f"extra-{i}"))
            # A textbox for the same reason as optional settings: a blank gr.Number becomes 0.
            out.append(
                gr.Textbox(
                    "",
                    label="Budget %",
                    placeholder="blank: the main budget",
                    elem_id=f"extra-{i}-budget",
                )
            )
            out.append(
                gr.Textbox(
                    "",
                    label="Settings",
                    placeholder="e.g. variant=official, merge=no, protected_layers=0,1",
                    elem_id=f"extra-{i}-settings",
                )
            )
    return out


def extras_from_values(values: list) -> list[tuple]:
    return [tuple(values[i : i + 3]) for i in range(0, len(values), 3)]
