"""Batch serving under a KV cap (tiny random models): same tokens as alone, honest memory, clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import TEXT, held_positions, one_step, tiny_model

import d2o_core
from d2o_core import POLICIES, engine, serving
from d2o_core.batching import RaggedBatch, StackedBatch, can_stack
from d2o_core.policies.scoring import FromKeys

# Rows of different lengths, so a stacked layer holds different entry counts per row (padding).
PROMPTS = [TEXT[i : i + 40 + 3 * i] for i in range(0, 60, 6)]
# Every registry entry (a new policy is served without editing this file), plus settings that differ.
MATRIX = [(name, {}) for name in POLICIES] + [
    ("d2o", {"variant": "official"}),
    ("d2o", {"merge": False}),
    ("snapkv", {"window": 8}),  # these prompts compress (longer than the window); the default keeps them
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw in MATRIX]


def held(cache) -> list:
    return [held_positions(layer) for layer in cache.layers]


@pytest.mark.parametrize("name,kw", MATRIX, ids=IDS)
def test_serve_batch_gives_each_prompt_the_tokens_it_gets_alone(tiny, name, kw):
    policy, prompts = POLICIES[name](budget=0.25, **kw), PROMPTS[::2]  # 5 prompts of 40 to 64 characters
    out = d2o_core.serve_batch(tiny, prompts, policy, max_new_tokens=8, batch=2, chat=False)
    alone = [
        d2o_core.generate(tiny, p, policy, max_new_tokens=8, chat=False, fidelity=False) for p in prompts
    ]
    assert out.token_ids == [r.token_ids for r in alone]
    assert out.texts == [r.text for r in alone]
    assert [w["batch"] for w in out.waves] == [2, 2, 1]


@pytest.mark.parametrize("name,kw", MATRIX, ids=IDS)
def test_a_stacked_batch_keeps_what_each_row_keeps_alone_and_its_logits_differ_only_in_last_bits(
    tiny, name, kw
):
    """Why tokens could ever differ: batched matrix products and the padded attention kernel sum in
    another order than B=1 (~1e-5 on these logits); the kept entries are the same at every step."""
    policy = POLICIES[name](budget=0.25, **kw)
    prompts, feed = PROMPTS[:5], [ord(c) for c in TEXT[100:108]]
    if isinstance(policy.scoring(), FromKeys):
        # A repeated token's first-layer keys differ only by rotation, so their norms tie exactly and
        # last-bit rounding decides which leaves; these rows repeat no token, so nothing ties.
        prompts = [list(range(20, 20 + min(len(p), 100))) for p in prompts]
        feed = list(range(1, 9))
    rows = lambda: [  # noqa: E731
        serving.admit(tiny, i, engine.encode(tiny, p, False), policy, 30, 0.0, 0)[0].cache
        for i, p in enumerate(prompts)
    ]
    stacked, alone = rows(), rows()
    # Rows stack when they share a layer layout; SnapKV leaves prompts within its window whole, so
    # its rows may not: serve_batch then decodes them as a RaggedBatch, checked the same way here.
    batch = StackedBatch(stacked) if can_stack(stacked) else RaggedBatch(stacked)
    assert can_stack(stacked) or name in ("snapkv", "pyramidkv")
    for step, token in enumerate(feed):
        together = engine.decode_step(tiny, batch, [token] * len(stacked), step + 1)
        apart = torch.stack([one_step(tiny, cache, token, step + 1) for cache in alone])
        torch.testing.assert_close(together, apart, rtol=0, atol=1e-4)
        assert [held(c) for c in stacked] == [held(c) for c in alone], step


def test_rows_finish_independently_at_eos_and_the_rest_go_on(tiny):
    eos = ord("e")
    lm = dataclasses.replace(tiny, eos_ids={eos})
    policy = POLICIES["d2o"](budget=0.3)
    out = d2o_core.serve_batch(lm, PROMPTS, policy, max_new_tokens=16, batch=len(PROMPTS), chat=False)
    alone = [d2o_core.generate(lm, p, policy, max_new_tokens=16, chat=False, fidelity=False) for p in PROMPTS]
    assert out.token_ids == [r.token_ids for r in alone]
    lengths = {len(t) for t in out.token_ids}
    assert len(lengths) > 1 and 16 in lengths  # some rows stopped early, others ran to the end
    assert all(t[-1] == eos for t in out.token_ids if len(t) < 16)


def test_default_cap_is_one_full_row_and_compressed_rows_fit_several(tiny):
    n_prompt, new = len(PROMPTS[0]), 8
    same = [PROMPTS[0]] * 12
    entry = 2 * tiny.n_kv_heads * tiny.head_dim * 4
    cap = tiny.n_layers * (n_prompt + new) * entry / serving.MB
    full = d2o_core.serve_batch(tiny, same[:3], POLICIES["full"](), max_new_tokens=new, chat=False)
    assert full.metrics["kv_mb_cap"] == pytest.approx(cap) and full.metrics["batch"] == 1
    h2o = d2o_core.serve_batch(tiny, same, POLICIES["h2o"](budget=0.2), max_new_tokens=new, chat=False)
    row = tiny.n_layers * (round(0.2 * n_prompt) + 1) * entry  # budget + the step's new token, per layer
    assert h2o.metrics["batch"] == int(cap * serving.MB // row) > 1
    assert h2o.metrics["kv_mb_decode_peak"] == pytest.approx(h2o.metrics["batch"] * row / serving.MB)
    official = d2o_core.serve_batch(
        tiny, same, POLICIES["d2o"](budget=0.2, variant="official"), max_new_tokens=new, chat=False
    )
    assert official.metrics["batch"] < h2o.metrics["batch"]  # three of four layers stay whole


def test_a_row_that_does_not_fit_its_wave_keeps_its_prefill_for_the_next(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(serving, "prefill", lambda *a: calls.append(1) or engine.prefill(*a))
    cap = serving.full_cache_mb(tiny, max(len(p) for p in PROMPTS), 6)  # one full row per wave
    out = d2o_core.serve_batch(
        tiny, PROMPTS[:4], POLICIES["full"](), max_new_tokens=6, kv_cap_mb=cap, chat=False
    )
    assert len(out.waves) >= 3 and len(calls) == 4  # one prefill per prompt, however many waves


@pytest.mark.parametrize("name", ["full", "h2o", "d2o"])
def test_no_batch_holds_more_kv_than_the_cap(tiny, name):
    policy = POLICIES[name](budget=0.2)
    one_full_row = serving.full_cache_mb(tiny, max(len(p) for p in PROMPTS), 6)
    for cap in (one_full_row, 1.7 * one_full_row, 3.2 * one_full_row):
        out = d2o_core.serve_batch(tiny, PROMPTS, policy, max_new_tokens=6, kv_cap_mb=cap, chat=False)
        assert all(w["kv_mb_decode_peak"] <= cap for w in out.waves)
        assert out.metrics["kv_mb_admission_peak"] > out.metrics["kv_mb_decode_peak"] / out.metrics["batch"]
        assert sum(w["batch"] for w in out.waves) == len(PROMPTS)


def test_metrics_record(tiny):
    out = d2o_core.serve_batch(tiny, PROMPTS[:3], POLICIES["h2o"](budget=0.3), max_new_tokens=5, chat=False)
    for key in (
        "policy",
        "budget",
        "batch",
        "tokens_per_second",
        "decode_ms_per_step",
        "kv_mb_cap",
        "kv_mb_decode_peak",
        "kv_mb_admission_peak",
        "rss_mb",
    ):
        assert key in out.metrics, key
    assert out.metrics["new_tokens"] == 15 and out.metrics["tokens_per_second"] > 0


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda lm: d2o_core.serve_batch(lm, [], POLICIES["h2o"]()), "non-empty list"),
        (lambda lm: d2o_core.serve_batch(lm, ["hi"], POLICIES["h2o"](), batch=0), "batch must be"),
        (lambda lm: d2o_core.serve_batch(lm, ["hi"], POLICIES["h2o"](), kv_cap_mb=-1), "kv_cap_mb"),
        (lambda lm: d2o_core.serve_batch(lm, ["hi"], "h2o"), "Policy object"),
        (lambda lm: d2o_core.serve_batch(lm, ["hi"], POLICIES["h2o"](), max_new_tokens=0), "max_new_tokens"),
        (lambda lm: POLICIES["h2o"](budget=1.5), "budget must be"),
        (
            lambda lm: d2o_core.serve_batch(
                lm, [TEXT], POLICIES["h2o"](budget=0.2), kv_cap_mb=1e-4, chat=False
            ),
            "smaller than one compressed row",
        ),
    ],
)
def test_bad_input_gets_a_sentence(tiny, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny)


def test_release_gives_rows_their_own_storage_back():
    lm = tiny_model()
    policy = POLICIES["h2o"](budget=0.3)
    caches = [
        serving.admit(lm, i, engine.encode(lm, p, False), policy, 8, 0.0, 0)[0].cache
        for i, p in enumerate(PROMPTS[:2])
    ]
    batch = StackedBatch(caches)
    engine.decode_step(lm, batch, [65, 66], 1)
    batch.release()
    assert all(not c.stacked and c.kv.is_contiguous() for c in caches)
    before = held(caches[0])
    one_step(lm, caches[0], 67, 2)  # a released row decodes on its own
    assert held(caches[0]) != before


def test_batch_step_benchmark_reports_ratios_against_the_floor(tiny):
    from d2o_core.eval.batch_step import run_batch_step

    out = run_batch_step(tiny, prompt_tokens=300, budget=0.25, rows=3, policies=["h2o", "d2o"], steps=2)
    assert set(out["policies"]) == {"h2o", "d2o"} and out["floor"]["entries"] > 0
    for stats in [*out["policies"].values(), out["floor"]]:
        assert stats["batch_ms"] > 0 and stats["one_ms"] > 0 and stats["ratio"] > 0
    with pytest.raises(ValueError, match="rows must be at least 2"):
        run_batch_step(tiny, prompt_tokens=300, budget=0.25, rows=1, policies=["h2o"])


def test_attention_from_explicit_probabilities_matches_sdpa_on_a_padded_gqa_batch():
    """Score-keeping rows get their probabilities from the attention itself; its output must be SDPA's."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from d2o_core import ops

    torch.manual_seed(0)
    rows, n_q, n_kv, width, dim = 3, 6, 2, 11, 16
    query = torch.randn(rows, n_q, 1, dim)
    keys, values = torch.randn(rows, n_kv, width, dim), torch.randn(rows, n_kv, width, dim)
    mask = (torch.arange(width)[None, :] < torch.tensor([11, 7, 4])[:, None])[:, None, None, :]
    module = SimpleNamespace(num_key_value_groups=n_q // n_kv, is_causal=True)
    expected, _ = sdpa_attention_forward(module, query, keys, values, mask, scaling=0.25)
    got, probs = ops.attend_one(query, keys, values, 0.25, mask[:, 0, 0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert probs.shape == (rows, n_kv, n_q // n_kv, width)
    assert torch.equal(probs[1, :, :, 7:], torch.zeros(n_kv, n_q // n_kv, 4))  # padding gets nothing
