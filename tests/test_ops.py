"""The tensor maths, checked on hand-made tensors against direct (slow, obvious) formulas."""

from __future__ import annotations

import math

import pytest
import torch

from d2o_core import ops


def explicit_probs(query, key, scaling):
    """[Hq, L, L] causal attention probabilities, with kv-heads repeated the obvious way."""
    n_rep = query.shape[1] // key.shape[1]
    k = key[0].repeat_interleave(n_rep, dim=0)
    logits = query[0] @ k.transpose(1, 2) * scaling
    length = query.shape[2]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    return logits.masked_fill(future, float("-inf")).softmax(-1)


@pytest.mark.parametrize("chunk_elements", [1 << 22, 200, 40])
def test_prefill_column_sums_match_the_full_attention_matrix(monkeypatch, chunk_elements):
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", chunk_elements)  # 40: one query per chunk; 200: three
    torch.manual_seed(0)
    query, key = torch.randn(1, 6, 11, 8), torch.randn(1, 2, 11, 8)
    col = ops.prefill_column_sums(query, key, 0.3)
    expected = explicit_probs(query, key, 0.3).sum(dim=1)
    torch.testing.assert_close(col, expected)
    assert col.shape == (6, 11)


def test_attention_row_sums_query_heads_into_their_kv_head():
    torch.manual_seed(1)
    query, key = torch.randn(1, 6, 1, 8), torch.randn(1, 2, 5, 8)
    row = ops.attention_row(query, key, 0.5)
    per_head = (query[0, :, 0][:, None] @ key[0].repeat_interleave(3, 0).transpose(1, 2))[:, 0] * 0.5
    expected = per_head.softmax(-1).reshape(2, 3, 5).sum(1)
    torch.testing.assert_close(row, expected)
    torch.testing.assert_close(row.sum(-1), torch.full((2,), 3.0))


def test_group_heads_sums_consecutive_query_heads():
    x = torch.arange(12.0).reshape(6, 2)
    assert ops.group_heads(x, 2).tolist() == [[0 + 2 + 4, 1 + 3 + 5], [6 + 8 + 10, 7 + 9 + 11]]


def test_attention_density_is_mean_of_min_max_normalised_variances():
    col = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    v = col.var(dim=-1)  # 0, 4, 1.3333
    expected = float(((v - v.min()) / (v.max() - v.min() + 1e-6)).mean())
    assert ops.attention_density(col) == pytest.approx(expected)
    assert ops.attention_density(torch.ones(3, 1)) == 0.0


@pytest.mark.parametrize("fraction,n_prompt", [(0.2, 600), (0.05, 300), (0.5, 77), (0.9, 1000)])
def test_dynamic_layer_budgets_total_and_direction(fraction, n_prompt):
    density = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2]
    budgets = ops.dynamic_layer_budgets(density, fraction, n_prompt)
    assert sum(budgets) == len(density) * round(fraction * n_prompt)
    assert all(1 <= b <= n_prompt for b in budgets)
    # Dense layers (low F) never get less than sparser ones.
    by_density = [b for _, b in sorted(zip(density, budgets))]
    assert by_density == sorted(by_density, reverse=True)
    mean_fraction = sum(budgets) / (len(budgets) * n_prompt)
    assert mean_fraction == pytest.approx(fraction, abs=0.5 / n_prompt + 1e-9)


def test_dynamic_layer_budgets_clamp_then_redistribute():
    # One very dense layer would ask for more than the whole prompt; the cap moves the excess elsewhere.
    budgets = ops.dynamic_layer_budgets([0.0, 5.0, 5.0, 5.0], 0.5, 100)
    assert budgets[0] == 100 and sum(budgets) == 200
    assert ops.dynamic_layer_budgets([0.3] * 5, 0.2, 100) == [20] * 5


def test_keep_sets_keep_sinks_recent_and_top_scores_per_head():
    positions = torch.arange(10).expand(2, 10)
    scores = torch.tensor([[9, 0, 5, 1, 8, 2, 3, 7, 0, 0], [0, 9, 0, 8, 0, 7, 0, 0, 1, 1]], dtype=torch.float)
    kept, gone = ops.keep_sets(scores, positions, n_keep=5, n_sink=1, n_recent=2, seen=10)
    assert kept.tolist() == [[0, 4, 7, 8, 9], [0, 1, 3, 8, 9]]  # sink 0, recent 8-9, two heaviest
    assert gone.tolist() == [[1, 2, 3, 5, 6], [2, 4, 5, 6, 7]]


def test_segment_argmin_and_argmax_work_within_each_segment():
    values = torch.tensor([[5.0, 1.0, 3.0, 2.0, 2.0, 9.0], [0.0, 4.0, 7.0, 7.0, 6.0, 1.0]])
    runs = ops.Segments.of([3, 2, 1])
    assert ops.segment_argmin(values, runs).tolist() == [[1, 3, 5], [0, 4, 5]]  # ties: lowest index
    best, index = ops.segment_argmax(values, runs)
    assert index.tolist() == [[0, 3, 5], [2, 3, 5]] and best.tolist() == [[5, 2, 9], [7, 7, 1]]
    positions = torch.tensor([[4, 2, 9]])  # integer values work too (StreamingLLM ranks by position)
    assert ops.segment_argmin(positions, ops.Segments.of([2, 1])).tolist() == [[1, 2]]


def test_segment_argmin_matches_argmin_per_segment_on_random_input():
    torch.manual_seed(3)
    lengths = [7, 1, 12, 4]
    values = torch.randn(3, sum(lengths))
    got = ops.segment_argmin(values, ops.Segments.of(lengths))
    starts = [0, 7, 8, 20]
    expected = [[s + int(values[h, s : s + n].argmin()) for s, n in zip(starts, lengths)] for h in range(3)]
    assert got.tolist() == expected


def test_nearest_kept_is_cosine_argmax():
    kept = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    evicted = torch.tensor([[[2.0, 0.1], [0.0, 3.0], [1.0, 1.2]]])
    sim, target = ops.nearest_kept(evicted, kept)
    assert target.tolist() == [[0, 1, 2]]
    assert sim[0, 0] == pytest.approx(2 / math.hypot(2, 0.1))


def test_thresholds_start_at_the_mean_then_follow_the_ema_per_layer():
    sim = torch.tensor([[0.2, 0.6], [0.4, 0.8]])  # [heads, layers]
    first = ops.ema_thresholds(torch.full((2,), float("nan")), sim, 0.7, "max")
    assert first.tolist() == pytest.approx([0.3, 0.7])
    tau = torch.tensor([0.5, float("nan")])
    assert ops.ema_thresholds(tau, sim, 0.7, "max").tolist() == pytest.approx([0.7 * 0.4 + 0.3 * 0.5, 0.7])
    assert ops.ema_thresholds(tau, sim, 0.5, "mean").tolist() == pytest.approx([0.5 * 0.3 + 0.5 * 0.5, 0.7])


def test_merge_decision_per_head_or_shared():
    s = torch.tensor([[0.9, 0.1], [0.2, 0.3]])
    tau = torch.tensor(0.5)
    assert ops.merge_decision(s, tau, False).tolist() == [[True, False], [False, False]]
    assert ops.merge_decision(s, tau, True).tolist() == [[True, False], [True, False]]  # head means 0.55, 0.2


def test_paper_merge_weights_sum_to_one_per_target():
    sim = torch.tensor([[0.9, 0.5, 0.7, 0.2]])
    target = torch.tensor([[1, 1, 0, 1]])
    merged = torch.tensor([[True, True, True, False]])
    w_self, w_in = ops.merge_weights(sim, target, merged, 3, "paper")
    totals = w_self.clone().scatter_add_(1, target, w_in)
    torch.testing.assert_close(totals, torch.ones(1, 3))
    denom = math.e + math.exp(0.9) + math.exp(0.5)
    assert float(w_in[0, 0]) == pytest.approx(math.exp(0.9) / denom)
    assert float(w_self[0, 1]) == pytest.approx(math.e / denom)
    assert float(w_in[0, 3]) == 0.0 and float(w_self[0, 2]) == 1.0


def test_official_merge_weights_follow_the_code_formula():
    sim = torch.tensor([[0.9, 0.5]])
    w_self, w_in = ops.merge_weights(sim, torch.tensor([[0, 0]]), torch.tensor([[True, True]]), 2, "official")
    assert w_self.tolist()[0] == pytest.approx([1 / 3, 1.0])
    assert w_in.tolist()[0] == pytest.approx([0.9 / 3, 0.5 / 3])


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_pair_weights_are_merge_weights_for_one_entry_per_target(variant):
    sim = torch.tensor([0.9, 0.2, 0.6])
    merged = torch.tensor([True, False, True])
    w_self, w_in = ops.pair_weights(sim, merged, variant)
    full_self, full_in = ops.merge_weights(
        sim[:, None], torch.zeros(3, 1, dtype=torch.long), merged[:, None], 1, variant
    )
    torch.testing.assert_close(w_self, full_self[:, 0])
    torch.testing.assert_close(w_in, full_in[:, 0])
    assert (w_self[1], w_in[1]) == (1.0, 0.0)  # not merged: the target stays exactly as it was


def test_apply_merge_folds_into_targets_and_leaves_others_bit_for_bit():
    torch.manual_seed(2)
    kept, evicted = torch.randn(2, 4, 3).to(torch.bfloat16), torch.randn(2, 3, 3).to(torch.bfloat16)
    target = torch.tensor([[1, 1, 2], [0, 3, 3]])
    sim = torch.rand(2, 3)
    merged = torch.tensor([[True, True, False], [True, False, True]])
    w_self, w_in = ops.merge_weights(sim, target, merged, 4, "paper")
    out = ops.apply_merge(kept, evicted, target, w_self, w_in)
    assert out.dtype == torch.bfloat16
    expected = kept.float() * w_self[..., None]
    for h in range(2):
        for i in range(3):
            expected[h, target[h, i]] += w_in[h, i] * evicted[h, i].float()
    torch.testing.assert_close(out, expected.to(torch.bfloat16))
    assert torch.equal(out[0, [0, 2, 3]], kept[0, [0, 2, 3]])  # target 2 absorbed only a dropped entry
    assert torch.equal(out[1, [1, 2]], kept[1, [1, 2]])


def test_the_prompt_pass_gives_sdpas_output_and_the_column_sums_at_once():
    torch.manual_seed(3)
    query, key, value = torch.randn(1, 6, 300, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    out, col = ops.prompt_attention(query, key, value, 0.25)
    expanded = [t.repeat_interleave(3, dim=1) for t in (key, value)]
    sdpa = torch.nn.functional.scaled_dot_product_attention(query, *expanded, is_causal=True, scale=0.25)
    torch.testing.assert_close(out, sdpa.transpose(1, 2), rtol=1e-5, atol=1e-5)
    probs = torch.softmax((query @ expanded[0].transpose(-1, -2) * 0.25).masked_fill(
        torch.ones(300, 300, dtype=torch.bool).triu(1), float("-inf")), dim=-1)  # fmt: skip
    torch.testing.assert_close(col, probs[0].sum(dim=1), rtol=1e-5, atol=1e-4)
    assert ops.prompt_attention(query, key, None, 0.25)[0] is None
