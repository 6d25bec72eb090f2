"""Plots of a loss-free balancing run, drawn from `trainer_state.json` plus a small routing-history file.

`RoutingHistoryRecorder` keeps what the Trainer's log history does not: the per-expert biases at every logging step
and the per-expert loads of the last evaluation. It writes them to `routing_history.json` next to the model (and into
each checkpoint, so a resumed run keeps its history). `draw_run_plots` turns a finished run folder into PNGs;
figures are built with `matplotlib.figure.Figure`, so no pyplot state or display is involved.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .callbacks import LossFreeBalancingCallback
from .routers import layer_numbers
from .run_files import BIAS_PLOT, LOAD_HEATMAP_PLOT, MAXVIO_PLOT, ROUTING_HISTORY_FILE, TRAINER_STATE_FILE


# Cell values are printed on the heatmap up to this many experts; beyond, they would not fit.
MAX_ANNOTATED_EXPERTS = 32


@dataclass
class RoutingHistory:
    """Bias snapshots over training steps and the loads of the last evaluation, per router (layer order).

    `layers` holds each router's number in the run's logs, its decoder-layer index (`model.model.layers[i]`), which
    the plots label it with; a file written before `layers` was recorded numbers its routers from their names, as the
    balancer of that run did.
    """

    router_names: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    biases: list[list[list[float]]] = field(default_factory=list)  # (snapshots, routers, experts)
    eval_loads: list[list[int]] | None = None  # (routers, experts) token counts

    def __post_init__(self):
        if self.router_names and not self.layers:
            self.layers = layer_numbers(self.router_names)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "RoutingHistory":
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


class RoutingHistoryRecorder(TrainerCallback):
    """Records `balancing.balancer.biases()` at each training log and the loads of each evaluation.

    Add it after the `LossFreeBalancingCallback` it reads from, so biases are recorded after that step's update; that
    callback writes the history into each checkpoint before the checkpoint counts as done. Pass the `history` of a
    checkpoint to continue it when resuming.
    """

    def __init__(self, balancing: LossFreeBalancingCallback, history: RoutingHistory | None = None):
        self.balancing = balancing
        self.history = RoutingHistory() if history is None else history
        balancing.add_checkpoint_file(ROUTING_HISTORY_FILE, lambda path, step: self.history.save(path))

    def record(self, step: int) -> None:
        if self.history.steps and self.history.steps[-1] == step:
            return
        self.history.steps.append(step)
        self.history.biases.append(self.balancing.balancer.biases().tolist())

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.history.router_names = list(self.balancing.balancer.names)
        self.history.layers = self.balancing.balancer.layers
        self.record(state.global_step)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            self.record(state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.record(state.global_step)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.balancing.last_eval_loads is not None:
            self.history.eval_loads = self.balancing.last_eval_loads.tolist()


def layer_labels(router_names: list[str], layers: list[int] | None = None) -> list[str]:
    """ "layer 3" for a router of `model.layers[3]`: the numbering of the balancer's metrics, `layers` where the run
    recorded it."""
    return [f"layer {layer}" for layer in (layer_numbers(router_names) if layers is None else layers)]


def layer_caption(layers: list[int]) -> str:
    """The footnote that says what a plot's layer numbers are, naming the dense layers that have no router."""
    dense = [layer for layer in range(max(layers, default=0)) if layer not in layers]
    caption = "layer i: the decoder layer index as the model numbers them (model.model.layers[i])"
    if dense:
        names = ", ".join(str(layer) for layer in dense)
        caption += f";\nlayer {names} {'is' if len(dense) == 1 else 'are'} dense (no router)"
    return caption


def _add_layer_caption(fig: Figure, layers: list[int]) -> None:
    fig.supxlabel(layer_caption(layers), fontsize=8, color="0.3")


def plot_maxvio_batch(
    log_history: list[dict], router_names: list[str], path: str | Path, layers: list[int] | None = None
) -> Path:
    """MaxVio_batch over training steps: the mean over MoE layers bold, each layer thin; final MaxVio_global dashed.

    `layers` numbers the routers as the logs do; default: read from `router_names`.
    """
    logs = [entry for entry in log_history if "maxvio_batch" in entry]
    if not logs:
        raise ValueError("The log history has no 'maxvio_batch' entry: was LossFreeBalancingCallback used?")
    steps = [entry["step"] for entry in logs]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    layers = layer_numbers(router_names) if layers is None else layers
    for layer in layers:
        key = f"maxvio_batch/layer_{layer}"
        ax.plot(steps, [entry.get(key, np.nan) for entry in logs], lw=1, alpha=0.6, label=f"layer {layer}")
    ax.plot(steps, [entry["maxvio_batch"] for entry in logs], color="black", lw=2.5, label="mean over layers")
    eval_maxvio = [entry["eval_maxvio_global"] for entry in log_history if "eval_maxvio_global" in entry]
    if eval_maxvio:
        ax.axhline(
            eval_maxvio[-1], color="tab:red", ls="--", lw=1.5, label=f"MaxVio_global (eval) = {eval_maxvio[-1]:.3f}"
        )
    ax.set(
        xlabel="training step",
        ylabel="MaxVio_batch",
        title="Load imbalance per training step (0 = perfectly balanced)",
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    _add_layer_caption(fig, layers)
    return _save(fig, path)


def plot_eval_load_heatmap(
    eval_loads: list[list[int]],
    router_names: list[str],
    path: str | Path,
    title: str = "Validation load / mean load per MoE layer",
    layers: list[int] | None = None,
) -> Path:
    """Per-layer x per-expert validation load relative to the layer's mean: 1.0 (white) is a perfect balance.

    `layers` numbers the rows as the run's logs do; default: read from `router_names`.
    """
    loads = np.asarray(eval_loads, dtype=np.float64)  # (L, E)
    relative = loads / loads.mean(axis=1, keepdims=True)  # (L, E)
    num_layers, num_experts = relative.shape
    fig = Figure(figsize=(max(6.0, 0.5 * num_experts + 2), max(2.5, 0.6 * num_layers + 1.5)), layout="constrained")
    ax = fig.add_subplot()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(relative.max())))
    image = ax.imshow(relative, cmap="RdBu_r", norm=norm, aspect="auto")
    if num_experts <= MAX_ANNOTATED_EXPERTS:
        for (row, col), value in np.ndenumerate(relative):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
    layers = layer_numbers(router_names) if layers is None else layers
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_layers), layer_labels(router_names, layers))
    ax.set(xlabel="routed expert", title=title)
    fig.colorbar(image, ax=ax, label="relative load")
    _add_layer_caption(fig, layers)
    return _save(fig, path)


def plot_bias_trajectories(history: RoutingHistory, path: str | Path) -> Path:
    """One panel per MoE layer, one line per expert: how the balancer moved each routing bias over training."""
    biases = np.asarray(history.biases)  # (snapshots, L, E)
    num_layers, num_experts = biases.shape[1:]
    cols = min(num_layers, 3)
    rows = -(-num_layers // cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    expert_colors = ScalarMappable(norm=Normalize(0, num_experts - 1), cmap="viridis")
    layers = layer_numbers(history.router_names) if not history.layers else history.layers
    for index, (ax, label) in enumerate(
        zip(axes[:num_layers], layer_labels(history.router_names, layers), strict=True)
    ):
        for expert in range(num_experts):
            ax.plot(history.steps, biases[:, index, expert], lw=1, color=expert_colors.to_rgba(expert))
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if index + cols >= num_layers:  # the lowest panel of its column
            ax.set_xlabel("training step")
    for ax in axes[num_layers:]:
        ax.set_visible(False)
    colorbar = fig.colorbar(expert_colors, ax=axes.tolist(), label="routed expert")
    colorbar.locator = MaxNLocator(integer=True)
    fig.supylabel("routing bias")
    fig.suptitle("Expert bias trajectories")
    _add_layer_caption(fig, layers)
    return _save(fig, path)


def draw_run_plots(run_dir: str | Path) -> list[Path]:
    """Draw every plot of a finished run from its `trainer_state.json` and `routing_history.json`; returns paths."""
    run_dir = Path(run_dir)
    for name in (TRAINER_STATE_FILE, ROUTING_HISTORY_FILE):
        if not (run_dir / name).is_file():
            raise ValueError(f"{run_dir} holds no {name}; is it the output folder of a finished training run?")
    log_history = json.loads((run_dir / TRAINER_STATE_FILE).read_text(encoding="utf-8"))["log_history"]
    return draw_plots(log_history, RoutingHistory.load(run_dir / ROUTING_HISTORY_FILE), run_dir)


def draw_plots(log_history: list[dict], history: RoutingHistory, folder: str | Path) -> list[Path]:
    """Draw into `folder` the plots a run's logs and routing history allow: MaxVio_batch when training was logged,
    bias trajectories when the routers have biases, the load heatmap after an evaluation; returns their paths."""
    folder = Path(folder)
    paths = []
    if any("maxvio_batch" in entry for entry in log_history):
        paths.append(plot_maxvio_batch(log_history, history.router_names, folder / MAXVIO_PLOT, history.layers))
    if history.biases and len(history.biases[0][0]) > 0:
        paths.append(plot_bias_trajectories(history, folder / BIAS_PLOT))
    if history.eval_loads is not None:
        paths.append(
            plot_eval_load_heatmap(
                history.eval_loads, history.router_names, folder / LOAD_HEATMAP_PLOT, layers=history.layers
            )
        )
    return paths


def _save(fig: Figure, path: str | Path) -> Path:
    fig.savefig(path, dpi=120)
    return Path(path)
