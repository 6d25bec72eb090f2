"""One run of the replay: the shared model shape and budget, training, and the held-out measurements.

Every method of a comparison trains a same-shape DeepSeekMoE-style model from the same initial weights, on the same
blocks in the same order, for the same number of tokens, with the stock `Trainer` and `LossFreeBalancingCallback`:
the callback measures MaxVio_batch at every optimizer step for every method and moves the biases only for loss-free
ones. Each run is then evaluated on the same validation blocks: language-model perplexity (without the balance loss,
so that methods compare on modelling quality alone) and MaxVio_global from `LossFreeBalancer.measure()`.
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
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from hf_lossfree_moe import (
    LossFreeBalancer,
    LossFreeBalancingCallback,
    LossFreeMoeConfig,
    LossFreeMoeForCausalLM,
    add_balancing_callback,
    compute_maxvio,
)
from hf_lossfree_moe.balance_metrics import compute_load_metrics
from hf_lossfree_moe.data import TEXT_COLUMN, tokenize_and_group, train_bpe_tokenizer

from .loads import (
    StepLoadsCallback,
    computation_batch_sizes,
    evaluate_by_sequence,
    maxvio_by_batch_size,
    moe_routers,
)
from .methods import Comparison, Method, is_expert_choice, methods_of


# MaxVio_batch "at the end of training" averages the last 5% of the steps: one step alone is mostly sampling noise.
FINAL_WINDOW_FRACTION = 0.05
# The routing collapse of a fresh model happens in its first tens of steps; "after it" starts here.
COLLAPSE_PHASE_STEPS = 50
# MaxVio_batch below which a run counts as balanced when it stays there.
BALANCED_MAXVIO_BATCH = 0.5
# Whole documents are tokenized before being cut into blocks, so no length limit applies to the tokenizer.
UNLIMITED_LENGTH = 10**9
DEVICES = ("cpu", "cuda")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class Scale:
    """Model shape and training budget shared by every run of a replay.

    The defaults fit 3 methods x 3 seeds in about 35 minutes on 2 CPU cores, one single-threaded run per core, with
    about 2.5M tokens per run. Why the budget is cut into 1200 steps x 16 sequences x 128 tokens, and what other cuts
    gave, is in docs/replay.md.
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
    and lose much on a busy machine (docs/replay.md); on a GPU one run at a time."""
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
    runs_dir: str | None = None

    @property
    def saved_result(self) -> Path | None:
        """Where the finished run is kept when `runs_dir` is set: `{runs_dir}/{method}_seed{seed}.json`."""
        return None if self.runs_dir is None else Path(self.runs_dir) / f"{self.method.name}_seed{self.seed}.json"


@dataclass
class RunResult:
    """Numbers of one run. Curves have one value per optimizer step; `train_loss` is the Trainer's (with an aux-loss
    model, its balance term included). Loads are (MoE layers, experts) token counts over the validation split; the
    rows of loads and biases belong to the decoder layers `layers` (`model.model.layers[i]`), which also key
    `maxvio_global_per_layer`.

    `maxvio_global_train` is MaxVio_global over as many training blocks as there are validation blocks, spread evenly
    over the training split and measured the same way after training: set against `maxvio_global`, it tells how much
    of the imbalance on held-out text comes from those documents routing differently from the ones the biases were
    tuned on. `val_load_metrics` are `load_metrics` of the validation loads (dead experts, CV, min / mean load).

    `maxvio_by_batch_size` maps a computation-batch size (validation sequences) to the MaxVio of such batches,
    averaged over them (the paper's expert-parallelism question; see loads.py). `val_perplexity_shuffled_routing`
    (Expert Choice only) evaluates the same weights with the batch's tokens shuffled before routing: a model that
    learned to read its future from the routing of its own sequence loses that."""

    method: str
    seed: int
    val_loss: float
    val_perplexity: float
    maxvio_global: float
    maxvio_global_per_layer: dict[int, float]
    maxvio_global_train: float
    final_maxvio_batch: float
    maxvio_batch: list[float]
    bias_abs_max: list[float]
    train_loss: list[float]
    val_loads: list[list[int]]
    layers: list[int]
    router_names: list[str]
    final_biases: list[list[float]]
    wall_time_s: float
    val_load_metrics: dict[str, float] = field(default_factory=dict)
    maxvio_by_batch_size: dict[int, float] = field(default_factory=dict)
    val_perplexity_shuffled_routing: float | None = None

    @property
    def peak_maxvio_batch_after_collapse(self) -> float:
        """Highest MaxVio_batch after step `COLLAPSE_PHASE_STEPS` (over the whole run when it is shorter)."""
        return peak_after(self.maxvio_batch, COLLAPSE_PHASE_STEPS)

    @property
    def steps_to_balance(self) -> int | None:
        """The step from which MaxVio_batch stays below `BALANCED_MAXVIO_BATCH` to the end; None if it never does."""
        return first_step_staying_below(self.maxvio_batch, BALANCED_MAXVIO_BATCH)

    @property
    def val_load_cv(self) -> float | None:
        return self.val_load_metrics.get("val_load_cv")

    @property
    def val_min_load_ratio(self) -> float | None:
        return self.val_load_metrics.get("val_min_load_ratio")


@torch.no_grad()
def measure_held_out(
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


def peak_after(curve: Sequence[float], step: int) -> float:
    """Largest value of a per-step curve (step 1 first) after `step`; the whole curve's when it is not longer."""
    return max(curve[step:] or curve)


def first_step_staying_below(curve: Sequence[float], threshold: float) -> int | None:
    """The 1-based step from which every value of the curve is below `threshold`; None if its last one is not."""
    first = None
    for step, value in enumerate(curve, start=1):
        if value >= threshold:
            first = None
        elif first is None:
            first = step
    return first


def final_mean(curve: Sequence[float]) -> float:
    """Mean of the last `FINAL_WINDOW_FRACTION` of a per-step curve (at least its last value)."""
    window = max(1, round(len(curve) * FINAL_WINDOW_FRACTION))
    return statistics.fmean(curve[-window:])


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values, as long as the input: per-step MaxVio_batch is noisy."""
    cumulative = [0.0]
    for value in values:
        cumulative.append(cumulative[-1] + value)
    return [(cumulative[i + 1] - cumulative[max(0, i + 1 - window)]) / min(window, i + 1) for i in range(len(values))]


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
        dataloader_pin_memory=spec.execution.device != "cpu",
        use_cpu=spec.execution.device == "cpu",
        bf16=spec.execution.bf16,
        disable_tqdm=True,
        log_level="error",
    )


def train_and_evaluate(spec: RunSpec) -> RunResult:
    """Train one method with one seed, then evaluate it on the validation blocks."""
    if is_expert_choice(spec.method):
        return _train_and_evaluate_expert_choice(spec)
    start = time.perf_counter()
    model = build_model(spec.method, spec.scale, spec.vocab_size, spec.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(model=model, args=training_arguments(spec, output_dir), train_dataset=spec.blocks["train"])
        trainer.remove_callback(PrinterCallback)
        balancer = add_balancing_callback(trainer, LossFreeBalancingCallback(report=False)).balancer
        trainer.train()
    steps = [log for log in trainer.state.log_history if "maxvio_batch" in log]
    if len(steps) != spec.scale.max_steps:
        raise RuntimeError(f"Expected MaxVio_batch at each of {spec.scale.max_steps} steps, got {len(steps)}.")
    maxvio_batch = [log["maxvio_batch"] for log in steps]
    val_blocks = torch.tensor(spec.blocks["validation"]["input_ids"])  # (N, S)
    val_loss, loads = measure_held_out(model, balancer, val_blocks, spec.scale.eval_batch_size)
    _, seen_loads = measure_held_out(
        model, balancer, training_blocks_like(spec, val_blocks), spec.scale.eval_batch_size
    )
    _, sequence_loads = evaluate_by_sequence(model, val_blocks, spec.scale.eval_batch_size)
    result = RunResult(
        **_evaluation_fields(spec, val_loss, loads, seen_loads, balancer.layers),
        final_maxvio_batch=final_mean(maxvio_batch),
        maxvio_batch=maxvio_batch,
        bias_abs_max=[log["bias_abs_max"] for log in steps],
        train_loss=[log["loss"] for log in steps],
        val_loads=loads.tolist(),
        layers=balancer.layers,
        router_names=list(balancer.names),
        final_biases=balancer.biases().tolist(),
        wall_time_s=time.perf_counter() - start,
        val_load_metrics=compute_load_metrics(loads, "val"),
        maxvio_by_batch_size=maxvio_by_batch_size(
            sequence_loads, balancer.layers, computation_batch_sizes(len(val_blocks)), spec.seed
        ),
    )
    balancer.remove()
    return result


def training_blocks_like(spec: RunSpec, val_blocks: torch.Tensor) -> torch.Tensor:
    """As many training blocks as there are validation blocks, spread evenly over the training split: (N, S)."""
    train_blocks = spec.blocks["train"]
    return torch.tensor(train_blocks.select(spread_indices(len(train_blocks), len(val_blocks)))["input_ids"])


def _evaluation_fields(
    spec: RunSpec, val_loss: float, loads: torch.Tensor, seen_loads: torch.Tensor, layers: list[int]
) -> dict:
    """The `RunResult` fields every method reports from its validation and training-block (L, E) loads."""
    held_out = compute_maxvio(loads, layers)
    return dict(
        method=spec.method.name,
        seed=spec.seed,
        val_loss=val_loss,
        val_perplexity=math.exp(val_loss),
        maxvio_global=held_out.mean,
        maxvio_global_per_layer=held_out.per_layer,
        maxvio_global_train=compute_maxvio(seen_loads, layers).mean,
    )


def _train_and_evaluate_expert_choice(spec: RunSpec) -> RunResult:
    """An Expert Choice run: no balancer (it has no bias); loads are read from the routers' own picks.

    Validation batches hold `batch_size` sequences, as in training, so that routing chunks are cut the same way.
    """
    start = time.perf_counter()
    model = build_model(spec.method, spec.scale, spec.vocab_size, spec.seed)
    step_loads = StepLoadsCallback(model)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(model=model, args=training_arguments(spec, output_dir), train_dataset=spec.blocks["train"])
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(step_loads)
        trainer.train()
    step_loads.remove()
    if len(step_loads.maxvio_batch) != spec.scale.max_steps:
        raise RuntimeError(
            f"Expected MaxVio_batch at each of {spec.scale.max_steps} steps, got {len(step_loads.maxvio_batch)}."
        )
    layers = step_loads.counter.layers
    batch_size = spec.scale.batch_size
    val_blocks = torch.tensor(spec.blocks["validation"]["input_ids"])  # (N, S)
    val_loss, sequence_loads = evaluate_by_sequence(model, val_blocks, batch_size)
    loads = sequence_loads.sum(dim=0)  # (L, E)
    _, seen_loads = evaluate_by_sequence(model, training_blocks_like(spec, val_blocks), batch_size)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return RunResult(
        val_perplexity_shuffled_routing=math.exp(_loss_with_shuffled_routing(model, val_blocks, batch_size)),
        **_evaluation_fields(spec, val_loss, loads, seen_loads.sum(dim=0), layers),
        final_maxvio_batch=final_mean(step_loads.maxvio_batch),
        maxvio_batch=step_loads.maxvio_batch,
        bias_abs_max=[0.0] * len(step_loads.maxvio_batch),
        train_loss=losses,
        val_loads=loads.tolist(),
        layers=layers,
        router_names=[f"model.layers.{layer}.mlp.gate" for layer in layers],
        final_biases=[[0.0] * spec.scale.n_routed_experts for _ in layers],
        wall_time_s=time.perf_counter() - start,
        val_load_metrics=compute_load_metrics(loads, "val"),
        maxvio_by_batch_size=maxvio_by_batch_size(
            sequence_loads, layers, computation_batch_sizes(len(val_blocks)), spec.seed
        ),
    )


def _loss_with_shuffled_routing(model: LossFreeMoeForCausalLM, blocks: torch.Tensor, batch_size: int) -> float:
    """Validation loss of an Expert Choice model whose routers shuffle the batch's tokens before cutting chunks."""
    _, routers = moe_routers(model)
    trained = [router.shuffle for router in routers]
    for router in routers:
        router.shuffle = True
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same permutations for every run
            loss, _ = evaluate_by_sequence(model, blocks, batch_size)
    finally:
        for router, shuffle in zip(routers, trained, strict=True):
            router.shuffle = shuffle
    return loss


def run_all(specs: Sequence[RunSpec], execution: Execution) -> list[RunResult]:
    """Run every spec, in `execution.workers` processes when above 1; results come back in the order of `specs`.

    A spec whose `saved_result` file exists is read back instead of run, so an interrupted replay resumes.
    """
    done = {index: _load_result(spec.saved_result) for index, spec in enumerate(specs) if _is_saved(spec)}
    pending = [spec for index, spec in enumerate(specs) if index not in done]
    ran = iter(_run_pending(pending, execution))
    return [done[index] if index in done else next(ran) for index in range(len(specs))]


def _is_saved(spec: RunSpec) -> bool:
    return spec.saved_result is not None and spec.saved_result.is_file()


def _load_result(path: Path) -> RunResult:
    fields = json.loads(path.read_text(encoding="utf-8"))
    # JSON object keys are strings; the per-layer MaxVio is keyed by decoder-layer number.
    fields["maxvio_global_per_layer"] = {
        int(layer): value for layer, value in fields["maxvio_global_per_layer"].items()
    }
    fields["maxvio_by_batch_size"] = {
        int(size): value for size, value in fields.get("maxvio_by_batch_size", {}).items()
    }
    return RunResult(**fields)


def _run_pending(specs: Sequence[RunSpec], execution: Execution) -> list[RunResult]:
    if not specs:
        return []
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
    if spec.saved_result is not None:
        spec.saved_result.parent.mkdir(parents=True, exist_ok=True)
        spec.saved_result.write_text(json.dumps(asdict(result)) + "\n", encoding="utf-8")
    print(
        f"{result.method} seed {result.seed}: perplexity {result.val_perplexity:.3f}, "
        f"MaxVio_global {result.maxvio_global:.3f}, final MaxVio_batch {result.final_maxvio_batch:.3f}, "
        f"peak after step {COLLAPSE_PHASE_STEPS} {result.peak_maxvio_batch_after_collapse:.3f}, "
        f"below {BALANCED_MAXVIO_BATCH} from step {result.steps_to_balance}, "
        f"{result.wall_time_s:.0f} s",
        flush=True,
    )
    return result


def replay(
    comparisons: Sequence[Comparison],
    seeds: Sequence[int],
    scale: Scale,
    blocks: DatasetDict,
    vocab_size: int,
    execution: Execution = Execution(),
    runs_dir: str | None = None,
) -> list[RunResult]:
    """Train and evaluate every method of `comparisons` with every seed; results ordered by seed, then method.

    With `runs_dir`, every finished run is saved there and runs already saved are read back, not run again.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must list at least one seed, each once, got {list(seeds)}.")
    if len(blocks["train"]) < scale.batch_size:
        raise ValueError(
            f"--batch_size {scale.batch_size} exceeds the {len(blocks['train'])} training blocks; use a smaller "
            "--batch_size or --block_size, or more data."
        )
    specs = [
        RunSpec(method, seed, scale, blocks, vocab_size, execution, runs_dir)
        for seed in seeds
        for method in methods_of(comparisons)
    ]
    return run_all(specs, execution)
