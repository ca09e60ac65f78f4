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

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from . import metrics as M
from .batching import RaggedBatch
from .cache import PolicyCache, PrefillCache, prefill_needs
from .capture import observing
from .events import EventLog
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


@dataclass
class _Run:
    """A policy's state while generating (private to one call)."""

    policy: Policy
    label: str
    cache: PolicyCache
    generator: torch.Generator
    prefill_seconds: float
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    decode_seconds: float = 0.0
    decode_steps: int = 0
    # Teacher-forced copy, forked at the first token that differs from the full cache's; while it is
    # None the run has read exactly what the full cache read.
    fork: PolicyCache | None = None
    drift: list = field(default_factory=list)
    logprobs: torch.Tensor | None = None  # the full cache's latest next-token log-probs (reference only)


def encode(lm: LoadedModel, prompt: str | Sequence[int], chat: bool) -> list[int]:
    """Token ids of the prompt (with the chat template when `chat` and the tokenizer has one)."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    tok = lm.tokenizer
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    else:
        ids = tok(prompt)["input_ids"]
    return [int(t) for t in ids]


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
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or positive; got {temperature!r}.")


def _forward(lm: LoadedModel, cache, input_ids: list[list[int]], positions: list[list[int]]) -> torch.Tensor:
    """Last-position logits [B, V] after feeding `input_ids` at `positions`, with `cache` observing."""
    device = lm.device
    with torch.no_grad(), observing(cache):
        out = lm.model(
            input_ids=torch.tensor(input_ids, device=device),
            position_ids=torch.tensor(positions, device=device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return out.logits[:, -1]


def _prefill(lm: LoadedModel, cache: PrefillCache, ids: list[int]) -> torch.Tensor:
    """The prompt's one forward pass: [V] logits for the first new token."""
    return _forward(lm, cache, [ids], [list(range(len(ids)))])[0]


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _decode(lm: LoadedModel, caches, tokens: list[int], step: int) -> torch.Tensor:
    """One decode step for several caches as one batch; returns [B, V] logits.

    `caches`: a list of `PolicyCache`s (any policies; attention then runs per row), or a
    `batching.StackedBatch` (one layout; attention runs once for all rows). Each token goes in
    at the position after every token its cache has seen (not after the entries it stores).
    The matrix products run once for all rows.
    """
    batch = caches if isinstance(caches, Cache) else RaggedBatch(caches)
    for cache in batch.caches:
        cache.step = step
    positions = [[cache.get_seq_length()] for cache in batch.caches]
    return _forward(lm, batch, [[t] for t in tokens], positions)


def _step(lm: LoadedModel, cache: PolicyCache, token: int, step: int) -> torch.Tensor:
    """`_decode` for one cache: [V] logits."""
    return _decode(lm, [cache], [token], step)[0]


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
) -> Iterator[Update]:
    """Generate with every policy from one shared prefill, yielding progress as it goes.

    attention : record the prompt's attention column sums into every result's `attention` frame
    (the page's attention view and run files); benchmarks and sweeps, which never draw it, turn it
    off so a policy that needs no attention (full, StreamingLLM) pays nothing for it.

    Yields `Update("status", text=...)` lines, `Update("token", label, text, step)` with each
    policy's text so far, and finally `Update("done", results={label: RunResult})`.
    Closing the generator stops the work (the UI's Stop button does this).
    """
    _check(lm, prompt, policies, max_new_tokens, temperature)
    ids = encode(lm, prompt, chat)
    if not ids:
        raise ValueError("The prompt has no tokens after tokenisation.")
    if len(ids) > lm.max_prompt_tokens:
        raise ValueError(
            f"The prompt has {len(ids)} tokens; the limit here is {lm.max_prompt_tokens} "
            "(set D2O_MAX_PROMPT_TOKENS to change it)."
        )
    policies = sorted(policies, key=lambda p: p.name != "full")  # the reference decodes first each step
    yield Update("status", text=f"Reading the prompt ({len(ids)} tokens) once for all policies...")
    start = time.perf_counter()
    needs = prefill_needs(policies)
    prefill = PrefillCache(lm.n_layers, **(needs | {"record": needs["record"] or attention}))
    logits = _prefill(lm, prefill, ids)
    prefill_seconds = time.perf_counter() - start
    runs = []
    for policy, label in zip(policies, result_labels(policies)):
        start = time.perf_counter()
        cache = PolicyCache.from_prefill(prefill, policy, extra=max_new_tokens + 1, log=EventLog())
        generator = torch.Generator().manual_seed(seed)
        run = _Run(policy, label, cache, generator, prefill_seconds + time.perf_counter() - start)
        run.tokens.append(_pick(logits, temperature, generator))
        run.done = run.tokens[-1] in lm.eos_ids
        runs.append(run)
    prompt_tokens = token_texts(lm, ids)
    shared = prompt_attention(prefill, lm.n_kv_heads, prompt_tokens) if attention else None
    del prefill
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
        logits = _decode(
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


def _advance(lm, run: _Run, logits: torch.Tensor, step: int, temperature: float, ref: _Run | None) -> None:
    """Take the run's next token; while it has read what the full cache read, that step is also drift."""
    run.tokens.append(_pick(logits, temperature, run.generator))
    run.decode_steps += 1
    run.done = run.tokens[-1] in lm.eos_ids
    if ref is not None and run.fork is None and step < len(ref.tokens):
        if run is ref:
            # Only this step's reference is ever needed: every comparison with it happens in this batch.
            ref.logprobs = torch.log_softmax(logits.float(), dim=-1)
        run.drift.append(_fidelity(ref, logits, step))


def _fidelity(ref: _Run, logits: torch.Tensor, step: int) -> tuple:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return (step, *M.step_fidelity(ref.logprobs, logprobs, ref.tokens[step]))


def _track_agreement(runs: list[_Run], ref: _Run, step: int) -> None:
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
