"""`cache_for` in an unmodified `model.generate()`: the explorer's tokens, events and refusals."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest
import torch
from helpers import TEXT, tiny_model

import d2o_core
from d2o_core import POLICIES, runfile
from d2o_core.interop import Unsupported

README = Path(__file__).resolve().parent.parent / "README.md"
IDS = [ord(c) for c in TEXT]
NEW = 10


def plain_generate(model, ids, cache=None, **kwargs):
    inputs = torch.tensor([ids])
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0} | kwargs
    return model.generate(inputs, attention_mask=torch.ones_like(inputs), past_key_values=cache, **kwargs)


@pytest.mark.parametrize("name", list(POLICIES))
def test_generate_with_cache_for_gives_the_explorers_tokens_and_events(tiny, name):
    policy = POLICIES[name](budget=0.3)
    ref = d2o_core.generate(tiny, IDS, policy, max_new_tokens=NEW)
    cache = d2o_core.cache_for(tiny.model, policy, tiny.tokenizer)
    out = plain_generate(tiny.model, IDS, cache)
    res = cache.result(out)
    assert out[0, len(IDS) :].tolist() == ref.token_ids
    assert res.token_ids == ref.token_ids and res.text == ref.text
    assert res.events.equals(ref.events) and res.steps.equals(ref.steps)
    assert res.layer_budgets.equals(ref.layer_budgets)
    assert res.metrics["kv_bytes_peak"] == ref.metrics["kv_bytes_peak"]


@pytest.mark.parametrize("name", list(POLICIES))
def test_budget_one_equals_plain_generate(tiny, name):
    plain = plain_generate(tiny.model, IDS)
    cache = d2o_core.cache_for(tiny, POLICIES[name](budget=1.0))
    assert plain_generate(tiny.model, IDS, cache).tolist() == plain.tolist()


def test_sampling_works_and_is_reproducible_with_a_seed(tiny):
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        cache = d2o_core.cache_for(tiny, POLICIES["d2o"](budget=0.3))
        outs.append(plain_generate(tiny.model, IDS, cache, do_sample=True, temperature=1.5, top_k=0).tolist())
        assert len(cache.result().events) > 0
    assert outs[0] == outs[1] and len(outs[0][0]) == len(IDS) + NEW


def refused(tiny, match, **kwargs):
    cache = d2o_core.cache_for(tiny, POLICIES["h2o"](budget=0.3))
    with pytest.raises(Unsupported, match=match):
        plain_generate(tiny.model, IDS, cache, **kwargs)
    assert cache.policy_cache is None and cache.fed == []  # refused before the prompt was even read


def test_beam_search_and_several_sequences_are_refused_before_any_token(tiny):
    refused(tiny, "one sequence", num_beams=2)
    refused(tiny, "one sequence", num_return_sequences=2, do_sample=True)


def test_a_batch_of_prompts_and_padding_are_refused(tiny):
    cache = d2o_core.cache_for(tiny, POLICIES["h2o"](budget=0.3))
    with pytest.raises(Unsupported, match="2 rows"):
        tiny.model.generate(torch.tensor([IDS, IDS]), past_key_values=cache, max_new_tokens=2, pad_token_id=0)
    cache = d2o_core.cache_for(tiny, POLICIES["h2o"](budget=0.3))
    mask = torch.ones(1, len(IDS), dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(Unsupported, match="padding"):
        tiny.model.generate(torch.tensor([IDS]), attention_mask=mask, past_key_values=cache, max_new_tokens=2)


def test_assisted_decoding_is_refused_with_a_sentence(tiny):
    assistant = tiny_model(layers=2, seed=1).model
    cache = d2o_core.cache_for(tiny, POLICIES["h2o"](budget=0.3))
    with pytest.raises(Unsupported, match="assisted decoding"):
        plain_generate(tiny.model, IDS, cache, assistant_model=assistant)


@pytest.mark.parametrize(
    "setting, value, match",
    [("layer_types", ["sliding_attention"] * 2, "sliding"), ("attn_logit_softcapping", 30.0, "soft-capping")],
)
def test_sliding_window_and_soft_capped_models_are_refused(setting, value, match):
    model = tiny_model(layers=2).model
    setattr(model.config, setting, value)
    with pytest.raises(Unsupported, match=match):
        d2o_core.cache_for(model, POLICIES["h2o"](budget=0.3))


def test_the_model_stays_plain_sdpa_for_other_caches_padded_batches_included():
    lm = tiny_model(layers=2, seed=2)
    model = lm.model
    model.set_attn_implementation("sdpa")
    batch = torch.tensor([[0, 0, 0] + IDS[:20], IDS[:23]])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    before = model.generate(batch, **kwargs)
    cache = d2o_core.cache_for(model, POLICIES["h2o"](budget=0.5))
    plain_generate(model, IDS, cache)
    assert model.generate(batch, **kwargs).tolist() == before.tolist()
    del cache
    gc.collect()
    assert not model._forward_pre_hooks and not model._forward_hooks  # the hooks go with the cache


def test_the_result_goes_into_a_run_file_and_back(tiny):
    cache = d2o_core.cache_for(tiny, POLICIES["d2o"](budget=0.3))
    out = plain_generate(tiny.model, IDS, cache)
    res = cache.result(out)
    assert res.metrics["new_tokens"] == NEW and res.prompt_tokens == list(TEXT)
    assert not res.attention.empty
    loaded, _ = runfile.load_run(runfile.save_run({res.label: res}))
    assert loaded[res.label].events.equals(res.events)


def readme_example() -> str:
    section = README.read_text().split("## Use a policy in your own code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.integration
def test_the_readme_example_runs_as_printed(bundled, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The example loads the bundled model by its folder; hand it the one already loaded.
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: bundled.model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: bundled.tokenizer)
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec", dont_inherit=True), namespace)
    assert namespace["result"].metrics["new_tokens"] >= 1 and len(namespace["result"].events) > 0


@pytest.mark.integration
def test_every_policy_in_generate_matches_the_explorer_on_the_bundled_model(bundled):
    ids = d2o_core.engine.encode(bundled, "Summarise: " + TEXT * 2, chat=True)
    for name, cls in POLICIES.items():
        policy = cls(budget=0.2)
        ref = d2o_core.generate(bundled, ids, policy, max_new_tokens=8)
        cache = d2o_core.cache_for(bundled, policy)
        out = plain_generate(bundled.model, ids, cache, max_new_tokens=8)
        got = out[0, len(ids) :].tolist()
        n = len(ref.token_ids)  # the explorer stops at EOS too
        assert got[:n] == ref.token_ids, name


def test_the_interop_benchmark_reports_a_ratio_and_equal_tokens(tiny):
    from d2o_core.eval.interop_bench import run_interop_bench

    out = run_interop_bench(tiny, prompt_tokens=300, budget=0.3, new_tokens=3, policies=["d2o"], repeats=1)
    for stats in out["policies"].values():
        assert stats["same_tokens"] and stats["decode_generate_over_explorer"] > 0
