"""Batch-balanced routing (`batch_balance_iterations`): a training forward routes its batch on the bias that balances
that batch, started from the stored bias; evaluation routes on the stored bias, which Quantile Balancing learns."""

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from conftest import run_on_two_ranks
from hf_lossfree_moe import LossFreeBalancer, LossFreeMoeConfig, LossFreeMoeForCausalLM
from hf_lossfree_moe.modeling_lossfree_moe import LossFreeMoeTopkRouter, sequence_balance_loss
from hf_lossfree_moe.quantile_threshold import share_threshold_bias
from hf_lossfree_moe.update_rules import quantile_candidate


BALANCED = dict(bias_update_rule="quantile", batch_balance_iterations=4)


def flat_scores(tokens: int, experts: int, seed: int = 0) -> torch.Tensor:
    """Scores whose expert offsets (0.2) dwarf their spread over tokens (0.01), as in the replay's early steps."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randn(experts, generator=generator) * 0.2
    return (offsets + torch.randn(tokens, experts, generator=generator) * 0.01).sigmoid()


def maxvio_of_routing(scores: torch.Tensor, bias: torch.Tensor, top_k: int) -> float:
    loads = torch.bincount((scores + bias).topk(top_k, dim=-1).indices.flatten(), minlength=bias.numel()).float()
    return (loads.max() / loads.mean() - 1).item()


def test_each_pass_is_one_quantile_candidate_from_the_previous_bias():
    scores, bias = flat_scores(256, 8), torch.linspace(-0.1, 0.1, 8)
    expected = bias
    for passes in range(1, 5):
        expected = quantile_candidate(scores, expected, top_k=2)
        assert torch.equal(share_threshold_bias(scores, bias, 2, passes=passes), expected)


def test_passes_converge_to_a_balanced_batch_where_one_pass_does_not():
    scores = flat_scores(2048, 16)
    zero = torch.zeros(16)
    assert maxvio_of_routing(scores, zero, 2) > 2  # the offsets send most tokens to a few experts
    one_pass = maxvio_of_routing(scores, share_threshold_bias(scores, zero, 2, passes=1), 2)
    four_passes = maxvio_of_routing(scores, share_threshold_bias(scores, zero, 2, passes=4), 2)
    assert one_pass > 0.5  # the cutoffs moved with the bias: one pass overshoots
    assert four_passes < 0.1  # the share is 256 tokens: within 26 of it


def test_a_training_forward_routes_on_the_batch_bias_and_evaluation_on_the_stored_one(tiny_config):
    router = LossFreeMoeTopkRouter(tiny_config(**BALANCED))
    torch.nn.init.normal_(router.weight, std=0.02)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, router.num_experts))
    stored = router.e_score_correction_bias.clone()
    hidden = torch.randn(64, router.hidden_dim)
    logits, _, train_indices = router.train()(hidden)
    scores = logits.sigmoid()
    batch_bias = share_threshold_bias(scores, stored, router.top_k, passes=4)
    assert torch.equal(train_indices, (scores + batch_bias).topk(router.top_k, dim=-1, sorted=False).indices)
    _, _, eval_indices = router.eval()(hidden)
    assert torch.equal(eval_indices, (scores + stored).topk(router.top_k, dim=-1, sorted=False).indices)
    assert torch.equal(router.e_score_correction_bias, stored)  # the router never writes its bias
    train_loads = torch.bincount(train_indices.flatten(), minlength=router.num_experts)
    eval_loads = torch.bincount(eval_indices.flatten(), minlength=router.num_experts)
    assert train_loads.max() - train_loads.min() < eval_loads.max() - eval_loads.min()


def test_padding_neither_shifts_the_batch_bias_nor_changes_real_tokens(tiny_config):
    torch.manual_seed(0)
    model = LossFreeMoeForCausalLM(tiny_config(**BALANCED)).train()
    real = torch.randint(3, model.config.vocab_size, (2, 12))
    padded = torch.cat([real, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    other_padding = torch.cat([real, torch.randint(3, model.config.vocab_size, (2, 4))], dim=1)
    mask = torch.cat([torch.ones(2, 12), torch.zeros(2, 4)], dim=1).long()
    with torch.no_grad():
        unpadded = model(real).logits
        first = model(padded, attention_mask=mask).logits[:, :12]
        second = model(other_padding, attention_mask=mask).logits[:, :12]
    torch.testing.assert_close(first, unpadded, atol=1e-5, rtol=0)
    torch.testing.assert_close(second, unpadded, atol=1e-5, rtol=0)


def test_training_routing_looks_across_the_batch_and_evaluation_does_not(tiny_config):
    torch.manual_seed(0)
    model = LossFreeMoeForCausalLM(tiny_config(**BALANCED, experts_implementation="batched_mm"))
    input_ids = torch.randint(3, model.config.vocab_size, (4, 24))
    changed = input_ids.clone()
    changed[1:] = (input_ids[1:] + 1) % model.config.vocab_size

    def first_sequence_change() -> float:
        with torch.no_grad():
            return (model(changed).logits[0] - model(input_ids).logits[0]).abs().max().item()

    model.train()
    assert first_sequence_change() > 1e-3
    model.eval()
    assert first_sequence_change() == 0.0


def test_the_balancer_learns_the_stored_bias_as_without_batch_balancing(tiny_config):
    """One MoE layer: its scores do not depend on the routing, so Quantile Balancing's update is the same whether the
    batch was routed balanced or not, while the counts show the balanced routing."""
    overrides = dict(bias_update_rule="quantile", first_k_dense_replace=2, num_hidden_layers=3)
    torch.manual_seed(0)
    plain = LossFreeMoeForCausalLM(tiny_config(**overrides)).train()
    balanced = LossFreeMoeForCausalLM(tiny_config(**overrides, batch_balance_iterations=8)).train()
    balanced.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for model in (plain, balanced):
            model.routers()[0].e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    input_ids = torch.randint(3, plain.config.vocab_size, (8, 32))
    stats = {}
    for name, model in (("plain", plain), ("balanced", balanced)):
        balancer = LossFreeBalancer(model)
        model(input_ids)
        stats[name] = balancer.step()
    torch.testing.assert_close(
        balanced.routers()[0].e_score_correction_bias, plain.routers()[0].e_score_correction_bias, atol=0, rtol=0
    )
    assert stats["balanced"]["maxvio_batch"] < 0.2 < stats["plain"]["maxvio_batch"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(batch_balance_iterations=-1), "an integer >= 0"),
        (dict(batch_balance_iterations=2), "bias_update_rule='quantile'"),
        (dict(batch_balance_iterations=2, bias_update_rule="quantile", load_balancing="aux_loss"), "loss_free"),
        (dict(**BALANCED, batch_balance_steps=-3), "an integer >= 0"),
        (dict(batch_balance_steps=100), "0 unless batch_balance_iterations > 0"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(tiny_config, overrides, message):
    field = "batch_balance_steps" if "batch_balance_steps" in overrides else "batch_balance_iterations"
    with pytest.raises(ValueError, match=rf"{field} must be .*{message}"):
        tiny_config(**overrides)


def test_the_balancer_refuses_a_count_driven_rule_for_batch_balanced_routers(tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config(**BALANCED))
    with pytest.raises(ValueError, match="bias_update_rule must be 'quantile' for routers that route each batch"):
        LossFreeBalancer(model, bias_update_rule="sign")
    balancer = LossFreeBalancer(model)
    with pytest.raises(ValueError, match="batch_balance_iterations=4"):
        balancer.settings.bias_update_rule = "error"
    assert balancer.rule == "quantile"


def test_the_balancer_ends_batch_balanced_routing_after_the_steps_and_restores_it_on_resume(tiny_config):
    torch.manual_seed(0)
    model = LossFreeMoeForCausalLM(tiny_config(**BALANCED, batch_balance_steps=2)).train()
    balancer = LossFreeBalancer(model)
    input_ids = torch.randint(3, model.config.vocab_size, (4, 16))
    finished = []
    for _ in range(3):
        model(input_ids)
        balancer.step()
        finished.append([router.batch_balance_finished for router in model.routers()])
    assert finished == [[False, False], [True, True], [True, True]]
    router = model.routers()[0]
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, router.num_experts))  # far from balance
    hidden = torch.randn(32, router.hidden_dim)
    logits, _, indices = router(hidden)  # training mode, after the steps: the stored bias routes
    on_stored = (logits.sigmoid() + router.e_score_correction_bias).topk(router.top_k, dim=-1, sorted=False).indices
    assert torch.equal(indices, on_stored)
    router.batch_balance_finished = False
    assert not torch.equal(router(hidden)[2], on_stored)
    state = balancer.state_dict()
    balancer.completed_steps = 1  # set back, as a run resumed from step 1 would
    assert [r.batch_balance_finished for r in model.routers()] == [False, False]
    resumed = LossFreeBalancer(LossFreeMoeForCausalLM(tiny_config(**BALANCED, batch_balance_steps=2)).train())
    resumed.load_state_dict(state)
    assert [r.batch_balance_finished for r in resumed.routers] == [True, True]


def test_the_setting_round_trips_through_a_saved_config(tmp_path, tiny_config):
    tiny_config(**BALANCED, batch_balance_steps=50).save_pretrained(tmp_path)
    loaded = LossFreeMoeConfig.from_pretrained(tmp_path)
    assert (loaded.batch_balance_iterations, loaded.batch_balance_steps) == (4, 50)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_in_training_mode_routes_on_the_stored_bias(tiny_config, use_cache):
    """RL trainers generate with the model in training mode: decoding routes one token per sequence at a time, so
    only the stored bias gives the tokens that evaluation-mode generation gives."""
    torch.manual_seed(0)
    model = LossFreeMoeForCausalLM(tiny_config(**BALANCED))
    with torch.no_grad():
        for router in model.routers():
            router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, router.num_experts))
    prompt = torch.randint(3, model.config.vocab_size, (16, 6))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=use_cache)
    with torch.no_grad():
        in_eval = model.eval().generate(prompt, **kwargs)
        in_training = model.train().generate(prompt, **kwargs)
    assert torch.equal(in_training, in_eval)


def test_a_training_forward_given_a_cache_routes_on_the_stored_bias(tiny_config):
    """A cache passed in means decoding (generate, continuous batching): the batch is one step of many sequences."""
    torch.manual_seed(0)
    model = LossFreeMoeForCausalLM(tiny_config(**BALANCED))
    with torch.no_grad():
        for router in model.routers():
            router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, router.num_experts))
    input_ids = torch.randint(3, model.config.vocab_size, (16, 6))
    with torch.no_grad():
        in_eval = model.eval()(input_ids, cache=DynamicCache(config=model.config)).logits
        in_training = model.train()(input_ids, cache=DynamicCache(config=model.config)).logits
        balanced = model(input_ids).logits
    assert torch.equal(in_training, in_eval)
    assert not torch.equal(balanced, in_eval)  # without a cache the same batch is routed balanced


def test_the_sequence_wise_balance_loss_reads_the_routing_the_experts_ran(tiny_config):
    """DeepSeek-V3's complementary sequence-wise loss beside batch-balanced routing: its f_i counts the choices the
    router made, which left the padding out of the batch's bias."""
    torch.manual_seed(0)
    model = LossFreeMoeForCausalLM(tiny_config(**BALANCED, router_aux_loss_coef=1e-4)).train()
    input_ids = torch.randint(3, model.config.vocab_size, (4, 12))
    mask = torch.ones_like(input_ids)
    mask[:2, 6:] = 0
    routed = []
    hooks = [r.register_forward_hook(lambda m, a, out: routed.append(out)) for r in model.routers()]
    with torch.no_grad():
        aux_loss = model(input_ids, attention_mask=mask, labels=input_ids).aux_loss
    for hook in hooks:
        hook.remove()
    expected = sum(
        sequence_balance_loss(
            logits.sigmoid().view(4, 12, -1), indices.view(4, 12, -1), mask, 8, normalize_scores=True
        )
        for logits, _, indices in routed
    )
    torch.testing.assert_close(aux_loss, expected, atol=0, rtol=0)


def test_a_new_balancer_routes_its_first_steps_balanced_again(tiny_config):
    """A balancer starts at step 0: the routers a previous balancer finished balance their batches again."""
    torch.manual_seed(0)
    model = LossFreeMoeForCausalLM(tiny_config(**BALANCED, batch_balance_steps=1)).train()
    balancer = LossFreeBalancer(model)
    model(torch.randint(3, model.config.vocab_size, (4, 16)))
    balancer.step()
    assert all(router.batch_balance_finished for router in model.routers())
    LossFreeBalancer(model)
    assert not any(router.batch_balance_finished for router in model.routers())


def test_two_data_parallel_ranks_step_like_one_process_with_two_micro_batches(tmp_path):
    """Each rank balances the half it routes, as one process balances each micro-batch: the summed counts, the
    Quantile Balancing candidates and so the biases are identical on both ranks and, to float rounding, those of one
    process."""
    from batch_balanced_ranks_scenario import run

    ranks = run_on_two_ranks(Path(__file__).parent / "batch_balanced_ranks_scenario.py", tmp_path, timeout=300)
    one_process = run((0, 1))
    assert ranks[0] == ranks[1]
    torch.testing.assert_close(torch.tensor(ranks[0]["biases"]), torch.tensor(one_process["biases"]))
    assert ranks[0]["maxvio_batch"] == one_process["maxvio_batch"]
    assert max(one_process["maxvio_batch"]) < 0.5  # the halves were routed balanced
    assert one_process["biases"][1] != one_process["biases"][2]  # the stored biases kept moving
