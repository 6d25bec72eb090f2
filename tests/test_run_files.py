"""The file names of a run folder are shared: the plots the plotting code draws are those the model card links."""

import json
import re

from hf_lossfree_moe import LossFreeMoeForCausalLM
from hf_lossfree_moe.model_card import render_model_card
from hf_lossfree_moe.plotting import RoutingHistory, draw_run_plots
from hf_lossfree_moe.run_files import ROUTING_HISTORY_FILE, TRAINER_STATE_FILE


def test_the_card_links_every_plot_a_run_draws_and_nothing_else(tmp_path, tiny_config, one_thread):
    log_history = [
        {"step": 10, "loss": 5.0, "maxvio_batch": 1.0, "maxvio_batch/layer_1": 1.0, "maxvio_batch/layer_2": 1.0},
        {"step": 10, "train_loss": 5.0, "train_runtime": 1.0},
        {"step": 10, "eval_loss": 4.0, "eval_maxvio_global": 0.5, "eval_maxvio_global/layer_1": 0.5},
    ]
    (tmp_path / TRAINER_STATE_FILE).write_text(json.dumps({"log_history": log_history}))
    routers = ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
    history = RoutingHistory(
        router_names=routers, steps=[0, 10], biases=[[[0.0] * 8] * 2, [[0.01] * 8] * 2], eval_loads=[[4] * 8] * 2
    )
    history.save(tmp_path / ROUTING_HISTORY_FILE)
    drawn = {path.name for path in draw_run_plots(tmp_path)}

    config = tiny_config()
    card = render_model_card(
        config,
        LossFreeMoeForCausalLM(config).num_parameters(),
        log_history,
        model_name="tiny",
        repo_id="someone/tiny",
        dataset_description="the embedded corpus",
        eval_split_description="5% of the documents",
        block_size=64,
        tokens_per_step=512,
        learning_rate=2e-3,
        sample_prompt="The",
    )
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", str(card)))
    assert len(drawn) == 3 and linked == drawn
    assert all((tmp_path / name).is_file() for name in linked)
