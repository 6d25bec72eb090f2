"""Expert Choice routing (load_balancing="expert_choice"): each expert picks the top-C tokens of its routing chunk.

Whether it leaks future tokens is tests/test_causality.py's subject; here: capacities, chunks, padding, gates,
training, and the refusals (generation, the balancer, bad settings).
"""

import math
import re

import pytest
import torch
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_lossfree_moe import LossFreeBalancer, LossFreeMoeConfig, LossFreeMoeForCausalLM
from hf_lossfree_moe.modeling_lossfree_moe import EXPERT_CHOICE_WARNING, LossFreeMoeExpertChoiceRouter


def picks(router: LossFreeMoeExpertChoiceRouter, hidden: torch.Tensor, mask: torch.Tensor | None = None):
    """(T, E) bool of the router's picks, read from its output: the slots with a non-zero weight."""
    _, weights, indices = router(hidden, mask)
    chosen = torch.zeros(indices.size(0), router.num_experts, dtype=torch.bool)
    return chosen.scatter_(1, indices, weights != 0)


@pytest.fixture
def router(tiny_config):
    def make(**overrides):
        module = LossFreeMoeExpertChoiceRouter(tiny_config(load_balancing="expert_choice", **overrides))
        torch.nn.init.normal_(module.weight)
        return module

    return make


@pytest.mark.parametrize("factor", [1.0, 0.5, 1.5, 4.0])
def test_every_expert_picks_capacity_tokens_of_the_batch(router, factor):
    gate = router(expert_capacity_factor=factor)
    chosen = picks(gate, torch.randn(3, 10, 64))  # 30 tokens, 8 experts, top-2
    assert chosen.sum(dim=0).tolist() == [math.ceil(factor * 30 * 2 / 8)] * 8


def test_each_expert_picks_its_highest_scoring_tokens(router):
    gate = router()
    hidden = torch.randn(2, 16, 64)
    chosen = picks(gate, hidden)
    scores = (hidden.reshape(-1, 64) @ gate.weight.T).sigmoid()  # (32, 8)
    capacity = 32 * 2 // 8
    for expert in range(8):
        assert set(chosen[:, expert].nonzero().flatten().tolist()) == set(
            scores[:, expert].topk(capacity).indices.tolist()
        )


def test_gate_values_are_the_scores_of_the_picking_experts(router):
    gate = router()
    hidden = torch.randn(2, 8, 64)
    logits, weights, indices = gate(hidden)
    scores = logits.sigmoid()
    picked = weights != 0
    assert torch.equal(weights[picked], scores.gather(1, indices)[picked])


def test_chunks_of_one_sequence_balance_every_sequence(router):
    gate = router(expert_choice_chunk_size=1)
    chosen = picks(gate, torch.randn(3, 12, 64)).view(3, 12, 8)
    assert torch.equal(chosen.sum(dim=1), torch.full((3, 8), 12 * 2 // 8))


def test_padding_is_never_picked_nor_counted(router):
    gate = router(expert_choice_chunk_size=1)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding: 8 real tokens
    chosen = picks(gate, torch.randn(2, 12, 64), mask).view(2, 12, 8)
    assert not chosen[1, :4].any()
    assert chosen[0].sum(dim=0).tolist() == [3] * 8  # ceil(12 * 2 / 8)
    assert chosen[1].sum(dim=0).tolist() == [2] * 8  # ceil(8 * 2 / 8)


def test_shuffling_the_whole_batch_as_one_chunk_changes_nothing(router):
    """Shuffling only decides which tokens share a chunk: over a single chunk the picks stay the same."""
    hidden = torch.randn(4, 8, 64)
    plain = router()
    shuffled = router(expert_choice_shuffle=True)
    shuffled.load_state_dict(plain.state_dict())
    assert torch.equal(picks(plain, hidden), picks(shuffled, hidden))


def test_shuffled_chunks_mix_sequences_but_stay_balanced(router):
    gate = router(expert_choice_chunk_size=1, expert_choice_shuffle=True)
    chosen = picks(gate, torch.randn(4, 16, 64)).view(4, 16, 8)
    assert chosen.sum(dim=(0, 1)).tolist() == [4 * 16 * 2 // 8] * 8
    assert not torch.equal(chosen.sum(dim=1), torch.full((4, 8), 16 * 2 // 8))  # no longer per sequence


def test_trains_and_shares_the_initial_weights_of_token_choice(tiny_config):
    torch.manual_seed(0)
    expert_choice = LossFreeMoeForCausalLM(tiny_config(load_balancing="expert_choice"))
    torch.manual_seed(0)
    loss_free = LossFreeMoeForCausalLM(tiny_config())
    reference = loss_free.state_dict()
    assert set(reference) - set(expert_choice.state_dict()) == {
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.2.mlp.gate.e_score_correction_bias",
    }
    assert all(torch.equal(value, reference[name]) for name, value in expert_choice.state_dict().items())

    input_ids = torch.randint(3, 128, (2, 16))
    output = expert_choice(input_ids, labels=input_ids, output_router_logits=True)
    output.loss.backward()
    assert output.aux_loss is None and len(output.router_logits) == 2
    gates = [layer.mlp.gate for layer in expert_choice.model.layers[1:]]
    assert all(gate.weight.grad.abs().sum() > 0 for gate in gates)


def test_saved_model_reloads_with_its_routing(tmp_path, tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config(load_balancing="expert_choice", expert_choice_chunk_size=1)).eval()
    model.save_pretrained(tmp_path)
    loaded = LossFreeMoeForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = torch.randint(3, 128, (2, 16))
    assert loaded.config.expert_choice_chunk_size == 1
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)


def test_warns_once_that_it_leaks_the_future(tiny_config):
    logging.warning_once.cache_clear()  # an earlier test may have shown it already
    logger = logging.get_logger("hf_lossfree_moe.modeling_lossfree_moe")
    with CaptureLogger(logger) as captured:
        LossFreeMoeForCausalLM(tiny_config(load_balancing="expert_choice"))
        LossFreeMoeForCausalLM(tiny_config(load_balancing="expert_choice"))
    assert captured.out.count(EXPERT_CHOICE_WARNING) == 1
    assert "must not generate text" in EXPERT_CHOICE_WARNING


def test_generate_refuses(tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config(load_balancing="expert_choice"))
    with pytest.raises(ValueError, match="load_balancing='expert_choice' cannot generate text"):
        model.generate(torch.randint(3, 128, (1, 4)), max_new_tokens=2)


def test_balancer_refuses_expert_choice_routers(tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config(load_balancing="expert_choice"))
    with pytest.raises(ValueError, match="routes by Expert Choice.*balanced by construction"):
        LossFreeBalancer(model)


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        ({"expert_capacity_factor": 0.0}, "expert_capacity_factor", "a positive number"),
        ({"expert_capacity_factor": float("nan")}, "expert_capacity_factor", "a positive number"),
        (
            {"expert_capacity_factor": 4.5},
            "expert_capacity_factor",
            "at most n_routed_experts / num_experts_per_tok = 4",
        ),
        ({"expert_choice_chunk_size": 0}, "expert_choice_chunk_size", "None (the whole batch) or a positive integer"),
        ({"router_aux_loss_coef": 1e-3}, "router_aux_loss_coef", "0 with load_balancing='expert_choice'"),
    ],
)
def test_bad_settings_name_the_field_and_the_allowed_values(tiny_config, overrides, field, allowed):
    with pytest.raises(ValueError, match=rf"LossFreeMoeConfig\.{field} must be .*{re.escape(allowed)}"):
        tiny_config(load_balancing="expert_choice", **overrides)


def test_load_balancing_lists_expert_choice(tiny_config):
    with pytest.raises(ValueError, match="'expert_choice'"):
        tiny_config(load_balancing="expert choice")
    assert LossFreeMoeConfig(load_balancing="expert_choice").expert_capacity_factor == 1.0
