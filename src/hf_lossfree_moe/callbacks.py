"""LossFreeBalancingCallback: `LossFreeBalancer` inside `transformers.Trainer`, plus its metrics in every logger.

The callback holds no balancing logic: it builds the balancer for the Trainer's model, calls `step()` once per
optimizer step (after all gradient-accumulation micro-batches) and adds MaxVio and bias statistics to the Trainer's
logs and evaluation metrics. Reporting integrations (TensorBoard, trackio, W&B ...) read the logs in callback order
and `Trainer` puts them ahead of the callbacks it is given, so the callback moves itself to the front of the
Trainer's list the first time the Trainer calls it; `add_balancing_callback(trainer)` does the same explicitly.
"""

import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .balance_metrics import compute_layer_spread_metrics, compute_load_metrics, compute_maxvio
from .balancing import LoadMeasurement, LossFreeBalancer
from .checkpoints import fault_point
from .compat import calling_handler, checkpoint_being_saved, resumed_checkpoint
from .settings import ALIASES, LEGACY_POSITIONAL, BalancingSettings, is_legacy_positional, legacy_positional


if TYPE_CHECKING:
    import torch.distributed as dist
    from torch import nn
    from transformers import Trainer


# The callback that attached to each model last. A callback the Trainer rebuilds from a checkpoint's saved arguments
# (`restore_callback_states_from_checkpoint=True`) replaces a live one on the same model, and takes over from it what
# cannot be saved in trainer_state.json: its registered checkpoint files and its process group.
_LAST_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, LossFreeBalancingCallback]" = weakref.WeakKeyDictionary()


class LossFreeBalancingCallback(TrainerCallback, ExportableState):
    """Runs a `LossFreeBalancer` on the Trainer's model and logs what it measures.

    Training logs gain `maxvio_batch`, `maxvio_batch/layer_{i}`, `batch_dead_expert_fraction`, `batch_load_cv`,
    `batch_min_load_ratio` and the spread over layers (`batch_effective_expert_fraction...`, `maxvio_batch/max`,
    `maxvio_batch/p90`), averaged over the optimizer steps since the last log, and `bias_abs_max`,
    `bias_abs_mean`, `bias_update_factor` (at the last step). Evaluation metrics gain `{prefix}_maxvio_global`,
    `{prefix}_maxvio_global/layer_{i}`, `{prefix}_dead_expert_fraction`, `{prefix}_load_cv` and
    `{prefix}_min_load_ratio`, and the spread over layers (`{prefix}_effective_expert_fraction` with its `/layer_{i}`
    and `/min`, `{prefix}_maxvio_global/max` and `/p90`, see `compute_layer_spread_metrics`) from the loads of the
    whole evaluation, summed over ranks; `last_eval_loads` keeps those (routers, experts) loads. `i` is the
    decoder-layer index (`LossFreeBalancer.layers`); layers that received no token are skipped and counted in
    `.../skipped_layers`. Any forward of the model in eval mode between the last optimizer step and an evaluation's
    log counts toward that evaluation.

    With `report=True` (the default) it also writes, at the end of training and again after each later evaluation,
    the run's routing history, plots and a model-card section into `args.output_dir`, and sends the plots to
    TensorBoard / W&B when the Trainer reports to them (see `balance_report.py`, docs/balancing.md#plots-and-the-card).
    A resumed run continues the routing history saved in the checkpoint it resumes from (a warning says when that
    checkpoint holds none).

    Pass it the ordinary way, `Trainer(..., callbacks=[LossFreeBalancingCallback()])`: when the Trainer first calls
    it, it moves ahead of the `report_to` integrations, so they all receive its metrics. A model has one balancer:
    the callback of a second Trainer on the same model takes the routers over, and a callback whose routers were taken
    takes them back at its next `train()`. At an evaluation it can attach only after the first batch (when its routers
    were taken, or when it was added with `trainer.add_callback` after the Trainer was built): that evaluation leaves
    out its MaxVio with a warning, the next one has it.

    Files that belong in each checkpoint beside the balancer's state (`RoutingHistoryRecorder`'s history, a script's
    run record) are registered with `add_checkpoint_file`: they are written before the checkpoint's
    `trainer_state.json`, so a checkpoint is complete once that file is (see `checkpoints.py`).

    Args:
        settings, process_group, **overrides: As for `LossFreeBalancer`: checked here and passed on; unset settings
            come from the model's config. The balancer's `total_steps` is the Trainer's `max_steps`, and its count of
            updates resumes from the Trainer's `global_step`.
        report (`bool`, defaults to `True`): Write the routing history, plots and card section of the run.

    Example:

    ```python
    >>> callback = LossFreeBalancingCallback()
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, callbacks=[callback])
    >>> trainer.train()
    >>> trainer.evaluate()["eval_maxvio_global"]
    ```
    """

    def __init__(
        self,
        settings: BalancingSettings | None = None,
        *legacy_settings,
        process_group: "dist.ProcessGroup | None" = None,
        report: bool = True,
        **overrides,
    ):
        if is_legacy_positional(settings, legacy_settings):
            values = (settings, *legacy_settings)
            overrides = legacy_positional(
                "LossFreeBalancingCallback", values, overrides, count=len(LEGACY_POSITIONAL) - 1
            )
            settings, process_group = None, overrides.pop("process_group", process_group)
        if not isinstance(report, bool):
            raise ValueError(f"report must be True or False, got {report!r}.")
        self.report = None
        self._write_reports = report
        self.settings = BalancingSettings.of(settings, **overrides)
        self.process_group = process_group
        self.balancer: LossFreeBalancer | None = None
        # Set by Trainer when it rebuilds the callback from a checkpoint (`restore_callback_states_from_checkpoint`).
        self.balancer_state: dict | None = None
        self._attached_to = None
        self.last_eval_loads = None
        self._placement_warned = False
        self._eval_measurement: LoadMeasurement | None = None
        self._evaluating = False
        self._evaluation_incomplete = False
        self._step_stats: list[dict[str, float]] = []
        self._checkpoint_files: dict[str, Callable[[Path, int], None]] = {}
        # Set by Trainer on the callback it rebuilds from a checkpoint, from the attributes `state()` saves.
        self.rebuilt_from_checkpoint = False
        self._training: tuple[TrainingArguments, TrainerState] | None = None

    @property
    def balancer_kwargs(self) -> dict:
        """The balancer's arguments under the names of earlier releases (deprecated: read `settings`)."""
        warnings.warn(
            "LossFreeBalancingCallback.balancer_kwargs is deprecated; read callback.settings (and process_group).",
            DeprecationWarning,
            stacklevel=2,
        )
        return {
            name: self.process_group if name == "process_group" else getattr(self.settings, ALIASES.get(name, name))
            for name in LEGACY_POSITIONAL[:-1]
        }

    def add_checkpoint_file(self, name: str, write: Callable[[Path, int], None]) -> None:
        """Have every checkpoint hold the file `name`: `write(path, step)` writes it at optimizer step `step`."""
        self._checkpoint_files[name] = write

    def write_checkpoint_files(self, checkpoint: Path, step: int) -> None:
        """Write the registered files into `checkpoint`, the folder of optimizer step `step`."""
        fault_point("before_balancer_files", step)
        for name, write in self._checkpoint_files.items():
            write(checkpoint / name, step)
            fault_point(f"after_{Path(name).stem}", step)

    def attach(self, model):
        """Build the balancer for `model` (wrappers are unwrapped); a no-op while it is attached to it.

        A balancer another one took over is built again, taking the routers back.
        """
        if self.balancer is not None and model is self._attached_to and self.balancer.attached:
            return
        if self.balancer is not None:
            self.balancer.remove()
        self.balancer = LossFreeBalancer(model, self.settings, process_group=self.process_group)
        self._attached_to = model
        _LAST_ATTACHED[model] = self
        # Every thread's: an evaluation may run in another thread than the one that built the Trainer.
        self._eval_measurement = self.balancer.measure(eval_only=True, all_threads=True).start()

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        self._move_ahead_of_reporters(args)
        if model is not None:
            self.attach(model)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        self._move_ahead_of_reporters(args)
        if self.rebuilt_from_checkpoint:
            self._take_over_from(_LAST_ATTACHED.get(model))
        self.attach(model)
        if state.max_steps and state.max_steps > 0:
            self.balancer.total_steps = state.max_steps
        self.balancer.completed_steps = state.global_step
        saved = self.balancer_state or _saved_balancer_state(state)
        if saved is not None and state.global_step > 0:
            self.balancer.load_state_dict(saved)
        self.balancer_state = None
        self._eval_measurement.reset()
        self._step_stats = []
        self._training = (args, state)
        self._start_report(args, state, control)

    def _take_over_from(self, replaced: "LossFreeBalancingCallback | None") -> None:
        """Keep the checkpoint files and process group of the live callback this rebuilt one replaces."""
        self.rebuilt_from_checkpoint = False
        if replaced is None or replaced is self:
            return
        self._checkpoint_files = {**replaced._checkpoint_files, **self._checkpoint_files}
        if self.process_group is None:
            self.process_group = replaced.process_group

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._training = None
        self._finish_report(args, state, control)

    def state(self) -> dict:
        """Saved by Trainer in each checkpoint's trainer_state.json: the balancer's state between steps (the SMEBU
        momentum, the count of updates), restored when training resumes, so a resumed run updates as an
        uninterrupted one would.

        During training, Trainer calls it right before writing a checkpoint's trainer_state.json, the file that
        makes the checkpoint count as done (and only then deletes older checkpoints): the registered checkpoint
        files are written here, so no checkpoint holds a trainer_state.json without them.
        """
        checkpoint = None if self._training is None else checkpoint_being_saved(*self._training)
        if checkpoint is not None:  # see compat.checkpoint_being_saved for the order this relies on
            self.write_checkpoint_files(checkpoint, self._training[1].global_step)
        args = {**self.settings.to_dict(), "report": self._write_reports}
        attributes = {
            "balancer_state": None if self.balancer is None else self.balancer.state_dict(),
            "checkpoint_files": sorted(self._checkpoint_files),
            "rebuilt_from_checkpoint": True,  # what the Trainer's rebuilt copy (and only it) is given
        }
        return {"args": args, "attributes": attributes}

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        fault_point("after_trainer_state", state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._step_stats.append(self.balancer.step())
        self._eval_measurement.reset()  # eval-mode forwards during training are no evaluation

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        self._move_ahead_of_reporters(args)
        if self.balancer is None or not self.balancer.attached:
            self.attach(model)  # called after the first batch's forward, which no measurement of ours counted
            self._evaluation_incomplete = True
        self._evaluating = True

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        self._move_ahead_of_reporters(args)
        if self.balancer is None or logs is None:
            return
        added = self._evaluation_metrics(logs) if self._evaluating else self._training_metrics()
        logs.update(added)
        # Trainer.log appends a copy of the logs to log_history before calling on_log.
        if added and state.log_history and set(logs) - set(added) <= set(state.log_history[-1]):
            state.log_history[-1].update(added)
        if self.report is not None:
            self.report.recorder.on_log(args, state, control, logs=logs)

    def _finish_report(self, args: TrainingArguments, state: TrainerState, control: TrainerControl):
        if self.report is not None:
            self.report.recorder.on_train_end(args, state, control)
            self.report.training_ended = True
            self._write_report(args, state)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.report is not None:
            self.report.recorder.on_evaluate(args, state, control)
            if self.report.training_ended:
                self._write_report(args, state)

    def write_report(self, args: TrainingArguments, state: TrainerState) -> list:
        """Write the routing history, plots and card section of the run so far into `args.output_dir` now (what the
        callback does by itself at the end of training); returns the paths written."""
        if self.report is None:
            raise ValueError("No report to write: the callback was built with report=False or has not trained yet.")
        return self._write_report(args, state)

    def _start_report(self, args: TrainingArguments, state: TrainerState, control: TrainerControl):
        """A new routing history at each `train()`, continuing the one saved in the checkpoint a resumed run starts
        from (imported here: plotting needs matplotlib, the package does not)."""
        if not self._write_reports:
            return
        from .balance_report import BalanceReport
        from .plotting import checkpoint_history

        history = checkpoint_history(resumed_checkpoint()) if state.global_step > 0 else None
        self.report = BalanceReport(self, history)
        self.report.recorder.on_train_begin(args, state, control)

    def _write_report(self, args: TrainingArguments, state: TrainerState) -> list:
        handler = calling_handler(self)
        return self.report.write(args, state, [] if handler is None else handler.callbacks)

    def on_predict(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None, **kwargs
    ):
        if self.balancer is not None and self._evaluating:
            metrics.update(self._evaluation_metrics(metrics))

    def _training_metrics(self) -> dict[str, float]:
        """MaxVio averaged over the steps since the last log; bias statistics of the last step."""
        if not self._step_stats:
            return {}
        stats, self._step_stats = self._step_stats, []
        added = {}
        for key in sorted({key for step in stats for key in step if key.startswith(("maxvio_batch", "batch_"))}):
            values = [step[key] for step in stats if key in step]
            added[key] = sum(values) / len(values)
        last = ("bias_abs_max", "bias_abs_mean", "bias_update_factor")  # routers without a bias have no bias_abs_*
        added.update({key: stats[-1][key] for key in last if key in stats[-1]})
        return added

    def _evaluation_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """`{prefix}_maxvio_global` (+ per layer) and the load figures of the evaluation that just ended; counting restarts."""
        self._evaluating = False
        loads = self._eval_measurement.stop().loads
        self._eval_measurement = self.balancer.measure(eval_only=True, all_threads=True).start()
        prefix = next((key[: -len("_runtime")] for key in metrics if key.endswith("_runtime")), "eval")
        if self._evaluation_incomplete:
            self._evaluation_incomplete = False
            warnings.warn(
                f"{prefix}_maxvio_global is left out of this evaluation: the callback could attach its balancer only "
                "after the first batch (it was added after the Trainer was built, or another balancer had taken over "
                "the model's routers). The next evaluation has it.",
                stacklevel=2,
            )
            return {}
        self.last_eval_loads = loads
        return {
            **compute_maxvio(loads, self.balancer.layers).metrics(f"{prefix}_maxvio_global"),
            **compute_load_metrics(loads, prefix),
            **compute_layer_spread_metrics(loads, prefix, f"{prefix}_maxvio_global", self.balancer.layers),
        }

    def _move_ahead_of_reporters(self, args: TrainingArguments):
        """Move to the front of the calling Trainer's callbacks, so every `report_to` integration sees the metrics.

        Trainer events carry no reference to the Trainer, so the `CallbackHandler` is found on the call stack
        (`compat.calling_handler`). Moving from place i to 0 while it iterates its list leaves the
        callbacks after i where its iterator expects them, so no other callback misses or repeats this event.
        """
        handler = calling_handler(self)
        if handler is None:
            if args.report_to and not self._placement_warned:
                self._placement_warned = True
                warnings.warn(
                    "LossFreeBalancingCallback could not move ahead of the report_to integrations, which therefore "
                    "miss its metrics (log_history has them). Add it with `add_balancing_callback(trainer)`.",
                    stacklevel=3,
                )
            return
        if handler.callbacks[0] is not self:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)


def _saved_balancer_state(state: TrainerState) -> dict | None:
    """The balancer state a resumed Trainer loaded with its checkpoint's trainer_state.json, if one was saved."""
    saved = (state.stateful_callbacks or {}).get(LossFreeBalancingCallback.__name__)
    if isinstance(saved, list):  # one entry per callback instance; a Trainer runs one balancer per model
        saved = saved[0]
    return None if saved is None else saved.get("attributes", {}).get("balancer_state")


def add_balancing_callback(trainer: "Trainer", callback: LossFreeBalancingCallback | None = None):
    """Add `callback` (default: `LossFreeBalancingCallback()`) to `trainer` ahead of every other callback.

    The explicit form of `Trainer(..., callbacks=[callback])`: Trainer calls callbacks in list order and puts its
    reporting integrations first; placed first, the callback's additions reach TensorBoard, trackio, W&B and the rest.
    The balancer is built at once, so `trainer.evaluate()` works before `train()`. Returns the callback.
    """
    callback = LossFreeBalancingCallback() if callback is None else callback
    if not isinstance(callback, LossFreeBalancingCallback):
        raise ValueError(f"callback must be a LossFreeBalancingCallback, got {type(callback).__name__}.")
    callbacks = trainer.callback_handler.callbacks
    if callback in callbacks:
        callbacks.remove(callback)
    callbacks.insert(0, callback)
    callback.attach(trainer.model)
    return callback


__all__ = ["LossFreeBalancingCallback", "add_balancing_callback"]
