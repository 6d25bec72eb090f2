"""The plots, routing history and model-card section of any `Trainer` run with `LossFreeBalancingCallback`.

`BalanceReport` is what the callback runs when `report=True` (the default): it records the routing history
(`plotting.RoutingHistoryRecorder`), and at the end of training, and again after each later evaluation, writes into
the run's `output_dir` the files `scripts/train.py` writes: `routing_history.json`, the plots of `plotting.py`, plus
`balance_card_section.md`, a Markdown section to paste into the model card. Where the Trainer reports to TensorBoard
or W&B, the plots go there too, as images.
"""

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.image import imread
from transformers import TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback, WandbCallback

from .model_card import BALANCE_SECTION_FILE, render_balance_section
from .plotting import ROUTING_HISTORY_FILE, RoutingHistoryRecorder, draw_plots


if TYPE_CHECKING:
    from .callbacks import LossFreeBalancingCallback

IMAGE_TAG_PREFIX = "balance"


class BalanceReport:
    """Routing history of one training run and the files and images drawn from it."""

    def __init__(self, balancing: "LossFreeBalancingCallback"):
        self.balancing = balancing
        self.recorder = RoutingHistoryRecorder(balancing)
        self.training_ended = False

    @property
    def history(self):
        return self.recorder.history

    def write(self, args: TrainingArguments, state: TrainerState, reporters: list) -> list[Path]:
        """Write the history, plots and card section into `args.output_dir` (main process only) and send the plots to
        the TensorBoard / W&B callbacks among `reporters`. Returns the paths written."""
        if not args.should_save:
            return []
        folder = Path(args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.history.save(folder / ROUTING_HISTORY_FILE)
        plots = draw_plots(state.log_history, self.history, folder)
        balancer = self.balancing.balancer
        section = render_balance_section(
            state.log_history,
            num_layers=len(balancer),
            num_experts=balancer.num_experts,
            method=balancing_method(balancer),
            plots=[path.name for path in plots],
        )
        (folder / BALANCE_SECTION_FILE).write_text(section, encoding="utf-8")
        send_images(plots, reporters, state.global_step)
        return [folder / ROUTING_HISTORY_FILE, *plots, folder / BALANCE_SECTION_FILE]


def balancing_method(balancer) -> str:
    """One line saying how the routers were balanced during the run."""
    if balancer.updates_biases:
        return (
            f"auxiliary-loss-free bias balancing (Wang et al., 2024), rule `{balancer.rule}`, update rate "
            f"{balancer.update_rate:g}, once per optimizer step"
        )
    config = getattr(balancer.model, "config", None)
    aux = getattr(config, "router_aux_loss_coef", 0.0) or 0.0
    load_balancing = getattr(config, "load_balancing", None)  # this project's config says it outright
    if load_balancing is not None:
        with_aux = load_balancing == "aux_loss"
    else:  # stock families add their auxiliary loss only when they output router logits
        with_aux = aux > 0 and bool(getattr(config, "output_router_logits", False))
    loss = f"the model's auxiliary loss (coefficient {aux:g})" if with_aux else "no balancing signal"
    return f"measured only (the routing biases did not move); training used {loss}"


def send_images(paths: list[Path], reporters: list, step: int) -> None:
    """Log each PNG as an image to the TensorBoard and W&B callbacks among `reporters` that are active."""
    for reporter in reporters:
        if isinstance(reporter, TensorBoardCallback) and reporter.tb_writer is not None:
            for path in paths:
                image = imread(path)[..., :3]  # (H, W, 3) floats in [0, 1]
                reporter.tb_writer.add_image(
                    f"{IMAGE_TAG_PREFIX}/{path.stem}", np.ascontiguousarray(image), step, dataformats="HWC"
                )
            reporter.tb_writer.flush()
        elif isinstance(reporter, WandbCallback) and getattr(reporter, "_wandb", None) is not None:
            if getattr(reporter._wandb, "run", None) is not None:
                images = {f"{IMAGE_TAG_PREFIX}/{path.stem}": reporter._wandb.Image(str(path)) for path in paths}
                reporter._wandb.log({**images, "train/global_step": step})


__all__ = ["BalanceReport", "balancing_method", "send_images"]
