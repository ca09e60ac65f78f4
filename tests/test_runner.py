"""The generation loop on tiny random models: results, schemas, streaming, fidelity, errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TEXT, one_step, policy_cache, shared_prefill, tiny_model

import d2o_core
from d2o_core import POLICIES, metrics
from d2o_core.events import (
    DRIFT_SCHEMA,
    EVENTS_SCHEMA,
    LAYER_BUDGETS_SCHEMA,
    STEPS_SCHEMA,
    SURVIVAL_SCHEMA,
    check_schema,
)

ALL = ("full", "streaming", "h2o", "d2o")


def policies(budget=0.25, names=ALL):
    return [POLICIES[k](budget=budget) for k in names]


@pytest.fixture(scope="module")
def results(tiny):
    return d2o_core.compare(tiny, TEXT, policies(), max_new_tokens=16, chat=False)


def test_full_cache_matches_transformers_generate(tiny):
    ids = [ord(c) for c in TEXT]
    res = d2o_core.generate(tiny, TEXT, POLICIES["full"](), max_new_tokens=20, chat=False)
    out = tiny.model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert res.token_ids == out[0, len(ids) :].tolist()


def test_every_frame_follows_its_schema_even_when_empty(results):
    for res in results.values():
        check_schema(res.events, EVENTS_SCHEMA)
        check_schema(res.steps, STEPS_SCHEMA)
        check_schema(res.layer_budgets, LAYER_BUDGETS_SCHEMA)
        check_schema(res.drift, DRIFT_SCHEMA)
        check_schema(res.survival(), SURVIVAL_SCHEMA)
    assert results["full"].events.empty  # empty, yet typed


def test_result_fields_and_metrics(results, tiny):
    n_prompt = len(TEXT)
    for label, res in results.items():
        assert res.label == label
        assert len(res.token_ids) == res.metrics["new_tokens"] == 16
        assert res.text == "".join(chr(t) for t in res.token_ids)
        assert len(res.prompt_tokens) == n_prompt == res.metrics["prompt_tokens"]
        assert list(res.steps["step"].unique()) == list(range(16))  # prefill compression + 15 decode steps
        assert len(res.layer_budgets) == tiny.n_layers
        for key in (
            "kv_bytes_peak",
            "kv_bytes_final",
            "kv_bytes_full",
            "kv_fraction",
            "prefill_seconds",
            "decode_seconds",
            "tokens_per_second",
            "token_agreement",
            "mean_kl_to_full",
        ):
            assert key in res.metrics
    entry = 2 * tiny.n_kv_heads * tiny.head_dim * 4
    seen = n_prompt + 15
    full = results["full"].metrics
    assert full["kv_bytes_full"] == full["kv_bytes_final"] == tiny.n_layers * seen * entry
    h2o = results["h2o"].metrics
    assert h2o["kv_bytes_final"] == tiny.n_layers * round(0.25 * n_prompt) * entry
    assert h2o["kv_bytes_peak"] == tiny.n_layers * n_prompt * entry  # the prefill held the whole prompt
    assert h2o["kv_fraction"] == pytest.approx(round(0.25 * n_prompt) / seen)


def test_events_describe_evictions_and_merges(results):
    d2o = results["d2o"].events
    merges, drops = d2o[d2o.kind == "merge"], d2o[d2o.kind == "evict"]
    assert len(merges) and len(drops)
    assert (merges.target_position >= 0).all() and merges.similarity.notna().all()
    assert (drops.target_position == -1).all() and drops.similarity.isna().all()
    tokens = results["d2o"].prompt_tokens + results["d2o"].generated_tokens
    assert all(tokens[p] == t for p, t in zip(d2o.position, d2o.token))
    # Each (layer, head, position) leaves at most once.
    assert not d2o.duplicated(["layer", "head", "position"]).any()
    streaming = results["streaming"].events
    assert (streaming.kind == "evict").all()


def test_steps_count_what_left(results):
    for label in ("h2o", "d2o", "streaming"):
        res = results[label]
        per_step = res.events.groupby(["step", "layer"]).size()
        steps = res.steps.set_index(["step", "layer"])
        assert (steps.loc[per_step.index, "evicted"] == per_step).all()
        merged = res.events[res.events.kind == "merge"].groupby(["step", "layer"]).size()
        assert (steps.loc[merged.index, "merged"] == merged).all()


def test_a_run_does_not_leak_into_the_next(tiny):
    first = d2o_core.generate(tiny, TEXT, POLICIES["h2o"](budget=0.2), max_new_tokens=10, chat=False)
    d2o_core.generate(tiny, TEXT, POLICIES["d2o"](budget=0.2), max_new_tokens=10, chat=False)
    d2o_core.compare(tiny, TEXT, policies(0.3), max_new_tokens=5, chat=False)
    again = d2o_core.generate(tiny, TEXT, POLICIES["h2o"](budget=0.2), max_new_tokens=10, chat=False)
    assert again.token_ids == first.token_ids and again.events.equals(first.events)


def test_compare_shares_one_prefill_and_decodes_as_one_batch_yet_matches_separate_runs(tiny):
    together = d2o_core.compare(tiny, TEXT, policies(0.3), max_new_tokens=8, chat=False)
    for policy in policies(0.3):
        alone = d2o_core.generate(tiny, TEXT, policy, max_new_tokens=8, chat=False, fidelity=False)
        a, b = together[policy.label], alone
        assert a.token_ids == b.token_ids
        # Batched matrix products may round differently from single-row ones (last bits only):
        # the same entries leave at the same steps, with the same scores up to that rounding.
        assert a.events.drop(columns=["score", "similarity"]).equals(
            b.events.drop(columns=["score", "similarity"])
        )
        assert a.events["score"].tolist() == pytest.approx(b.events["score"].tolist(), rel=1e-4, nan_ok=True)


def brute_force_drift(lm, ids, policy, ref_tokens):
    """Teacher forcing done the slow way: both caches fed the reference tokens from the start."""
    prefill, _ = shared_prefill(lm, ids)
    full = policy_cache(prefill, POLICIES["full"](), len(ref_tokens))
    mine = policy_cache(prefill, policy, len(ref_tokens))
    rows = []
    for step in range(1, len(ref_tokens)):
        a = torch.log_softmax(one_step(lm, full, ref_tokens[step - 1], step).float(), -1)
        b = torch.log_softmax(one_step(lm, mine, ref_tokens[step - 1], step).float(), -1)
        rows.append((step, *metrics.step_fidelity(a, b, ref_tokens[step])))
    return metrics.drift_frame(rows)


@pytest.mark.parametrize("name", ["streaming", "h2o", "d2o"])
def test_drift_is_teacher_forced_on_the_full_cache_tokens(tiny, name):
    policy = POLICIES[name](budget=0.15)
    res = d2o_core.compare(tiny, TEXT, [POLICIES["full"](), policy], max_new_tokens=14, chat=False)
    assert res[policy.label].token_ids != res["full"].token_ids  # the fork path is exercised
    expected = brute_force_drift(tiny, [ord(c) for c in TEXT], policy, res["full"].token_ids)
    got = res[policy.label].drift
    assert got["step"].tolist() == expected["step"].tolist() == list(range(1, 14))
    assert got["agrees"].tolist() == expected["agrees"].tolist()
    for col in ("kl_to_full", "nll"):
        assert got[col].tolist() == pytest.approx(expected[col].tolist(), rel=1e-5, abs=1e-6)
    summary = res[policy.label].metrics
    assert summary["token_agreement"] == pytest.approx(expected["agrees"].mean())


def test_full_cache_agrees_with_itself(results):
    full = results["full"]
    assert full.metrics["token_agreement"] == 1.0 and full.metrics["mean_kl_to_full"] == 0.0


def test_no_fidelity_metrics_without_a_full_cache_run(tiny):
    res = d2o_core.compare(tiny, TEXT, policies(0.3, ("h2o", "d2o")), max_new_tokens=4, chat=False)
    assert all("token_agreement" not in r.metrics and r.drift.empty for r in res.values())


def test_kl_of_identical_distributions_is_zero_and_positive_otherwise():
    lp = torch.log_softmax(torch.randn(50), -1)
    kl, agrees, nll = metrics.step_fidelity(lp, lp, 3)
    assert kl == 0.0 and agrees and nll == pytest.approx(-float(lp[3]))
    other = torch.log_softmax(torch.randn(50), -1)
    assert metrics.step_fidelity(lp, other, 3)[0] > 0


def test_sampling_is_reproducible_with_a_seed(tiny):
    run = lambda seed: (
        d2o_core.generate(  # noqa: E731
            tiny, TEXT, POLICIES["d2o"](budget=0.3), max_new_tokens=12, chat=False, temperature=1.0, seed=seed
        ).token_ids
    )
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_streaming_yields_growing_text_per_policy_then_results(tiny):
    updates = list(d2o_core.iter_compare(tiny, TEXT, policies(0.3), max_new_tokens=6, chat=False))
    assert updates[0].kind == "status" and updates[-1].kind == "done"
    for label in [p.label for p in policies(0.3)]:
        texts = [u.text for u in updates if u.kind == "token" and u.label == label]
        assert len(texts) == 6 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
        assert texts[-1] == updates[-1].results[label].text


def test_closing_the_stream_stops_cleanly(tiny):
    stream = d2o_core.iter_compare(tiny, TEXT, policies(0.3), max_new_tokens=50, chat=False)
    tokens = 0
    for update in stream:
        tokens += update.kind == "token"
        if tokens == 5:
            break
    stream.close()
    # The model is still usable afterwards.
    assert (
        d2o_core.generate(tiny, TEXT, POLICIES["h2o"](), max_new_tokens=3, chat=False).metrics["new_tokens"]
        == 3
    )


def test_policies_keep_generating_after_the_full_cache_stops():
    """Regression: a policy still running after the reference hit EOS crashed the agreement tracking."""
    lm = tiny_model(seed=1)
    probe = d2o_core.generate(lm, TEXT, POLICIES["full"](), max_new_tokens=12, chat=False)
    lm.eos_ids = {probe.token_ids[4]}
    res = d2o_core.compare(
        lm, TEXT, [POLICIES["full"](), POLICIES["streaming"](budget=0.1)], max_new_tokens=12, chat=False
    )
    full, other = res["full"], res["streaming"]
    assert len(full.token_ids) < len(other.token_ids)  # the situation under test
    assert other.drift["step"].max() <= len(full.token_ids) - 1


def test_generation_stops_at_eos():
    lm = tiny_model(seed=1)
    probe = d2o_core.generate(lm, TEXT, POLICIES["full"](), max_new_tokens=6, chat=False)
    lm.eos_ids = {probe.token_ids[3]}
    res = d2o_core.generate(lm, TEXT, POLICIES["full"](), max_new_tokens=6, chat=False)
    assert res.token_ids == probe.token_ids[: probe.token_ids.index(probe.token_ids[3]) + 1]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"policies": []}, "No policy selected"),
        ({"policies": [POLICIES["h2o"](), POLICIES["h2o"]()]}, "once per comparison"),
        ({"policies": ["h2o"]}, "Policy objects"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"prompt": "x" * 5000}, "limit here is"),
    ],
)
def test_bad_requests_raise_clear_value_errors(tiny, kwargs, message):
    args = {"prompt": TEXT, "policies": policies(0.3), "max_new_tokens": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        d2o_core.compare(tiny, args.pop("prompt"), args.pop("policies"), chat=False, **args)


def test_policies_that_differ_only_by_budget_get_budget_tagged_keys(tiny):
    runs = [POLICIES["h2o"](budget=0.1), POLICIES["h2o"](budget=0.4), POLICIES["d2o"](budget=0.4)]
    res = d2o_core.compare(tiny, TEXT, runs, max_new_tokens=3, chat=False)
    assert list(res) == ["h2o@10%", "h2o@40%", "d2o"]
    assert res["h2o@10%"].metrics["kv_bytes_final"] < res["h2o@40%"].metrics["kv_bytes_final"]


def test_tiny_prompts_and_tiny_budgets_still_run(tiny):
    res = d2o_core.compare(tiny, "Hi", policies(0.05), max_new_tokens=5, chat=False)
    for r in res.values():
        assert r.metrics["new_tokens"] == 5
        assert not math.isnan(r.metrics["kv_fraction"])


def test_bfloat16_models_run_and_merge_in_their_dtype():
    lm = tiny_model(dtype=torch.bfloat16)
    res = d2o_core.compare(lm, TEXT, policies(0.2), max_new_tokens=6, chat=False)
    assert res["d2o"].metrics["kv_bytes_final"] == lm.n_layers * round(0.2 * len(TEXT)) * 2 * 2 * 16 * 2
    assert (res["d2o"].events.kind == "merge").any()


def test_caches_are_freed_as_soon_as_a_run_ends(tiny):
    """Regression: a cache <-> layer reference cycle kept every run's tensors until the cycle collector
    ran (RSS grew by hundreds of MB per comparison in the app)."""
    import gc
    import weakref

    prefill, _ = shared_prefill(tiny, [ord(c) for c in TEXT])
    gc.disable()
    try:
        cache = policy_cache(prefill, POLICIES["d2o"](budget=0.3), 4)
        one_step(tiny, cache, 65, 1)
        fork = cache.clone()
        alive = [weakref.ref(cache), weakref.ref(fork), weakref.ref(cache.layers[0])]
        del cache, fork
        assert [ref() for ref in alive] == [None, None, None]
    finally:
        gc.enable()


def test_a_compressed_cache_allocates_only_its_budget(tiny):
    """Regression: capped layers were given room for the whole prompt, so compression saved no memory."""
    prefill, _ = shared_prefill(tiny, [ord(c) for c in TEXT])
    for name in ("streaming", "h2o", "d2o"):
        cache = policy_cache(prefill, POLICIES[name](budget=0.2), 8)
        budgets = sum(layer.plan.budget for layer in cache.layers)
        assert cache.kv.shape[2] == budgets + tiny.n_layers, name  # one spare slot per layer
    full = policy_cache(prefill, POLICIES["full"](), 8)
    assert full.kv.shape[2] == tiny.n_layers * (len(TEXT) + 8)
