"""Policy settings on the page, generated from the registry, and columns as configurations.

What this module is: (1) `advanced_controls()` builds one tab of controls per registered policy
from its dataclass fields (`d2o_core.policies.base.settings_of`: kind, range, default, one-line
help), so a new policy's settings appear without touching the page; (2) the pure functions that
turn the controls' values back into policy settings and a request's columns into `Policy`
objects. A column is a configuration (policy, budget, settings), not a name: the ticked policies
run with their Advanced settings at the main budget, and up to `EXTRA` extra columns each name a
policy, an optional budget and settings such as ``variant=official`` — D2O paper beside D2O
official, or D2O at 20 % beside D2O at 40 %.

What it is not: no generation and no figures; `compare_run.py` runs the columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gradio as gr

from d2o_core import POLICIES
from d2o_core.policies import build
from d2o_core.policies.base import Setting, settings_of

MAX_COLUMNS = 6
EXTRA = 3  # extra-column rows in the page
DEFAULT_PICKED = ("full", "streaming", "h2o", "d2o")
NAMES = list(POLICIES)


def parse_layers(text: str, name: str = "protected_layers") -> tuple[int, ...]:
    """'0, 1, -1' -> (0, 1, -1); ValueError with a sentence naming the field otherwise."""
    parts = [p.strip() for p in str(text or "").replace(";", ",").split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"{name}: must be whole numbers separated by commas (0, 1, -1); got {text!r}."
        ) from None


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def field_name(policy: str, s: Setting) -> str:
    """How the page names a setting's control: its policy's tab, then its label ("D2O · recent share")."""
    return f"{POLICIES[policy].title} · {s.name.replace('_', ' ')}"


def convert(policy: str, s: Setting, value):
    """A control's (or typed) value as the setting's type; None when blank and the setting allows it.

    Bounds are checked here, not by Gradio's `minimum`/`maximum`: Gradio's refusal names no field.
    """
    where = field_name(policy, s)
    if _blank(value):
        if s.optional:
            return None
        raise ValueError(f"{where}: needs a value ({s.help}).")
    if s.kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "on", "yes", "1"):
            return True
        if text in ("false", "off", "no", "0"):
            return False
        raise ValueError(f"{where}: must be true or false; got {value!r}.")
    if s.kind == "layers":
        return parse_layers(value, where) if isinstance(value, str) else tuple(value)
    if s.kind == "choice":
        if str(value) not in s.choices:
            raise ValueError(f"{where}: must be one of {', '.join(s.choices)}; got {value!r}.")
        return str(value)
    return in_range(where, _number(where, s.kind == "int", value), s.low, s.high)


def _number(where: str, whole: bool, value) -> float | int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: must be a number; got {value!r}.") from None
    if not math.isfinite(number):  # "nan" would pass every bound check below
        raise ValueError(f"{where}: must be a number; got {value!r}.")
    if whole:
        if not number.is_integer():
            raise ValueError(f"{where}: must be a whole number; got {value!r}.")
        return int(number)
    return number


def in_range(where: str, number: float | int, low: float | None, high: float | None) -> float | int:
    """`number` when within [low, high] (None: unbounded); ValueError naming the field otherwise."""
    if (low is not None and number < low) or (high is not None and number > high):
        if low is not None and high is not None:
            bounds = f"between {low:g} and {high:g}"
        else:
            bounds = f"at least {low:g}" if low is not None else f"at most {high:g}"
        raise ValueError(f"{where}: must be {bounds}; got {number:g}.")
    return number


def control_keys() -> list[tuple[str, str]]:
    """(policy, setting) for every Advanced control, in page order."""
    return [(name, s.name) for name in NAMES for s in settings_of(POLICIES[name])]


def settings_from_values(values: list) -> dict[str, dict]:
    """The Advanced controls' values (in `control_keys()` order) -> {policy: settings}; blanks omitted."""
    keys = control_keys()
    if len(values) != len(keys):
        raise ValueError(f"expected {len(keys)} Advanced values, got {len(values)}")
    specs = {(n, s.name): s for n in NAMES for s in settings_of(POLICIES[n])}
    out: dict[str, dict] = {name: {} for name in NAMES}
    for (name, key), value in zip(keys, values):
        converted = convert(name, specs[(name, key)], value)
        if converted is not None:
            out[name][key] = converted
    return out


def parse_overrides(policy: str, text: str) -> dict:
    """'variant=official, merge=false' -> typed settings of `policy`; ValueError naming what is wrong."""
    specs = {s.name: s for s in settings_of(POLICIES[policy])}
    out = {}
    for part in [p.strip() for p in str(text or "").split(",") if p.strip()]:
        key, eq, value = (x.strip() for x in part.partition("="))
        if not eq:
            raise ValueError(f"Column settings are key=value pairs such as variant=official; got {part!r}.")
        if key not in specs:
            known = ", ".join(specs) or "none"
            raise ValueError(f"{POLICIES[policy].title} has no setting {key!r}; its settings are {known}.")
        out[key] = convert(policy, specs[key], value)
    return out


@dataclass
class Columns:
    """What the user asked to run: ticked policies at the main budget, plus extra configurations.

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
        main = _budget(self.budget_percent, "KV budget")
        out = [
            _build(n, main, self.settings.get(n, {}), POLICIES[n].title)
            for n in NAMES
            if n in (self.picked or [])
        ]
        for i, (name, budget, text) in enumerate(self.extras, 1):
            if _blank(name):
                continue
            if name not in POLICIES:
                raise ValueError(
                    f"Unknown policy {name!r} in extra column {i}; choose from {', '.join(NAMES)}."
                )
            where = f"Extra column {i} ({POLICIES[name].title})"
            try:
                given = self.settings.get(name, {}) | parse_overrides(name, text)
            except ValueError as exc:
                raise ValueError(f"{where} · settings: {exc}") from None
            share = main if _blank(budget) else _budget(budget, f"{where} · budget %")
            out.append(_build(name, share, given, where))
        if not out:
            raise ValueError("No policy selected: tick at least one cache policy or fill an extra column.")
        if limit is not None and len(out) > limit:
            raise ValueError(f"At most {limit} columns run at once; you asked for {len(out)}.")
        return out


def _build(name: str, budget: float, settings: dict, where: str):
    """`build`, its refusal prefixed with the column it is about (the policy's own says only the setting)."""
    try:
        return build(name, budget, **settings)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _budget(percent, where: str) -> float:
    """A budget % typed or slid on the page -> a fraction; ValueError naming the field `where`."""
    try:
        value = float(percent)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: must be a percentage from 1 to 100; got {percent!r}.") from None
    if not 1 <= value <= 100:  # also refuses nan
        raise ValueError(f"{where}: must be a percentage from 1 to 100; got {value:g}.")
    return value / 100


# -- building the controls (Gradio components) -----------------------------------------------
def _control(policy: str, s: Setting) -> gr.components.Component:
    label, elem_id = s.name.replace("_", " "), f"set-{policy}-{s.name}"
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
    if s.low is None or s.high is None:
        # No minimum/maximum for Gradio to check: `convert` checks the bounds and names the field.
        return gr.Number(default, label=label, info=s.help, elem_id=elem_id)
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
        "`variant=official`, or D2O at 40 %."
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
                    placeholder="e.g. variant=official, merge=false",
                    elem_id=f"extra-{i}-settings",
                )
            )
    return out


def extras_from_values(values: list) -> list[tuple]:
    return [tuple(values[i : i + 3]) for i in range(0, len(values), 3)]
