"""Where the library leans on behaviour of torch or transformers that no public API promises.

Each workaround is one function here, with the versions it was tested with; tests/test_compat.py checks the
behaviour each one relies on, so an upgrade that changes it fails there first instead of breaking silently.

One workaround lives elsewhere: turning `@strict`'s own validation errors into the `ValueError` naming the field
(`_raise_value_errors` in configuration_lossfree_moe.py, which patches the config's `__setattr__` and `validate`)
stays in that file: a saved model folder loads it as remote code, alone. Its test is here with the others.
"""

import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch


if TYPE_CHECKING:
    from transformers import TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler, TrainerCallback


# Tested with transformers 5.24: `CallbackHandler.call_event` calls each callback's event method directly, so the
# handler is the `self` of a frame a few levels above the callback's method.
def calling_handler(callback: "TrainerCallback", max_depth: int = 8) -> "CallbackHandler | None":
    """The `CallbackHandler` within `max_depth` frames up the call stack whose list holds `callback`, if any.

    Trainer events carry no reference to the Trainer or its handler, and the callback must reorder the handler's list
    (see `LossFreeBalancingCallback`).
    """
    from transformers.trainer_callback import CallbackHandler  # only callbacks need it; routers import this module

    for local in _locals_of_callers(max_depth):
        candidate = local.get("self")
        if isinstance(candidate, CallbackHandler) and any(cb is callback for cb in candidate.callbacks):
            return candidate
    return None


# Tested with transformers 5.24: `Trainer._save_checkpoint` writes the model, optimizer, scheduler and RNG states into
# `<output_dir>/checkpoint-<global_step>`, then calls every `ExportableState` callback's `state()`, then writes that
# folder's trainer_state.json, and only then deletes older checkpoints (`rotate_checkpoints`). Crash safety rests on
# this order: files written from `state()` are in place before the checkpoint counts as complete.
def checkpoint_being_saved(args: "TrainingArguments", state: "TrainerState") -> Path | None:
    """The checkpoint folder the Trainer is saving when it calls a callback's `state()` during training (None on a
    process that does not save, or before the folder exists)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    checkpoint = Path(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
    return checkpoint if args.should_save and checkpoint.is_dir() else None


# Tested with transformers 5.24: `Trainer._inner_training_loop` holds the checkpoint it resumes from in its local
# `resume_from_checkpoint` (None for a fresh run) when it calls `on_train_begin` through the `CallbackHandler`.
def resumed_checkpoint(max_depth: int = 8) -> str | None:
    """The checkpoint folder the `Trainer` calling this `on_train_begin` resumes from, or None if none is found.

    `TrainerState` does not say where it was loaded from, and the files a callback keeps in its checkpoints (the
    routing history) must be read back from that folder, which need not be under the run's `output_dir`.
    """
    from transformers import Trainer

    for local in _locals_of_callers(max_depth):
        if isinstance(local.get("self"), Trainer) and "resume_from_checkpoint" in local:
            checkpoint = local["resume_from_checkpoint"]
            return None if checkpoint is None else str(checkpoint)
    return None


def _locals_of_callers(max_depth: int) -> list[dict]:
    """The local variables of the `max_depth` frames above the function that calls this one, nearest first."""
    frame = inspect.currentframe().f_back
    try:
        found = []
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            found.append(frame.f_locals)
        return found
    finally:
        del frame


# Tested with transformers 5.24: DeepSeek-V3-style routers apply sigmoid; Kolibri-1 adds the bias to the raw
# `router_logits` (`router_logits + self.e_score_correction_bias`) and applies the sigmoid to the chosen weights only.
def scoring_function_from_source(router_class: type, bias_name: str) -> str:
    """Which function turns a router's logits into the scores it selects on, read from its `forward`'s code:
    `"identity"` where it adds the bias to `router_logits`, `"softmax"` where it calls only softmax, else `"sigmoid"`
    (also when the code cannot be read). For routers that name no scoring function of their own."""
    try:
        source = inspect.getsource(router_class.forward)
    except (OSError, TypeError):
        return "sigmoid"
    if re.search(rf"router_logits\s*\+\s*self\.{bias_name}", source):
        return "identity"
    if "softmax" in source and "sigmoid" not in source:
        return "softmax"
    return "sigmoid"


# Tested with torch 2.13: `torch._C._current_graph_task_id()` is -1 outside autograd's backward and the id of the
# running graph task inside it, including while activation checkpointing (reentrant or not) recomputes a forward.
def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (a forward here is a checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


__all__ = [
    "calling_handler",
    "checkpoint_being_saved",
    "in_backward",
    "resumed_checkpoint",
    "scoring_function_from_source",
]
