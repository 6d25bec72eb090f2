import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from conftest import run_on_two_ranks
from hf_lossfree_moe import LossFreeBalancer, LossFreeBalancingCallback, LossFreeMoeConfig, LossFreeMoeForCausalLM
from hf_lossfree_moe.load_metrics import load_metrics, maxvio
from hf_lossfree_moe.routers import read_scores
from hf_lossfree_moe.testing_utils import build_tiny_model
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


def tiny_model(**overrides) -> LossFreeMoeForCausalLM:
    from conftest import TINY

    torch.manual_seed(0)
    return LossFreeMoeForCausalLM(LossFreeMoeConfig(**{**TINY, **overrides})).train()


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


def test_balancer_averages_quantile_candidates_over_micro_batches_then_recentres_and_blends():
    model = tiny_model(bias_update_rule="quantile", bias_quantile_ema=0.5)
    balancer = LossFreeBalancer(model)
    router = balancer.routers[0]
    outputs = []
    hook = router.register_forward_hook(lambda module, args, output: outputs.append(output))
    generator = torch.Generator().manual_seed(3)
    input_ids = [torch.randint(3, 128, (2, 9), generator=generator) for _ in range(2)]
    second_mask = torch.ones(2, 9, dtype=torch.long)
    second_mask[0, 5:] = 0
    with torch.no_grad():
        model(input_ids=input_ids[0])
        model(input_ids=input_ids[1], attention_mask=second_mask)
    hook.remove()
    candidates = [
        quantile_candidate(output[0].sigmoid(), torch.zeros(8), 2, mask)
        for output, mask in zip(outputs, [None, second_mask.reshape(-1)], strict=True)
    ]
    mean = (candidates[0] + candidates[1]) / 2
    expected = 0.5 * (mean - mean.mean())
    balancer.step()
    torch.testing.assert_close(balancer.biases()[0], expected, atol=1e-6, rtol=0)


def test_quantile_step_sums_counts_candidates_and_calls_over_ranks_in_one_collective(monkeypatch):
    """Two balancers stand for two ranks: the collective is replaced by adding the other rank's payload."""
    ranks = [LossFreeBalancer(tiny_model(bias_update_rule="quantile")) for _ in range(2)]
    generator = torch.Generator().manual_seed(6)
    for rank, calls in zip(ranks, (1, 2), strict=True):
        for _ in range(calls):
            with torch.no_grad():
                rank.model(input_ids=torch.randint(3, 128, (2, 9), generator=generator))
    payloads = [(rank.loads, *rank._candidates.stacked(rank.device)) for rank in ranks]
    reduced = []

    def all_reduce(tensor):
        reduced.append(tensor.clone())
        other_loads, other_sums, other_calls = payloads[1]
        tensor += torch.cat([other_loads.double(), other_sums, other_calls], dim=-1)

    monkeypatch.setattr(ranks[0], "_all_reduce", all_reduce)
    stats = ranks[0].step()
    assert len(reduced) == 1 and reduced[0].dtype == torch.float64
    loads = payloads[0][0] + payloads[1][0]
    assert stats["maxvio_batch"] == pytest.approx(maxvio(loads).mean)
    mean = (payloads[0][1] + payloads[1][1]) / 3  # 1 + 2 router calls per layer
    torch.testing.assert_close(ranks[0].biases(), (mean - mean.mean(dim=-1, keepdim=True)).float())


@pytest.mark.slow
def test_quantile_candidates_average_over_ranks_and_biases_stay_identical(tmp_path):
    ranks = run_on_two_ranks(Path(__file__).parent / "quantile_ranks_scenario.py", tmp_path, timeout=300)
    assert ranks[0]["biases"] == ranks[1]["biases"]
    assert ranks[0]["sums"] != ranks[1]["sums"]  # the ranks routed different tokens
    sums = sum(torch.tensor(rank["sums"]) for rank in ranks)  # (L, E)
    calls = sum(torch.tensor(rank["calls"]) for rank in ranks)  # (L, 1): 2 micro-batches on each of 2 ranks
    assert calls.flatten().tolist() == [4.0, 4.0]
    mean = sums / calls
    expected = mean - mean.mean(dim=-1, keepdim=True)  # bias_quantile_ema = 1: the candidate replaces the bias
    torch.testing.assert_close(torch.tensor(ranks[0]["biases"]), expected.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["deepseek_v3", "kolibri1", "ernie4_5_moe", "minimax_m2"])
def test_scores_read_for_quantile_reproduce_the_routers_own_selection(family):
    torch.manual_seed(0)
    model = build_tiny_model(family).train()
    balancer = LossFreeBalancer(model, rule="quantile")
    found = balancer._routers[0]
    bias = getattr(found.bias_owner, found.bias_attr)
    with torch.no_grad():
        bias.copy_(torch.randn_like(bias) * 0.05)
    outputs = []
    hook = found.module.register_forward_hook(lambda module, args, output: outputs.append(output))
    model(input_ids=torch.randint(3, 100, (2, 8)))
    hook.remove()
    scores = read_scores(found, outputs[0])
    selected = found.adapter.topk_indices(found.module, outputs[0])
    mine = (scores + bias.reshape(-1)).topk(selected.size(-1)).indices
    assert scores.dtype == torch.float32
    assert torch.equal(mine.sort(-1).values, selected.sort(-1).values)
    stats = balancer.step()
    assert stats["bias_updated"] == 1.0
    balancer.remove()


def test_quantile_refuses_a_router_whose_scoring_function_is_unknown():
    model = tiny_model()
    for router in model.model.routers():
        router.scoring_func = "sqrtsoftplus"
    with pytest.raises(ValueError, match="rule='quantile' needs the routers' scores.*model.layers.1.mlp.gate"):
        LossFreeBalancer(model, rule="quantile")


def test_quantile_needs_an_additive_bias():
    with pytest.raises(ValueError, match="LossFreeMoeConfig.bias_update_rule must be other than 'quantile'"):
        LossFreeMoeConfig(bias_update_rule="quantile", bias_type="multiplicative")
    with pytest.raises(ValueError, match="bias_type='additive'"):
        LossFreeBalancer(tiny_model(bias_type="multiplicative"), rule="quantile")


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


def test_balancer_smebu_keeps_momentum_between_steps():
    model = tiny_model(bias_update_rule="smebu", bias_update_rate=1e-2, bias_update_momentum=0.5)
    balancer = LossFreeBalancer(model)
    input_ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    steps = []
    for _ in range(2):
        with torch.no_grad():
            model(input_ids=input_ids)
        loads = balancer.loads
        before = balancer.biases()
        balancer.step()
        steps.append((loads, balancer.biases() - before))
    state = torch.zeros(2, 8, dtype=torch.float64)
    for loads, delta in steps:
        expected = rule_update("smebu", loads, torch.zeros(2, 8), 1e-2, momentum_state=state, momentum=0.5)
        torch.testing.assert_close(delta, expected.float(), atol=1e-7, rtol=0)


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


def test_balancer_applies_the_schedule_factor_to_the_step():
    model = tiny_model(bias_update_schedule="linear_warmup", bias_update_warmup_steps=4, bias_update_rate=1e-2)
    balancer = LossFreeBalancer(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5)))
    stats = balancer.step()
    assert stats["bias_update_factor"] == 0.25
    assert balancer.biases().abs().max().item() == pytest.approx(0.25 * 1e-2)


def test_a_schedule_that_stops_needs_total_steps():
    model = tiny_model(bias_update_stop_fraction=0.5)
    balancer = LossFreeBalancer(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (2, 9)))
    with pytest.raises(ValueError, match="total_steps must be the number of optimizer steps"):
        balancer.step()
    with pytest.raises(ValueError, match="total_steps must be"):
        balancer.total_steps = 0
    balancer.total_steps = 1
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (2, 9)))
    assert balancer.step()["bias_update_factor"] == 0.0  # update 2 of 1 is past the stop


def test_callback_takes_total_steps_from_the_trainer(tmp_path):
    model = tiny_model(bias_update_schedule="cosine")
    callback = LossFreeBalancingCallback()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = TrainerState(max_steps=40, global_step=10)
    callback._first_in_trainer = True
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    assert (callback.balancer.total_steps, callback.balancer.completed_steps) == (40, 10)


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        ({"bias_update_rule": "qb"}, "bias_update_rule", "'quantile', 'smebu'"),
        ({"bias_update_schedule": "step"}, "bias_update_schedule", "'linear_warmup', 'cosine'"),
        ({"bias_update_warmup_steps": -1}, "bias_update_warmup_steps", "an integer >= 0"),
        ({"bias_update_stop_fraction": 0.0}, "bias_update_stop_fraction", "(0, 1]"),
        ({"bias_update_stop_fraction": 1.5}, "bias_update_stop_fraction", "(0, 1]"),
        ({"bias_quantile_ema": 0.0}, "bias_quantile_ema", "(0, 1]"),
        ({"bias_update_momentum": 1.0}, "bias_update_momentum", "[0, 1)"),
        ({"bias_update_rule": "quantile", "bias_quantile_anneal_steps": -1}, "bias_quantile_anneal_steps", ">= 0"),
        ({"bias_quantile_anneal_steps": 10}, "bias_quantile_anneal_steps", "unless bias_update_rule='quantile'"),
    ],
)
def test_config_rejects_bad_rule_settings_naming_the_field(overrides, field, allowed):
    with pytest.raises(ValueError, match=f"LossFreeMoeConfig.{field} must be") as error:
        LossFreeMoeConfig(**overrides)
    assert allowed in str(error.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rule": "qb"}, "rule"),
        ({"schedule": "step"}, "bias_update_schedule"),
        ({"warmup_steps": 1.5}, "bias_update_warmup_steps"),
        ({"stop_fraction": float("nan")}, "bias_update_stop_fraction"),
        ({"quantile_ema": 2.0}, "bias_quantile_ema"),
        ({"momentum": -0.1}, "bias_update_momentum"),
        ({"total_steps": True}, "total_steps"),
    ],
)
def test_balancer_and_callback_reject_bad_settings_naming_them(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        LossFreeBalancer(tiny_model(), **kwargs)
    if "total_steps" not in kwargs:
        with pytest.raises(ValueError, match=f"^{field} must be"):
            LossFreeBalancingCallback(**kwargs)


def test_default_settings_keep_the_sign_rule_with_a_constant_rate():
    config = LossFreeMoeConfig()
    assert (config.bias_update_rule, config.bias_update_schedule, config.bias_update_stop_fraction) == (
        "sign",
        "constant",
        1.0,
    )
    balancer = LossFreeBalancer(tiny_model())
    with torch.no_grad():
        balancer.model(input_ids=torch.randint(3, 128, (2, 9)))
    loads = balancer.loads.double()
    balancer.step()
    expected = 1e-3 * (loads.mean(dim=-1, keepdim=True) - loads).sign()
    torch.testing.assert_close(balancer.biases(), expected.float())


def test_load_metrics_by_hand():
    metrics = load_metrics(torch.tensor([[4, 0, 2, 2], [0, 0, 0, 0], [2, 2, 2, 2]]), "eval")
    # layer 1 received no token and is left out; layer 0: mean 2, std sqrt(2); layer 2: balanced
    assert metrics == pytest.approx(
        {
            "eval_dead_expert_fraction": (0.25 + 0.0) / 2,
            "eval_load_cv": (math.sqrt(2) / 2 + 0.0) / 2,
            "eval_min_load_ratio": (0.0 + 1.0) / 2,
        }
    )
    assert load_metrics(torch.zeros(2, 4), "eval") == {}


def test_step_logs_the_load_metrics_of_the_batch():
    model = tiny_model()
    balancer = LossFreeBalancer(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (2, 9)))
    expected = load_metrics(balancer.loads, "batch")
    stats = balancer.step()
    assert {key: stats[key] for key in expected} == expected
    assert set(expected) == {"batch_dead_expert_fraction", "batch_load_cv", "batch_min_load_ratio"}
