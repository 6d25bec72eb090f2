"""The update rules and schedules as pure functions of loads and scores, checked by hand."""

import math

import pytest
import torch

from hf_lossfree_moe.update_rules import (
    UpdateSchedule,
    histogram_margin_quantiles,
    quantile_candidate,
    quantile_histogram,
    quantile_weight,
    rule_update,
)


# Four tokens, four experts, top-1: each expert's share is ceil(4 * 1 / 4) = 1 token.
SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.2, 0.3],
        [0.8, 0.2, 0.1, 0.4],
        [0.7, 0.3, 0.6, 0.1],
        [0.6, 0.5, 0.2, 0.1],
    ]
)
# alpha (2nd largest per row) = 0.3, 0.4, 0.6, 0.5; columns of s - alpha:
#   [0.6, 0.4, 0.1, 0.1], [-0.2, -0.2, -0.3, 0.0], [-0.1, -0.3, 0.0, -0.3], [0.0, 0.0, -0.5, -0.4]
# beta = 2nd largest of each column = [0.4, -0.2, -0.1, 0.0]; the candidate bias is -beta.
HAND_CANDIDATE = [-0.4, 0.2, 0.1, 0.0]


def test_quantile_candidate_matches_the_hand_computed_column_quantile():
    candidate = quantile_candidate(SCORES, torch.zeros(4), top_k=1)
    assert candidate.dtype == torch.float32
    torch.testing.assert_close(candidate, torch.tensor(HAND_CANDIDATE), atol=1e-6, rtol=0)


def test_quantile_candidate_uses_the_biased_cutoff():
    # with bias [0, 0, 0, 0.35] row 0's 2nd-largest biased score is 0.65 (expert 3), so alpha_0 = 0.65, and so on:
    # alpha = [0.65, 0.75, 0.6, 0.5]; column 0 of s - alpha = [0.25, 0.05, 0.1, 0.1] -> beta_0 = 0.1
    candidate = quantile_candidate(SCORES, torch.tensor([0.0, 0.0, 0.0, 0.35]), top_k=1)
    assert candidate[0].item() == pytest.approx(-0.1, abs=1e-6)


def test_quantile_candidate_is_invariant_to_a_constant_added_to_every_score():
    scores = torch.rand(64, 8, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(8, generator=torch.Generator().manual_seed(1)) * 0.1
    shifted = scores + 3.0
    torch.testing.assert_close(
        quantile_candidate(shifted, bias, top_k=2), quantile_candidate(scores, bias, top_k=2), atol=1e-5, rtol=0
    )
    # and the routing with the candidate is the same
    candidate = quantile_candidate(scores, bias, top_k=2)
    assert torch.equal(
        (scores + candidate).topk(2).indices.sort(-1).values, (shifted + candidate).topk(2).indices.sort(-1).values
    )


def test_quantile_candidate_leaves_padding_out():
    padded = torch.cat([SCORES, torch.full((3, 4), 50.0)])  # padding rows that would dominate every column
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0])
    candidate = quantile_candidate(padded, torch.zeros(4), top_k=1, token_mask=mask)
    torch.testing.assert_close(candidate, torch.tensor(HAND_CANDIDATE), atol=1e-6, rtol=0)


def test_quantile_candidate_is_none_when_every_expert_could_take_every_token():
    assert quantile_candidate(SCORES[:1], torch.zeros(4), top_k=1) is None


def test_quantile_candidate_gives_each_expert_its_share_on_the_same_batch():
    scores = torch.rand(400, 8, generator=torch.Generator().manual_seed(2))
    scores[:, 0] += 0.5  # one popular expert
    before = torch.bincount(scores.topk(2).indices.flatten(), minlength=8)
    candidate = quantile_candidate(scores, torch.zeros(8), top_k=2)
    after = torch.bincount((scores + candidate).topk(2).indices.flatten(), minlength=8)
    # share 100; every expert's threshold moves at once, so one update is close to the share, not exact
    assert before.max().item() > 250
    assert 85 <= after.min().item() and after.max().item() <= 115


# The margins s + b - alpha of SCORES (b = 0) are the columns above. Three bins of width 0.5 over [-0.75, 0.75):
# bin 1 [-0.75, -0.25), bin 2 [-0.25, 0.25), bin 3 [0.25, 0.75), bin 0 below, bin 4 from 0.75 up (no value on an edge).
HAND_HISTOGRAM = [[0, 0, 2, 2, 0], [0, 1, 3, 0, 0], [0, 2, 2, 0, 0], [0, 2, 2, 0, 0]]
# share 1: the 2nd largest margin. Column 0: bin 3 holds the top 2 and none lie above it, so the point with 1 count
# above is half-way down it, 0.75 - 0.5 / 2 = 0.5 (exact: 0.4). Column 1: bin 2 holds 3, 0.25 - 0.5 / 3 (exact:
# -0.2). Columns 2 and 3: bin 2 holds 2, 0.25 - 0.5 / 2 = 0 (exact: -0.1 and 0). Each within a bin width of exact.
HAND_MARGINS = [0.5, 0.25 - 0.5 / 3, 0.0, 0.0]


def test_quantile_histogram_matches_the_hand_computed_bins():
    histogram = quantile_histogram(SCORES, torch.zeros(4), top_k=1, bins=3, value_range=0.75)
    assert histogram.dtype == torch.int32
    assert histogram.tolist() == HAND_HISTOGRAM


def test_histogram_quantile_matches_the_hand_computation_within_a_bin_of_the_exact_one():
    histogram = torch.tensor([HAND_HISTOGRAM])  # (1 layer, 4 experts, 3 + 2 bins)
    margins, has_threshold, beyond = histogram_margin_quantiles(histogram, torch.tensor([4 * 1]), value_range=0.75)
    torch.testing.assert_close(margins[0], torch.tensor(HAND_MARGINS, dtype=torch.float64))
    assert has_threshold.tolist() == [True] and beyond.tolist() == [False]
    exact = -torch.tensor(HAND_CANDIDATE, dtype=torch.float64)  # the exact margins (b = 0)
    assert (margins[0] - exact).abs().max() <= 0.5


def test_histogram_margins_are_measured_from_the_bias():
    # with bias [0, 0, 0, 0.35], alpha = [0.65, 0.75, 0.6, 0.5]; five bins of width 0.26 over [-0.65, 0.65):
    # expert 0's margins s - alpha = [0.25, 0.05, 0.1, 0.1] -> bins 4, 3, 3, 3; expert 3's s + 0.35 - alpha =
    # [0.0, 0.0, -0.15, -0.05] -> bins 3, 3, 2, 3 (unbiased they are [0.0, 0.0, -0.5, -0.4] -> bins 3, 3, 1, 1)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.35])
    histogram = quantile_histogram(SCORES, bias, top_k=1, bins=5, value_range=0.65)
    assert histogram[0].tolist() == [0, 0, 0, 3, 1, 0, 0]
    assert histogram[3].tolist() == [0, 0, 1, 3, 0, 0, 0]
    unbiased = quantile_histogram(SCORES, torch.zeros(4), top_k=1, bins=5, value_range=0.65)
    assert unbiased[3].tolist() == [0, 2, 0, 2, 0, 0, 0]


def test_histogram_quantile_is_within_a_bin_width_of_the_exact_quantile():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(300, 8, generator=generator)
    scores[:, 0] += 0.3
    bias = torch.randn(8, generator=generator) * 0.1
    for bins in (100, 1000):
        histogram = quantile_histogram(scores, bias, top_k=2, bins=bins, value_range=1.0)
        margins, has_threshold, beyond = histogram_margin_quantiles(histogram[None].long(), torch.tensor([600]), 1.0)
        assert has_threshold.item() and not beyond.item()
        error = (bias - margins[0]) - quantile_candidate(scores, bias, top_k=2).double()
        assert error.abs().max() <= 2.0 / bins


def test_histograms_of_micro_batches_add_up_to_the_histogram_of_their_concatenation():
    generator = torch.Generator().manual_seed(1)
    first, second = torch.rand(37, 8, generator=generator), torch.rand(52, 8, generator=generator)
    bias = torch.randn(8, generator=generator) * 0.1
    parts = [quantile_histogram(part, bias, top_k=2, bins=1000, value_range=1.0) for part in (first, second)]
    whole = quantile_histogram(torch.cat([first, second]), bias, top_k=2, bins=1000, value_range=1.0)
    assert torch.equal(parts[0] + parts[1], whole)
    assert whole.sum(dim=-1).tolist() == [89] * 8  # every token once per expert


def test_histogram_leaves_padding_out_and_bins_a_nan_without_breaking_the_counts():
    padded = torch.cat([SCORES, torch.full((3, 4), 50.0)])
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0])
    histogram = quantile_histogram(padded, torch.zeros(4), top_k=1, bins=3, value_range=0.75, token_mask=mask)
    assert histogram.tolist() == HAND_HISTOGRAM
    poisoned = SCORES.clone()
    poisoned[0, 1] = float("nan")
    assert (
        quantile_histogram(poisoned, torch.zeros(4), top_k=1, bins=3, value_range=0.75).sum(dim=-1).tolist() == [4] * 4
    )


def test_a_histogram_quantile_beyond_the_range_takes_its_edge_and_says_so():
    # range 0.05: column 0's 2nd largest margin, 0.4, lies in the bin above the range; column 1's, -0.2, below it
    histogram = quantile_histogram(SCORES, torch.zeros(4), top_k=1, bins=2, value_range=0.05)
    margins, has_threshold, beyond = histogram_margin_quantiles(histogram[None].long(), torch.tensor([4]), 0.05)
    assert margins[0, :2].tolist() == [0.05, -0.05] and beyond.tolist() == [True]


def test_a_histogram_has_no_threshold_when_every_expert_could_take_every_token():
    one_token = quantile_histogram(SCORES[:1], torch.zeros(4), top_k=1, bins=3, value_range=0.75)
    nothing = torch.zeros(4, 5, dtype=torch.int64)
    _, has_threshold, beyond = histogram_margin_quantiles(
        torch.stack([one_token.long(), nothing]), torch.tensor([1, 0]), 0.75
    )
    assert has_threshold.tolist() == [False, False] and beyond.tolist() == [False, False]


def test_smebu_update_by_hand_with_momentum_across_steps():
    loads = torch.tensor([[6, 2, 0, 0]])  # mean 2: d = (2 - c) / 2 = [-2, 0, 1, 1]
    state = torch.zeros(1, 4, dtype=torch.float64)
    squashed = torch.tensor([math.tanh(-2), 0.0, math.tanh(1), math.tanh(1)], dtype=torch.float64)
    first = rule_update("smebu", loads, torch.zeros(1, 4), 1e-2, momentum_state=state, momentum=0.5)
    momentum = 0.5 * squashed
    torch.testing.assert_close(first[0], 1e-2 * (momentum - momentum.mean()))
    second = rule_update("smebu", loads, torch.zeros(1, 4), 1e-2, momentum_state=state, momentum=0.5)
    momentum = 0.75 * squashed  # 0.5 * (0.5 * t) + 0.5 * t
    torch.testing.assert_close(second[0], 1e-2 * (momentum - momentum.mean()))
    assert first.sum().item() == pytest.approx(0.0, abs=1e-15)


def test_quantile_update_by_hand():
    candidates = torch.tensor([[0.3, 0.1, -0.1, 0.1]])  # mean 0.1 -> re-centred [0.2, 0.0, -0.2, 0.0]
    biases = torch.tensor([[0.1, 0.0, 0.0, -0.1]])
    delta = rule_update("quantile", torch.ones(1, 4), biases, 0.25, candidates=candidates)
    torch.testing.assert_close(delta[0].float(), 0.25 * torch.tensor([0.1, 0.0, -0.2, 0.1]))


def test_annealed_quantile_weight_at_its_boundaries():
    # A = 4, floor 0.1: 1 through update 4 (update 1 is the warm start), then 4 / n down to the floor at n = 40
    assert [quantile_weight(n, 0.1, anneal_steps=4) for n in (1, 4, 5, 8, 39)] == [1.0, 1.0, 0.8, 0.5, 4 / 39]
    assert [quantile_weight(n, 0.1, anneal_steps=4) for n in (40, 41, 10**6)] == [0.1, 0.1, 0.1]
    assert [quantile_weight(n, 0.2) for n in (1, 10**6)] == [0.2, 0.2]  # A = 0: the constant weight
    with pytest.raises(ValueError, match="update must be an integer >= 1"):
        quantile_weight(0, 0.1, anneal_steps=4)


def test_schedules_at_their_boundaries():
    warmup = UpdateSchedule("linear_warmup", warmup_steps=4)
    assert [warmup.factor(n) for n in (1, 4, 5)] == [0.25, 1.0, 1.0]
    assert UpdateSchedule("linear_warmup").factor(1) == 1.0
    cosine = UpdateSchedule("cosine")
    assert cosine.factor(5, total_steps=10) == pytest.approx(0.5)
    assert cosine.factor(10, total_steps=10) == pytest.approx(0.0)
    warm_cosine = UpdateSchedule("cosine", warmup_steps=2)
    assert [warm_cosine.factor(n, total_steps=12) for n in (1, 2)] == [0.5, 1.0]
    assert warm_cosine.factor(7, total_steps=12) == pytest.approx(0.5)
    stop = UpdateSchedule("constant", stop_fraction=0.5)
    assert [stop.factor(n, total_steps=10) for n in (5, 6)] == [1.0, 0.0]
    assert UpdateSchedule().factor(10**6) == 1.0
