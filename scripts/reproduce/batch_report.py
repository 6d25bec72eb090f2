"""The replay's answers to the paper's RQ3 and RQ4 in its reports: MaxVio as the computation batch grows, and the
bound on what Expert Choice routing can leak."""

import statistics
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from .leakage import leakage_bound_bits
from .methods import METHODS, is_expert_choice
from .runs import RunResult, Scale, final_mean, moving_average


def token_choice_methods(results: Sequence[RunResult]) -> list[str]:
    """Methods of the results, in order of first appearance, that route by token choice (Expert Choice is balanced
    in every chunk by construction, so its MaxVio over batches says nothing about balancing)."""
    names = dict.fromkeys(run.method for run in results if run.maxvio_by_batch_size)
    return [name for name in names if not is_expert_choice(METHODS[name])]


def mean_maxvio_by_batch_size(results: Sequence[RunResult], method: str) -> dict[int, float]:
    """Per computation-batch size, the mean over the method's seeds."""
    runs = [run for run in results if run.method == method]
    return {
        size: statistics.fmean(run.maxvio_by_batch_size[size] for run in runs) for size in runs[0].maxvio_by_batch_size
    }


def computation_batch_table(results: Sequence[RunResult]) -> str:
    """Markdown: one row per token-choice method, one column per computation-batch size (validation sequences)."""
    methods = token_choice_methods(results)
    sizes = list(mean_maxvio_by_batch_size(results, methods[0]))
    header = ["Method", *(f"{size} seq." for size in sizes)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in methods:
        values = mean_maxvio_by_batch_size(results, name)
        lines.append("| " + " | ".join([METHODS[name].label, *(f"{values[size]:.3f}" for size in sizes)]) + " |")
    return "\n".join(lines)


def computation_batch_section(results: Sequence[RunResult], block_size: int) -> str:
    """The RQ3 part of results.md: how MaxVio falls as a computation batch holds more sequences."""
    return "\n".join(
        [
            "## MaxVio over computation batches of growing size (RQ3)",
            "",
            "After training, the validation sequences are shuffled once and cut into computation batches of each size "
            f"({block_size} tokens per sequence; the last column is the whole split as one batch); each cell is the "
            "MaxVio of a batch, averaged over the batches and the MoE layers (and the seeds). Token-choice routing "
            "is a function of each token alone, so a batch's load is the sum of its sequences' loads, however it "
            "was computed. Under expert parallelism an expert sees the tokens of many data-parallel ranks: a larger "
            "column.",
            "",
            computation_batch_table(results),
            "",
            "![MaxVio over computation batches](maxvio_by_batch_size.png)",
        ]
    )


def plot_maxvio_by_batch_size(results: Sequence[RunResult], path: str | Path) -> Path:
    """MaxVio against the computation-batch size (log-log), one line per token-choice method: the paper's
    expert-parallelism figure."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name in token_choice_methods(results):
        values = mean_maxvio_by_batch_size(results, name)
        ax.plot(list(values), list(values.values()), marker="o", label=METHODS[name].label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(
        xlabel="computation batch (validation sequences)",
        ylabel="MaxVio, mean over batches and MoE layers",
        title="Balance as the computation batch grows",
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)


def leakage_setting(scale: Scale, capacity_factor: float = 1.0) -> str:
    """The bound of leakage.py for the replay's model, in words, for the settings of the results page."""
    moe_layers = scale.num_hidden_layers - 1  # the first layer is dense
    bits = leakage_bound_bits(moe_layers, scale.n_routed_experts, scale.num_experts_per_tok, capacity_factor)
    return (
        f"at most {bits:.1f} bits per token = L * E * H(factor * K / E) with L = {moe_layers} MoE layers, "
        f"E = {scale.n_routed_experts} experts, K = {scale.num_experts_per_tok}, capacity factor {capacity_factor:g} "
        "(docs/expert_choice.md)"
    )


def expert_choice_methods(results: Sequence[RunResult]) -> list[str]:
    return [name for name in dict.fromkeys(run.method for run in results) if is_expert_choice(METHODS[name])]


def expert_choice_section(results: Sequence[RunResult]) -> str:
    """The RQ4 part of results.md: each Expert Choice run's perplexity as trained and with its routing shuffled at
    evaluation, beside loss-free balancing's, and the final training loss of each."""
    shown = [name for name in ("loss_free", *expert_choice_methods(results)) if any(r.method == name for r in results)]
    lines = [
        "## Expert Choice: what the leak is worth (RQ4)",
        "",
        "Validation batches hold as many sequences as training batches, so that chunks are cut the same way. "
        "'Shuffled at evaluation' evaluates the same weights with the batch's tokens shuffled before routing (one "
        "sequence's worth of random tokens per chunk for a per-sequence model; over a single chunk, the whole batch, "
        "it changes nothing). The training loss averages the last 5% of steps.",
        "",
        "| Method | Validation perplexity | Shuffled at evaluation | Training loss (final) |",
        "|---|---|---|---|",
    ]
    for name in shown:
        runs = [run for run in results if run.method == name]
        shuffled = [run.val_perplexity_shuffled_routing for run in runs if run.val_perplexity_shuffled_routing]
        cells = [
            f"{statistics.fmean(run.val_perplexity for run in runs):.2f}",
            f"{statistics.fmean(shuffled):.2f}" if shuffled else "—",
            f"{statistics.fmean(final_mean(run.train_loss) for run in runs):.3f}",
        ]
        lines.append("| " + " | ".join([METHODS[name].label, *cells]) + " |")
    lines += ["", "![Training loss, loss-free against Expert Choice](training_loss_expert_choice.png)"]
    return "\n".join(lines)


def plot_training_loss(results: Sequence[RunResult], path: str | Path) -> Path:
    """Training loss over steps (moving average, first seed) of loss-free balancing and every Expert Choice run."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name in ("loss_free", *expert_choice_methods(results)):
        run = next((run for run in results if run.method == name), None)
        if run is None:
            continue
        window = max(1, len(run.train_loss) // 50)
        ax.plot(range(1, len(run.train_loss) + 1), moving_average(run.train_loss, window), label=METHODS[name].label)
    ax.set(
        xlabel="training step",
        ylabel="training loss (moving average)",
        title="Training loss: loss-free balancing and Expert Choice",
    )
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)
