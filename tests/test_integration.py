"""The bundled SmolLM2-135M-Instruct, end to end through the library and the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import d2o_core
from d2o_core import POLICIES
from d2o_core import __main__ as cli

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("bundled_story")]  # one worker: one at_fifth
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def story():
    examples = json.loads((ROOT / "assets" / "examples.json").read_text())
    return next(e["prompt"] for e in examples if "story" in e["name"].lower())


@pytest.fixture(scope="module")
def at_fifth(bundled, story):
    policies = [POLICIES[k](budget=0.2) for k in ("full", "streaming", "h2o", "d2o")]
    return d2o_core.compare(bundled, story, policies, max_new_tokens=32)


def fluent(text: str) -> bool:
    """Readable English-like text: long enough, mostly letters and spaces, not one word repeated."""
    words = re.findall(r"[A-Za-z']+", text)
    letters = sum(c.isalpha() or c.isspace() for c in text) / max(len(text), 1)
    return len(words) >= 8 and letters > 0.8 and len(set(w.lower() for w in words)) / len(words) > 0.4


def test_prompt_is_long_context(at_fifth):
    assert at_fifth["full"].metrics["prompt_tokens"] >= 600


@pytest.mark.parametrize("label", ["h2o", "d2o"])
def test_compressed_policies_at_a_fifth_still_write_fluent_text(at_fifth, label):
    res = at_fifth[label]
    assert fluent(res.text), res.text
    assert 0.18 <= res.metrics["kv_fraction"] <= 0.25


def test_d2o_budgets_differ_between_layers_and_keep_the_total(at_fifth):
    budgets = at_fifth["d2o"].layer_budgets
    n_prompt = at_fifth["d2o"].metrics["prompt_tokens"]
    assert budgets["budget_tokens"].nunique() > 3
    assert budgets["budget_tokens"].sum() == 30 * round(0.2 * n_prompt)
    assert budgets["density"].notna().all()


def test_every_policy_at_full_budget_reproduces_the_full_cache(bundled, story):
    policies = [POLICIES[k](budget=1.0) for k in ("full", "streaming", "h2o", "d2o")]
    policies.append(POLICIES["d2o"](budget=1.0, variant="official"))
    res = d2o_core.compare(bundled, story, policies, max_new_tokens=12)
    for label, r in res.items():
        assert r.token_ids == res["full"].token_ids, label
        assert r.events.empty and r.metrics["kv_fraction"] == 1.0


@pytest.mark.parametrize(
    "prompt,max_new,stops_at",
    [
        ("Explain in two sentences why the sky is blue.", 12, "the token limit"),
        ("What is the capital of France? Answer in one word.", 40, "an end token"),
    ],
)
def test_full_cache_equals_transformers_generate(bundled, prompt, max_new, stops_at):
    """Whole sequences, token for token: both stop at the same end tokens or at the same limit."""
    res = d2o_core.generate(bundled, prompt, POLICIES["full"](), max_new_tokens=max_new)
    ids = d2o_core.runner.encode(bundled, prompt, chat=True)
    eos = sorted(bundled.eos_ids)
    out = bundled.model.generate(
        torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
    )
    theirs = out[0, len(ids) :].tolist()
    assert res.token_ids == theirs and len(res.token_ids) == len(theirs)
    if stops_at == "an end token":
        assert len(theirs) < max_new and theirs[-1] in eos and theirs.count(theirs[-1]) == 1
    else:
        assert len(theirs) == max_new and not set(theirs) & set(eos)


def test_the_bundled_model_loads_from_the_conversion_cache(bundled):
    again = d2o_core.load_model()
    assert again.source == "bundled (cached conversion)"
    assert (again.n_layers, again.n_kv_heads, again.config.num_attention_heads) == (30, 3, 9)


def test_cli_compare_prints_texts_memory_and_writes_json(tmp_path, story, bundled, monkeypatch, capsys):
    # In this process, on the model already loaded (the test below runs `python -m d2o_core` itself).
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: bundled)
    prompt = tmp_path / "story.txt"
    prompt.write_text(story)
    out = tmp_path / "out.json"
    argv = [
        "compare",
        "--prompt-file",
        str(prompt),
        "--policies",
        "full,h2o,d2o",
        "--budget",
        "0.2",
        "--max-new-tokens",
        "12",
        "--json",
        str(out),
    ]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    for header in ("=== full ===", "=== h2o ===", "=== d2o ==="):
        assert header in stdout
    assert "KV MB (final)" in stdout and "d2o per-layer budgets (tokens):" in stdout
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"full", "h2o", "d2o"}
    d2o = doc["results"]["d2o"]
    assert d2o["events"] and d2o["steps"] and len(d2o["layer_budgets"]) == 30 and d2o["text"]


def test_python_m_d2o_core_explains_bad_input_without_a_trace(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "d2o_core", "compare", "--prompt", "hi", "--budget", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "budget must be" in done.stderr and "Traceback" not in done.stderr
