"""transformers' own MoE families: balancing those that carry an `e_score_correction_bias`, measuring those without."""

import subprocess
import sys

import pytest
import torch

from hf_lossfree_moe import LossFreeBalancer
from hf_lossfree_moe.balance_metrics import compute_layer_spread_metrics, compute_maxvio
from hf_lossfree_moe.families import BIAS_ARGUMENT_ADAPTER, SHARED_GATES_ADAPTER, STATICS_ADAPTER, TOPK_ROUTER_ADAPTER
from hf_lossfree_moe.routers import DEEPSEEK_V3_ADAPTER, RouterLocation, find_routers
from hf_lossfree_moe.selection_bias import add_selection_bias
from hf_lossfree_moe.testing_utils import build_tiny_model, correction_bias_families, tiny_model_class


TOP_K = 2  # build_tiny_model routes each token to 2 of 8 experts
GROUPED = dict(n_group=4, topk_group=1)  # group-limited routing: 4 groups of 2 experts, each token keeps 1 group


def padded_batch(batch_size=2, seq_len=8, left_padding=3):
    """Fixed input_ids (B, S) whose first row starts with `left_padding` pad tokens, and its attention_mask."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 128, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :left_padding] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def bias_tensors(model):
    """The correction bias of every router, the tensors the model itself holds."""
    return [getattr(router.bias_owner, router.bias_attr) for router in find_routers(model)]


@pytest.mark.parametrize("family", correction_bias_families())
def test_every_family_counts_real_tokens_and_moves_its_biases(family):
    try:
        model = build_tiny_model(family).train()
    except Exception as error:  # whatever stops the family from building tiny is the reason printed
        pytest.skip(f"{family} cannot be instantiated tiny on CPU: {type(error).__name__}: {error}")
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch()
    before = balancer.biases()
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    loads = balancer.loads  # (L, E)
    routed = loads.sum(dim=-1) > 0  # (L,): ERNIE-4.5-VL's vision experts get no text token
    assert routed.any()
    real_tokens = int(attention_mask.sum())
    assert loads[routed].sum(dim=-1).tolist() == [TOP_K * real_tokens] * int(routed.sum())

    balancer.step()  # the config has no bias_update_rate: the paper's u = 1e-3
    mean = loads.double().mean(dim=-1, keepdim=True)  # (L, 1)
    expected = torch.where(routed.unsqueeze(-1), 1e-3 * torch.sign(mean - loads), 0.0).float()  # (L, E)
    torch.testing.assert_close(balancer.biases() - before, expected)


@pytest.mark.parametrize(
    "family, adapter, bias_owner",
    [
        ("deepseek_v3", DEEPSEEK_V3_ADAPTER, "mlp.gate"),
        ("ernie4_5_moe", STATICS_ADAPTER, "mlp.gate.moe_statics"),
        ("minimax_m2", BIAS_ARGUMENT_ADAPTER, "mlp"),
        ("hy_v3", BIAS_ARGUMENT_ADAPTER, "mlp"),
        ("inkling", SHARED_GATES_ADAPTER, "mlp.gate"),
    ],
)
def test_each_layout_is_read_by_its_adapter(family, adapter, bias_owner):
    model = build_tiny_model(family)
    routers = find_routers(model)  # one router per layer: a module that only stores the bias is no router
    assert [router.name for router in routers] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert all(router.adapter is adapter for router in routers)
    assert [router.bias_owner for router in routers] == [
        model.get_submodule(f"model.layers.{layer}.{bias_owner}") for layer in (0, 1)
    ]


@pytest.mark.parametrize(
    "family, config",
    [("deepseek_v3", GROUPED), ("glm4_moe", GROUPED), ("dots1", GROUPED), ("ernie4_5_moe", {})],
)
def test_a_skewed_bias_is_balanced_in_place(family, config):
    torch.manual_seed(0)
    model = build_tiny_model(family, **config).train().requires_grad_(False)
    biases = bias_tensors(model)
    with torch.no_grad():
        for bias in biases:
            bias.view(-1)[:2] += 0.05  # experts 0 and 1 (one routing group) take most tokens
    pointers = [bias.data_ptr() for bias in biases]
    # frozen=False: the weights are frozen to keep routing fixed, the biases must still move. u = 5e-3, not the
    # paper's 1e-3: the skew must unwind within the test's 16 steps, and the sign rule's oscillation (about u) stays
    # well below the spread of the tiny router's scores.
    balancer = LossFreeBalancer(model, bias_update_rate=5e-3, frozen=False)
    input_ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))

    picks = []
    for router in balancer.routers:
        router.register_forward_hook(lambda module, args, output: picks.append(output[2]))
    history = []
    for _ in range(16):
        picks.clear()
        with torch.no_grad():
            model(input_ids=input_ids)
        history.append(balancer.step()["maxvio_batch"])

    assert len(picks) == len(balancer.routers)
    if config:  # routing stayed group-limited: both experts of every token come from one group
        assert all(torch.equal(indices[:, 0] // 2, indices[:, 1] // 2) for indices in picks)
    assert history[0] > 1.0, history
    assert history[-1] < min(0.35, history[0] / 2), history
    assert all(now is before for now, before in zip(bias_tensors(model), biases, strict=True))
    assert [bias.data_ptr() for bias in biases] == pointers
    assert all(bias.dtype == torch.float32 for bias in biases)
    torch.testing.assert_close(balancer.biases(), torch.stack([bias.detach().reshape(-1) for bias in biases]))


# Families whose bias is not in `_keep_in_fp32_modules_strict`, so `from_pretrained(dtype=torch.bfloat16)` makes it
# bf16: Laguna (an nn.Parameter), MiniMax-M2 (a buffer of the MoE block), LongCat-Flash, MiniMax-M3-VL, Step-3.7.
BF16_LOADED = [
    "laguna",
    "minimax_m2",
    *(pytest.param(f, marks=pytest.mark.slow) for f in ("longcat_flash", "minimax_m3_vl", "step3p7")),
]


@pytest.mark.parametrize("family", BF16_LOADED)
# Laguna's loaded bias requires grad; the balancer turns that off with a warning of its own, tested elsewhere.
@pytest.mark.filterwarnings("ignore:.*parameter that requires grad:UserWarning")
def test_a_bf16_loaded_bias_is_upcast_updated_saved_and_reloaded(family, tmp_path):
    model_class = tiny_model_class(family)
    base = build_tiny_model(family)
    with torch.no_grad():
        for bias in bias_tensors(base):
            bias.fill_(1.0)  # a shift of every bias leaves routing alone; near 1, bf16 steps are 2**-7 > u = 1e-3
    base.save_pretrained(tmp_path / "base")
    model = model_class.from_pretrained(tmp_path / "base", dtype=torch.bfloat16).train()
    assert {bias.dtype for bias in bias_tensors(model)} == {torch.bfloat16}

    with pytest.warns(UserWarning, match="fp32 copy"):
        balancer = LossFreeBalancer(model)
    biases = bias_tensors(model)
    assert {bias.dtype for bias in biases} == {torch.float32}
    assert torch.equal(balancer.biases(), torch.ones(len(biases), 8))
    input_ids, attention_mask = padded_batch()
    for _ in range(3):
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
        balancer.step()
    assert all(now is before for now, before in zip(bias_tensors(model), biases, strict=True))
    updated = balancer.biases()
    net_steps = (updated.double() - 1) / 1e-3  # sign rule: a whole number of u-steps each, none lost to rounding
    torch.testing.assert_close(net_steps, net_steps.round(), atol=1e-3, rtol=0)
    assert net_steps.abs().max() >= 1

    model.save_pretrained(tmp_path / "tuned")  # the checkpoint stores the fp32 biases
    exact = model_class.from_pretrained(tmp_path / "tuned", dtype=torch.float32)
    assert torch.equal(torch.stack([bias.reshape(-1) for bias in bias_tensors(exact)]), updated)
    rounded = model_class.from_pretrained(tmp_path / "tuned")  # dtype "auto": the saved config says bfloat16
    assert torch.equal(torch.stack([bias.reshape(-1) for bias in bias_tensors(rounded)]), updated.bfloat16())


def test_a_subclass_keeps_the_bias_fp32_when_loading_in_bf16(tmp_path):
    base = build_tiny_model("laguna")
    with torch.no_grad():
        for bias in bias_tensors(base):
            bias.fill_(1.001)  # 1.0 in bf16
    base.save_pretrained(tmp_path)

    class LagunaWithFp32Bias(tiny_model_class("laguna")):
        _keep_in_fp32_modules_strict = ["e_score_correction_bias"]

    model = LagunaWithFp32Bias.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert all(torch.equal(bias, torch.full((8,), 1.001)) for bias in bias_tensors(model))


@pytest.mark.parametrize(
    "family, num_layers, message",
    [("llama", 2, "family must be one of"), ("deepseek_v3", 0, "num_layers must be an integer >= 1")],
)
def test_build_tiny_model_rejects_bad_arguments(family, num_layers, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_model(family, num_layers=num_layers)


def test_router_discovery_is_a_pure_function_of_the_module_it_is_given():
    """The block that holds MiniMax-M2's bias makes its gate a router; asked about in any order, the answer is the
    same, and importing the package reads no transformers source file (that is `testing_utils`' job)."""
    model = build_tiny_model("minimax_m2")
    block = model.model.layers[1].mlp
    assert find_routers(block.gate) == []  # the gate alone holds no bias
    assert [router.name for router in find_routers(block)] == ["gate"]
    assert [router.name for router in find_routers(model)] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    code = "import sys, hf_lossfree_moe; print('hf_lossfree_moe.testing_utils' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


# Families whose routers have no bias: the balancer only measures them, with the figures it logs for ours.
UNBIASED = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss", "flex_olmo", "phimoe", "granitemoe"]


def router_choices(routers):
    """Hooks of our own that keep every (T, K) index tensor each router returns, in call order per router."""
    chosen = {index: [] for index in range(len(routers))}
    for index, router in enumerate(routers):
        router.register_forward_hook(lambda module, args, output, index=index: chosen[index].append(output[2]))
    return chosen


def counted_by_hand(choices, attention_mask, num_experts=8):
    """Per router, the tokens each expert got from the router's own outputs, the padding of `attention_mask` left out."""
    real = attention_mask.reshape(-1).bool()
    return torch.stack(
        [
            sum(torch.bincount(indices[real].reshape(-1), minlength=num_experts) for indices in calls)
            for calls in choices.values()
        ]
    )


@pytest.mark.parametrize("family", UNBIASED)
def test_a_family_without_a_bias_is_measured_exactly(family):
    torch.manual_seed(0)
    model = build_tiny_model(family).train()
    balancer = LossFreeBalancer(model)
    assert not balancer.updates_biases
    assert [router.adapter for router in find_routers(model)] == [TOPK_ROUTER_ADAPTER] * 2
    choices = router_choices(balancer.routers)
    input_ids, attention_mask = padded_batch()
    model.activation_checkpointing_enable()
    model(input_ids=input_ids, attention_mask=attention_mask).logits.float().pow(2).mean().backward()
    assert [len(calls) for calls in choices.values()] == [2, 2]  # the forward, then its recomputation
    expected = counted_by_hand({index: calls[:1] for index, calls in choices.items()}, attention_mask)
    with torch.no_grad():
        model.eval()(input_ids=input_ids, attention_mask=attention_mask)  # evaluation: not counted
        model.generate(input_ids[1:], max_new_tokens=2, do_sample=False)  # generation: not counted
    model.train()
    assert all(len(calls) > 3 for calls in choices.values())  # the routers ran, the balancer did not count

    loads = balancer.loads
    assert torch.equal(loads, expected)
    assert loads.sum(dim=-1).tolist() == [TOP_K * int(attention_mask.sum())] * 2
    stats = balancer.step()
    assert stats["maxvio_batch"] == pytest.approx(compute_maxvio(expected, balancer.layers).mean)
    assert stats["batch_effective_expert_fraction"] == pytest.approx(
        compute_layer_spread_metrics(expected, "batch", "maxvio_batch")["batch_effective_expert_fraction"]
    )
    assert stats["bias_updated"] == 0.0 and "bias_abs_max" not in stats
    assert balancer.biases().shape == (2, 0)


def test_routers_without_a_bias_refuse_to_be_balanced_and_cannot_be_mixed_with_biased_ones():
    model = build_tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="have no bias, so the balancer only measures"):
        LossFreeBalancer(model, bias_update_rate=1e-3)
    with pytest.raises(ValueError, match="have no bias, so the balancer only measures"):
        LossFreeBalancer(model, frozen=False)
    balancer = LossFreeBalancer(model)
    for name, value in (("frozen", False), ("frozen", None), ("update_rate", 1e-2)):
        with pytest.raises(ValueError, match="have no bias, so the balancer only measures"):
            setattr(balancer, name, value)  # as the constructor refuses it, not a crash at the next step()
    balancer.update_rate = 0.0
    with pytest.warns(UserWarning, match="no token was counted since the last step"):
        assert balancer.frozen is True and balancer.step()["bias_updated"] == 0.0
    balancer.remove()
    with pytest.raises(ValueError, match="must give num_experts"):
        RouterLocation(model.model.layers[0].mlp.gate, None, None)
    add_selection_bias(model.model.layers[0])  # layer 0's router gets a bias, layer 1's not
    with pytest.raises(ValueError, match=r"Some routers have a bias \(model.layers.0.mlp.gate\) and others have none"):
        LossFreeBalancer(model)
