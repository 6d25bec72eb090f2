"""The torch and transformers behaviour that each workaround of compat.py relies on: a change there fails here."""

from dataclasses import dataclass

import pytest
import torch
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from hf_lossfree_moe import LossFreeMoeConfig
from hf_lossfree_moe.compat import calling_handler, in_backward, scoring_function_from_source
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
