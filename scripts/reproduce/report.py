"""Reports of a replay: mean ± sample std over seeds, the Markdown table, the JSON file and the plots."""

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from datasets import DatasetDict
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from hf_lossfree_moe.model_card import count_active_parameters
from hf_lossfree_moe.plotting import plot_eval_load_heatmap

from .batch_report import (
    computation_batch_section,
    expert_choice_methods,
    expert_choice_section,
    plot_maxvio_by_batch_size,
    plot_training_loss,
    token_choice_methods,
)
from .methods import METHODS, Comparison, methods_of
from .runs import (
    BALANCED_MAXVIO_BATCH,
    COLLAPSE_PHASE_STEPS,
    FINAL_WINDOW_FRACTION,
    RunResult,
    Scale,
    build_model,
    moving_average,
)


SUMMARY_METRICS = (
    "val_perplexity",
    "val_loss",
    "maxvio_global",
    "maxvio_global_train",
    "final_maxvio_batch",
    "peak_maxvio_batch_after_collapse",
    "steps_to_balance",
    "val_load_cv",
    "val_min_load_ratio",
    "wall_time_s",
)


def mean_std(values: Sequence[float | None]) -> dict:
    """{"mean", "std" (sample std, None for one value), "n", "runs"} over the values that are not None (a run that
    never reached a threshold); mean and std are None when every value is."""
    if not values:
        raise ValueError("mean_std needs at least one value.")
    present = [value for value in values if value is not None]
    mean = statistics.fmean(present) if present else None
    std = statistics.stdev(present) if len(present) > 1 else None
    return {"mean": mean, "std": std, "n": len(present), "runs": len(values)}


def summarize(results: Sequence[RunResult]) -> dict[str, dict[str, dict]]:
    """Per method (in order of first appearance) and metric: mean ± sample std over its seeds."""
    by_method: dict[str, list[RunResult]] = {}
    for result in results:
        by_method.setdefault(result.method, []).append(result)
    return {
        method: {metric: mean_std([getattr(run, metric) for run in runs]) for metric in SUMMARY_METRICS}
        for method, runs in by_method.items()
    }


def format_mean_std(stats: dict, digits: int, missing: str = "—") -> str:
    """`mean ± std`; a value missing in some runs (e.g. never balanced) is marked `(n of runs)`, in all: `missing`."""
    if stats["mean"] is None:
        return missing
    text = f"{stats['mean']:.{digits}f}"
    if stats["std"] is not None:
        text += f" ± {stats['std']:.{digits}f}"
    if stats["n"] < stats.get("runs", stats["n"]):
        text += f" ({stats['n']} of {stats['runs']} runs)"
    return text


TABLE_COLUMNS = (
    ("Validation perplexity", "val_perplexity", 2),
    ("MaxVio_global", "maxvio_global", 3),
    ("MaxVio_global, training blocks", "maxvio_global_train", 3),
    ("MaxVio_batch (final)", "final_maxvio_batch", 3),
    (f"MaxVio_batch, peak after step {COLLAPSE_PHASE_STEPS}", "peak_maxvio_batch_after_collapse", 2),
    (f"Steps until MaxVio_batch stays < {BALANCED_MAXVIO_BATCH}", "steps_to_balance", 0),
    ("Load CV, validation", "val_load_cv", 3),
    ("Min / mean load, validation", "val_min_load_ratio", 2),
    ("Wall time (s)", "wall_time_s", 0),
)


def markdown_table(comparison: Comparison, summary: dict[str, dict[str, dict]]) -> str:
    """One comparison in the paper's format, with the paper's 1B numbers alongside."""
    header = ["Method", *(title for title, _, _ in TABLE_COLUMNS), "Paper, 1B: perplexity / MaxVio_global"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in comparison.methods:
        method = METHODS[name]
        cells = [
            format_mean_std(summary[name][metric], digits, "never" if metric == "steps_to_balance" else "—")
            for _, metric, digits in TABLE_COLUMNS
        ]
        lines.append("| " + " | ".join([method.label, *cells, method.paper]) + " |")
    return "\n".join(lines)


PIPELINE_CHECK_NOTE = (
    "**A pipeline check, not a result.** This `--quick` run trains a tiny model for a few dozen steps to show that "
    "every part of the replay works. Routing collapses in the first steps and the bias updates (u = 1e-3 per step) "
    "need hundreds of steps to undo that, so the numbers below say nothing about how the methods compare; run "
    "without `--quick` for that."
)


def markdown_report(
    comparisons: Sequence[Comparison],
    summary: dict[str, dict[str, dict]],
    settings: dict,
    pipeline_check: bool = False,
) -> str:
    """The results page: the settings every run shared, then one table per comparison; a `pipeline_check` page
    says first that its numbers are no result."""
    seeds = settings["seeds"]
    lines = [
        "# Auxiliary-loss-free load balancing: small-scale replay",
        "",
        *([PIPELINE_CHECK_NOTE, ""] if pipeline_check else []),
        *(f"- {key.replace('_', ' ')}: {value}" for key, value in settings.items()),
        "",
        f"Each cell is the mean ± sample standard deviation over {len(seeds)} seed(s). Validation perplexity is the "
        "language-model perplexity alone (no balance loss). MaxVio_global is measured on the whole validation split "
        "(and, as a diagnostic, on as many training blocks), "
        f"MaxVio_batch (final) averages the last {FINAL_WINDOW_FRACTION:.0%} of training steps; its peak after step "
        f"{COLLAPSE_PHASE_STEPS} is the largest single-step value once the early routing collapse should be over, and "
        f"'steps until < {BALANCED_MAXVIO_BATCH}' is the step from which it stays below {BALANCED_MAXVIO_BATCH} to the "
        "end. Load CV (std / mean of the expert loads) and min / mean load are measured on the validation split. "
        "Every MaxVio and load column is a mean over MoE layers.",
    ]
    for comparison in comparisons:
        lines += ["", f"## {comparison.title}", "", markdown_table(comparison, summary)]
    return "\n".join(lines) + "\n"


def write_json(
    path: str | Path,
    settings: dict,
    scale: Scale,
    results: Sequence[RunResult],
    summary: dict,
    pipeline_check: bool = False,
) -> None:
    """All numbers: whether they are only a pipeline check, the shared settings and scale, the per-method summary and
    every run (curves and loads too)."""
    payload = {
        "pipeline_check": pipeline_check,
        "settings": settings,
        "scale": asdict(scale),
        "summary": summary,
        "runs": [asdict(result) for result in results],
    }
    Path(path).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def plot_maxvio_batch_by_method(comparison: Comparison, results: Sequence[RunResult], path: str | Path) -> Path:
    """MaxVio_batch over training, one line per method (mean over seeds, the band spans the seeds): Figure 3."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name in comparison.methods:
        curves = [run.maxvio_batch for run in results if run.method == name]
        window = max(1, len(curves[0]) // 50)
        smoothed = torch.tensor([moving_average(curve, window) for curve in curves])  # (seeds, steps)
        steps = torch.arange(1, smoothed.size(1) + 1)
        line = ax.plot(steps, smoothed.mean(dim=0), label=METHODS[name].label)[0]
        if smoothed.size(0) > 1:
            ax.fill_between(steps, smoothed.amin(dim=0), smoothed.amax(dim=0), color=line.get_color(), alpha=0.2)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(
        xlabel="training step",
        ylabel=f"MaxVio_batch (moving average of {window} steps)",
        title=f"MaxVio_batch during training: {comparison.title}",
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)


def describe_settings(scale: Scale, blocks: DatasetDict, vocab_size: int, data: str, seeds: Sequence[int]) -> dict:
    """What every run shared, in words: the header of the results page and of the JSON."""
    model = build_model(METHODS["loss_free"], scale, vocab_size, seed=0)
    total = model.num_parameters()
    active = count_active_parameters(model.config, total)
    train_tokens = len(blocks["train"]) * scale.block_size
    return {
        "model": (
            f"{scale.num_hidden_layers} layers (the first dense), hidden size {scale.hidden_size}, "
            f"{scale.n_shared_experts} shared + {scale.n_routed_experts} routed experts of width "
            f"{scale.moe_intermediate_size}, top-{scale.num_experts_per_tok}, sigmoid gate unless stated; "
            f"{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token"
        ),
        "data": f"{data}; BPE vocabulary of {vocab_size} trained on the training split",
        "training": (
            f"{scale.max_steps} steps x {scale.batch_size} x {scale.block_size} tokens = "
            f"{scale.max_steps * scale.tokens_per_step / 1e6:.2f}M tokens "
            f"({scale.max_steps * scale.tokens_per_step / train_tokens:.2g} epochs of {train_tokens / 1e3:.0f}k), "
            f"AdamW (lr {scale.learning_rate:g}, cosine, weight decay {scale.weight_decay:g}), "
            "same initial weights and batch order for every method of a seed"
        ),
        "validation": f"{len(blocks['validation'])} blocks x {scale.block_size} tokens, the same for every run",
        "seeds": list(seeds),
    }


def write_outputs(
    output_dir: str | Path,
    comparisons: Sequence[Comparison],
    results: Sequence[RunResult],
    settings: dict,
    scale: Scale,
    pipeline_check: bool = False,
) -> Path:
    """results.md, results.json, maxvio_batch_<comparison>.png per comparison and expert_loads_<method>.png per
    method (the validation loads of its first seed). `pipeline_check` marks the results of a `--quick` run."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    report = markdown_report(comparisons, summary, settings, pipeline_check)
    if expert_choice_methods(results):
        report += "\n" + expert_choice_section(results) + "\n"
        plot_training_loss(results, output_dir / "training_loss_expert_choice.png")
    if token_choice_methods(results):
        report += "\n" + computation_batch_section(results, scale.block_size) + "\n"
        plot_maxvio_by_batch_size(results, output_dir / "maxvio_by_batch_size.png")
    (output_dir / "results.md").write_text(report, encoding="utf-8")
    write_json(output_dir / "results.json", settings, scale, results, summary, pipeline_check)
    for comparison in comparisons:
        plot_maxvio_batch_by_method(comparison, results, output_dir / f"maxvio_batch_{comparison.name}.png")
    for method in methods_of(comparisons):
        first_run = next(run for run in results if run.method == method.name)
        plot_eval_load_heatmap(
            first_run.val_loads,
            first_run.router_names,
            output_dir / f"expert_loads_{method.name}.png",
            title=f"{method.label}: validation load / mean load (seed {first_run.seed})",
        )
    return output_dir
