"""scripts/stock_family_replay.py: a stock family's own auxiliary loss against the opt-in loss-free bias."""

import json

import pytest
import torch

from hf_lossfree_moe_scripts import stock_family_replay


def test_both_arms_start_from_the_same_weights_and_differ_only_in_balancing():
    args = stock_family_replay.StockReplayArguments()
    aux = stock_family_replay.build_model("qwen3_moe", 256, "aux_loss", args)
    loss_free = stock_family_replay.build_model("qwen3_moe", 256, "loss_free", args)
    assert aux.config.output_router_logits and aux.config.router_aux_loss_coef == 1e-3
    assert not loss_free.config.output_router_logits and loss_free.config.router_aux_loss_coef == 0.0
    aux_state, loss_free_state = aux.state_dict(), loss_free.state_dict()
    assert aux_state.keys() == loss_free_state.keys()
    assert all(torch.equal(aux_state[name], loss_free_state[name]) for name in aux_state)
    assert sum(name.endswith("e_score_correction_bias") for name in aux_state) == 3  # layers 1-3 are MoE


@pytest.mark.slow
def test_a_short_replay_writes_both_arms(tmp_path):
    stock_family_replay.main(["--max_steps", "3", "--output_dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [result["arm"] for result in results] == ["aux_loss", "loss_free"]
    assert results[0]["bias_abs_max"] == 0.0 and results[1]["bias_abs_max"] > 0.0
    assert "| loss_free |" in (tmp_path / "results.md").read_text()
