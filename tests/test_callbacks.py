import functools
import glob
import re
import threading
import warnings
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from conftest import tiny_model
from hf_lossfree_moe import LossFreeBalancingCallback, LossFreeMoeForCausalLM, add_balancing_callback, compute_maxvio
from hf_lossfree_moe.testing_utils import build_tiny_model


TOP_K = 2


def padded_examples(count: int, seed: int, max_length: int = 12):
    """Token sequences of random lengths in [3, max_length]."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_length + 1, (count,), generator=generator).tolist()
    return [{"input_ids": torch.randint(3, 128, (n,), generator=generator).tolist()} for n in lengths]


def collate(features):
    """Right-pads a batch: pad id 0, attention_mask 0, labels -100."""
    length = max(len(f["input_ids"]) for f in features)
    input_ids = torch.zeros(len(features), length, dtype=torch.long)
    attention_mask = torch.zeros(len(features), length, dtype=torch.long)
    for row, feature in enumerate(features):
        input_ids[row, : len(feature["input_ids"])] = torch.tensor(feature["input_ids"])
        attention_mask[row, : len(feature["input_ids"])] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, -100),
    }


def real_tokens(examples) -> int:
    return sum(len(example["input_ids"]) for example in examples)


def make_trainer(model, output_dir, train, evaluation=None, callbacks=None, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return Trainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collate,
        callbacks=callbacks,
    )


def spy_on_steps(balancer):
    """Record the loads `step()` sees and the stats it returns."""
    seen = []
    step = balancer.step

    def recorded_step():
        loads = balancer.loads
        stats = step()
        seen.append((loads, stats))
        return stats

    balancer.step = recorded_step
    return seen


def tensorboard_scalars(output_dir) -> dict[str, list[float]]:
    """Every scalar of every event file under `output_dir/runs`, per tag, in the order they were written."""
    events = {}
    for path in glob.glob(f"{output_dir}/runs/**/events.out.tfevents.*", recursive=True):
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            events.setdefault(tag, []).extend(accumulator.Scalars(tag))
    return {
        tag: [event.value for event in sorted(tagged, key=lambda e: e.wall_time)] for tag, tagged in events.items()
    }


def test_trainer_logs_maxvio_everywhere_with_gradient_accumulation(tiny_config, tmp_path):
    model = LossFreeMoeForCausalLM(tiny_config())
    train, validation = padded_examples(16, seed=1), padded_examples(6, seed=2)
    trainer = make_trainer(
        model,
        tmp_path,
        train,
        validation,
        gradient_accumulation_steps=2,
        max_steps=4,  # 16 examples / (2 x 2): exactly one epoch
        eval_strategy="steps",
        eval_steps=4,
        report_to=["tensorboard"],
    )
    callback = add_balancing_callback(trainer)
    steps = spy_on_steps(callback.balancer)
    trainer.train()

    # one step() per optimizer step, each with the loads of both micro-batches, padding excluded
    assert len(steps) == 4
    assert sum(loads for loads, _ in steps).sum(dim=-1).tolist() == [TOP_K * real_tokens(train)] * 2
    assert all((loads.sum(dim=-1) > 0).all() for loads, _ in steps)
    assert callback.balancer.biases().abs().max() > 0

    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [2, 4]
    for entry, window in zip(train_logs, (steps[:2], steps[2:]), strict=True):
        assert entry["maxvio_batch"] == pytest.approx(sum(s["maxvio_batch"] for _, s in window) / 2)
        assert entry["maxvio_batch/layer_2"] == pytest.approx(sum(s["maxvio_batch/layer_2"] for _, s in window) / 2)
        assert entry["bias_abs_max"] == window[-1][1]["bias_abs_max"]
    eval_log = next(entry for entry in trainer.state.log_history if "eval_loss" in entry)
    assert eval_log["eval_maxvio_global"] > 0
    assert callback.last_eval_loads.sum(dim=-1).tolist() == [TOP_K * real_tokens(validation)] * 2

    biases = callback.balancer.biases()
    metrics = trainer.evaluate()
    with callback.balancer.measure() as measurement:  # the same validation pass, by hand
        model.eval()
        model(**collate(validation))
    assert metrics["eval_maxvio_global"] == pytest.approx(measurement.maxvio_global)
    per_layer = list(compute_maxvio(measurement.loads).per_layer.values())
    assert [metrics["eval_maxvio_global/layer_1"], metrics["eval_maxvio_global/layer_2"]] == pytest.approx(per_layer)
    assert trainer.state.log_history[-1]["eval_maxvio_global"] == metrics["eval_maxvio_global"]
    assert torch.equal(callback.balancer.biases(), biases)  # evaluation moved no bias ...
    assert callback.balancer.loads.sum() == 0  # ... and counted nothing toward training

    scalars = tensorboard_scalars(tmp_path)
    assert scalars["train/maxvio_batch"] == pytest.approx([entry["maxvio_batch"] for entry in train_logs])
    assert "train/maxvio_batch/layer_1" in scalars
    assert "train/bias_abs_max" in scalars
    assert scalars["eval/maxvio_global"] == pytest.approx(
        [eval_log["eval_maxvio_global"], metrics["eval_maxvio_global"]]
    )


def test_evaluate_before_training_and_predict(tiny_config, tmp_path):
    model = LossFreeMoeForCausalLM(tiny_config())
    validation = padded_examples(5, seed=3)
    trainer = make_trainer(model, tmp_path, None, validation)
    callback = add_balancing_callback(trainer)

    metrics = trainer.evaluate()
    assert metrics["eval_maxvio_global"] == pytest.approx(compute_maxvio(callback.last_eval_loads).mean)
    assert callback.last_eval_loads.sum(dim=-1).tolist() == [TOP_K * real_tokens(validation)] * 2
    prediction = trainer.predict(validation)
    assert prediction.metrics["test_maxvio_global"] == pytest.approx(metrics["eval_maxvio_global"])
    assert torch.equal(callback.balancer.biases(), torch.zeros(2, 8))


def test_an_evaluation_in_another_thread_than_the_trainers_is_measured(tiny_config, tmp_path):
    """Measurements count their own thread's forwards; the callback's evaluation measurement counts every thread's."""
    model = LossFreeMoeForCausalLM(tiny_config())
    validation = padded_examples(5, seed=3)
    trainer = make_trainer(model, tmp_path, None, validation)
    callback = add_balancing_callback(trainer)
    results = {}
    evaluator = threading.Thread(target=lambda: results.update(trainer.evaluate()))
    evaluator.start()
    evaluator.join()
    assert callback.last_eval_loads.sum(dim=-1).tolist() == [TOP_K * real_tokens(validation)] * 2
    assert results["eval_maxvio_global"] == pytest.approx(compute_maxvio(callback.last_eval_loads).mean)


@pytest.mark.parametrize(
    "rule_settings",
    [
        {"bias_update_rule": "sign"},
        {"bias_update_rule": "smebu"},  # carries a momentum from step to step
        # the annealed weight reads the count of updates: 1 up to update 4, then 4 / n, across the resume
        {"bias_update_rule": "quantile", "bias_quantile_anneal_steps": 4, "bias_quantile_ema": 0.1},
    ],
)
def test_resuming_gives_the_biases_of_an_uninterrupted_run(tiny_config, tmp_path, rule_settings):
    train = padded_examples(40, seed=4)
    settings = dict(max_steps=20, save_strategy="steps", save_steps=10, logging_steps=10)
    tiny_config = functools.partial(tiny_config, **rule_settings)
    uninterrupted = make_trainer(LossFreeMoeForCausalLM(tiny_config()), tmp_path / "a", train, **settings)
    callback = add_balancing_callback(uninterrupted)
    uninterrupted.train()
    expected = callback.balancer.biases()

    resumed_model = LossFreeMoeForCausalLM(tiny_config())
    resumed = make_trainer(resumed_model, tmp_path / "b", train, **settings)
    callback = add_balancing_callback(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-10"))

    at_checkpoint = LossFreeMoeForCausalLM.from_pretrained(tmp_path / "a" / "checkpoint-10")
    halfway = torch.stack([router.e_score_correction_bias for router in at_checkpoint.routers()])
    assert halfway.abs().max() > 0 and not torch.equal(halfway, expected)  # the biases kept moving after step 10
    assert torch.equal(callback.balancer.biases(), expected)
    assert callback.balancer.completed_steps == 20


def test_aux_loss_model_is_only_measured(tiny_config, tmp_path):
    model = LossFreeMoeForCausalLM(tiny_config(load_balancing="aux_loss"))
    trainer = make_trainer(model, tmp_path, padded_examples(8, seed=5), max_steps=2)
    callback = add_balancing_callback(trainer)
    trainer.train()
    assert trainer.state.log_history[0]["maxvio_batch"] > 0
    assert torch.equal(callback.balancer.biases(), torch.zeros(2, 8))


class EventCounter(TrainerCallback):
    """Counts the on_log calls it receives and keeps the keys each one had."""

    def __init__(self):
        self.logged = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(set(logs))


def test_callback_passed_the_ordinary_way_reaches_every_integration(tiny_config, tmp_path):
    model = LossFreeMoeForCausalLM(tiny_config())
    callback, counter = LossFreeBalancingCallback(bias_update_rate=1e-2), EventCounter()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=4,
            logging_steps=2,
            eval_strategy="steps",
            eval_steps=4,
            report_to=["tensorboard"],
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=padded_examples(8, seed=6),
        eval_dataset=padded_examples(4, seed=7),
        data_collator=collate,
        callbacks=[counter, callback],
    )
    assert callback.balancer.update_rate == 1e-2  # built when the Trainer was ...
    assert trainer.callback_handler.callbacks[0] is callback  # ... and moved ahead of the TensorBoard callback
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*report_to.*")
        trainer.train()
    metrics = trainer.evaluate()

    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    eval_logs = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(counter.logged) == len(trainer.state.log_history) == 5  # each log reached every callback once
    assert all("maxvio_batch" in keys for keys in counter.logged[:1])
    scalars = tensorboard_scalars(tmp_path)
    assert scalars["train/maxvio_batch"] == pytest.approx([entry["maxvio_batch"] for entry in train_logs])
    assert scalars["train/maxvio_batch/layer_2"] == pytest.approx(
        [entry["maxvio_batch/layer_2"] for entry in train_logs]
    )
    assert scalars["train/bias_abs_max"] == pytest.approx([entry["bias_abs_max"] for entry in train_logs])
    assert scalars["train/bias_abs_mean"] == pytest.approx([entry["bias_abs_mean"] for entry in train_logs])
    assert scalars["eval/maxvio_global"] == pytest.approx([entry["eval_maxvio_global"] for entry in eval_logs])
    assert scalars["eval/maxvio_global"][-1] == pytest.approx(metrics["eval_maxvio_global"])
    assert "eval/maxvio_global/layer_1" in scalars


def test_a_second_trainer_on_the_same_model_takes_over_and_hands_back(tiny_config, tmp_path):
    model = LossFreeMoeForCausalLM(tiny_config())
    validation = padded_examples(4, seed=8)
    first = make_trainer(model, tmp_path / "a", padded_examples(8, seed=9), validation, max_steps=2)
    first_callback = add_balancing_callback(first)
    first.train()

    second_callback = LossFreeBalancingCallback()
    second = make_trainer(
        model, tmp_path / "b", None, validation, per_device_eval_batch_size=2, callbacks=[second_callback]
    )
    assert (first_callback.balancer.attached, second_callback.balancer.attached) == (False, True)
    assert "eval_maxvio_global" in second.evaluate()
    assert second_callback.last_eval_loads.sum(dim=-1).tolist() == [TOP_K * real_tokens(validation)] * 2

    biases = second_callback.balancer.biases()
    first.train()  # takes the routers back before its first batch
    assert (first_callback.balancer.attached, second_callback.balancer.attached) == (True, False)
    assert "maxvio_batch" in first.state.log_history[0]
    assert (first_callback.balancer.biases() - biases).abs().max() == pytest.approx(2e-3)  # two steps of u = 1e-3

    with pytest.warns(UserWarning, match="left out of this evaluation"):
        assert "eval_maxvio_global" not in second.evaluate()  # taken back after its first batch
    metrics = second.evaluate()
    assert second_callback.last_eval_loads.sum(dim=-1).tolist() == [TOP_K * real_tokens(validation)] * 2
    assert metrics["eval_maxvio_global"] == pytest.approx(compute_maxvio(second_callback.last_eval_loads).mean)


def test_a_callback_added_after_the_trainer_was_built_measures_from_the_next_evaluation(tiny_config, tmp_path):
    validation = padded_examples(4, seed=11)
    trainer = make_trainer(
        LossFreeMoeForCausalLM(tiny_config()), tmp_path, None, validation, per_device_eval_batch_size=2
    )
    callback = LossFreeBalancingCallback()
    trainer.add_callback(callback)
    with pytest.warns(UserWarning, match="left out of this evaluation"):
        assert "eval_maxvio_global" not in trainer.evaluate()
    metrics = trainer.evaluate()
    assert callback.last_eval_loads.sum(dim=-1).tolist() == [TOP_K * real_tokens(validation)] * 2
    assert metrics["eval_maxvio_global"] == pytest.approx(compute_maxvio(callback.last_eval_loads).mean)


def test_routers_without_tokens_leave_the_evaluation_metric_in_place(tmp_path):
    """ERNIE-4.5-VL's vision experts get no text token: their layers are skipped and counted, not the metric lost."""
    model = build_tiny_model("ernie4_5_vl_moe")  # a text model: no loss, so the evaluation only measures loads
    validation = padded_examples(4, seed=10)
    trainer = make_trainer(model, tmp_path, None, validation, callbacks=[LossFreeBalancingCallback()])
    metrics = trainer.evaluate()

    callback = trainer.callback_handler.callbacks[0]
    assert callback.balancer.names[1::2] == ["layers.0.mlp.vision_moe.gate", "layers.1.mlp.vision_moe.gate"]
    loads = callback.last_eval_loads
    assert loads.sum(dim=-1).tolist() == [TOP_K * real_tokens(validation), 0] * 2
    text = compute_maxvio(loads[0::2]).per_layer.values()
    assert metrics["eval_maxvio_global"] == pytest.approx(sum(text) / 2)
    assert metrics["eval_maxvio_global/skipped_layers"] == 2
    assert [key for key in metrics if key.startswith("eval_maxvio_global/layer_")] == [
        "eval_maxvio_global/layer_0",
        "eval_maxvio_global/layer_2",
    ]


def test_balancer_arguments_are_declared_and_checked_when_the_callback_is_built():
    with pytest.raises(TypeError, match="update_rates"):
        LossFreeBalancingCallback(update_rates=1e-3)
    with pytest.raises(ValueError, match="^bias_update_rate must be a number >= 0"):
        LossFreeBalancingCallback(update_rate=-1.0)
    with pytest.raises(ValueError, match="^bias_update_rule must be one of"):
        LossFreeBalancingCallback(rule="momentum")


def test_callback_takes_total_steps_from_the_trainer(tmp_path):
    model = tiny_model(bias_update_schedule="cosine")
    callback = LossFreeBalancingCallback()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = TrainerState(max_steps=40, global_step=10)
    callback._first_in_trainer = True
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    assert (callback.balancer.total_steps, callback.balancer.completed_steps) == (40, 10)


# What Trainer itself logs; every other key of a run's logs comes from the callback.
TRAINER_KEYS = {
    "loss",
    "grad_norm",
    "learning_rate",
    "epoch",
    "step",
    "total_flos",
    "eval_loss",
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
    "train_loss",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
}
BALANCING_DOCS = Path(__file__).resolve().parents[1] / "docs" / "balancing.md"


def documented_log_keys() -> list[str]:
    """The first column of the table of logged keys in docs/balancing.md."""
    text = BALANCING_DOCS.read_text(encoding="utf-8")
    table = text[text.index("| key | when | meaning |") :].split("\n\n")[0]
    return re.findall(r"^\| `([^`]+)` \|", table, flags=re.MULTILINE)


def test_every_key_the_callback_logs_is_documented(tiny_config, tmp_path):
    model = LossFreeMoeForCausalLM(tiny_config())
    train, validation = padded_examples(8, seed=1), padded_examples(4, seed=2)
    trainer = make_trainer(
        model,
        tmp_path,
        train,
        validation,
        [LossFreeBalancingCallback()],
        max_steps=2,
        eval_strategy="steps",
        eval_steps=2,
    )
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry} - TRAINER_KEYS
    assert {"maxvio_batch/layer_1", "batch_load_cv", "bias_update_factor", "eval_min_load_ratio"} <= logged

    patterns = [re.escape(key).replace(r"\{i\}", r"\d+") for key in documented_log_keys()]
    undocumented = sorted(key for key in logged if not any(re.fullmatch(pattern, key) for pattern in patterns))
    assert undocumented == []
