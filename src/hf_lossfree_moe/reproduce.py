"""Small-scale replay of the paper's experiments (Wang et al., arXiv 2408.15664): methods, one run, the reports.

Every method of a comparison trains a same-shape DeepSeekMoE-style model from the same initial weights, on the same
blocks in the same order, for the same number of tokens, with the stock `Trainer` and `LossFreeBalancingCallback`:
the callback measures MaxVio_batch at every optimizer step for every method and moves the biases only for loss-free
ones. Each run is then evaluated on the same validation blocks: language-model perplexity (without the balance loss,
so that methods compare on modelling quality alone) and MaxVio_global from `LossFreeBalancer.measure()`. Runs are
aggregated over seeds to mean ± sample std and written as a Markdown table, a JSON file and PNG plots.
"""

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import DatasetDict
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from .balancing import LossFreeBalancer, maxvio
from .callbacks import add_balancing_callback
from .configuration_lossfree_moe import LossFreeMoeConfig
from .data import TEXT_COLUMN, tokenize_and_group, train_bpe_tokenizer
from .modeling_lossfree_moe import LossFreeMoeForCausalLM
from .plotting import plot_eval_load_heatmap


# MaxVio_batch "at the end of training" averages the last 5% of the steps: one step alone is mostly sampling noise.
FINAL_WINDOW_FRACTION = 0.05
# Whole documents are tokenized before being cut into blocks, so no length limit applies to the tokenizer.
UNLIMITED_LENGTH = 10**9
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Method:
    """A load-balancing setting: `config` overrides `LossFreeMoeConfig` fields of the shape every method shares.

    `paper` quotes the paper's 1B-model validation perplexity / MaxVio_global where it reports them.
    """

    name: str
    label: str
    config: dict
    paper: str = "—"


METHODS = {
    method.name: method
    for method in (
        Method(
            "aux_loss",
            "Loss-Controlled (aux loss, α=1e-3)",
            {"load_balancing": "aux_loss", "router_aux_loss_coef": 1e-3},
            "9.56 / 0.72",
        ),
        Method("loss_free", "Loss-Free (u=1e-3, sign)", {"load_balancing": "loss_free"}, "9.50 / 0.04"),
        Method("none", "No balancing", {"load_balancing": "none"}),
        Method(
            "loss_free_u1e-4",
            "Loss-Free (u=1e-4, sign)",
            {"load_balancing": "loss_free", "bias_update_rate": 1e-4},
            "9.51 / —",
        ),
        Method(
            "loss_free_u1e-2",
            "Loss-Free (u=1e-2, sign)",
            {"load_balancing": "loss_free", "bias_update_rate": 1e-2},
            "9.51 / —",
        ),
        Method(
            "loss_free_error",
            "Loss-Free (u=1e-3, error rule)",
            {"load_balancing": "loss_free", "bias_update_rule": "error"},
            "9.51 / 0.036",
        ),
        Method(
            "loss_free_multiplicative",
            "Loss-Free (u=1e-3, multiplicative bias)",
            {"load_balancing": "loss_free", "bias_type": "multiplicative"},
            "9.52 / 0.036",
        ),
        Method(
            "softmax_aux_loss",
            "Softmax gate, aux loss (α=3e-4)",
            {"scoring_func": "softmax", "load_balancing": "aux_loss", "router_aux_loss_coef": 3e-4},
            "9.604 / 0.937",
        ),
        Method(
            "softmax_loss_free",
            "Softmax gate, Loss-Free (u=1e-3, sign)",
            {"scoring_func": "softmax", "load_balancing": "loss_free"},
            "9.599 / 0.027",
        ),
        Method(
            "loss_free_seq_aux",
            "Loss-Free + sequence-wise aux loss (α=1e-4, DeepSeek-V3)",
            {"load_balancing": "loss_free", "router_aux_loss_coef": 1e-4},
        ),
    )
}


@dataclass(frozen=True)
class Comparison:
    """Methods shown in one table and one MaxVio_batch plot; `name` is how `--ablations` selects it."""

    name: str
    title: str
    methods: tuple[str, ...]


MAIN_COMPARISON = Comparison("main", "Main comparison (sigmoid gate)", ("aux_loss", "loss_free", "none"))
ABLATIONS = {
    comparison.name: comparison
    for comparison in (
        Comparison("update_rate", "Update rate u", ("loss_free_u1e-4", "loss_free", "loss_free_u1e-2")),
        Comparison("rule", "Update rule: sign vs. error", ("loss_free", "loss_free_error")),
        Comparison("bias_type", "Additive vs. multiplicative bias", ("loss_free", "loss_free_multiplicative")),
        Comparison("softmax", "Softmax gate", ("softmax_aux_loss", "softmax_loss_free")),
        Comparison("dsv3", "DeepSeek-V3 combination", ("loss_free", "loss_free_seq_aux")),
    )
}


def select_comparisons(ablations: Sequence[str]) -> list[Comparison]:
    """The main comparison followed by the named ablations (`"all"` selects every one); names may be comma-joined."""
    names = list(dict.fromkeys(name for item in ablations for name in item.split(",") if name))
    names = list(ABLATIONS) if names == ["all"] else names
    unknown = [name for name in names if name not in ABLATIONS]
    if unknown:
        raise ValueError(f"--ablations must be 'all' or names among {sorted(ABLATIONS)}, got {unknown}.")
    return [MAIN_COMPARISON, *(ABLATIONS[name] for name in names)]


def methods_of(comparisons: Sequence[Comparison]) -> list[Method]:
    """Every method the comparisons need, once each, in order of first appearance."""
    names = dict.fromkeys(name for comparison in comparisons for name in comparison.methods)
    return [METHODS[name] for name in names]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class Scale:
    """Model shape and training budget shared by every run of a replay.

    The defaults fit 3 methods x 3 seeds in 33 minutes on 2 CPU cores: one single-threaded run per core at about
    0.33 s per step (a second thread per run bought nothing). The budget is about 2.5M tokens per run; how it is cut
    into steps x sequences x tokens decides what each method can show (embedded corpus, measured):

    - 1200 x 16 x 128 (default, 3 seeds): loss-free perplexity 39.5, MaxVio_global 0.14; aux loss 39.6, 0.57; none
      39.7, 4.8. The following cuts were single runs of seed 0:
    - 1200 x 32 x 64: loss-free 39.3, 0.12; aux loss 38.7, 0.41. The aux loss is sequence-wise, and over 64-token
      sequences it balances much harder than over the paper's long ones, so this cut changes the baseline.
    - 600 x 32 x 128: loss-free 46.6, 0.12; aux loss 46.9, 0.53; half the optimizer steps leave the model undertrained.
    - 2400 x 16 x 128: 12 epochs overfit (loss-free perplexity 44.6) and balance the validation split no better (0.20).

    The sign rule moves a bias by u = 1e-3 per step; after the routing collapse of the first 50 steps the biases need
    a few hundred steps to reach their working range (about 0.25), which is why steps are not traded for batch size.
    A 2048-token vocabulary keeps the LM head small (at 4096 it is a third of the compute).
    """

    vocab_size: int = field(default=2048, metadata=_help("Size of the BPE vocabulary trained on the training split."))
    hidden_size: int = field(default=128, metadata=_help("Width of the residual stream."))
    num_hidden_layers: int = field(default=4, metadata=_help("Decoder layers; the first is dense, the rest MoE."))
    num_attention_heads: int = field(default=4, metadata=_help("Attention heads."))
    intermediate_size: int = field(default=512, metadata=_help("Hidden width of the dense first layer's FFN."))
    moe_intermediate_size: int = field(default=64, metadata=_help("Hidden width of one routed or shared expert."))
    n_routed_experts: int = field(default=16, metadata=_help("Fine-grained routed experts per MoE layer."))
    n_shared_experts: int = field(default=1, metadata=_help("Always-on shared experts per MoE layer."))
    num_experts_per_tok: int = field(default=2, metadata=_help("Routed experts per token (top-K)."))
    block_size: int = field(default=128, metadata=_help("Tokens per training sequence."))
    batch_size: int = field(default=16, metadata=_help("Sequences per optimizer step."))
    max_steps: int = field(default=1200, metadata=_help("Optimizer steps, hence bias updates, per run."))
    learning_rate: float = field(default=2e-3, metadata=_help("Peak AdamW learning rate (cosine schedule)."))
    warmup_steps: float = field(default=0.05, metadata=_help("Warmup steps; below 1, a fraction of max_steps."))
    weight_decay: float = field(default=0.1, metadata=_help("AdamW weight decay."))
    eval_batch_size: int = field(default=64, metadata=_help("Sequences per validation forward."))

    def __post_init__(self):
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"--{spec.name} must be a finite number, got {value!r}.")
            if spec.type is int and not isinstance(value, int):
                raise ValueError(f"--{spec.name} must be an integer, got {value!r}.")
            allowed_zero = spec.name in ("n_shared_experts", "warmup_steps", "weight_decay")
            if value < 0 or (value == 0 and not allowed_zero):
                raise ValueError(f"--{spec.name} must be {'>= 0' if allowed_zero else '> 0'}, got {value!r}.")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    def model_config(self, method: Method, vocab_size: int) -> LossFreeMoeConfig:
        """The shared shape with the method's balancing fields; bad combinations raise the config's `ValueError`."""
        return LossFreeMoeConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            moe_intermediate_size=self.moe_intermediate_size,
            n_routed_experts=self.n_routed_experts,
            n_shared_experts=self.n_shared_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            first_k_dense_replace=1,
            max_position_embeddings=self.block_size,
            **method.config,
        )


DEFAULT_SCALE = Scale()
QUICK_SCALE = Scale(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=3,
    intermediate_size=128,
    moe_intermediate_size=32,
    n_routed_experts=8,
    block_size=64,
    batch_size=8,
    max_steps=40,
)


def build_model(method: Method, scale: Scale, vocab_size: int, seed: int) -> LossFreeMoeForCausalLM:
    """The model of one run; every method gets the same initial weights for a given seed (same parameter shapes)."""
    config = scale.model_config(method, vocab_size)
    set_seed(seed)
    return LossFreeMoeForCausalLM(config)


def prepare_blocks(
    raw_datasets: DatasetDict, vocab_size: int, block_size: int, text_column: str = TEXT_COLUMN
) -> tuple[DatasetDict, int]:
    """Train a BPE tokenizer on the training text; return the blocks of both splits and the vocabulary size."""
    tokenizer = train_bpe_tokenizer(raw_datasets["train"][text_column], vocab_size, UNLIMITED_LENGTH)
    blocks = tokenize_and_group(raw_datasets, tokenizer, block_size, text_column)
    return blocks, len(tokenizer)


@dataclass(frozen=True)
class Execution:
    """Where runs train: the device, how many runs at once (worker processes) and torch threads per worker process.

    `threads=None` leaves torch's setting alone (runs in this process never change it).
    """

    device: str = "cpu"
    workers: int = 1
    threads: int | None = None
    bf16: bool = False

    def describe(self) -> str:
        threads = "torch's default" if self.threads is None else str(self.threads)
        precision = "bf16 mixed precision" if self.bf16 else "fp32"
        return f"{self.device}, {precision}, {self.workers} run(s) at a time with {threads} thread(s) each"


def plan_execution(num_runs: int, device: str = "cpu", workers: int | None = None, bf16: bool = False) -> Execution:
    """By default on CPU one single-threaded run per core, since models this small gain nothing from a second thread
    (measured: the same time per step with 1 or 2) and lose much on a busy machine; on a GPU one run at a time."""
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {device!r}.")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"--workers must be an integer >= 1, got {workers!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU, and torch sees none; use --device cpu.")
    if device != "cpu":
        return Execution(device, workers or 1, None, bf16)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = workers or max(1, min(num_runs, cores))
    return Execution(device, workers, max(1, cores // workers) if workers > 1 else None, bf16)


@dataclass
class RunSpec:
    """Everything one run needs, picklable so that runs can go to worker processes."""

    method: Method
    seed: int
    scale: Scale
    blocks: DatasetDict
    vocab_size: int
    execution: Execution = Execution()


@dataclass
class RunResult:
    """Numbers of one run. Curves have one value per optimizer step; `train_loss` is the Trainer's (with an aux-loss
    model, its balance term included). Loads are (MoE layers, experts) token counts over the validation split.

    `maxvio_global_train` is MaxVio_global over as many training blocks as there are validation blocks, spread evenly
    over the training split and measured the same way after training: set against `maxvio_global`, it tells how much
    of the imbalance on held-out text comes from those documents routing differently from the ones the biases were
    tuned on."""

    method: str
    seed: int
    val_loss: float
    val_perplexity: float
    maxvio_global: float
    maxvio_global_per_layer: list[float]
    maxvio_global_train: float
    final_maxvio_batch: float
    maxvio_batch: list[float]
    bias_abs_max: list[float]
    train_loss: list[float]
    val_loads: list[list[int]]
    router_names: list[str]
    final_biases: list[list[float]]
    wall_time_s: float


@torch.no_grad()
def evaluate(
    model: LossFreeMoeForCausalLM, balancer: LossFreeBalancer, blocks: torch.Tensor, batch_size: int
) -> tuple[float, torch.Tensor]:
    """Mean next-token cross-entropy over `blocks` (N, S) and the (MoE layers, experts) loads they were routed to.

    The model is called without labels: with labels an aux-loss model adds its balance term to `loss`, which would
    count against it in a perplexity comparison.
    """
    model.eval()
    loss_sum, predicted = 0.0, 0
    with balancer.measure() as measurement:
        for batch in blocks.split(batch_size):
            batch = batch.to(model.device)  # (B, S)
            logits = model(input_ids=batch, use_cache=False).logits  # (B, S, V)
            targets = batch[:, 1:]  # (B, S - 1)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
            loss_sum += loss.item()
            predicted += targets.numel()
    return loss_sum / predicted, measurement.loads


def spread_indices(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over `range(total)` (all of them when `count >= total`).

    Blocks are in corpus order, so a leading slice would cover a few neighbouring documents on one topic, which
    experts specialised on topics route very unevenly: a measure of balance needs text as varied as the corpus.
    """
    if count >= total:
        return list(range(total))
    return [index * total // count for index in range(count)]


def final_mean(curve: Sequence[float]) -> float:
    """Mean of the last `FINAL_WINDOW_FRACTION` of a per-step curve (at least its last value)."""
    window = max(1, round(len(curve) * FINAL_WINDOW_FRACTION))
    return statistics.fmean(curve[-window:])


def training_arguments(spec: RunSpec, output_dir: str) -> TrainingArguments:
    scale = spec.scale
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=scale.max_steps,
        per_device_train_batch_size=scale.batch_size,
        learning_rate=scale.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=scale.warmup_steps,
        weight_decay=scale.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=spec.seed,
        data_seed=spec.seed,
        dataloader_drop_last=True,
        use_cpu=spec.execution.device == "cpu",
        bf16=spec.execution.bf16,
        disable_tqdm=True,
        log_level="error",
    )


def train_and_evaluate(spec: RunSpec) -> RunResult:
    """Train one method with one seed, then evaluate it on the validation blocks."""
    start = time.perf_counter()
    model = build_model(spec.method, spec.scale, spec.vocab_size, spec.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(model=model, args=training_arguments(spec, output_dir), train_dataset=spec.blocks["train"])
        trainer.remove_callback(PrinterCallback)
        balancer = add_balancing_callback(trainer).balancer
        trainer.train()
    steps = [log for log in trainer.state.log_history if "maxvio_batch" in log]
    if len(steps) != spec.scale.max_steps:
        raise RuntimeError(f"Expected MaxVio_batch at each of {spec.scale.max_steps} steps, got {len(steps)}.")
    maxvio_batch = [log["maxvio_batch"] for log in steps]
    val_blocks = torch.tensor(spec.blocks["validation"]["input_ids"])  # (N, S)
    val_loss, loads = evaluate(model, balancer, val_blocks, spec.scale.eval_batch_size)
    per_layer = maxvio(loads)
    train_blocks = spec.blocks["train"]
    seen_blocks = torch.tensor(train_blocks.select(spread_indices(len(train_blocks), len(val_blocks)))["input_ids"])
    _, seen_loads = evaluate(model, balancer, seen_blocks, spec.scale.eval_batch_size)
    result = RunResult(
        method=spec.method.name,
        seed=spec.seed,
        val_loss=val_loss,
        val_perplexity=math.exp(val_loss),
        maxvio_global=per_layer.mean().item(),
        maxvio_global_per_layer=per_layer.tolist(),
        maxvio_global_train=maxvio(seen_loads).mean().item(),
        final_maxvio_batch=final_mean(maxvio_batch),
        maxvio_batch=maxvio_batch,
        bias_abs_max=[log["bias_abs_max"] for log in steps],
        train_loss=[log["loss"] for log in steps],
        val_loads=loads.tolist(),
        router_names=list(balancer.names),
        final_biases=balancer.biases().tolist(),
        wall_time_s=time.perf_counter() - start,
    )
    balancer.remove()
    return result


def run_all(specs: Sequence[RunSpec], execution: Execution) -> list[RunResult]:
    """Run every spec, in `execution.workers` processes when above 1; results come back in the order of `specs`."""
    if execution.workers == 1:
        return [_logged_run(spec) for spec in specs]
    pool = ProcessPoolExecutor(
        max_workers=execution.workers,
        mp_context=get_context("spawn"),
        initializer=None if execution.threads is None else torch.set_num_threads,
        initargs=() if execution.threads is None else (execution.threads,),
    )
    with pool:
        return list(pool.map(_logged_run, specs))


def _logged_run(spec: RunSpec) -> RunResult:
    result = train_and_evaluate(spec)
    print(
        f"{result.method} seed {result.seed}: perplexity {result.val_perplexity:.3f}, "
        f"MaxVio_global {result.maxvio_global:.3f}, final MaxVio_batch {result.final_maxvio_batch:.3f}, "
        f"{result.wall_time_s:.0f} s",
        flush=True,
    )
    return result


SUMMARY_METRICS = (
    "val_perplexity",
    "val_loss",
    "maxvio_global",
    "maxvio_global_train",
    "final_maxvio_batch",
    "wall_time_s",
)


def mean_std(values: Sequence[float]) -> dict:
    """{"mean", "std" (sample std, None for one value), "n"}."""
    if not values:
        raise ValueError("mean_std needs at least one value.")
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def summarize(results: Sequence[RunResult]) -> dict[str, dict[str, dict]]:
    """Per method (in order of first appearance) and metric: mean ± sample std over its seeds."""
    by_method: dict[str, list[RunResult]] = {}
    for result in results:
        by_method.setdefault(result.method, []).append(result)
    return {
        method: {metric: mean_std([getattr(run, metric) for run in runs]) for metric in SUMMARY_METRICS}
        for method, runs in by_method.items()
    }


def format_mean_std(stats: dict, digits: int) -> str:
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


TABLE_COLUMNS = (
    ("Validation perplexity", "val_perplexity", 2),
    ("MaxVio_global", "maxvio_global", 3),
    ("MaxVio_global, training blocks", "maxvio_global_train", 3),
    ("MaxVio_batch (final)", "final_maxvio_batch", 3),
    ("Wall time (s)", "wall_time_s", 0),
)


def markdown_table(comparison: Comparison, summary: dict[str, dict[str, dict]]) -> str:
    """One comparison in the paper's format, with the paper's 1B numbers alongside."""
    header = ["Method", *(title for title, _, _ in TABLE_COLUMNS), "Paper, 1B: perplexity / MaxVio_global"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in comparison.methods:
        method = METHODS[name]
        cells = [format_mean_std(summary[name][metric], digits) for _, metric, digits in TABLE_COLUMNS]
        lines.append("| " + " | ".join([method.label, *cells, method.paper]) + " |")
    return "\n".join(lines)


def markdown_report(comparisons: Sequence[Comparison], summary: dict[str, dict[str, dict]], settings: dict) -> str:
    """The results page: the settings every run shared, then one table per comparison."""
    seeds = settings["seeds"]
    lines = [
        "# Auxiliary-loss-free load balancing: small-scale replay",
        "",
        *(f"- {key.replace('_', ' ')}: {value}" for key, value in settings.items()),
        "",
        f"Each cell is the mean ± sample standard deviation over {len(seeds)} seed(s). Validation perplexity is the "
        "language-model perplexity alone (no balance loss). MaxVio_global is measured on the whole validation split "
        "(and, as a diagnostic, on as many training blocks), "
        f"MaxVio_batch (final) averages the last {FINAL_WINDOW_FRACTION:.0%} of training steps; every MaxVio column is "
        "a mean over MoE layers.",
    ]
    for comparison in comparisons:
        lines += ["", f"## {comparison.title}", "", markdown_table(comparison, summary)]
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, settings: dict, scale: Scale, results: Sequence[RunResult], summary: dict) -> None:
    """All numbers: the shared settings and scale, the per-method summary and every run (curves and loads too)."""
    payload = {
        "settings": settings,
        "scale": asdict(scale),
        "summary": summary,
        "runs": [asdict(result) for result in results],
    }
    Path(path).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values, as long as the input: per-step MaxVio_batch is noisy."""
    cumulative = [0.0]
    for value in values:
        cumulative.append(cumulative[-1] + value)
    return [(cumulative[i + 1] - cumulative[max(0, i + 1 - window)]) / min(window, i + 1) for i in range(len(values))]


def plot_maxvio_batch(comparison: Comparison, results: Sequence[RunResult], path: str | Path) -> Path:
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
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    active = total - routed * (1 - scale.num_experts_per_tok / scale.n_routed_experts)
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
) -> Path:
    """results.md, results.json, maxvio_batch_<comparison>.png per comparison and expert_loads_<method>.png per
    method (the validation loads of its first seed)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    (output_dir / "results.md").write_text(markdown_report(comparisons, summary, settings), encoding="utf-8")
    write_json(output_dir / "results.json", settings, scale, results, summary)
    for comparison in comparisons:
        plot_maxvio_batch(comparison, results, output_dir / f"maxvio_batch_{comparison.name}.png")
    for method in methods_of(comparisons):
        first_run = next(run for run in results if run.method == method.name)
        plot_eval_load_heatmap(
            first_run.val_loads,
            first_run.router_names,
            output_dir / f"expert_loads_{method.name}.png",
            title=f"{method.label}: validation load / mean load (seed {first_run.seed})",
        )
    return output_dir


def replay(
    comparisons: Sequence[Comparison],
    seeds: Sequence[int],
    scale: Scale,
    blocks: DatasetDict,
    vocab_size: int,
    execution: Execution = Execution(),
) -> list[RunResult]:
    """Train and evaluate every method of `comparisons` with every seed; results ordered by seed, then method."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must list at least one seed, each once, got {list(seeds)}.")
    if len(blocks["train"]) < scale.batch_size:
        raise ValueError(
            f"--batch_size {scale.batch_size} exceeds the {len(blocks['train'])} training blocks; use a smaller "
            "--batch_size or --block_size, or more data."
        )
    specs = [
        RunSpec(method, seed, scale, blocks, vocab_size, execution)
        for seed in seeds
        for method in methods_of(comparisons)
    ]
    return run_all(specs, execution)


__all__ = [
    "ABLATIONS",
    "DEFAULT_SCALE",
    "MAIN_COMPARISON",
    "METHODS",
    "QUICK_SCALE",
    "Comparison",
    "Execution",
    "Method",
    "RunResult",
    "RunSpec",
    "Scale",
    "build_model",
    "describe_settings",
    "evaluate",
    "final_mean",
    "markdown_report",
    "markdown_table",
    "mean_std",
    "methods_of",
    "moving_average",
    "plan_execution",
    "plot_maxvio_batch",
    "prepare_blocks",
    "replay",
    "run_all",
    "select_comparisons",
    "spread_indices",
    "summarize",
    "train_and_evaluate",
    "write_json",
    "write_outputs",
]
