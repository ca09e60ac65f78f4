"""The public steps every generation loop shares, and the one per-row state they pass around.

What this module is: `encode` (prompt -> token ids), `prefill` (the prompt's one forward pass
into a `PrefillCache`), `compress` (step 0: a policy's `PolicyCache` from that prefill),
`decode_step` (one token for each of several caches, as one batch), `pick` (greedy or seeded
sampling) and `Row` (a policy's state while it generates). The comparison loop (runner.py),
batch serving (serving.py), the benchmarks (eval/) and `cache_for` (interop.py) build on these;
none of them reaches into another's private names.

What it is not: no policy maths (policies/, ops.py, evict.py), no result assembly
(run_result.py), no loop of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from .batching import RaggedBatch
from .cache import PolicyCache, PrefillCache
from .capture import observing
from .events import EventLog
from .models import LoadedModel
from .policies import Policy


@dataclass
class Row:
    """One policy's state while it generates for one prompt.

    The comparison loop uses the drift fields; batch serving uses `index` (the prompt's place) and
    `peak_entries` (the most entries the row holds while decoding, for admission under a KV cap).
    """

    policy: Policy
    label: str
    cache: PolicyCache
    generator: torch.Generator | None
    prefill_seconds: float = 0.0
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    decode_seconds: float = 0.0
    decode_steps: int = 0
    index: int = 0
    ids: list[int] = field(default_factory=list)  # the prompt's token ids
    peak_entries: int = 0
    # Teacher-forced copy, forked at the first token that differs from the full cache's; while it is
    # None the row has read exactly what the full cache read.
    fork: PolicyCache | None = None
    drift: list = field(default_factory=list)
    logprobs: torch.Tensor | None = None  # the full cache's latest next-token log-probs (reference only)

    def fresh(self, seed: int = 0) -> Row:
        """A copy as admitted (its compressed cache cloned, only the first token): to decode again."""
        generator = torch.Generator().manual_seed(seed)
        return Row(
            self.policy,
            self.label,
            self.cache.clone(),
            generator,
            self.prefill_seconds,
            self.tokens[:1],
            index=self.index,
            ids=self.ids,
            peak_entries=self.peak_entries,
        )


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


def encode_parts(
    lm: LoadedModel, context: str | Sequence[int], question: str | Sequence[int], chat: bool
) -> tuple[list[int], list[int]]:
    """Token ids of a context, and of the question fed after the context's compression.

    With the chat template, the user turn is the context, a blank line and the question; the ids up
    to the end of the context are the context's, the rest (the question, the turn's end and the
    assistant header) the question's. Each part is tokenised on its own (as kvpress does), so a
    token never straddles the two.
    """
    if not isinstance(context, str) or not isinstance(question, str):
        if isinstance(context, str) or isinstance(question, str):
            raise ValueError("context and question must both be text or both be token ids.")
        return [int(t) for t in context], [int(t) for t in question]
    tok, turn = lm.tokenizer, f"{context}\n\n{question}"
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            [{"role": "user", "content": turn}], add_generation_prompt=True, tokenize=False
        )
        cut = text.rindex(turn) + len(context)
        return _ids(tok, text[:cut]), _ids(tok, text[cut:])
    return _ids(tok, context), _ids(tok, turn[len(context) :])


def _ids(tok, text: str) -> list[int]:
    return [int(t) for t in tok(text, add_special_tokens=False)["input_ids"]]


def forward(lm: LoadedModel, cache, input_ids: list[list[int]], positions: list[list[int]]) -> torch.Tensor:
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


def hold(lm: LoadedModel, caches: list[PolicyCache], ids: list[int]) -> torch.Tensor:
    """Feed `ids` (a question) to every compressed cache in one forward pass; no compression evicts
    them. Returns [B, V] logits for each cache's first new token."""
    for cache in caches:
        cache.holding = True
    try:
        seen = caches[0].get_seq_length()
        return forward(
            lm, RaggedBatch(caches), [ids] * len(caches), [list(range(seen, seen + len(ids)))] * len(caches)
        )
    finally:
        for cache in caches:
            cache.holding = False


def prefill(lm: LoadedModel, cache: PrefillCache, ids: list[int]) -> torch.Tensor:
    """The prompt's one forward pass into `cache`: [V] logits for the first new token."""
    return forward(lm, cache, [ids], [list(range(len(ids)))])[0]


def compress(
    prefilled: PrefillCache, policy: Policy, extra: int, log: EventLog | None = None, hold: int = 0
) -> PolicyCache:
    """Step 0: `policy`'s compressed cache from a shared prefill.

    extra : room for the tokens still to come in layers that never evict.
    hold : room for entries fed after the compression that it may not evict (a question).
    """
    return PolicyCache.from_prefill(prefilled, policy, extra=extra, log=log or EventLog(), hold=hold)


def pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """The next token: argmax at temperature 0, else a seeded sample."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def decode_step(lm: LoadedModel, caches, tokens: list[int], step: int) -> torch.Tensor:
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
    return forward(lm, batch, [[t] for t in tokens], positions)
