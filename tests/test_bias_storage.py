"""Bias storage: fp32 in place, frozen routers keep their bias, parameters stop requiring grad."""

import pytest
import torch
from torch import nn

from conftest import ToyModel, ToyRouter
from hf_lossfree_moe import LossFreeBalancer
from hf_lossfree_moe.testing_utils import build_tiny_model


def test_a_frozen_router_keeps_its_bias(model):
    model.routers()[0].weight.requires_grad_(False)
    balancer = LossFreeBalancer(model)
    model(torch.randint(3, 128, (2, 5)))  # 10 tokens x 2 / 8 experts: no load equals the mean, every bias moves
    balancer.step()
    biases = balancer.biases()
    assert torch.equal(biases[0], torch.zeros(8))
    assert biases[1].abs().min() == pytest.approx(1e-3)

    balancer.remove()
    balancer = LossFreeBalancer(model, frozen=False)
    model(torch.randint(3, 128, (2, 5)))
    balancer.step()
    assert balancer.biases()[0].abs().min() == pytest.approx(1e-3)


def test_freezing_a_router_after_construction_keeps_its_bias(model):
    balancer = LossFreeBalancer(model)
    first, second = model.routers()
    first.weight = nn.Parameter(first.weight.detach().clone(), requires_grad=False)  # a new object, as FSDP makes
    second.weight.requires_grad_(False)
    model(torch.randint(3, 128, (2, 5)))
    stats = balancer.step()
    assert stats["bias_updated"] == 0.0
    assert torch.equal(balancer.biases(), torch.zeros(2, 8))

    second.weight.requires_grad_(True)
    model(torch.randint(3, 128, (2, 5)))
    balancer.step()
    biases = balancer.biases()
    assert torch.equal(biases[0], torch.zeros(8))
    assert biases[1].abs().min() == pytest.approx(1e-3)


def test_bias_stays_fp32_in_a_bf16_model(model):
    model.to(torch.bfloat16)
    balancer = LossFreeBalancer(model)
    model(torch.randint(3, 128, (2, 5)))
    balancer.step()
    assert all(router.e_score_correction_bias.dtype == torch.float32 for router in model.routers())
    assert balancer.biases().abs().min() == pytest.approx(1e-3)


def test_a_foreign_bf16_bias_is_upcast_in_place_of_the_buffer():
    model = build_tiny_model("deepseek_v3", num_layers=2, first_k_dense_replace=1).to(torch.bfloat16).train()
    router = model.model.layers[1].mlp.gate
    assert router.e_score_correction_bias.dtype == torch.bfloat16

    with pytest.warns(UserWarning, match="bfloat16"):
        balancer = LossFreeBalancer(model)
    assert balancer.names == ["model.layers.1.mlp.gate"]
    bias = router.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert dict(router.named_buffers())["e_score_correction_bias"] is bias
    assert model.state_dict()["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32

    model(torch.randint(0, 64, (2, 5)))
    balancer.step()
    assert router.e_score_correction_bias is bias
    assert bias.abs().min() == pytest.approx(1e-3)


@pytest.mark.parametrize("steps", [5_000, pytest.param(100_000, marks=pytest.mark.slow)])
def test_long_run_of_sign_updates_stays_exact_in_fp32(steps):
    router = ToyRouter(torch.rand(16, 4), top_k=1)
    router.e_score_correction_bias[0] = 5.0
    model = ToyModel(router)
    balancer = LossFreeBalancer(model, bias_update_rate=1e-3)
    exact = torch.tensor([5.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    bf16 = router.e_score_correction_bias.to(torch.bfloat16)
    for _ in range(steps):
        model()
        loads = balancer.loads[0].double()
        delta = 1e-3 * torch.sign(loads.mean() - loads)
        exact += delta
        bf16 += delta.to(torch.bfloat16)
        balancer.step()
    assert (router.e_score_correction_bias.double() - exact).abs().max() < 1e-2
    assert (exact - 5.0).abs().max() > 1  # the bias did travel
    assert bf16[0] == 5.0  # in bf16, 5 + 1e-3 rounds back to 5: the bias would never have moved


def test_a_parameter_bias_stops_requiring_grad():
    router = ToyRouter(torch.rand(4, 4), top_k=2)
    del router.e_score_correction_bias
    router.e_score_correction_bias = nn.Parameter(torch.zeros(4))
    with pytest.warns(UserWarning, match="requires grad"):
        LossFreeBalancer(ToyModel(router))
    assert not router.e_score_correction_bias.requires_grad
