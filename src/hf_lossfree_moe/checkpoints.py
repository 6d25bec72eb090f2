"""Which Trainer checkpoints are complete, and a fault-injection hook to test that a killed save leaves none half-done.

`Trainer._save_checkpoint` writes the model, optimizer, scheduler and RNG states, then `trainer_state.json`, then
deletes old checkpoints (`save_total_limit`), then calls `on_save`. `LossFreeBalancingCallback` writes its files
(the routing history, a script's run record) just before `trainer_state.json`, which names them (see
`compat.checkpoint_being_saved` for the order relied on): a checkpoint whose `trainer_state.json` reads back and whose
named files are present is complete, and rotation only ever deletes older checkpoints once a newer one is.

`HF_LOSSFREE_MOE_FAULT=<stage>[@<step>]` kills the process (SIGKILL, as a lost machine would) when checkpoint writing
reaches `<stage>` (at the checkpoint of optimizer step `<step>`, or at the first). It exists for tests; unset, the
hook does nothing. The stages, in writing order: `before_balancer_files` (model and optimizer written),
`after_<file stem>` after each balancer file (`after_routing_history`, `after_run_record`), `after_trainer_state`
(the Trainer's state written and old checkpoints rotated, before any `on_save`).
"""

import json
import os
import signal
from pathlib import Path

from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .run_files import TRAINER_STATE_FILE


FAULT_VARIABLE = "HF_LOSSFREE_MOE_FAULT"
# The name under which trainer_state.json keeps `LossFreeBalancingCallback.state()`.
BALANCING_CALLBACK = "LossFreeBalancingCallback"


def checkpoint_step(path: str | Path) -> int | None:
    """The optimizer step of a `checkpoint-<step>` folder, None for any other name."""
    name = Path(path).name
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    step = name[len(prefix) :] if name.startswith(prefix) else ""
    return int(step) if step.isdigit() else None


def missing_part(checkpoint: str | Path) -> str | None:
    """What `checkpoint` lacks to be complete, None if nothing: a readable `trainer_state.json`, written last, and
    the files the balancing callback registered, which that state names."""
    try:
        state = TrainerState.load_from_json(str(Path(checkpoint, TRAINER_STATE_FILE)))
    except FileNotFoundError:
        return TRAINER_STATE_FILE
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
        return f"a readable {TRAINER_STATE_FILE} (it is cut short)"
    missing = [name for name in registered_files(state) if not Path(checkpoint, name).is_file()]
    return ", ".join(missing) if missing else None


def registered_files(state: TrainerState) -> list[str]:
    """The files the balancing callback wrote into the checkpoint whose state is `state` (none for older ones)."""
    saved = (state.stateful_callbacks or {}).get(BALANCING_CALLBACK, [])
    saved = saved if isinstance(saved, list) else [saved]
    return [name for entry in saved for name in entry.get("attributes", {}).get("checkpoint_files", [])]


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders of `run_dir`, newest (highest step) first."""
    if not os.path.isdir(run_dir):
        return []
    folders = [path for path in Path(run_dir).iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(folders, key=checkpoint_step, reverse=True)


def newest_complete_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint of `run_dir` with the highest step, for `Trainer.train(resume_from_checkpoint=...)`.

    Unlike `transformers.trainer_utils.get_last_checkpoint`, it passes over a checkpoint whose writing was cut off.
    """
    return next((path for path in run_checkpoints(run_dir) if missing_part(path) is None), None)


def check_complete(checkpoint: str | Path) -> None:
    """Raise `ValueError` naming what an incomplete `checkpoint` lacks and the newest complete one beside it."""
    missing = missing_part(checkpoint)
    if missing is None:
        return
    complete = newest_complete_checkpoint(Path(checkpoint).parent)
    alternative = (
        f"the newest complete one is {complete.name}"
        if complete is not None
        else f"no other checkpoint of {Path(checkpoint).parent} is complete"
    )
    raise ValueError(
        f"{Path(checkpoint).name} is incomplete: it lacks {missing} (its writing was cut off); {alternative}."
    )


def fault_point(stage: str, step: int) -> None:
    """Kill this process if `HF_LOSSFREE_MOE_FAULT` names `stage` (and `step`, when it gives one)."""
    fault = os.environ.get(FAULT_VARIABLE)
    if not fault:
        return
    name, _, at_step = fault.partition("@")
    if name == stage and (not at_step or int(at_step) == step):
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["check_complete", "missing_part", "newest_complete_checkpoint"]
