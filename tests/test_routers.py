"""Finding routers and reading them: the DeepSeek-V3 contract, registered adapters, scores for Quantile Balancing."""

import pytest
import torch
from torch import nn

from conftest import ToyModel, ToyRouter, tiny_model
from hf_lossfree_moe import LossFreeBalancer, RouterAdapter, RouterLocation, register_router_adapter, routers
from hf_lossfree_moe.routers import read_scores
from hf_lossfree_moe.testing_utils import build_tiny_model


def test_a_model_without_routers_is_rejected():
    with pytest.raises(ValueError, match="has no router"):
        LossFreeBalancer(nn.Linear(4, 4))


def test_a_router_with_another_output_needs_an_adapter():
    class TwoOutputRouter(ToyRouter):
        def forward(self, hidden_states):
            return super().forward(hidden_states)[1:]

    model = ToyModel(TwoOutputRouter(torch.rand(4, 4), top_k=2))
    LossFreeBalancer(model)
    with pytest.raises(ValueError, match="TwoOutputRouter.*register_router_adapter"):
        model()


def test_registered_adapter_reads_a_bias_stored_elsewhere(monkeypatch):
    monkeypatch.setattr(routers, "_FAMILY_ADAPTERS", {})

    class Statics(nn.Module):  # holds the bias for its router, as ERNIE-4.5-MoE does; shape (1, E)
        def __init__(self, num_experts):
            super().__init__()
            self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts), requires_grad=False)

    class PairRouter(nn.Module):  # returns (weights, indices)
        def __init__(self, scores):
            super().__init__()
            self.scores = scores
            self.statics = Statics(scores.size(1))

        def forward(self, hidden_states):
            indices = (self.scores + self.statics.e_score_correction_bias).topk(2, dim=-1).indices
            return self.scores.gather(1, indices), indices

    register_router_adapter(
        RouterAdapter(
            name="pair",
            locate=lambda module: (
                RouterLocation(module, module.statics, "e_score_correction_bias")
                if isinstance(module, PairRouter)
                else None
            ),
            topk_indices=lambda router, output: output[1],
        )
    )
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0]] * 3)
    model = ToyModel(PairRouter(scores), PairRouter(scores))
    balancer = LossFreeBalancer(model)
    assert balancer.names == ["layers.0", "layers.1"]  # the Statics modules are not routers of their own
    model()
    balancer.step()
    assert torch.equal(model.layers[0].statics.e_score_correction_bias, torch.tensor([[-1e-3, -1e-3, 1e-3, 1e-3]]))


@pytest.mark.parametrize("family", ["deepseek_v3", "kolibri1", "ernie4_5_moe", "minimax_m2"])
def test_scores_read_for_quantile_reproduce_the_routers_own_selection(family):
    torch.manual_seed(0)
    model = build_tiny_model(family).train()
    balancer = LossFreeBalancer(model, bias_update_rule="quantile")
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
        LossFreeBalancer(model, bias_update_rule="quantile")
