"""Batch serving under a KV-memory cap: many prompts, one policy, decoded together.

What this module is: `serve_batch`, the measurement behind D2O's headline claim. Prompts
are admitted one at a time (prefill, then compress to the policy's budget) while the
decode-time KV of every admitted row stays under `kv_cap_mb`; the admitted rows then decode
as one batch, each over its own compressed cache, until each stops (EOS or `max_new_tokens`).
Prompts that did not fit wait for the next wave. A compressed row is smaller, so more rows fit
under the same cap, and a batch of rows reads the model's weights once per step: that, not a
faster single sequence, is where the throughput comes from.

Memory is counted in stored entries (key + value, every kv-head), honestly: a capped layer
holds `budget + 1` entries while a step's new token is in it, an uncapped layer (the full
cache, D2O's protected layers) holds the whole prompt plus every new token, and admitting a
prompt briefly holds its whole uncompressed prefill on top of the rows already admitted.

What it is not: a serving engine (no scheduler, no paging, greedy or seeded sampling only).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .batching import RaggedBatch, StackedBatch, can_stack
from .cache import PolicyCache, PrefillCache, prefill_needs
from .engine import Row, compress, decode_step, encode, pick, prefill
from .events import EventLog
from .limits import check_prompt_chars
from .models import LoadedModel
from .policies import Policy
from .run_result import decode_text

MB = 1024 * 1024


@dataclass
class BatchResult:
    """Per-row texts and token ids (in the order of the prompts), and one metrics record."""

    texts: list[str]
    token_ids: list[list[int]]
    metrics: dict
    waves: list[dict] = field(default_factory=list)  # one metrics record per decoded batch


def entry_bytes(lm: LoadedModel) -> int:
    """Bytes of one stored entry (key + value over all kv-heads) in one layer."""
    return 2 * lm.n_kv_heads * lm.head_dim * torch.empty((), dtype=lm.dtype).element_size()


def decode_entries(cache: PolicyCache, n_prompt: int, new_tokens: int) -> int:
    """The most entries `cache` holds at once while decoding `new_tokens` tokens (all layers)."""
    longest = n_prompt + new_tokens  # the token fed at the last step included
    room = new_tokens if cache.every == 0 else cache.every  # how far past its budget a layer grows
    return sum(
        longest if layer.plan.budget is None else min(layer.plan.budget + room, longest)
        for layer in cache.layers
    )


def full_cache_mb(lm: LoadedModel, n_prompt: int, new_tokens: int) -> float:
    """KV of ONE full-cache row of this length: the default cap."""
    return lm.n_layers * (n_prompt + new_tokens) * entry_bytes(lm) / MB


def cap_too_small(cap_mb: float, row_mb: float, policy: Policy) -> ValueError:
    """The sentence for a cap that does not hold even one compressed row."""
    return ValueError(
        f"The KV cap of {cap_mb:.1f} MB is smaller than one compressed row, which needs "
        f"{row_mb:.1f} MB at {policy.label} {100 * policy.budget:g} % budget; "
        "raise kv_cap_mb or lower the budget."
    )


def _check(prompts, policy, max_new_tokens, kv_cap_mb, batch) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts (strings or token-id lists).")
    if not isinstance(policy, Policy):
        raise ValueError("policy must be a Policy object, e.g. d2o_core.POLICIES['d2o'](budget=0.2).")
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not whole(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1; got {max_new_tokens!r}.")
    if kv_cap_mb is not None and (
        isinstance(kv_cap_mb, bool) or not isinstance(kv_cap_mb, (int, float)) or not kv_cap_mb > 0
    ):
        raise ValueError(f"kv_cap_mb must be a positive number of MB; got {kv_cap_mb!r}.")
    if batch is not None and (not whole(batch) or batch < 1):
        raise ValueError(f"batch must be a whole number >= 1; got {batch!r}.")


def serve_batch(
    lm: LoadedModel,
    prompts: Sequence[str | Sequence[int]],
    policy: Policy,
    *,
    max_new_tokens: int = 32,
    kv_cap_mb: float | None = None,
    batch: int | None = None,
    chat: bool = True,
    stop_at_eos: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BatchResult:
    """Decode `prompts` with one `policy`, as many rows at a time as fit under `kv_cap_mb`.

    Parameters
    ----------
    kv_cap_mb : decode-time KV memory allowed for all rows of a batch together; default: the full
        cache of ONE row as long as the longest prompt plus `max_new_tokens`.
    batch : admit exactly this many rows per batch regardless of the cap (for batch-size sweeps);
        the memory figures are still reported.
    stop_at_eos : rows stop at the model's EOS; False makes every row decode `max_new_tokens`
        (equal work, for benchmarks).

    Returns
    -------
    `BatchResult`: texts and token ids per prompt, and metrics: policy, budget, batch (rows of the
    largest batch), rows, new_tokens, tokens_per_second (generated tokens over decode wall time),
    decode_ms_per_step, decode_seconds, prefill_seconds, kv_mb_cap, kv_mb_decode_peak,
    kv_mb_admission_peak, rss_mb (the process's peak resident memory so far).
    """
    _check(prompts, policy, max_new_tokens, kv_cap_mb, batch)
    say = progress or (lambda text: None)
    for p in prompts:  # before tokenising any: a huge text is refused at once
        check_prompt_chars(p, None, lm.max_prompt_tokens)
    ids = [encode(lm, p, chat) for p in prompts]
    if any(not row for row in ids):
        raise ValueError("A prompt is empty after tokenisation; every row needs at least one token.")
    longest = max(len(row) for row in ids)
    if longest > lm.max_prompt_tokens:
        raise ValueError(f"A prompt has {longest} tokens; the limit here is {lm.max_prompt_tokens}.")
    per_entry = entry_bytes(lm)
    cap_mb = float(kv_cap_mb) if kv_cap_mb is not None else full_cache_mb(lm, longest, max_new_tokens)
    cap = cap_mb * MB
    texts, tokens = [None] * len(ids), [None] * len(ids)
    waves, waiting = [], list(range(len(ids)))
    admission_peak, pending = 0, None  # pending: a row admitted but not fitting its wave keeps its prefill
    while waiting:
        rows, held = [], 0
        while waiting and (batch is None or len(rows) < batch):
            index = waiting[0]
            row, prefill_entries = pending or admit(
                lm, index, ids[index], policy, max_new_tokens, temperature, seed
            )
            pending = None
            need = row.peak_entries * per_entry
            if batch is None and held + need > cap:
                if not rows:
                    raise cap_too_small(cap_mb, need / MB, policy)
                pending = (row, prefill_entries)
                break
            waiting.pop(0)
            compressed = row.cache.stored_entries() * per_entry
            admission_peak = max(admission_peak, held + prefill_entries * per_entry + compressed)
            held += need
            rows.append(row)
            say(f"admitted row {index + 1}/{len(ids)} ({len(rows)} in this batch, {held / MB:.1f} MB)")
        wave = decode_rows(lm, rows, max_new_tokens, temperature, stop_at_eos, say)
        wave |= {"kv_mb_decode_peak": held / MB}
        waves.append(wave)
        for row in rows:
            tokens[row.index] = row.tokens
            texts[row.index] = decode_text(lm, row.tokens)
    metrics = _summary(policy, waves, cap_mb, admission_peak / MB)
    return BatchResult(texts, tokens, metrics, waves)


def admit(lm, index, ids, policy, max_new_tokens, temperature=0.0, seed=0) -> tuple[Row, int]:
    """Prefill one prompt and compress it: its row, and the entries its prefill held."""
    rows, prefill_entries = admit_shared(lm, index, ids, [policy], max_new_tokens, temperature, seed)
    return rows[0], prefill_entries


def admit_shared(
    lm, index: int, ids: list[int], policies: Sequence[Policy], max_new_tokens: int, temperature=0.0, seed=0
) -> tuple[list[Row], int]:
    """Prefill one prompt ONCE and compress it for each policy: one row per policy, and the entries
    the prefill held. Each row's `prefill_seconds` is the shared prefill plus its own compression,
    what admitting it alone would have cost; its cache is what `serve_batch` would have built."""
    start = time.perf_counter()
    prompt_cache = PrefillCache(lm.n_layers, **prefill_needs(policies))
    logits = prefill(lm, prompt_cache, ids)
    shared = time.perf_counter() - start
    rows = []
    for policy in policies:
        start = time.perf_counter()
        cache = compress(prompt_cache, policy, extra=max_new_tokens + 1, log=EventLog(enabled=False))
        generator = torch.Generator().manual_seed(seed)
        first = pick(logits, temperature, generator)
        peak = decode_entries(cache, len(ids), max_new_tokens)
        seconds = shared + time.perf_counter() - start
        row = Row(
            policy, policy.label, cache, generator, seconds, [first], index=index, ids=ids, peak_entries=peak
        )
        rows.append(row)
    return rows, lm.n_layers * len(ids)


def decode_rows(lm, rows: list[Row], max_new_tokens, temperature=0.0, stop_at_eos=True, say=None) -> dict:
    """Decode admitted rows together until each stops; returns the batch's timing record
    (batch, steps, generated, decode_seconds, prefill_seconds). The rows' caches are used up."""
    say = say or (lambda text: None)
    for row in rows:
        row.done = stop_at_eos and row.tokens[-1] in lm.eos_ids
    steps = generated = 0
    start = time.perf_counter()
    batch, members = None, None
    for step in range(1, max_new_tokens):
        live = [row for row in rows if not row.done]
        if not live:
            break
        if [row.index for row in live] != members:  # rows joined or left: restack (one copy)
            caches = [row.cache for row in live]
            batch = StackedBatch(caches) if can_stack(caches) else RaggedBatch(caches)
            members = [row.index for row in live]
        logits = decode_step(lm, batch, [row.tokens[-1] for row in live], step)
        for row, row_logits in zip(live, logits):
            row.tokens.append(pick(row_logits, temperature, row.generator))
            row.done = len(row.tokens) >= max_new_tokens or (stop_at_eos and row.tokens[-1] in lm.eos_ids)
        steps, generated = steps + 1, generated + len(live)
        if step % 8 == 0:
            say(f"decoding {len(live)} rows: step {step}/{max_new_tokens - 1}")
    seconds = time.perf_counter() - start
    return {
        "batch": len(rows),
        "steps": steps,
        "generated": generated,
        "decode_seconds": seconds,
        "prefill_seconds": sum(row.prefill_seconds for row in rows),
    }


def _summary(policy: Policy, waves: list[dict], cap_mb: float, admission_peak_mb: float) -> dict:
    steps = sum(w["steps"] for w in waves)
    generated = sum(w["generated"] for w in waves)
    seconds = sum(w["decode_seconds"] for w in waves)
    return {
        "policy": policy.label,
        "budget": policy.budget,
        "batch": max(w["batch"] for w in waves),
        "rows": sum(w["batch"] for w in waves),
        "new_tokens": generated + sum(w["batch"] for w in waves),  # the first tokens come from prefill
        "tokens_per_second": generated / seconds if seconds > 0 else math.nan,
        "decode_ms_per_step": 1000 * seconds / steps if steps else math.nan,
        "decode_seconds": seconds,
        "prefill_seconds": sum(w["prefill_seconds"] for w in waves),
        "kv_mb_cap": cap_mb,
        "kv_mb_decode_peak": max(w["kv_mb_decode_peak"] for w in waves),
        "kv_mb_admission_peak": admission_peak_mb,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # the process's peak (Linux: KB)
    }
