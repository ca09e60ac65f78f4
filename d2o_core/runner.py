"""The generation loop: one shared prefill, then per-policy decoding, streamed step by step.

What this module is: `iter_compare` (a generator of `Update`s: status lines, each
policy's partial text per step, then the results), and the plain forms built on it,
`compare` and `generate`. The prompt is processed once for all policies (the forward
pass is identical; only the compression of its cache differs); the policies then decode
together, one batch row each over its own compressed cache, so the UI can stream every
column at once. When the full cache runs too, each other policy is also measured
teacher-forced on the full cache's tokens: its free run is that measurement until its
first different token, where a copy of its cache is forked and fed the full cache's
tokens from then on (in the same batches).

The prefill always records the prompt's attention column sums (one `attention` frame per
comparison, shared by every result: the explorer is for seeing); batch serving does not.

What it is not: no policy maths (policies/, ops.py), no figures, no result assembly
(run_result.py). One prompt at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from . import metrics as M
from .cache import PrefillCache, prefill_needs
from .engine import Row, compress, decode_step, encode, encode_parts, hold, pick, prefill
from .events import EventLog
from .limits import check_prompt_chars
from .models import LoadedModel
from .policies import Policy
from .run_result import RunResult, decode_text, make_result, prompt_attention, token_texts

MAX_NEW_TOKENS = 2048


@dataclass
class Update:
    """One item of `iter_compare`: kind is "status", "token" or "done"."""

    kind: str
    label: str = ""
    text: str = ""
    step: int = 0
    results: dict[str, RunResult] | None = None


def result_labels(policies: Sequence[Policy]) -> list[str]:
    """Each policy's key in the results: its label, plus "@<budget>%" where only budgets tell runs apart."""
    labels = [p.label for p in policies]
    keys = [(p.label, None if p.name == "full" else p.budget) for p in policies]
    if len(set(keys)) != len(keys):
        twice = sorted({label for label, key in zip(labels, keys) if keys.count(key) > 1})
        raise ValueError(f"Each policy may run once per comparison; duplicated: {twice}.")
    return [
        f"{label}@{100 * p.budget:g}%" if labels.count(label) > 1 else label
        for label, p in zip(labels, policies)
    ]


def _check(lm: LoadedModel, prompt, policies, max_new_tokens, temperature) -> None:
    if isinstance(prompt, str) and not prompt.strip():
        raise ValueError("The prompt is empty: type a prompt or pick an example.")
    if not policies:
        raise ValueError("No policy selected: choose at least one cache policy to run.")
    if not all(isinstance(p, Policy) for p in policies):
        raise ValueError("policies must be Policy objects, e.g. d2o_core.POLICIES['h2o'](budget=0.2).")
    result_labels(policies)
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or not 1 <= max_new_tokens <= MAX_NEW_TOKENS
    ):
        raise ValueError(
            f"max_new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS}; got {max_new_tokens!r}."
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 <= temperature < math.inf
    ):
        raise ValueError(f"temperature must be 0 (greedy) or positive; got {temperature!r}.")


def iter_compare(
    lm: LoadedModel,
    prompt: str | Sequence[int],
    policies: Sequence[Policy],
    *,
    max_new_tokens: int = 64,
    chat: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
    fidelity: bool = True,
    attention: bool = True,
    question: str | Sequence[int] | None = None,
) -> Iterator[Update]:
    """Generate with every policy from one shared prefill, yielding progress as it goes.

    question : kept whole: `prompt` is then the context, which every policy compresses; the question
    (with the chat template's end of turn and assistant header) is fed after the compression, and
    that compression cannot evict it (kvpress's convention). Without it the whole prompt is compressed.

    attention : record the prompt's attention column sums into every result's `attention` frame
    (the page's attention view and run files); benchmarks and sweeps, which never draw it, turn it
    off so a policy that needs no attention (full, StreamingLLM) pays nothing for it.

    Yields `Update("status", text=...)` lines, `Update("token", label, text, step)` with each
    policy's text so far, and finally `Update("done", results={label: RunResult})`.
    Closing the generator stops the work (the UI's Stop button does this).
    """
    _check(lm, prompt, policies, max_new_tokens, temperature)
    if question is not None and isinstance(question, str) and not question.strip():
        question = None  # a blank question box: the whole prompt is compressed
    check_prompt_chars(prompt, question, lm.max_prompt_tokens)  # before tokenising: 10 MB took 10 s
    ids, held = (
        encode_parts(lm, prompt, question, chat) if question is not None else (encode(lm, prompt, chat), [])
    )
    if not ids:
        raise ValueError("The prompt has no tokens after tokenisation.")
    if len(ids) + len(held) > lm.max_prompt_tokens:
        raise ValueError(
            f"The prompt has {len(ids) + len(held)} tokens; the limit here is {lm.max_prompt_tokens} "
            "(set D2O_MAX_PROMPT_TOKENS to change it)."
        )
    policies = sorted(policies, key=lambda p: p.name != "full")  # the reference decodes first each step
    yield Update("status", text=f"Reading the prompt ({len(ids)} tokens) once for all policies...")
    start = time.perf_counter()
    needs = prefill_needs(policies)
    prompt_cache = PrefillCache(lm.n_layers, **(needs | {"record": needs["record"] or attention}))
    logits = prefill(lm, prompt_cache, ids)
    prefill_seconds = time.perf_counter() - start
    runs = []
    for policy, label in zip(policies, result_labels(policies)):
        start = time.perf_counter()
        cache = compress(prompt_cache, policy, extra=max_new_tokens + 1, log=EventLog(), hold=len(held))
        generator = torch.Generator().manual_seed(seed)
        runs.append(Row(policy, label, cache, generator, prefill_seconds + time.perf_counter() - start))
    firsts = [logits] * len(runs)
    if held:
        yield Update("status", text=f"Reading the question ({len(held)} tokens), kept whole...")
        start = time.perf_counter()
        firsts = hold(lm, [run.cache for run in runs], held)
        for run in runs:
            run.prefill_seconds += time.perf_counter() - start
    for run, first in zip(runs, firsts):
        run.tokens.append(pick(first, temperature, run.generator))
        run.done = run.tokens[-1] in lm.eos_ids
    prompt_tokens = token_texts(lm, ids + held)
    context_tokens = prompt_tokens[: len(ids)]
    shared = prompt_attention(prompt_cache, lm.n_kv_heads, context_tokens) if attention else None
    del prompt_cache
    ref = runs[0] if runs[0].policy.name == "full" and fidelity else None
    for run in runs:
        yield Update("token", run.label, decode_text(lm, run.tokens), 0)
    for step in range(1, max_new_tokens):
        free = [r for r in runs if not r.done]
        if not free:
            break
        # Forked copies read the full cache's tokens; they run while the full cache does.
        forced = [r for r in runs if r.fork is not None and not ref.done] if ref is not None else []
        start = time.perf_counter()
        logits = decode_step(
            lm,
            [r.cache for r in free] + [r.fork for r in forced],
            [r.tokens[-1] for r in free] + [ref.tokens[step - 1] for _ in forced],
            step,
        )
        for run, row in zip(free, logits):  # the full cache first: the others compare with it
            _advance(lm, run, row, step, temperature, ref)
        for run, row in zip(forced, logits[len(free) :]):
            run.drift.append(_fidelity(ref, row, step))
        elapsed = time.perf_counter() - start
        for run in free:
            run.decode_seconds += elapsed  # the batch's wall time: the policies decode together
        if ref is not None:
            _track_agreement(runs, ref, step)
        for run in free:
            yield Update("token", run.label, decode_text(lm, run.tokens), step)
    results = {r.label: make_result(lm, prompt_tokens, r, ref is not None, shared) for r in runs}
    yield Update("done", results=results)


def _advance(lm, run: Row, logits: torch.Tensor, step: int, temperature: float, ref: Row | None) -> None:
    """Take the run's next token; while it has read what the full cache read, that step is also drift."""
    run.tokens.append(pick(logits, temperature, run.generator))
    run.decode_steps += 1
    run.done = run.tokens[-1] in lm.eos_ids
    if ref is not None and run.fork is None and step < len(ref.tokens):
        if run is ref:
            # Only this step's reference is ever needed: every comparison with it happens in this batch.
            ref.logprobs = torch.log_softmax(logits.float(), dim=-1)
        run.drift.append(_fidelity(ref, logits, step))


def _fidelity(ref: Row, logits: torch.Tensor, step: int) -> tuple:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return (step, *M.step_fidelity(ref.logprobs, logprobs, ref.tokens[step]))


def _track_agreement(runs: list[Row], ref: Row, step: int) -> None:
    """After `step`, fork every run whose latest token differs from the full cache's."""
    for run in runs[1:]:
        if run.fork is not None or step >= len(ref.tokens):
            continue
        if step >= len(run.tokens) or run.tokens[step] != ref.tokens[step]:
            run.fork = run.cache.clone()


def compare(
    lm: LoadedModel,
    prompt: str | Sequence[int],
    policies: Sequence[Policy],
    *,
    on_update: Callable[[Update], None] | None = None,
    **kwargs,
) -> dict[str, RunResult]:
    """Run every policy on one shared prefill; returns {policy label: RunResult}.

    Keyword arguments are those of `iter_compare`; `on_update` sees every streamed `Update`.
    """
    for update in iter_compare(lm, prompt, policies, **kwargs):
        if on_update is not None:
            on_update(update)
        if update.kind == "done":
            return update.results
    raise RuntimeError("generation ended without results")


def generate(lm: LoadedModel, prompt: str | Sequence[int], policy: Policy, **kwargs) -> RunResult:
    """Generate with one policy (greedy by default); keyword arguments as in `iter_compare`."""
    return next(iter(compare(lm, prompt, [policy], **kwargs).values()))
