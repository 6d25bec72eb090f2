"""The update rules and schedules as pure functions of loads and scores, checked by hand."""

import math

import pytest
import torch

from hf_lossfree_moe.update_rules import UpdateSchedule, quantile_candidate, quantile_weight, rule_update


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
    # alpha = [0.65, 0.75, 0.7, 0.5]; column 0 of s - alpha = [0.25, 0.05, 0.0, 0.1] -> beta_0 = 0.1
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
