"""The question kept whole: the context is compressed, then the question is read and never evicted by it."""

from __future__ import annotations

import pytest
import torch
from helpers import TEXT, held_positions

import d2o_core
from d2o_core import POLICIES, engine
from d2o_core.cache import PrefillCache, prefill_needs

CONTEXT, QUESTION = TEXT[:60], "What does the fox do?"
CAPPING = [n for n in POLICIES if n != "full"]


def compressed(tiny, policy, question_ids):
    ids = [ord(c) for c in CONTEXT]
    prefill = PrefillCache(tiny.n_layers, **prefill_needs([policy]))
    engine.prefill(tiny, prefill, ids)
    return engine.compress(prefill, policy, extra=4, hold=len(question_ids)), len(ids)


@pytest.mark.parametrize("name", CAPPING)
def test_the_question_is_read_after_the_compression_and_kept_whole(tiny, name):
    q_ids = [ord(c) for c in "\n\n" + QUESTION]
    policy = POLICIES[name](budget=0.3)
    cache, n_ctx = compressed(tiny, policy, q_ids)
    before = [held_positions(layer) for layer in cache.layers]
    engine.hold(tiny, [cache], q_ids)
    question = set(range(n_ctx, n_ctx + len(q_ids)))
    for layer, kept in zip(cache.layers, before):
        for now, then in zip(held_positions(layer), kept):
            assert set(now) == set(then) | question  # nothing evicted, the whole question added


@pytest.mark.parametrize("name", ["h2o", "tova", "d2o"])
def test_reading_the_question_at_once_equals_reading_it_token_by_token(tiny, name):
    q_ids = [ord(c) for c in "\n\n" + QUESTION]
    policy = POLICIES[name](budget=0.3)
    at_once, _ = compressed(tiny, policy, q_ids)
    logits = engine.hold(tiny, [at_once], q_ids)[0]
    one_by_one, _ = compressed(tiny, policy, q_ids)
    one_by_one.holding = True
    for token in q_ids:
        step_logits = engine.decode_step(tiny, [one_by_one], [token], 0)[0]
    torch.testing.assert_close(logits, step_logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(at_once.layers, one_by_one.layers):
        assert held_positions(a) == held_positions(b)
    torch.testing.assert_close(at_once.scores, one_by_one.scores, rtol=1e-4, atol=1e-6)


def test_the_full_cache_with_a_question_reads_what_the_whole_prompt_reads(tiny):
    full = POLICIES["full"]()
    apart = d2o_core.generate(tiny, CONTEXT, full, question=QUESTION, max_new_tokens=6, chat=False)
    whole = d2o_core.generate(tiny, f"{CONTEXT}\n\n{QUESTION}", full, max_new_tokens=6, chat=False)
    assert apart.token_ids == whole.token_ids
    assert apart.prompt_tokens == whole.prompt_tokens


def test_compare_with_a_question_records_it_in_the_prompt_and_never_evicts_it(tiny):
    results = d2o_core.compare(
        tiny, CONTEXT, [POLICIES[n](budget=0.3) for n in ("full", "h2o", "d2o")], question=QUESTION,
        max_new_tokens=4, chat=False,
    )  # fmt: skip
    n_ctx = len(CONTEXT)
    for res in results.values():
        assert res.metrics["prompt_tokens"] == n_ctx + len("\n\n" + QUESTION)
        at_step0 = res.events[res.events.step == 0]
        assert at_step0.empty or at_step0.position.max() < n_ctx


def test_cache_for_keeps_the_question_whole_as_the_explorer_does(tiny):
    ctx_ids, q_ids = engine.encode_parts(tiny, CONTEXT, QUESTION, chat=False)
    for name in ("h2o", "d2o", "snapkv"):
        policy = POLICIES[name](budget=0.3, **({"window": 8} if name == "snapkv" else {}))
        ref = d2o_core.generate(tiny, CONTEXT, policy, question=QUESTION, max_new_tokens=6, chat=False)
        cache = d2o_core.cache_for(tiny, policy)
        context = torch.tensor([ctx_ids])
        with torch.no_grad():
            tiny.model(context, past_key_values=cache)
        both = torch.tensor([ctx_ids + q_ids])
        out = tiny.model.generate(
            both, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        assert out[0, both.shape[1] :].tolist() == ref.token_ids, name
        assert cache.result(out).events.equals(ref.events)


def test_a_chat_prompt_splits_at_the_end_of_the_context(bundled):
    ctx_ids, q_ids = engine.encode_parts(bundled, "Some context.", "A question?", chat=True)
    text = bundled.tokenizer.decode(ctx_ids + q_ids)
    assert bundled.tokenizer.decode(ctx_ids).endswith("Some context.")
    assert text.rstrip().endswith("assistant") and "A question?" in bundled.tokenizer.decode(q_ids)


def test_the_cli_takes_a_question_and_records_it(cli_tiny, tmp_path, capsys):
    import json

    from d2o_core.__main__ import main

    out = tmp_path / "run.json"
    code = main(
        ["compare", "--prompt", CONTEXT, "--question", QUESTION, "--policies", "full,h2o", "--no-chat",
         "--max-new-tokens", "3", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert record["meta"]["question"] == QUESTION
