"""A progress bar whose log lines stay short: the headline figures of each log, not every per-layer one.

transformers' `ProgressCallback` writes the whole log dict under the bar; with `LossFreeBalancingCallback` that is a
few hundred characters every `logging_steps` (a MaxVio per layer, load and bias statistics). The full logs still reach
`log_history`, the `report_to` integrations and the saved `trainer_state.json`; only the console line is shortened.
Swap it in with `trainer.remove_callback(ProgressCallback)` and `trainer.add_callback(CompactProgressCallback)`.
"""

from transformers import ProgressCallback, TrainerControl, TrainerState, TrainingArguments


# Shown on the console line (in this order, when present); every other key stays in the logs only.
CONSOLE_KEYS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "maxvio_batch",
    "bias_abs_max",
    "eval_loss",
    "eval_maxvio_global",
    "train_loss",
    "train_runtime",
)


def console_line(step: int, logs: dict) -> str:
    """`step 10: loss 6.81 | grad_norm 1.02 | ...`, the `CONSOLE_KEYS` of `logs` with 4 significant digits."""
    shown = [f"{key} {_short(logs[key])}" for key in CONSOLE_KEYS if key in logs]
    return f"step {step}: " + " | ".join(shown)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class CompactProgressCallback(ProgressCallback):
    """transformers' progress bars, writing `console_line` of each log under the training bar."""

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(console_line(state.global_step, logs))


__all__ = ["CONSOLE_KEYS", "CompactProgressCallback", "console_line"]
