"""The attention view: the prompt's attention per (layer, kv-head, token) recorded by every comparison,
equal to an eager-attention reference, shared by all results, saved once in the run file and reopened
with the same figures; what each policy kept per (layer, kv-head) read from its events."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TEXT, figure_data, held_positions, tiny_model, walk

import d2o_core
from d2o_core import ops, run_summary, runfile
from d2o_core.cache import PrefillCache
from d2o_core.events import (
    ATTENTION_SCHEMA,
    EVENTS_SCHEMA,
    KEPT_SCHEMA,
    attention_frame,
    check_schema,
    frame,
    kept_frame,
)
from d2o_core.run_result import RunResult, prompt_attention
from ui import figures

N_PROMPT = 40
PROMPT = [ord(c) for c in TEXT[:N_PROMPT]]
KEYS = ("full", "streaming", "h2o", "d2o")


@pytest.fixture(scope="module")
def results(tiny):
    policies = [d2o_core.POLICIES[k](budget=0.3) for k in KEYS]
    return d2o_core.compare(tiny, PROMPT, policies, max_new_tokens=6)


@pytest.fixture(scope="module")
def eager_attention():
    """Per layer, [Hq, Lp, Lp] prompt attention probabilities of an identical model run eagerly."""
    twin = tiny_model()  # same seed, same weights as the `tiny` fixture
    twin.model.set_attn_implementation("eager")
    with torch.no_grad():
        out = twin.model(input_ids=torch.tensor([PROMPT]), output_attentions=True)
    return [a[0].double() for a in out.attentions]


def grid(attention: pd.DataFrame) -> np.ndarray:
    """[L, Hkv, Lp] column sums of an attention frame."""
    df = attention.sort_values(["layer", "head", "position"])
    shape = (df["layer"].nunique(), df["head"].nunique(), df["position"].nunique())
    return df["column_sum"].to_numpy().reshape(shape)


def kept_of(results: dict, layer: int, head: int) -> pd.DataFrame:
    """What the UI builds: every policy's kept_frame, with a leading policy column."""
    parts = [
        kept_frame(r.events, r.prompt_tokens, layer, head, r.settings.get("n_sink", 0)).assign(policy=label)
        for label, r in results.items()
    ]
    return pd.concat(parts, ignore_index=True)[["policy", *KEPT_SCHEMA]]


# -- engine data ----------------------------------------------------------------------------------------


def test_column_sums_equal_an_eager_attention_reference_summed_per_kv_head(tiny, results, eager_attention):
    attention = results["streaming"].attention  # a policy that needs no scores: recorded anyway
    check_schema(attention, ATTENTION_SCHEMA)
    n_kv = tiny.n_kv_heads
    reference = np.stack(
        [a.sum(dim=1).reshape(n_kv, -1, N_PROMPT).sum(dim=1).numpy() for a in eager_attention]
    )  # [L, Hkv, Lp]: each key's total attention from all prompt queries, query heads of a group summed
    assert grid(attention).shape == (tiny.n_layers, n_kv, N_PROMPT) == reference.shape
    np.testing.assert_allclose(grid(attention), reference, rtol=1e-4, atol=1e-6)
    tokens = [chr(t) for t in PROMPT]
    assert attention["token"].tolist() == tokens * (tiny.n_layers * n_kv)
    assert attention["position"].tolist() == list(range(N_PROMPT)) * (tiny.n_layers * n_kv)


def test_density_is_d2o_f_l_over_the_per_query_head_sums(results, eager_attention):
    attention = results["full"].attention
    per_layer = attention.groupby("layer")["density"]
    assert (per_layer.nunique() == 1).all()  # one value on every row of a layer
    expected = []
    for att in eager_attention:  # docs/policies.md: variance over keys per query head, min-max scaled, mean
        var = att.sum(dim=1).var(dim=-1, unbiased=True)
        expected.append(float(((var - var.min()) / (var.max() - var.min() + 1e-6)).mean()))
    assert per_layer.first().tolist() == pytest.approx(expected, abs=1e-6)
    own = [ops.attention_density(att.sum(dim=1).float()) for att in eager_attention]
    assert per_layer.first().tolist() == pytest.approx(own, abs=1e-6)
    # ... and it is the density D2O budgeted with, so the figure's two panels tell one story.
    d2o = results["d2o"].layer_budgets
    assert d2o["density"].tolist() == pytest.approx(per_layer.first().tolist(), abs=1e-12)


def test_every_result_of_a_comparison_and_generate_hold_one_shared_frame(tiny, results):
    frames = [r.attention for r in results.values()]
    assert all(f is frames[0] for f in frames) and not frames[0].empty
    single = d2o_core.generate(tiny, PROMPT, d2o_core.POLICIES["streaming"](budget=0.5), max_new_tokens=2)
    pd.testing.assert_frame_equal(single.attention, frames[0], check_exact=True)


def test_attention_off_records_nothing_for_policies_that_need_no_scores(tiny, monkeypatch, results):
    """Benchmarks and sweeps pass attention=False: full and StreamingLLM then skip the column sums."""
    recorded = []
    real = PrefillCache.__init__

    def spy(self, n_layers, record, queries=None):
        recorded.append(record)
        real(self, n_layers, record, queries)

    monkeypatch.setattr(PrefillCache, "__init__", spy)
    policies = [d2o_core.POLICIES[n](budget=0.5) for n in ("full", "streaming")]
    off = d2o_core.compare(tiny, PROMPT, policies, max_new_tokens=3, attention=False)
    assert recorded == [False] and all(r.attention.empty for r in off.values())
    h2o = d2o_core.generate(
        tiny, PROMPT, d2o_core.POLICIES["h2o"](budget=0.5), max_new_tokens=3, attention=False
    )
    assert recorded == [False, True] and h2o.attention.empty  # H2O records for its scores, draws nothing
    on = d2o_core.compare(tiny, PROMPT, policies, max_new_tokens=3)
    assert recorded == [False, True, True] and all(not r.attention.empty for r in on.values())
    assert [r.text for r in off.values()] == [r.text for r in on.values()]


def test_frames_keep_their_schema_when_empty(tiny):
    check_schema(attention_frame(np.zeros((0, 0, 0)), [], []), ATTENTION_SCHEMA)
    check_schema(kept_frame(frame({}, EVENTS_SCHEMA), [], 0, 0), KEPT_SCHEMA)
    empty = frame({}, EVENTS_SCHEMA)
    res = RunResult(
        "x", "", [], [], events=empty, steps=empty, layer_budgets=empty, metrics={}, drift=empty, settings={}
    )
    check_schema(res.attention, ATTENTION_SCHEMA)  # other code builds results without attention
    unrecorded = PrefillCache(tiny.n_layers, record=False)
    assert prompt_attention(unrecorded, tiny.n_kv_heads, []).empty


@pytest.mark.parametrize("name", ["h2o", "d2o", "streaming"])
def test_kept_frame_agrees_with_the_caches_final_stored_positions(tiny, name):
    policy = d2o_core.POLICIES[name](budget=0.3)
    step, cache, _ = list(walk(tiny, PROMPT, policy, steps=8))[-1]  # the cache at the end of the run
    assert step == 8
    tokens = [f"t{i}" for i in range(N_PROMPT + step)]
    events = cache.log.events_frame(tokens)
    n_sink = policy.settings().get("n_sink", 0)
    assert events["kind"].eq("evict").any()
    merged_somewhere = False
    for layer in range(tiny.n_layers):
        held = held_positions(cache.layers[layer])
        for head in range(tiny.n_kv_heads):
            kept = kept_frame(events, tokens[:N_PROMPT], layer, head, n_sink)
            check_schema(kept, KEPT_SCHEMA)
            stayed = set(kept.loc[kept["state"].isin(["kept", "sink"]), "position"])
            assert stayed == {p for p in held[head] if p < N_PROMPT}, (layer, head)
            assert set(kept.loc[kept["state"] == "sink", "position"]) == set(range(n_sink))
            merged_somewhere |= kept["state"].eq("merged").any()
    assert merged_somewhere == (name == "d2o")


def test_kept_frame_without_events_keeps_everything_and_marks_the_sinks():
    kept = kept_frame(frame({}, EVENTS_SCHEMA), list("abcdef"), 0, 0, n_sink=2)
    assert kept["state"].tolist() == ["sink", "sink", "kept", "kept", "kept", "kept"]
    assert kept["token"].tolist() == list("abcdef")


# -- figures --------------------------------------------------------------------------------------------


def test_attention_map_draws_one_heatmap_density_and_a_budget_line_per_policy(tiny, results):
    attention = results["d2o"].attention
    fig = figures.attention_map(attention, run_summary.combined(results, "layer_budgets"))
    assert [t.type for t in fig.data] == ["heatmap", "bar"] + ["scatter"] * len(KEYS)
    heat = fig.data[0]
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (tiny.n_layers, N_PROMPT)
    np.testing.assert_allclose((10**z).sum(axis=1), 1.0, rtol=1e-3)  # shares of each layer's attention
    cells = np.asarray(heat.customdata)  # [L, Lp, (token, share, column sum)] behind one hover template
    assert cells.shape == (tiny.n_layers, N_PROMPT, 3) and cells[2, 4, 0] == "q"
    assert float(cells[2, 4, 1].rstrip("%")) == pytest.approx(100 * 10 ** z[2, 4], rel=1e-3)
    assert "<b>%{customdata[0]}</b>" in heat.hovertemplate and "layer %{y}" in heat.hovertemplate
    assert [t.name for t in fig.data[2:]] == list(results)
    d2o = fig.data[2 + KEYS.index("d2o")]
    assert list(d2o.x) == results["d2o"].layer_budgets["budget_fraction"].tolist()
    assert "budget" in fig.layout.title.text and "\n" not in fig.layout.title.text


def test_kept_tokens_draws_attention_bars_over_one_strip_per_policy(results):
    attention = results["d2o"].attention
    kept = kept_of(results, 1, 0)
    fig = figures.kept_tokens(attention, kept, 1, 0)
    assert [t.type for t in fig.data] == ["bar", "heatmap"]
    bars, strips = fig.data
    assert list(bars.x) == list(range(N_PROMPT)) and "<b>q</b>" in bars.hovertext[4]
    sel = attention[(attention["layer"] == 1) & (attention["head"] == 0)]
    assert list(bars.y) == sel["column_sum"].tolist()
    assert list(strips.y) == list(results) and list(strips.x) == list(range(N_PROMPT))
    codes = {"sink": 0, "kept": 1, "merged": 2, "evicted": 3}
    for row, label in enumerate(results):
        states = kept.loc[kept["policy"] == label, "state"].map(codes).tolist()
        assert list(strips.z[row]) == states, label
        assert "<b>q</b>" in strips.hovertext[row][4] and label in strips.hovertext[row][4]
    assert fig.layout.xaxis.matches == "x2" or fig.layout.xaxis2.matches == "x"  # one token axis


def test_figures_say_a_sentence_when_there_is_nothing_to_draw(results):
    empty_attention, empty_budgets = frame({}, ATTENTION_SCHEMA), pd.DataFrame()
    for fig in (
        figures.attention_map(empty_attention, empty_budgets),
        figures.kept_tokens(empty_attention, pd.DataFrame(), 0, 0),
    ):
        assert not fig.data and fig.layout.annotations[0].text == figures.NO_DATA
    missing = figures.kept_tokens(results["full"].attention, pd.DataFrame(), 99, 0)
    assert not missing.data and "layer 99" in missing.layout.annotations[0].text
    alone = figures.attention_map(results["full"].attention, empty_budgets)  # no budgets: map + density
    assert [t.type for t in alone.data] == ["heatmap", "bar"]


def test_a_2k_token_prompt_over_30_layers_renders_quickly_as_single_traces():
    n_layers, n_kv, n_prompt = 30, 3, 2000
    rng = np.random.default_rng(0)
    col = rng.gamma(0.3, size=(n_layers, n_kv, n_prompt))
    col[:, :, 0] += n_prompt  # a sink
    attention = attention_frame(col, rng.random(n_layers), [f"w{i}" for i in range(n_prompt)])
    states = rng.choice(["kept", "merged", "evicted"], size=n_prompt)
    kept = pd.concat(
        pd.DataFrame({"policy": p, "position": range(n_prompt), "token": "w", "state": states})
        for p in ("full", "h2o", "d2o", "streaming")
    )
    start = time.perf_counter()
    fig = figures.attention_map(attention, pd.DataFrame())
    strips = figures.kept_tokens(attention, kept, 29, 2)
    assert time.perf_counter() - start < 10
    assert [t.type for t in fig.data] == ["heatmap", "bar"] and not fig.layout.shapes
    assert np.asarray(fig.data[0].z).shape == (n_layers, n_prompt)
    assert [t.type for t in strips.data] == ["bar", "heatmap"] and not strips.layout.shapes


# -- run file -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(results):
    return runfile.save_run(results, {"prompt": TEXT[:N_PROMPT]})


def test_the_run_file_stores_the_attention_once_and_reopens_it_exactly(results, saved):
    doc = json.loads(saved)
    assert doc["schema_version"] == "d2o-run/2"
    stored = doc["prompt_attention"]
    assert (stored["n_layers"], stored["n_kv_heads"]) == (4, 2) and len(stored["density"]) == 4
    assert np.asarray(stored["column_sums"]).shape == (4, 2, N_PROMPT)
    assert all("attention" not in rec for rec in doc["results"].values())  # once, not per policy
    values = np.asarray(stored["column_sums"]).ravel()
    assert all(float(f"{v:.5g}") == v for v in values)  # 5 significant digits, short in the JSON
    back, _ = runfile.load_run(saved)
    frames = [r.attention for r in back.values()]
    assert all(f is frames[0] for f in frames)
    pd.testing.assert_frame_equal(frames[0], results["full"].attention, check_exact=True)


def test_attention_figures_drawn_from_a_reopened_run_have_the_same_data(results, saved):
    back, _ = runfile.load_run(saved)
    for res in (results, back):
        assert not next(iter(res.values())).attention.empty
    live = figures.attention_map(results["h2o"].attention, run_summary.combined(results, "layer_budgets"))
    opened = figures.attention_map(back["h2o"].attention, run_summary.combined(back, "layer_budgets"))
    assert figure_data(opened) == figure_data(live)
    for layer, head in ((0, 0), (2, 1), (3, 0)):
        a = figures.kept_tokens(results["d2o"].attention, kept_of(results, layer, head), layer, head)
        b = figures.kept_tokens(back["d2o"].attention, kept_of(back, layer, head), layer, head)
        assert figure_data(a) == figure_data(b), (layer, head)


def test_an_older_d2o_run_1_file_without_attention_still_opens(results, saved):
    doc = json.loads(saved)
    doc["schema_version"] = "d2o-run/1"
    doc.pop("prompt_attention")
    back, _ = runfile.load_run(json.dumps(doc))
    assert list(back) == list(results)
    for label, res in back.items():
        check_schema(res.attention, ATTENTION_SCHEMA)
        assert res.attention.empty
        pd.testing.assert_frame_equal(res.events, results[label].events, check_exact=True)
    assert not figures.attention_map(back["h2o"].attention, pd.DataFrame()).data


BAD = {
    "wrong shape": (lambda d: d["prompt_attention"]["column_sums"].pop(), r"should hold .* column sums"),
    "ragged": (lambda d: d["prompt_attention"]["column_sums"][0][0].pop(), r"ragged lists"),
    "text value": (
        lambda d: d["prompt_attention"]["column_sums"][0][0].__setitem__(0, "1.0"),
        r"prompt_attention\.column_sums\[0\]\[0\]\[0\]",
    ),
    "/1 with attention": (lambda d: d.update(schema_version="d2o-run/1"), "not a field of d2o-run/1"),
    "newer": (lambda d: d.update(schema_version="d2o-run/3"), "'d2o-run/3'"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_corrupt_attention_record_is_refused_with_one_sentence(saved, case):
    change, message = BAD[case]
    doc = json.loads(saved)
    change(doc)
    with pytest.raises(ValueError, match=message) as info:
        runfile.load_run(json.dumps(doc))
    text = str(info.value)
    assert "\n" not in text and text.endswith(".") and len(text) < 300
