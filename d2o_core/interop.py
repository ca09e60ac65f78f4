"""Any policy inside an unmodified `model.generate()`: `cache_for(model, policy)`.

What this module is: `GenerateCache`, a transformers `Cache` that plays the explorer's engine
inside someone else's generation loop. It holds a plain growing prompt cache until the prefill's
last layer has attended, then compresses it exactly as the explorer does (`PolicyCache.from_prefill`,
step 0) and from then on is that `PolicyCache`: one entry in per decode step, scores updated and one
entry evicted (or merged) per kv-head when a layer is over budget. Greedy tokens therefore equal
`d2o_core.generate` on the same prompt token ids, and a budget of 1.0 equals plain `generate()`.

How it reaches the attention without patching anything:
- the model's attention implementation is switched, on this model instance, to the explorer's
  registered function (`capture.ATTENTION`, registered with `transformers.AttentionInterface`, and a
  mask function registered for it with `AttentionMaskInterface`). With no cache observing it is plain
  SDPA with SDPA's masks, so other `generate()` calls on the same model are unchanged;
- a forward pre-hook and a forward hook on the model instance (PyTorch's public hooks, removed when the
  cache is garbage-collected) route that forward pass's attention to this cache when, and only when,
  the pass was given this cache. The pre-hook also refuses what the cache cannot serve, before any token.

What it is not: a serving engine. One sequence per cache (batch 1, no padding); no beam search, no
assisted decoding (`crop`), no sliding-window or soft-capped attention. Each is refused with one
sentence. See docs/engine.md for how a run flows through the engine.
"""

from __future__ import annotations

import time
import weakref

import torch
from transformers.cache_utils import Cache

from . import capture
from .cache import PolicyCache, PrefillCache, prefill_needs
from .engine import Row
from .events import EventLog
from .models import LoadedModel, from_model
from .policies import Policy
from .run_result import RunResult, make_result, prompt_attention, token_texts

# Room for generated tokens in layers that never evict; a layer that outgrows it doubles (`PolicyCache.grow`).
EXTRA = 256


class Unsupported(ValueError):
    """What `GenerateCache` cannot serve, said in one sentence before any token."""


def cache_for(model, policy: Policy, tokenizer=None) -> GenerateCache:
    """A transformers `Cache` that runs `policy` inside an unmodified `model.generate()`.

    Parameters
    ----------
    model : a transformers causal LM (any Llama/Mistral/Qwen-style model with full attention), or a
        `LoadedModel` from `d2o_core.load_model`. Its attention implementation is switched to the
        explorer's registered SDPA function (plain SDPA when no such cache is attached).
    policy : a registered policy, e.g. `d2o_core.POLICIES["d2o"](budget=0.2)`.
    tokenizer : optional; lets `result()` decode token texts (a `LoadedModel` brings its own).

    Use one cache per `generate()` call::

        cache = cache_for(model, POLICIES["h2o"](budget=0.2))
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
        cache.result(out)      # RunResult: events, steps, layer budgets, metrics

    To keep a question whole (compress the context only, then read the question), read the context
    first; the next forward pass with several tokens, before any is generated, is held::

        model(context_ids, past_key_values=cache)                     # prefill, then compress
        out = model.generate(torch.cat([context_ids, question_ids], 1), past_key_values=cache, ...)

    Raises `ValueError` (as `Unsupported`) for models it cannot serve (sliding-window layers,
    attention soft-capping) and, before the first token, for inputs it cannot serve.
    """
    if not isinstance(policy, Policy):
        raise ValueError("policy must be a Policy object, e.g. d2o_core.POLICIES['h2o'](budget=0.2).")
    if isinstance(model, LoadedModel):
        lm = model
    else:
        try:
            lm = from_model(model, tokenizer, name=getattr(model.config, "_name_or_path", "") or "custom")
        except ValueError as err:
            raise Unsupported(str(err)) from err
    return GenerateCache(lm, policy)


class GenerateCache(Cache):
    """A policy's cache for `model.generate()`: prompt cache until step 0, then the policy's `PolicyCache`.

    After generation, `result(output)` gives the run as a `RunResult` (what the explorer's figures,
    `show --html` and run files take).
    """

    def __init__(self, lm: LoadedModel, policy: Policy):
        needs = prefill_needs([policy])
        self.prefill: PrefillCache | None = PrefillCache(lm.n_layers, **(needs | {"record": True}))
        super().__init__(layers=self.prefill.layers)
        self.lm, self.policy, self.log = lm, policy, EventLog()
        self.policy_cache: PolicyCache | None = None
        self.attention = None  # the prompt's attention frame, built at step 0
        self.fed: list[int] = []  # every token id the model read: the prompt, then each generated one
        self.n_prompt = 0
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self._started, self._token = 0.0, None
        self._hooks = _attach(lm.model, self)

    # -- routing (called by the hooks) -----------------------------------------------------------
    def before_forward(self, args: tuple, kwargs: dict) -> None:
        """Check and record one forward pass's input, then route its attention here."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise Unsupported("cache_for needs input_ids (inputs_embeds alone cannot be recorded).")
        cache = self.policy_cache
        held = cache is not None and cache.step == 0 and ids.shape[1] > 1  # a question after the context
        _check_input(ids, kwargs.get("attention_mask"), cache is not None and not held, self.lm)
        if held:
            cache.holding = True
        elif cache is not None:
            cache.step += 1
        self.fed += [int(t) for t in ids[0]]
        self._started = time.perf_counter()
        self._token = capture.observe_with(self)

    def after_forward(self) -> None:
        if self._token is not None:
            capture.stop_observing(self._token)
            self._token = None
        if self.policy_cache is not None and self.policy_cache.holding:
            self.policy_cache.holding = False
            self.n_prompt = len(self.fed)  # the question is part of the prompt
        phase = "prefill" if self.policy_cache is None or self.policy_cache.step == 0 else "decode"
        self.seconds[phase] += time.perf_counter() - self._started

    @property
    def wants_column_sums(self) -> bool:
        return self.policy_cache is None and self.prefill.record

    def wants_probs(self, layer_idx: int) -> bool:
        return self.policy_cache is not None and self.policy_cache.wants_probs(layer_idx)

    def observe(self, layer_idx: int, query, key, scaling: float, col_sums=None, probs=None) -> None:
        if self.policy_cache is not None:
            self.policy_cache.observe(layer_idx, query, key, scaling, probs=probs)
            return
        self.prefill.observe(layer_idx, query, key, scaling, col_sums)
        if layer_idx == len(self.layers) - 1:
            self._compress()

    def _compress(self) -> None:
        """Step 0: cut the prompt cache to the policy's budget, exactly as the explorer does."""
        self.n_prompt = self.prefill.layers[0].keys.shape[2]
        self.policy_cache = PolicyCache.from_prefill(self.prefill, self.policy, extra=EXTRA, log=self.log)
        self.attention = prompt_attention(self.prefill, self.lm.n_kv_heads, self._texts(self.fed))
        self.layers = self.policy_cache.layers
        self.prefill = None

    # -- what generate() must not do with it -------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        raise Unsupported(
            "cache_for cannot be cropped: assisted decoding and prompt lookup rewind the cache, and an "
            "evicting cache cannot take back what it evicted; generate without an assistant."
        )

    def reorder_cache(self, beam_idx) -> None:
        raise Unsupported("cache_for serves one sequence: beam search is not supported (use num_beams=1).")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise Unsupported("cache_for serves one sequence: use num_beams=1 and num_return_sequences=1.")

    def batch_select_indices(self, indices) -> None:
        raise Unsupported("cache_for serves one sequence: contrastive search is not supported.")

    # -- the run --------------------------------------------------------------------------------
    def result(self, output=None) -> RunResult:
        """The run as a `RunResult`.

        output : what `generate()` returned (a tensor [1, prompt + new], or its output object). Pass it
            to include the last generated token, which the model never read; without it, the tokens are
            those fed back to the model.
        """
        if self.policy_cache is None:
            raise ValueError("no generation has run with this cache yet.")
        ids = self.fed
        if output is not None:
            sequences = getattr(output, "sequences", output)
            ids = [int(t) for t in sequences[0]]
        row = Row(self.policy, self.policy.label, self.policy_cache, None, self.seconds["prefill"])
        row.tokens = ids[self.n_prompt :]
        row.decode_seconds = self.seconds["decode"]
        row.decode_steps = self.policy_cache.step
        texts = self._texts(ids[: self.n_prompt])
        return make_result(self.lm, texts, row, with_fidelity=False, attention=self.attention)

    def _texts(self, ids: list[int]) -> list[str]:
        if self.lm.tokenizer is None:
            return [f"<{i}>" for i in ids]
        return token_texts(self.lm, ids)


def _check_input(ids: torch.Tensor, mask, started: bool, lm: LoadedModel) -> None:
    """Refuse, in one sentence, a forward pass this cache cannot serve (before its attention runs)."""
    rows, length = ids.shape
    if rows != 1:
        raise Unsupported(
            f"cache_for serves one sequence, but this forward pass has {rows} rows (several prompts, "
            "num_beams > 1 or num_return_sequences > 1); run each prompt alone with its own cache."
        )
    if mask is not None and not bool(mask.all()):
        raise Unsupported(
            "cache_for takes unpadded input: the attention mask has padding; pass the prompt alone."
        )
    if started and length != 1:
        raise Unsupported(
            f"cache_for feeds one token per step after the prompt, but this pass feeds {length} "
            "(assisted decoding or chunked prefill); use plain generate()."
        )
    if started is False and length > lm.max_prompt_tokens:
        raise Unsupported(
            f"The prompt has {length} tokens; this model's limit here is {lm.max_prompt_tokens} "
            "(D2O_MAX_PROMPT_TOKENS or the model's position limit)."
        )


def _attach(model: torch.nn.Module, cache: GenerateCache) -> list:
    """Hooks that route a forward pass to `cache` when that pass was given it; gone with the cache."""
    ref = weakref.ref(cache)

    def mine(kwargs):
        owner = ref()
        return owner if owner is not None and kwargs.get("past_key_values") is owner else None

    def before(module, args, kwargs):
        owner = mine(kwargs)
        if owner is not None:
            owner.before_forward(args, kwargs)

    def after(module, args, kwargs, output):
        owner = mine(kwargs)
        if owner is not None:
            owner.after_forward()

    hooks = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True, always_call=True),
    ]
    for hook in hooks:
        weakref.finalize(cache, hook.remove)
    return hooks
