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
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

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


def attend_with_probs(query, key: Padded, value: Padded, scaling: float) -> torch.Tensor:
    """Attention output [B, 1, Hq, D] (SDPA's layout) from explicit probabilities, kept on `key.probs`."""
    n_rows, n_q, _, dim = query.shape
    key.probs = ops.attention_probs(query, key.tensor, key.mask[:, 0, 0], scaling)
    out = torch.matmul(key.probs.to(value.tensor.dtype), value.tensor)  # [B, Hkv, n_rep, D]
    return out.reshape(n_rows, 1, n_q, dim)


def attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA output, then `observer.observe(layer_idx, query, key, scaling)` when one is active.

    query : [B, Hq, q, D]; key, value : [B, Hkv, S, D] (GQA not expanded), or `Padded` / `Ragged` rows.
    """
    scaling = module.scaling if scaling is None else scaling
    if isinstance(key, Padded) and key.wants_probs:
        out = attend_with_probs(query, key, value, scaling)
    elif isinstance(key, Padded):
        out, _ = sdpa_attention_forward(
            module, query, key.tensor, value.tensor, key.mask, scaling=scaling, **kwargs
        )
    elif isinstance(key, Ragged):
        rows = zip(query.split(1), key.rows, value.rows)
        out = torch.cat(
            [sdpa_attention_forward(module, q, k, v, None, scaling=scaling, **kwargs)[0] for q, k, v in rows]
        )
    else:
        if attention_mask is None and 1 < query.shape[2] < key.shape[2]:
            # transformers' SDPA would drop the cached keys here (it assumes an empty cache).
            raise ValueError("several new tokens over a non-empty cache are not supported; feed one per step")
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    observer = _observer.get()
    if observer is not None:
        observer.observe(module.layer_idx, query, key, scaling)
    return out, None


AttentionInterface.register(ATTENTION, attention_forward)


@contextmanager
def observing(observer) -> Iterator[None]:
    """Route attention of forward passes inside this block to `observer.observe`."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)
