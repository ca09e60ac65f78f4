"""The JSON API behind `api_name="compare"`: texts and metrics per policy, for `gradio_client`.

What this module is: argument checks that name the field at fault (JSON has no int/float
distinction for whole numbers, so 64.0 is 64; a string is never a number) and one comparison
at the documented defaults. It runs what the page runs: `settings` ({"d2o": {"merge": "no"}}) are
read by the same parser as the page's and the CLI's (`d2o_core.policies.parse`, through
`policy_controls.Columns`), so a mistake gets the same sentence; `question` is kept whole (read after
the context's compression, never evicted by it). What it is not: no figures and no page state.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from d2o_core import limits, run_summary

from .compare_run import STREAM_EVERY_S, Sampling, stream_compare, within_time_limit
from .engine import Engine
from .errors import page_errors
from .policy_controls import Columns

API_POLICIES = ("full", "h2o", "d2o")  # the endpoint's defaults (layout.py's signature uses these)
API_BUDGET = 0.2
API_MAX_NEW_TOKENS = 64


def _kind(value) -> str:
    return f"{type(value).__name__} {value!r}"[:60]


def check_question(question) -> str | None:
    """The optional question: text, or None (blank means none: the whole prompt is compressed)."""
    if question is None:
        return None
    if not isinstance(question, str):
        raise ValueError(f"question must be text (a string) or null; got {_kind(question)}.")
    return question if question.strip() else None


def check_settings(settings, policies: list[str]) -> dict[str, dict]:
    """{policy: {setting: value}} for policies among `policies`; values are read when each is built."""
    if settings is None:
        return {}
    if not isinstance(settings, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in settings.items()
    ):
        example = '{"d2o": {"merge": "no"}}'
        raise ValueError(f"settings must be an object of objects such as {example}; got {_kind(settings)}.")
    unused = sorted(set(settings) - set(policies))
    if unused:
        listed = ", ".join(name[:40] for name in unused)
        raise ValueError(f"settings names {listed}, which is not among policies.")
    return settings


def check_args(prompt, policies, budget, max_new_tokens) -> tuple[str, list[str], float, int]:
    """The API's arguments checked by type, each problem a sentence naming the parameter."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be text (a string); got {_kind(prompt)}.")
    if not prompt.strip():
        raise ValueError("prompt is empty: send the text the model should continue.")
    if policies is None:
        policies = API_POLICIES
    if not isinstance(policies, (list, tuple)) or not all(isinstance(p, str) for p in policies):
        raise ValueError(
            f'policies must be a list of names such as ["full", "h2o", "d2o"]; got {_kind(policies)}.'
        )
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a number, a fraction in (0, 1] such as 0.2; got {_kind(budget)}.")
    if not 0.01 <= budget <= 1:  # what the page allows (1-100 %), said in the API's own unit
        raise ValueError(f"budget is a fraction from 0.01 to 1, e.g. 0.2 for 20 %; got {budget}.")
    whole = isinstance(max_new_tokens, int) or (
        isinstance(max_new_tokens, float) and max_new_tokens.is_integer()
    )
    if isinstance(max_new_tokens, bool) or not whole:
        raise ValueError(f"max_new_tokens must be a whole number such as 64; got {_kind(max_new_tokens)}.")
    limits.check_request(len(policies), int(max_new_tokens))  # the API no looser than the page
    return prompt, list(policies), float(budget), int(max_new_tokens)


def api_stream(
    engine: Engine,
    prompt: str,
    policies: list[str] | tuple[str, ...] | None = API_POLICIES,
    budget: float = API_BUDGET,
    max_new_tokens: int = API_MAX_NEW_TOKENS,
    question: str | None = None,
    settings: dict | None = None,
) -> Iterator[dict]:
    """`{"status": ...}` lines while the run goes (at most every `STREAM_EVERY_S`), then the result.

    A generator, not one call, so that the server can end the run between two of its updates: when
    the client disconnects, Gradio closes this generator and the model is free within a step; a
    plain function would decode to the end for nobody. `gradio_client`'s `predict` returns the last
    item, the result.
    """
    with page_errors("Generation"):
        prompt, policies, budget, max_new_tokens = check_args(prompt, policies, budget, max_new_tokens)
        question = check_question(question)
        given = check_settings(settings, policies)
        chosen = Columns(policies, 100 * budget, given).policies(limit=None)  # no page columns to fill
        lm = engine.get()
        stream = stream_compare(lm, prompt, chosen, max_new_tokens, Sampling(), question)
        sent = time.monotonic()
        for update in within_time_limit(stream):
            if update.kind == "done":
                results = update.results
            elif time.monotonic() - sent >= STREAM_EVERY_S:
                sent = time.monotonic()
                yield {"status": f"step {update.step or 0} of {max_new_tokens}"}
    yield run_summary.jsonable(
        {"results": {label: {"text": res.text, "metrics": res.metrics} for label, res in results.items()}}
    )


def api_compare(*args, **kwargs) -> dict:
    """Texts and metrics per policy (budget as a fraction, e.g. 0.2); no figures are drawn.

    Only the prompt is needed: policies default to full, h2o and d2o, budget to 0.2, 64 new tokens,
    no question (the whole prompt is compressed) and each policy's default settings.
    question : kept whole: the prompt is then the context, which is compressed; the question is read
        after the compression and never evicted by it.
    settings : per policy, e.g. {"d2o": {"variant": "official", "protected_layers": "0,1"},
        "h2o": {"compress_every": 0}}; values as JSON or as text ("no", "0,1").
    Arguments as `api_stream`'s; this returns its last item.
    """
    *_, result = api_stream(*args, **kwargs)
    return result
