"""The plots, routing history and card section that `LossFreeBalancingCallback` writes from an ordinary Trainer run."""

import glob
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Trainer, TrainingArguments

from hf_lossfree_moe import LossFreeBalancingCallback, LossFreeMoeForCausalLM
from hf_lossfree_moe.model_card import BALANCE_SECTION_FILE
from hf_lossfree_moe.plotting import RoutingHistory
from hf_lossfree_moe.run_files import BIAS_PLOT, LOAD_HEATMAP_PLOT, MAXVIO_PLOT, ROUTING_HISTORY_FILE
from hf_lossfree_moe.testing_utils import build_tiny_model


def examples(count: int, seed: int, length: int = 12):
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(3, 128, (count, length), generator=generator).tolist()
    ]


def png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def train_and_evaluate(model, output_dir, report_to, callback=None):
    callback = callback or LossFreeBalancingCallback(bias_update_rate=1e-2)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        logging_steps=2,
        save_strategy="no",
        report_to=report_to,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=examples(24, 1), eval_dataset=examples(8, 2), callbacks=[callback]
    )
    trainer.train()
    metrics = trainer.evaluate()
    return trainer, callback, metrics


def test_an_ordinary_trainer_run_gets_plots_history_and_a_card_section(tiny_config, tmp_path):
    """Layers 1 and 2 are the MoE layers (layer 0 is dense): the files number them as the model does."""
    model = LossFreeMoeForCausalLM(tiny_config())
    trainer, callback, metrics = train_and_evaluate(model, tmp_path, report_to=["tensorboard"])

    for name in (MAXVIO_PLOT, BIAS_PLOT, LOAD_HEATMAP_PLOT):
        width, height = png_size(tmp_path / name)
        assert width >= 600 and height >= 250 and (tmp_path / name).stat().st_size > 10_000
    history = RoutingHistory.load(tmp_path / ROUTING_HISTORY_FILE)
    assert history.layers == [1, 2]
    assert history.steps[0] == 0 and history.steps[-1] == 6
    assert torch.equal(torch.tensor(history.biases[-1]), callback.balancer.biases())
    assert torch.equal(torch.tensor(history.eval_loads), callback.last_eval_loads)

    section = (tmp_path / BALANCE_SECTION_FILE).read_text()
    assert "## Expert load balance" in section and "2 MoE layers of 8 routed experts" in section
    assert "rule `sign`, update rate 0.01" in section
    assert f"| MaxVio_global, mean over layers (evaluation, step 6) | {metrics['eval_maxvio_global']:.4f} |" in section
    for layer in (1, 2):
        assert f"| MaxVio_global, layer {layer} | {metrics[f'eval_maxvio_global/layer_{layer}']:.4f} |" in section
    last_training = [entry for entry in trainer.state.log_history if "maxvio_batch" in entry][-1]
    assert f"| MaxVio_batch, worst layer | {last_training['maxvio_batch/max']:.4f} |" in section
    assert set(re.findall(r"\]\((\S+\.png)\)", section)) == {MAXVIO_PLOT, BIAS_PLOT, LOAD_HEATMAP_PLOT}

    images = {}
    for path in glob.glob(str(tmp_path / "runs" / "**" / "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(path, size_guidance={"images": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["images"]:
            images.setdefault(tag, []).extend(accumulator.Images(tag))
    # written at the end of training (bias and MaxVio plots), again after the evaluation (with the load heatmap)
    assert {tag: len(events) for tag, events in images.items()} == {
        "balance/maxvio_batch": 2,
        "balance/bias_trajectories": 2,
        "balance/eval_load_heatmap": 1,
    }
    assert all(event.step == 6 and event.width >= 600 for events in images.values() for event in events)


def test_report_false_writes_nothing_and_bad_values_are_refused(tiny_config, tmp_path):
    model = LossFreeMoeForCausalLM(tiny_config())
    train_and_evaluate(model, tmp_path, report_to=[], callback=LossFreeBalancingCallback(report=False))
    assert not any((tmp_path / name).exists() for name in (MAXVIO_PLOT, ROUTING_HISTORY_FILE, BALANCE_SECTION_FILE))
    with pytest.raises(ValueError, match="report must be True or False"):
        LossFreeBalancingCallback(report="yes")


def test_a_stock_family_without_a_bias_gets_its_plots_and_section(tmp_path):
    """Qwen3-MoE trained with its own auxiliary loss: measured only, so no bias plot, and the section says so."""
    torch.manual_seed(0)
    model = build_tiny_model("qwen3_moe", output_router_logits=True, router_aux_loss_coef=1e-3)
    trainer, callback, metrics = train_and_evaluate(
        model, tmp_path, report_to=[], callback=LossFreeBalancingCallback()
    )
    assert not callback.balancer.updates_biases
    assert {path.name for path in tmp_path.glob("*.png")} == {MAXVIO_PLOT, LOAD_HEATMAP_PLOT}
    section = (tmp_path / BALANCE_SECTION_FILE).read_text()
    assert (
        "measured only (the routing biases did not move); training used the model's auxiliary loss (coefficient "
        "0.001)" in section
    )
    assert f"| MaxVio_global, layer 0 | {metrics['eval_maxvio_global/layer_0']:.4f} |" in section
    assert f"| MaxVio_global, layer 1 | {metrics['eval_maxvio_global/layer_1']:.4f} |" in section
    assert BIAS_PLOT not in section


def test_a_resumed_run_continues_the_routing_history_of_its_checkpoint(tiny_config, tmp_path):
    """Resumed from step 2 of 4, the history holds every logged step of the run, as the uninterrupted run's does;
    resumed from a checkpoint without the file, it starts at step 2, with a warning."""

    def train(output_dir, resume_from_checkpoint=None):
        args = TrainingArguments(
            output_dir=str(output_dir),
            max_steps=4,
            per_device_train_batch_size=4,
            logging_steps=1,
            save_strategy="steps",
            save_steps=2,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        model = LossFreeMoeForCausalLM(tiny_config())
        callback = LossFreeBalancingCallback()
        Trainer(model=model, args=args, train_dataset=examples(16, 1), callbacks=[callback]).train(
            resume_from_checkpoint=resume_from_checkpoint
        )
        return RoutingHistory.load(Path(output_dir, ROUTING_HISTORY_FILE))

    uninterrupted = train(tmp_path / "a")
    assert uninterrupted.steps == [0, 1, 2, 3, 4]
    resumed = train(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.steps == [0, 1, 2, 3, 4]
    assert resumed.biases == uninterrupted.biases

    (tmp_path / "a" / "checkpoint-2" / ROUTING_HISTORY_FILE).unlink()
    with pytest.warns(UserWarning, match=f"No {ROUTING_HISTORY_FILE} to continue .*checkpoint-2 holds none"):
        started_late = train(tmp_path / "c", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert started_late.steps == [2, 3, 4]
