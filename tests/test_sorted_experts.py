"""Every experts implementation computes the same MoE layer: outputs and gradients match the `eager` reference loop."""

import pytest
import torch
from transformers import Glm4MoeConfig, GptOssConfig
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeExperts
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from hf_lossfree_moe import LossFreeMoeForCausalLM
from hf_lossfree_moe.modeling_lossfree_moe import LossFreeMoeExperts, LossFreeMoeSparseMoeBlock
from hf_lossfree_moe.sorted_experts import SORTED_MM, _ExpertRows, _ExpertsLinear, _grouped_mm_applies


IMPLEMENTATIONS = ["grouped_mm", "batched_mm", SORTED_MM]
NUM_TOKENS = 24
# Selection is on `score + bias` with scores in (0, 1): expert 0 wins every token, experts 6 and 7 never win.
UNEVEN_BIAS = [2.0, 0.3, 0.0, 0.0, 0.1, 0.0, -2.0, -2.0]
NEVER_SELECTED = [6, 7]


@pytest.fixture
def moe_block(tiny_config):
    """An MoE layer (8 experts, top-2, hidden 64) with unit-scale weights and the routing bias above."""
    block = LossFreeMoeSparseMoeBlock(tiny_config())
    for param in block.parameters():
        torch.nn.init.normal_(param, std=param.size(-1) ** -0.5)
    block.gate.e_score_correction_bias.copy_(torch.tensor(UNEVEN_BIAS))
    return block


def forward_backward(block, implementation, hidden_states, projection):
    """Output and the gradients of `sum(output * projection)` w.r.t. input, router and expert weights."""
    block.experts.config._experts_implementation = implementation
    block.zero_grad(set_to_none=True)
    hidden_states = hidden_states.detach().requires_grad_()
    output = block(hidden_states)
    (output * projection).sum().backward()
    experts = block.experts
    return {
        "output": output.detach(),
        "input": hidden_states.grad,
        "router_weight": block.gate.weight.grad,
        "gate_up_proj": experts.gate_up_proj.grad,
        "down_proj": experts.down_proj.grad,
    }


def test_routing_is_uneven_with_idle_experts(moe_block):
    with torch.no_grad():
        _, _, topk_indices = moe_block.gate(torch.randn(NUM_TOKENS, 64))
    loads = torch.bincount(topk_indices.flatten(), minlength=8)
    assert loads[0] == NUM_TOKENS
    assert loads[NEVER_SELECTED].tolist() == [0, 0]
    assert loads.sum() == 2 * NUM_TOKENS


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_outputs_and_gradients_match_eager(moe_block, implementation):
    hidden_states = torch.randn(2, NUM_TOKENS // 2, 64)
    projection = torch.randn(2, NUM_TOKENS // 2, 64)
    expected = forward_backward(moe_block, "eager", hidden_states, projection)
    actual = forward_backward(moe_block, implementation, hidden_states, projection)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=1e-6, msg=f"{implementation}: {name}")
    for name in ("gate_up_proj", "down_proj"):
        assert actual[name][NEVER_SELECTED].abs().max() == 0, f"{implementation}: idle experts get no {name} grad"
        assert actual[name][0].abs().max() > 0


def test_sorted_mm_leaves_frozen_experts_without_gradient(moe_block):
    moe_block.experts.requires_grad_(False)
    hidden_states = torch.randn(1, NUM_TOKENS, 64)
    projection = torch.randn(1, NUM_TOKENS, 64)
    expected = forward_backward(moe_block, "eager", hidden_states, projection)
    actual = forward_backward(moe_block, SORTED_MM, hidden_states, projection)
    assert actual["gate_up_proj"] is None and actual["down_proj"] is None
    torch.testing.assert_close(actual["input"], expected["input"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(actual["router_weight"], expected["router_weight"], rtol=1e-4, atol=1e-6)


def test_sorted_mm_single_token_without_grad(moe_block):
    hidden_states = torch.randn(1, 1, 64)
    with torch.no_grad():
        moe_block.experts.config._experts_implementation = "eager"
        expected = moe_block(hidden_states)
        moe_block.experts.config._experts_implementation = SORTED_MM
        actual = moe_block(hidden_states)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_sorted_mm_in_bfloat16_stays_close_to_float32(moe_block):
    hidden_states = torch.randn(2, NUM_TOKENS // 2, 64)
    moe_block.experts.config._experts_implementation = "eager"
    with torch.no_grad():
        reference = moe_block(hidden_states)
        moe_block.to(torch.bfloat16)
        moe_block.experts.config._experts_implementation = SORTED_MM
        actual = moe_block(hidden_states.bfloat16())
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


def test_sorted_mm_handles_other_weight_layouts():
    """gpt-oss stores transposed, interleaved gate/up weights with biases: sorted_mm must still match eager."""
    config = GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    experts = GptOssExperts(config)
    for param in experts.parameters():
        torch.nn.init.normal_(param, std=0.2)
    hidden_states = torch.randn(10, 32)
    top_k_index = torch.tensor([[0, 1]] * 7 + [[0, 2]] * 3)
    top_k_weights = torch.rand(10, 2)
    config._experts_implementation = "eager"
    expected = experts(hidden_states, top_k_index, top_k_weights)
    config._experts_implementation = SORTED_MM
    torch.testing.assert_close(experts(hidden_states, top_k_index, top_k_weights), expected, rtol=1e-5, atol=1e-6)


# Expert parallelism hands each rank local expert ids; a route to another rank's expert carries the id num_experts
# (here 4) with weight 0. Each case: the index, and the positions holding that sentinel.
ROUTES = {
    "sentinel": torch.tensor([[0, 4], [4, 1], [2, 3]]),
    "local_only": torch.tensor([[0, 3], [2, 1], [2, 3]]),
    "remote_only": torch.full((3, 2), 4),
}


@pytest.mark.parametrize("implementation", ["eager", SORTED_MM, "grouped_mm"])
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_experts_match_transformers_eager_experts_on_expert_parallel_routes(tiny_config, implementation, route):
    """Output and gradients equal Glm4MoeExperts' eager loop, which skips the other-rank sentinel."""
    top_k_index = ROUTES[route]
    sentinel = top_k_index == 4
    reference_config = Glm4MoeConfig(hidden_size=16, moe_intermediate_size=8, n_routed_experts=4)
    reference_config._experts_implementation = "eager"
    reference = Glm4MoeExperts(reference_config)
    ours = LossFreeMoeExperts(tiny_config(hidden_size=16, moe_intermediate_size=8, n_routed_experts=4))
    ours.config._experts_implementation = implementation
    for param in reference.parameters():
        torch.nn.init.normal_(param, std=0.3)
    ours.load_state_dict(reference.state_dict())
    # transformers' expert-parallel sharding marks the experts it splits; grouped_mm masks sentinels only then.
    ours._is_expert_parallel = reference._is_expert_parallel = bool(sentinel.any())
    hidden_states = torch.randn(3, 16)
    top_k_weights = torch.rand(3, 2).masked_fill(sentinel, 0.0)
    projection = torch.randn(3, 16)

    results = []
    for experts in (reference, ours):
        inputs = (hidden_states.clone().requires_grad_(), top_k_weights.clone().requires_grad_())
        output = experts(inputs[0], top_k_index, inputs[1])
        differentiated = (*inputs, experts.gate_up_proj, experts.down_proj)
        if output.requires_grad:
            grads = torch.autograd.grad((output * projection).sum(), differentiated, materialize_grads=True)
        else:  # the eager loop never touched a weight: every route left the rank
            grads = [torch.zeros_like(tensor) for tensor in differentiated]
        results.append((output, *grads))
    for name, expected, actual in zip(["output", "input", "weights", "gate_up", "down"], *results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=f"{implementation}: {name}")
    reached_local_expert = (~sentinel).any(dim=-1)  # (T,)
    assert results[1][0].abs().sum(dim=-1).gt(0).equal(reached_local_expert)


def test_sorted_mm_is_the_default_and_travels_with_saved_models(tmp_path, tiny_config):
    assert LossFreeMoeForCausalLM(tiny_config()).config._experts_implementation == SORTED_MM
    LossFreeMoeForCausalLM(tiny_config()).save_pretrained(tmp_path)
    assert (tmp_path / "sorted_experts.py").exists()
    assert LossFreeMoeForCausalLM.from_pretrained(tmp_path).config._experts_implementation == SORTED_MM


def test_experts_implementation_is_chosen_by_name(tiny_config):
    model = LossFreeMoeForCausalLM._from_config(tiny_config(), experts_implementation="eager")
    assert model.config._experts_implementation == "eager"
    model.set_experts_implementation(SORTED_MM)
    assert model.config._experts_implementation == SORTED_MM
    with pytest.raises(ValueError, match="experts_implementation"):
        model.set_experts_implementation("no_such_kernel")


def test_training_step_loss_and_gradients_match_across_implementations(tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config())
    for router in model.routers():
        router.e_score_correction_bias.copy_(torch.tensor(UNEVEN_BIAS))
    input_ids = torch.randint(3, 128, (2, 12))
    results = {}
    for implementation in ["eager", *IMPLEMENTATIONS]:
        model.set_experts_implementation(implementation)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        results[implementation] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    expected_loss, expected_grads = results["eager"]
    for implementation in IMPLEMENTATIONS:
        loss, grads = results[implementation]
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=f"{implementation}: {name}")


def expert_rows(loads):
    """Expert-sorted expert ids for the given number of copies per expert, and their `_ExpertRows`."""
    sorted_ids = torch.repeat_interleave(torch.arange(len(loads)), torch.tensor(loads))
    return _ExpertRows.from_sorted_ids(sorted_ids, len(loads))


def test_expert_rows_skip_idle_experts():
    rows = expert_rows([2, 0, 3, 0])
    assert rows.segments == [(0, slice(0, 2)), (2, slice(2, 5))]
    assert rows.offsets.tolist() == [2, 2, 5, 5]
    assert rows.offsets.dtype == torch.int32
    assert rows.num_rows == 5


def test_expert_rows_leave_other_rank_routes_out():
    rows = _ExpertRows.from_sorted_ids(torch.tensor([0, 0, 2, 2, 2, 4, 4]), num_experts=4)
    assert rows.segments == [(0, slice(0, 2)), (2, slice(2, 5))]
    assert rows.offsets.tolist() == [2, 2, 5, 5]
    assert rows.num_rows == 5


BUSY = [3, 0, 4, 2, 5, 1, 0, 3]  # 6 of 8 experts receive tokens


def expert_weight(shape, dtype, layout):
    """Expert weights of `shape`, contiguous, starting 4 bytes off alignment, or cut from wider rows."""
    if layout == "offset":
        return torch.randn(1 + shape.numel(), dtype=dtype)[1:].view(shape)
    if layout == "cut":
        return torch.randn(*shape[:-1], shape[-1] + 4, dtype=dtype)[..., : shape[-1]]
    return torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize(
    ("loads", "in_features", "out_features", "dtype", "layout", "grouped"),
    [
        (BUSY, 16, 32, torch.float32, "contiguous", True),  # most experts busy: one grouped_mm call
        ([0, 0, 4, 0, 0, 3, 0, 0], 16, 32, torch.float32, "contiguous", True),  # a quarter busy: still grouped
        ([0, 0, 4, 0, 0, 0, 0, 0], 16, 32, torch.float32, "contiguous", False),  # 1 of 8, as when decoding: loop
        (BUSY, 6, 32, torch.float32, "contiguous", False),  # 24-byte input rows: grouped_mm refuses them
        (BUSY, 16, 6, torch.float32, "contiguous", False),  # 24-byte output rows (and output-gradient rows)
        (BUSY, 16, 32, torch.float32, "offset", False),  # weights starting off alignment, as a memory map may
        (BUSY, 16, 32, torch.float32, "cut", False),  # weights that are a view into wider rows
        (BUSY, 16, 32, torch.float64, "contiguous", False),  # grouped_mm has no float64 kernel
    ],
)
def test_experts_linear_matches_a_product_per_expert(loads, in_features, out_features, dtype, layout, grouped):
    """Both paths give x[rows] @ weight[e].T per expert, its gradients, and zero gradient for idle experts."""
    rows = expert_rows(loads)
    x = torch.randn(sum(loads), in_features, dtype=dtype, requires_grad=True)
    weight = expert_weight(torch.Size((len(loads), out_features, in_features)), dtype, layout).requires_grad_()
    assert _grouped_mm_applies(x, weight, rows) is grouped
    out = _ExpertsLinear.apply(x, weight, rows)
    projection = torch.randn_like(out)
    grad_x, grad_weight = torch.autograd.grad((out * projection).sum(), (x, weight))

    expected_out = torch.zeros_like(out)
    expected_grad_x = torch.zeros_like(x)
    expected_grad_weight = torch.zeros_like(weight)
    start = 0
    for expert, load in enumerate(loads):
        block = slice(start, start + load)
        expected_out[block] = x[block] @ weight[expert].T
        expected_grad_x[block] = projection[block] @ weight[expert]
        expected_grad_weight[expert] = projection[block].T @ x[block]
        start += load
    tolerance = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out, expected_out, **tolerance)
    torch.testing.assert_close(grad_x, expected_grad_x, **tolerance)
    torch.testing.assert_close(grad_weight, expected_grad_weight, **tolerance)
    idle = [expert for expert, load in enumerate(loads) if load == 0]
    assert grad_weight[idle].abs().max() == 0


def test_experts_linear_with_a_frozen_weight_gives_the_input_gradient():
    rows = expert_rows(BUSY)
    x = torch.randn(18, 16, requires_grad=True)
    weight = torch.randn(8, 32, 16)
    assert _grouped_mm_applies(x, weight, rows)
    (grad_x,) = torch.autograd.grad(_ExpertsLinear.apply(x, weight, rows).sum(), (x,))
    torch.testing.assert_close(grad_x[:3], torch.ones(3, 32) @ weight[0])
