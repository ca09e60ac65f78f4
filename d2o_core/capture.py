"""Hands each layer's attention probabilities to the request's cache without eager attention.

What this module is: one attention function registered with transformers'
`AttentionInterface` under `ATTENTION` ("d2o_sdpa"). Every attention layer of a model
loaded with `attn_implementation=ATTENTION` calls it. It computes the layer's output
with transformers' own SDPA function (fast, and bit for bit what "sdpa" gives), then,
when a cache is observing (a context variable set by `observing`), passes it the
layer's query and keys so the cache can compute just what its policy needs: chunked
prompt column sums at prefill, one probability row per step at decode.

What it is not: no model class is copied or patched; with no observer the function is
plain SDPA. The context variable is per thread / per task, so concurrent requests each
see their own cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import ops

ATTENTION = "d2o_sdpa"

_observer: ContextVar = ContextVar("d2o_observer", default=None)


@dataclass
class Ragged:
    """Keys (or values) of a batch whose rows hold different numbers of entries: [1, Hkv, S_b, D] each.

    Several policies decode as one batch: the model's matrix products run once for all rows,
    attention runs per row over that row's own cache.
    """

    rows: list[torch.Tensor]
    # On keys: which rows' observers need this layer's probabilities (attention then computes them
    # once for the output and the scores), and those probabilities ([1, Hkv, n_rep, S] or None per row).
    wants: list[bool] | None = None
    probs: list | None = None


@dataclass
class Padded:
    """Keys (or values) of a batch padded to one length: `tensor` [B, Hkv, S, D], `mask` [B, 1, 1, S].

    `mask` is True where a row holds an entry; rows of one layer may hold different counts.
    """

    tensor: torch.Tensor
    mask: torch.Tensor
    # Set on keys when the observer needs this layer's probabilities: attention then computes them once,
    # for its output and for the observer (`probs`, [B, Hkv, n_rep, S] float32), instead of SDPA + a redo.
    wants_probs: bool = False
    probs: torch.Tensor | None = None


def appended(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """The mask of `q` new tokens that are the last `q` of a cache's `S` entries: each sees every older
    entry and the new ones up to itself ([1, 1, q, S] bool); None when SDPA needs none (one token, or a
    prompt into an empty cache, which SDPA's own causal mask covers).

    The explorer's caches store entries by slot, not by position (evicted ones are gone), so
    transformers' position-based masks do not apply to them; this one counts from the end.
    """
    n_new, n_entries = query.shape[2], key.shape[2]
    if n_new == 1 or n_new == n_entries:
        return None
    return ops.appended_mask(n_new, n_entries, query.device)[None, None]


def wants_probs(observer, layer_idx: int) -> bool:
    """Whether `observer` scores from this layer's attention at this step (then computed once, here)."""
    ask = getattr(observer, "wants_probs", None)
    return ask is not None and ask(layer_idx)


def prompt_pass(query: torch.Tensor, key: torch.Tensor) -> bool:
    """A whole prompt into an empty cache (one row): every query, every key, causal."""
    return query.shape[0] == 1 and query.shape[2] == key.shape[2] > 1


def attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA output, then `observer.observe(layer_idx, query, key, scaling)` when one is active.

    query : [B, Hq, q, D]; key, value : [B, Hkv, S, D] (GQA not expanded), or `Padded` / `Ragged` rows.
    """
    scaling = module.scaling if scaling is None else scaling
    observer = _observer.get()
    if isinstance(key, Padded) and key.wants_probs:
        out, key.probs = ops.attend_one(query, key.tensor, value.tensor, scaling, key.mask[:, 0, 0])
    elif isinstance(key, Padded):
        out, _ = sdpa_attention_forward(
            module, query, key.tensor, value.tensor, key.mask, scaling=scaling, **kwargs
        )
    elif isinstance(key, Ragged):
        wants = key.wants or [False] * len(key.rows)
        key.probs, outs = [None] * len(key.rows), []
        for b, (q, k, v) in enumerate(zip(query.split(1), key.rows, value.rows)):
            if wants[b] and q.shape[2] == 1:
                out, key.probs[b] = ops.attend_one(q, k, v, scaling)
            else:
                out = sdpa_attention_forward(module, q, k, v, appended(q, k), scaling=scaling, **kwargs)[0]
            outs.append(out)
        out = torch.cat(outs)
    elif observer is not None and query.shape[2] == 1 and wants_probs(observer, module.layer_idx):
        out, probs = ops.attend_one(query, key, value, scaling)
        observer.observe(module.layer_idx, query, key, scaling, probs=probs)
        return out, None
    elif observer is not None and getattr(observer, "wants_column_sums", False) and prompt_pass(query, key):
        # The prompt's column sums and its output from one pass over the queries, not SDPA and a redo.
        out, col_sums = ops.prompt_attention(query, key, value, scaling)
        observer.observe(module.layer_idx, query, key, scaling, col_sums=col_sums)
        return out, None
    else:
        if observer is not None:  # the explorer's caches: one prompt, or new tokens after what they hold
            attention_mask = appended(query, key)
        elif attention_mask is None and 1 < query.shape[2] < key.shape[2]:
            # transformers' SDPA would drop the cached keys here (it assumes an empty cache).
            raise ValueError("several new tokens over a non-empty cache are not supported; feed one per step")
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if observer is not None:
        observer.observe(module.layer_idx, query, key, scaling)
    return out, None


AttentionInterface.register(ATTENTION, attention_forward)
# SDPA's masks too, so a model switched to this function is plain SDPA for any other cache (padded
# batches included). The explorer's own caches never need one: one prompt, then one token per row.
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def observe_with(observer) -> Token:
    """Route attention of the forward passes that follow to `observer.observe`; undo with `stop_observing`."""
    return _observer.set(observer)


def stop_observing(token: Token) -> None:
    _observer.reset(token)


@contextmanager
def observing(observer) -> Iterator[None]:
    """Route attention of forward passes inside this block to `observer.observe`."""
    token = observe_with(observer)
    try:
        yield
    finally:
        stop_observing(token)
