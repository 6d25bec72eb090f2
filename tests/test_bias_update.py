"""The step: rules applied in place from the step's global loads, schedules, momentum, and what a step reports."""

import copy
import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import ToyModel, ToyRouter, padded_batch, run_on_two_ranks, tiny_model
from hf_lossfree_moe import LossFreeBalancer, LossFreeMoeConfig, LossFreeMoeForCausalLM, compute_maxvio
from hf_lossfree_moe.balance_metrics import compute_load_metrics
from hf_lossfree_moe.update_rules import (
    UPDATE_RULES,
    histogram_margin_quantiles,
    quantile_candidate,
    quantile_histogram,
    rule_update,
)


def test_step_applies_the_sign_rule_in_place(model):
    balancer = LossFreeBalancer(model)
    tensors = [router.e_score_correction_bias for router in model.routers()]
    pointers = [bias.data_ptr() for bias in tensors]
    with torch.no_grad():
        for bias in tensors:
            bias.uniform_(-0.01, 0.01)
    before = balancer.biases()
    input_ids, attention_mask = padded_batch([12, 8, 4])
    model(input_ids=input_ids, attention_mask=attention_mask)
    loads = balancer.loads.double()

    stats = balancer.step()

    expected = before + 1e-3 * torch.sign(loads.mean(dim=-1, keepdim=True) - loads).float()
    assert torch.equal(balancer.biases(), expected)
    assert all(
        a is b for a, b in zip(tensors, [r.e_score_correction_bias for r in model.routers()], strict=True)
    )  # same objects
    assert [bias.data_ptr() for bias in tensors] == pointers  # ... same storage
    assert all(bias.dtype == torch.float32 for bias in tensors)
    assert torch.equal(model.state_dict()["model.layers.1.mlp.gate.e_score_correction_bias"], expected[0])
    per_layer = compute_maxvio(loads)
    assert stats["maxvio_batch"] == pytest.approx(per_layer.mean)
    assert [stats["maxvio_batch/layer_1"], stats["maxvio_batch/layer_2"]] == pytest.approx(
        list(per_layer.per_layer.values())
    )
    assert stats["bias_abs_max"] == pytest.approx(expected.abs().max().item())
    assert stats["bias_updated"] == 1.0
    assert balancer.loads.sum() == 0


def test_error_rule_and_centering(model):
    balancer = LossFreeBalancer(model, bias_update_rate=1e-2, bias_update_rule="error", center=True)
    input_ids, attention_mask = padded_batch([12, 12, 7])
    model(input_ids=input_ids, attention_mask=attention_mask)
    loads = balancer.loads.double()
    balancer.step()

    mean = loads.mean(dim=-1, keepdim=True)
    delta = 1e-2 * (mean - loads) / mean
    expected = (delta - delta.mean(dim=-1, keepdim=True)).float()
    torch.testing.assert_close(balancer.biases(), expected, rtol=0, atol=1e-8)
    assert balancer.biases().sum(dim=-1).abs().max() < 1e-7


def test_multiplicative_bias_starts_at_one_and_takes_the_same_steps(tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config(bias_type="multiplicative")).train()
    balancer = LossFreeBalancer(model)
    assert balancer.bias_type == "multiplicative"
    assert torch.equal(balancer.biases(), torch.ones(2, 8))
    model(torch.randint(3, 128, (3, 10)))
    loads = balancer.loads.double()
    stats = balancer.step()
    expected = 1 + 1e-3 * torch.sign(loads.mean(dim=-1, keepdim=True) - loads).float()
    assert torch.equal(balancer.biases(), expected)
    assert stats["bias_abs_max"] == pytest.approx(1e-3, abs=1e-6)  # measured from the neutral value 1


def test_step_without_tokens_changes_nothing_and_says_so(model):
    balancer = LossFreeBalancer(model)
    model.eval()
    model(torch.randint(3, 128, (2, 6)))
    with pytest.warns(UserWarning, match="no token was counted"):
        stats = balancer.step()
    assert "maxvio_batch" not in stats
    assert stats == {
        "maxvio_batch/skipped_layers": 2.0,
        "bias_abs_max": 0.0,
        "bias_abs_mean": 0.0,
        "bias_update_factor": 1.0,
        "bias_updated": 0.0,
    }
    assert torch.equal(balancer.biases(), torch.zeros(2, 8))


def test_step_after_eval_mode_forwards_says_call_train_at_the_callers_line(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = LossFreeMoeForCausalLM.from_pretrained(tmp_path)  # in eval mode, as from_pretrained leaves every model
    balancer = LossFreeBalancer(loaded)
    loaded(torch.randint(3, 128, (2, 6)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        stats = balancer.step()
    [warning] = caught
    assert (warning.filename, warning.lineno) == (__file__, line)  # the user's call, not torch's no_grad wrapper
    assert "call model.train()" in str(warning.message)
    assert stats["bias_updated"] == 0.0

    loaded.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        balancer.step()  # no forward at all since the last step: nothing ran in eval mode, no advice to call train()
    assert "no token was counted" in str(caught[0].message) and "model.train()" not in str(caught[0].message)
    loaded(torch.randint(3, 128, (2, 6)))
    assert balancer.step()["bias_updated"] == 1.0


@pytest.mark.parametrize("kwargs", [{"frozen": True}, {"update_rate": 0.0}])
def test_frozen_or_zero_rate_measures_without_updating(model, kwargs):
    balancer = LossFreeBalancer(model, **kwargs)
    model(torch.randint(3, 128, (2, 6)))
    stats = balancer.step()
    assert stats["maxvio_batch"] > 0
    assert stats["bias_updated"] == 0.0
    assert torch.equal(balancer.biases(), torch.zeros(2, 8))


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


def test_annealed_quantile_starts_from_the_first_batch_then_blends_with_a_falling_weight():
    # A = 2, floor 0.25: updates 1 and 2 replace the bias by the batch's re-centred candidate (the first is the warm
    # start), update 3 blends with weight 2 / 3, update 8 (2 / 8) and later with the floor 0.25
    model = tiny_model(bias_update_rule="quantile", bias_quantile_anneal_steps=2, bias_quantile_ema=0.25)
    balancer = LossFreeBalancer(model)
    router = balancer.routers[0]
    outputs = []
    hook = router.register_forward_hook(lambda module, args, output: outputs.append(output))
    generator = torch.Generator().manual_seed(6)
    expected_weights = {1: 1.0, 2: 1.0, 3: 2 / 3, 8: 0.25, 9: 0.25}
    for update in range(1, 10):
        before = balancer.biases()[0]
        with torch.no_grad():
            model(input_ids=torch.randint(3, 128, (2, 9), generator=generator))
        balancer.step()
        candidate = quantile_candidate(outputs[-1][0].sigmoid(), before, 2)
        target = candidate - candidate.mean()
        if update in expected_weights:
            weight = expected_weights[update]
            torch.testing.assert_close(balancer.biases()[0], before + weight * (target - before), atol=1e-6, rtol=0)
    hook.remove()


def test_quantile_step_sums_counts_candidates_and_calls_over_ranks_in_one_collective(monkeypatch):
    """Two balancers stand for two ranks: the collective is replaced by adding the other rank's payload."""
    ranks = [LossFreeBalancer(tiny_model(bias_update_rule="quantile")) for _ in range(2)]
    generator = torch.Generator().manual_seed(6)
    for rank, calls in zip(ranks, (1, 2), strict=True):
        for _ in range(calls):
            with torch.no_grad():
                rank.model(input_ids=torch.randint(3, 128, (2, 9), generator=generator))
    payloads = [(rank.loads, *rank._counter.candidates.stacked(rank.device)) for rank in ranks]
    reduced = []

    def all_reduce(tensor):
        reduced.append(tensor.clone())
        other_loads, other_sums, other_calls = payloads[1]
        no_non_finite_calls = torch.zeros_like(other_calls)
        tensor += torch.cat([other_loads.double(), no_non_finite_calls, other_sums, other_calls], dim=-1)

    monkeypatch.setattr(ranks[0], "_all_reduce", all_reduce)
    stats = ranks[0].step()
    assert len(reduced) == 1 and reduced[0].dtype == torch.float64
    loads = payloads[0][0] + payloads[1][0]
    assert stats["maxvio_batch"] == pytest.approx(compute_maxvio(loads).mean)
    mean = (payloads[0][1] + payloads[1][1]) / 3  # 1 + 2 router calls per layer
    torch.testing.assert_close(ranks[0].biases(), (mean - mean.mean(dim=-1, keepdim=True)).float())


@pytest.mark.slow
def test_quantile_candidates_average_over_ranks_and_biases_stay_identical(tmp_path):
    ranks = run_on_two_ranks(Path(__file__).parent / "quantile_ranks_scenario.py", tmp_path, timeout=300)
    assert ranks[0]["biases"] == ranks[1]["biases"]
    assert ranks[0]["sums"][0] != ranks[1]["sums"][0]  # the ranks routed different tokens
    previous = torch.zeros(2, 8)
    for step, weight in enumerate([1.0, 0.5]):  # annealed with A = 1: 1, then 1 / 2
        sums = sum(torch.tensor(rank["sums"][step]) for rank in ranks)  # (L, E)
        calls = sum(torch.tensor(rank["calls"][step]) for rank in ranks)  # (L, 1): 2 micro-batches on each of 2 ranks
        assert calls.flatten().tolist() == [4.0, 4.0]
        mean = sums / calls
        target = mean - mean.mean(dim=-1, keepdim=True)
        expected = previous + weight * (target.float() - previous)
        torch.testing.assert_close(torch.tensor(ranks[0]["biases"][step]), expected, atol=1e-6, rtol=0)
        previous = expected


GLOBAL_QUANTILE = {"rule": "quantile", "bias_quantile_solver": "global_histogram"}


def toy_step(balancer, micro_batches: list[torch.Tensor]) -> dict:
    """Route each (T, E) micro-batch of logits through every toy router, then step."""
    for scores in micro_batches:
        for router in balancer.model.layers:
            router.scores = scores
        balancer.model()
    return balancer.step()


def test_global_quantile_over_micro_batches_steps_like_one_call_over_their_concatenation():
    generator = torch.Generator().manual_seed(7)
    micro_batches = [torch.randn(6, 8, generator=generator) for _ in range(4)]
    for scores in micro_batches:
        scores[:, 0] += 1.5  # a popular expert
    whole = torch.cat(micro_batches)  # 24 tokens: share ceil(24 * 2 / 8) = 6
    split, joined, averaged = (
        LossFreeBalancer(two_toy_layers(torch.zeros(1, 8)), **settings)
        for settings in (GLOBAL_QUANTILE, GLOBAL_QUANTILE, {"rule": "quantile"})
    )
    toy_step(split, micro_batches)
    toy_step(joined, [whole])
    toy_step(averaged, micro_batches)
    assert torch.equal(split.biases(), joined.biases())  # the same histogram, to the count
    exact = quantile_candidate(whole.sigmoid(), torch.zeros(8), 2)  # the quantile of all 24 tokens at once
    exact = exact - exact.mean()
    width = 2.0 / 1000
    assert (split.biases()[0] - exact).abs().max() <= 2 * width  # one bin, and the re-centring's share of it
    # the mean of four 6-token quantiles is not the quantile of the 24 tokens
    assert (averaged.biases()[0] - exact).abs().max() > 10 * width


def test_global_quantile_step_adds_its_histograms_to_the_one_collective(monkeypatch):
    """Two balancers stand for two ranks: the collective is replaced by adding the other rank's payload."""
    generator = torch.Generator().manual_seed(8)
    halves = [torch.randn(5, 8, generator=generator), torch.randn(7, 8, generator=generator)]
    ranks = [LossFreeBalancer(two_toy_layers(torch.zeros(1, 8)), **GLOBAL_QUANTILE, bias_quantile_histogram_bins=50)]
    ranks.append(
        LossFreeBalancer(two_toy_layers(torch.zeros(1, 8)), **GLOBAL_QUANTILE, bias_quantile_histogram_bins=50)
    )
    one_process = LossFreeBalancer(
        two_toy_layers(torch.zeros(1, 8)), **GLOBAL_QUANTILE, bias_quantile_histogram_bins=50
    )
    for rank, half in zip(ranks, halves, strict=True):
        for router in rank.model.layers:
            router.scores = half
        rank.model()
    other = ranks[1]._counter
    payload = torch.cat([other.train_counts.stacked(ranks[1].device).double(), torch.zeros(2, 1)], dim=-1)
    payload = torch.cat([payload, other.histograms.take(ranks[1].device)[0]], dim=-1)
    reduced = []

    def all_reduce(tensor):
        reduced.append(tensor.clone())
        tensor += payload

    monkeypatch.setattr(ranks[0], "_all_reduce", all_reduce)
    ranks[0].step()
    toy_step(one_process, [torch.cat(halves)])
    [gathered] = reduced
    assert gathered.dtype == torch.float64 and gathered.shape == (2, 8 + 1 + 8 * 52 + 1)
    assert torch.equal(ranks[0].biases(), one_process.biases())
    histogram = quantile_histogram(torch.cat(halves).sigmoid(), torch.zeros(8), 2, bins=50, value_range=1.0)
    margins, _, _ = histogram_margin_quantiles(histogram[None].long(), torch.tensor([12 * 2]), 1.0)
    expected = -margins[0] + margins[0].mean()  # candidate 0 - d, re-centred, weight 1
    torch.testing.assert_close(ranks[0].biases()[0], expected.float())


def test_global_quantile_on_two_ranks_updates_exactly_like_one_process(tmp_path):
    from global_quantile_ranks_scenario import SETTINGS, TOKENS, run, toy_model

    ranks = run_on_two_ranks(Path(__file__).parent / "global_quantile_ranks_scenario.py", tmp_path, timeout=300)
    one_process = run(LossFreeBalancer(toy_model(), **SETTINGS), slice(0, TOKENS))
    assert ranks[0]["biases"] == ranks[1]["biases"] == one_process
    assert one_process[1] != one_process[2]  # the biases kept moving


def test_global_quantile_resumes_from_the_balancer_state_and_the_biases():
    """Annealed (A = 2, floor 0.25): a balancer rebuilt at step 3 from the checkpointed state and biases takes the
    same steps 4 and 5 as the one that ran on."""
    generator = torch.Generator().manual_seed(9)
    steps = [[torch.randn(6, 8, generator=generator) for _ in range(2)] for _ in range(5)]
    settings = {**GLOBAL_QUANTILE, "bias_quantile_anneal_steps": 2, "bias_quantile_ema": 0.25}
    running = LossFreeBalancer(two_toy_layers(torch.zeros(1, 8)), **settings)
    for micro_batches in steps[:3]:
        toy_step(running, micro_batches)
    checkpoint = (copy.deepcopy(running.state_dict()), copy.deepcopy(running.model.state_dict()))
    resumed_model = two_toy_layers(torch.zeros(1, 8))
    resumed_model.load_state_dict(checkpoint[1])
    resumed = LossFreeBalancer(resumed_model, **settings)
    resumed.load_state_dict(json.loads(json.dumps(checkpoint[0])))  # as a Trainer checkpoint stores it
    for micro_batches in steps[3:]:
        toy_step(running, micro_batches)
        toy_step(resumed, micro_batches)
        assert torch.equal(resumed.biases(), running.biases())
    assert resumed.state_dict() == running.state_dict()


def test_a_global_quantile_beyond_the_histogram_range_moves_by_the_range_and_says_so():
    scores = torch.randn(40, 8, generator=torch.Generator().manual_seed(10))
    scores[:, 0] += 3.0  # expert 0's threshold is far above its bias of 0
    balancer = LossFreeBalancer(two_toy_layers(scores), **GLOBAL_QUANTILE, bias_quantile_histogram_range=0.01)
    balancer.model()
    messages = step_recording_warnings(balancer)
    assert messages == [
        "LossFreeBalancer.step() 1: the quantile of some experts of layer(s) 0, 1 lay more than "
        "bias_quantile_histogram_range=0.01 from their bias, so their candidate moved by that range only; a wider "
        "range (or more steps) reaches it."
    ]
    biases = balancer.biases()
    assert biases[0, 0] < 0 and (biases.max(dim=-1).values - biases.min(dim=-1).values).max() <= 0.02 + 1e-7


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


def test_step_logs_the_load_metrics_of_the_batch():
    model = tiny_model()
    balancer = LossFreeBalancer(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (2, 9)))
    expected = compute_load_metrics(balancer.loads, "batch")
    stats = balancer.step()
    assert {key: stats[key] for key in expected} == expected
    assert set(expected) == {"batch_dead_expert_fraction", "batch_load_cv", "batch_min_load_ratio"}


def two_toy_layers(scores: torch.Tensor) -> ToyModel:
    return ToyModel(ToyRouter(scores.clone(), top_k=2), ToyRouter(scores.clone(), top_k=2)).train()


def step_recording_warnings(balancer) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        balancer.step()
    return [str(warning.message) for warning in caught]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "settings", [{"rule": rule} for rule in UPDATE_RULES] + [GLOBAL_QUANTILE], ids=[*UPDATE_RULES, "global_quantile"]
)
def test_a_non_finite_score_skips_that_layers_update_with_one_warning(settings, bad):
    """One bad token in layer 1 at step 3: layer 1 keeps its bias (and momentum) for that step, with one warning
    naming it and the step; layer 0 updates as in a clean run; from the next clean step on, layer 1 moves again."""
    scores = torch.rand(12, 8)
    model, clean = two_toy_layers(scores), two_toy_layers(scores)
    balancer = LossFreeBalancer(model, update_rate=0.01, **settings)
    reference = LossFreeBalancer(clean, update_rate=0.01, **settings)
    for _ in range(2):
        model(), clean()
        balancer.step(), reference.step()

    model.layers[1].scores[3, 5] = bad
    before, momentum_before = balancer.biases(), balancer.state_dict()["momentum"]
    model(), clean()
    messages = step_recording_warnings(balancer)
    reference.step()
    assert messages == [
        "LossFreeBalancer.step() 3: the router scores of layer(s) 1 held NaN or infinite values (check the inputs and "
        "activations of this step), so their biases, and their momentum, were left as they were for this step."
    ]
    assert torch.equal(balancer.biases()[1], before[1])
    assert balancer.state_dict()["momentum"][1] == momentum_before[1]
    assert torch.equal(balancer.biases()[0], reference.biases()[0])

    model.layers[1].scores = torch.rand(12, 8)  # clean again, and new: every rule moves the bias
    model()
    assert step_recording_warnings(balancer) == []
    assert torch.isfinite(balancer.biases()).all() and not torch.equal(balancer.biases()[1], before[1])
    assert torch.isfinite(torch.tensor(balancer.state_dict()["momentum"], dtype=torch.float64)).all()


@pytest.mark.parametrize("solver", ["call_mean", "global_histogram"])
def test_a_nan_token_leaves_quantile_biases_finite_and_routing_balanced(solver):
    """One NaN embedding in one batch: every MoE layer skips that step, and clean steps go on balancing."""
    model = tiny_model(bias_update_rule="quantile", bias_quantile_solver=solver)
    balancer = LossFreeBalancer(model)
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randint(3, 128, (4, 16), generator=generator) for _ in range(6)]
    for input_ids in batches[:2]:
        model(input_ids=input_ids)
        balancer.step()
    before = balancer.biases()
    embeddings = model.get_input_embeddings()(batches[2]).detach()
    embeddings[1, 4] = float("nan")
    model(inputs_embeds=embeddings)
    messages = step_recording_warnings(balancer)
    assert len(messages) == 1 and messages[0].startswith(
        "LossFreeBalancer.step() 3: the router scores of layer(s) 1, 2"
    )
    assert torch.equal(balancer.biases(), before)
    for input_ids in batches[3:]:
        model(input_ids=input_ids)
        stats = balancer.step()
    assert torch.isfinite(balancer.biases()).all() and not torch.equal(balancer.biases(), before)
    # NaN biases route every token to the same two of 8 experts (top-2): MaxVio (8/2 - 1) = 3.
    assert stats["maxvio_batch"] < 2


def test_a_non_finite_score_on_one_rank_skips_the_layer_on_every_rank(monkeypatch):
    """Two balancers stand for two ranks: the other rank's non-finite call travels in the same collective."""
    scores = torch.rand(6, 4)
    poisoned = scores.clone()
    poisoned[0, 0] = float("nan")
    ranks = [LossFreeBalancer(two_toy_layers(scores)), LossFreeBalancer(two_toy_layers(scores))]
    ranks[1].model.layers[0].scores = poisoned
    for rank in ranks:
        rank.model()
    other = torch.cat([ranks[1].loads, ranks[1]._counter.train_counts.non_finite_calls(ranks[1].device)], dim=-1)
    monkeypatch.setattr(ranks[0], "_all_reduce", lambda tensor: tensor.add_(other))
    messages = step_recording_warnings(ranks[0])
    assert len(messages) == 1 and "layer(s) 0 held NaN" in messages[0]
    assert ranks[0].biases()[0].eq(0).all() and ranks[0].biases()[1].ne(0).any()
