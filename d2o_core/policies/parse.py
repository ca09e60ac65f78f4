"""Reading policy settings from text: one parser for the CLI, the page, the API and run files.

What this module is: `parse_value` turns what a person typed (or JSON gave) into a setting's type,
from the `Setting` its field declares (`base.settings_of`): "no" -> False, "0,1" -> (0, 1),
"0.25" -> 0.25, blank -> None where the setting allows it. `parse_pairs` reads a column's
"variant=official, protected_layers=0,1" (a comma starts a new pair only before `name=`), and
`parse_assignments` the CLI's `d2o.merge=no`. Bounds and choices are not checked here but where
every path ends: the policy's own `base.check_setting` when it is built, so the same mistake gets
the same sentence from every surface.

What it is not: no defaults (the policy's) and no page controls (ui/policy_controls.py).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from . import POLICIES
from .base import Setting, settings_of

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NEXT_PAIR = re.compile(r"[,;]\s*(?=[A-Za-z_]\w*\s*=)")


def blank(value) -> bool:
    """None, NaN or only spaces: "the policy decides"."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def parse_value(s: Setting, value) -> Any:
    """`value` (text, JSON or already typed) as setting `s`'s type; ValueError naming `s` otherwise."""
    name, shown = s.name, repr(value)[:40]
    if blank(value):
        if s.optional:
            return None
        raise ValueError(f"{name} needs a value ({s.help}).")
    if s.kind == "bool":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in TRUE + FALSE:
            return word in TRUE
        raise ValueError(f"{name} must be true or false (yes/no, on/off); got {shown}.")
    if s.kind == "layers":
        return _layers(name, value)
    if s.kind == "choice":
        return str(value).strip()
    return _number(name, s.kind == "int", value)


def _layers(name: str, value) -> tuple[int, ...]:
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        parts = [p.strip() for p in re.split(r"[,;\s]+", text) if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        return tuple(_number(name, True, p) for p in parts)
    except ValueError:
        raise ValueError(
            f"{name} must be layer numbers such as 0, 1, -1 (negative from the end); got {repr(value)[:40]}."
        ) from None


def _number(name: str, whole: bool, value) -> int | float:
    shown = repr(value)[:40]
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number; got {shown}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; got {shown}.") from None
    if not math.isfinite(number):  # "nan" would pass every bound check
        raise ValueError(f"{name} must be a number; got {shown}.")
    if whole:
        if not number.is_integer():
            raise ValueError(f"{name} must be a whole number; got {shown}.")
        return int(number)
    return number


def specs(policy: str) -> dict[str, Setting]:
    """{setting name: Setting} of a registered policy; ValueError for an unknown one."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy[:40]!r}; choose from {', '.join(POLICIES)}.")
    return {s.name: s for s in settings_of(POLICIES[policy])}


def parse_settings(policy: str, raw: dict) -> dict:
    """{name: typed value} from {name: text or JSON value}; blanks of optional settings left out."""
    known = specs(policy)
    out = {}
    for key, value in raw.items():
        if key not in known:
            listed = ", ".join(known) or "none"
            raise ValueError(
                f"{POLICIES[policy].title} has no setting {str(key)[:40]!r}; its settings are {listed}."
            )
        typed = parse_value(known[key], value)
        if typed is not None:
            out[key] = typed
    return out


def parse_pairs(policy: str, text: str) -> dict:
    """'variant=official, protected_layers=0,1' -> typed settings of `policy`."""
    raw = {}
    for part in [p.strip() for p in _NEXT_PAIR.split(str(text or "")) if p.strip()]:
        key, eq, value = (x.strip() for x in part.partition("="))
        if not eq or not key:
            raise ValueError(f"settings are name=value pairs such as variant=official; got {part[:40]!r}.")
        raw[key] = value
    return parse_settings(policy, raw)


def parse_assignments(items: list[str]) -> dict[str, dict]:
    """The CLI's `--set` items -> typed settings per policy.

    `["d2o.merge=no", "d2o.protected_layers=0,1"]` -> {"d2o": {"merge": False, "protected_layers": (0, 1)}};
    a value may also be JSON (`d2o.protected_layers=[0,1]`).
    """
    raw: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        policy, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(
                f"--set takes policy.setting=value, e.g. d2o.variant=official; got {item[:60]!r}."
            )
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        raw.setdefault(policy, {})[name.strip()] = value
    return {policy: parse_settings(policy, settings) for policy, settings in raw.items()}
