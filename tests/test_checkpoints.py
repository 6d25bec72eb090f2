"""Which checkpoints count as complete, and the callback writing its files before a checkpoint counts as done.

A training process killed at each stage of checkpoint writing is tested end to end in test_train_script.py.
"""

import json

import pytest
import torch
from transformers import Trainer, TrainerState, TrainingArguments

from hf_lossfree_moe import LossFreeBalancingCallback, LossFreeMoeForCausalLM, add_balancing_callback
from hf_lossfree_moe.checkpoints import FAULT_VARIABLE, check_complete, fault_point, newest_complete_checkpoint
from hf_lossfree_moe.plotting import RoutingHistory, RoutingHistoryRecorder
from hf_lossfree_moe.run_files import ROUTING_HISTORY_FILE, TRAINER_STATE_FILE


def write_checkpoint(folder, step: int, state_text: str | None = None):
    """A checkpoint folder whose trainer_state.json holds `state_text`, or a real state when None."""
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    if state_text is None:
        TrainerState(global_step=step).save_to_json(str(checkpoint / TRAINER_STATE_FILE))
    elif state_text:
        (checkpoint / TRAINER_STATE_FILE).write_text(state_text)
    return checkpoint


def test_the_newest_complete_checkpoint_passes_over_cut_off_ones(tmp_path):
    write_checkpoint(tmp_path, 10)
    complete = write_checkpoint(tmp_path, 20)
    write_checkpoint(tmp_path, 30, state_text="")  # killed before trainer_state.json
    cut_short = write_checkpoint(tmp_path, 40, state_text='{"global_step": 4')  # killed while writing it
    (tmp_path / "checkpoint-50-copy").mkdir()  # not a checkpoint of the run

    assert newest_complete_checkpoint(tmp_path) == complete
    check_complete(complete)
    with pytest.raises(
        ValueError,
        match=r"^checkpoint-30 is incomplete: it lacks trainer_state.json \(its writing was cut off\); the newest "
        r"complete one is checkpoint-20\.$",
    ):
        check_complete(tmp_path / "checkpoint-30")
    with pytest.raises(ValueError, match=r"checkpoint-40 is incomplete: it lacks a readable trainer_state.json"):
        check_complete(cut_short)


def test_a_run_with_no_complete_checkpoint_says_so(tmp_path):
    write_checkpoint(tmp_path, 5, state_text="")
    assert newest_complete_checkpoint(tmp_path) is None
    assert newest_complete_checkpoint(tmp_path / "absent") is None
    with pytest.raises(
        ValueError, match=rf"lacks trainer_state.json .*; no other checkpoint of {tmp_path} is complete"
    ):
        check_complete(tmp_path / "checkpoint-5")


def test_fault_point_is_inert_unless_its_stage_and_step_are_named(monkeypatch):
    monkeypatch.delenv(FAULT_VARIABLE, raising=False)
    fault_point("after_trainer_state", 4)
    monkeypatch.setenv(FAULT_VARIABLE, "after_trainer_state@4")
    fault_point("after_trainer_state", 2)  # another checkpoint
    fault_point("after_routing_history", 4)  # another stage
    # Reaching this line is the test: a matching stage kills the process (see test_train_script.py).


def test_callback_writes_its_files_before_each_checkpoint_counts_as_done(tiny_config, tmp_path, one_thread):
    """The Trainer writes trainer_state.json, then deletes old checkpoints: the files must be in place by then."""
    model = LossFreeMoeForCausalLM(tiny_config())
    inputs = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (8, 12)).tolist()]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=4,
        logging_steps=2,
        save_steps=2,
        save_total_limit=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=inputs)
    balancing = add_balancing_callback(trainer)
    recorder = RoutingHistoryRecorder(balancing)
    trainer.add_callback(recorder)
    seen = []

    def write_note(path, step):
        present = sorted(folder.name for folder in tmp_path.glob("checkpoint-*"))
        seen.append((path.parent.name, step, (path.parent / TRAINER_STATE_FILE).exists(), present))
        path.write_text(json.dumps({"step": step}))

    balancing.add_checkpoint_file("note.json", write_note)
    trainer.train()

    # Written into each checkpoint before its trainer_state.json, while the previous checkpoint still existed.
    assert seen == [
        ("checkpoint-2", 2, False, ["checkpoint-2"]),
        ("checkpoint-4", 4, False, ["checkpoint-2", "checkpoint-4"]),
    ]
    assert [path.name for path in tmp_path.glob("checkpoint-*")] == ["checkpoint-4"]
    history = RoutingHistory.load(tmp_path / "checkpoint-4" / ROUTING_HISTORY_FILE)
    assert history.steps == [0, 2, 4]
    assert torch.tensor(history.biases[-1]).equal(balancing.balancer.biases())
    assert json.loads((tmp_path / "checkpoint-4" / "note.json").read_text()) == {"step": 4}


def test_a_callback_the_trainer_rebuilds_from_a_checkpoint_keeps_writing_the_registered_files(tiny_config, tmp_path):
    """With `restore_callback_states_from_checkpoint`, the Trainer replaces the live callback by one built from the
    checkpoint's saved arguments: that one still writes the registered files, and keeps `report=False`. A checkpoint
    that lacks a file its trainer_state.json names is incomplete."""
    inputs = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (8, 12)).tolist()]

    def train(output_dir, resume_from_checkpoint=None):
        args = TrainingArguments(
            output_dir=str(output_dir),
            per_device_train_batch_size=2,
            max_steps=4,
            save_steps=2,
            restore_callback_states_from_checkpoint=True,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        balancing = LossFreeBalancingCallback(report=False)
        balancing.add_checkpoint_file("note.json", lambda path, step: path.write_text(json.dumps({"step": step})))
        trainer = Trainer(model=LossFreeMoeForCausalLM(tiny_config()), args=args, train_dataset=inputs)
        add_balancing_callback(trainer, balancing)
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        return trainer, balancing

    train(tmp_path / "a")
    resumed, live = train(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    rebuilt = next(cb for cb in resumed.callback_handler.callbacks if isinstance(cb, LossFreeBalancingCallback))
    assert rebuilt is not live and rebuilt.report is None  # report=False came back with the saved arguments
    assert not (tmp_path / "b" / ROUTING_HISTORY_FILE).exists()
    assert json.loads((tmp_path / "b" / "checkpoint-4" / "note.json").read_text()) == {"step": 4}
    check_complete(tmp_path / "b" / "checkpoint-4")

    (tmp_path / "b" / "checkpoint-4" / "note.json").unlink()
    with pytest.raises(ValueError, match=r"^checkpoint-4 is incomplete: it lacks note.json"):
        check_complete(tmp_path / "b" / "checkpoint-4")
