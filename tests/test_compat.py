"""The torch and transformers behaviour that each workaround of compat.py relies on: a change there fails here."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import CallbackHandler, ExportableState

from hf_lossfree_moe import LossFreeMoeConfig
from hf_lossfree_moe.compat import (
    calling_handler,
    checkpoint_being_saved,
    in_backward,
    resumed_checkpoint,
    scoring_function_from_source,
)
from hf_lossfree_moe.routers import BIAS_NAME, SCORING_FUNCTION_ATTRIBUTES, find_routers
from hf_lossfree_moe.testing_utils import build_tiny_model


class HandlerProbe(TrainerCallback):
    """Records, at each event, the handler `calling_handler` finds."""

    def __init__(self):
        self.found = []

    def on_log(self, args, state, control, **kwargs):
        self.found.append(calling_handler(self))


def test_the_callback_handler_calling_an_event_is_found_on_the_call_stack(tmp_path):
    probe, other = HandlerProbe(), HandlerProbe()
    handler = CallbackHandler([other, probe], model=None, processing_class=None, optimizer=None, lr_scheduler=None)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    handler.on_log(args, TrainerState(), TrainerControl(), logs={})
    assert probe.found == [handler]
    assert other.found == [handler]
    assert calling_handler(probe) is None  # outside any event
    assert calling_handler(HandlerProbe()) is None  # a callback the handler does not hold


@pytest.mark.parametrize(
    "family, expected",
    [("deepseek_v3", "sigmoid"), ("kolibri1", "identity"), ("ernie4_5_moe", "softmax"), ("minimax_m2", "sigmoid")],
)
def test_the_scoring_function_of_stock_routers_is_read_from_their_code(family, expected):
    router = find_routers(build_tiny_model(family))[0].module
    assert not any(getattr(router, name, None) is not None for name in SCORING_FUNCTION_ATTRIBUTES)
    assert scoring_function_from_source(type(router), BIAS_NAME) == expected


def test_a_router_whose_code_cannot_be_read_is_taken_for_sigmoid():
    router_class = type("Generated", (torch.nn.Module,), {"forward": eval("lambda self, x: x")})
    assert scoring_function_from_source(router_class, BIAS_NAME) == "sigmoid"


@strict
@dataclass
class StrictProbe:
    steps: int = 0

    def validate_steps(self):
        if self.steps > 5:
            raise ValueError("steps must be at most 5")


def test_strict_dataclasses_raise_the_errors_the_config_turns_into_value_errors():
    """configuration_lossfree_moe.py's `_raise_value_errors` catches these two errors and relies on the cause."""
    probe = StrictProbe()
    with pytest.raises(StrictDataclassFieldValidationError):
        probe.steps = "many"
    probe.steps = 9
    with pytest.raises(StrictDataclassClassValidationError) as error:
        probe.validate()
    assert isinstance(error.value.__cause__, ValueError) and str(error.value.__cause__) == "steps must be at most 5"

    config = LossFreeMoeConfig()
    with pytest.raises(ValueError, match="^LossFreeMoeConfig.n_group must be of type int, got 'two'"):
        config.n_group = "two"
    config.bias_update_momentum = 1.5
    with pytest.raises(ValueError, match="^LossFreeMoeConfig.bias_update_momentum must be a number in"):
        config.validate()


def test_autograd_says_when_a_backward_runs_and_checkpointing_recomputes_in_it():
    assert torch._C._current_graph_task_id() == -1
    assert not in_backward()
    weight = torch.ones(3, requires_grad=True)
    seen = []
    doubled = weight * 2
    doubled.register_hook(lambda grad: seen.append(in_backward()))
    doubled.sum().backward()
    assert seen == [True]

    for reentrant in (False, True):
        calls = []

        def forward(tensor, calls=calls):
            calls.append(in_backward())
            return tensor.sin()  # saves its input, so backward needs the recomputation

        checkpoint(forward, weight, use_reentrant=reentrant).sum().backward()
        assert calls == [False, True], reentrant  # the forward, then its recomputation inside backward


class SaveOrderProbe(TrainerCallback, ExportableState):
    """Records, whenever the Trainer asks for its state, what `checkpoint_being_saved` names and what is on disk;
    and, at `on_train_begin`, the checkpoint `resumed_checkpoint` finds."""

    def __init__(self):
        self.saves, self.resumed, self.training = [], [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = (args, state)
        self.resumed.append(resumed_checkpoint())

    def state(self) -> dict:
        if self.training is not None:
            args, state = self.training
            folder = checkpoint_being_saved(args, state)
            present = sorted(path.name for path in Path(args.output_dir).glob("checkpoint-*"))
            self.saves.append((folder.name, (folder / TRAINER_STATE_NAME).exists(), present))
        return {"args": {}, "attributes": {}}


def test_the_trainer_asks_for_callback_states_before_a_checkpoint_counts_as_done(tmp_path):
    """`state()` runs once the checkpoint folder holds the model, before its trainer_state.json and before older
    checkpoints are deleted; `on_train_begin` runs where the resumed checkpoint's path can be read."""
    inputs = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 64, (8, 8)).tolist()]

    def train(output_dir, resume_from_checkpoint=None):
        args = TrainingArguments(
            output_dir=str(output_dir),
            per_device_train_batch_size=2,
            max_steps=4,
            save_steps=2,
            save_total_limit=1,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        probe = SaveOrderProbe()
        Trainer(model=build_tiny_model("qwen3_moe"), args=args, train_dataset=inputs, callbacks=[probe]).train(
            resume_from_checkpoint=resume_from_checkpoint
        )
        return probe

    probe = train(tmp_path / "a")
    assert probe.resumed == [None]
    assert probe.saves == [
        ("checkpoint-2", False, ["checkpoint-2"]),
        ("checkpoint-4", False, ["checkpoint-2", "checkpoint-4"]),
    ]
    resumed = train(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert resumed.resumed == [str(tmp_path / "a" / "checkpoint-4")]
