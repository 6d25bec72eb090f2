"""README.md model cards, of a trained LossFreeMoe and of its stock `glm4_moe` export: Hub metadata plus a Jinja
template from the repository's top-level `model_cards/` folder.

Metrics come from the Trainer's `log_history`, so the card states exactly what the run logged. Rendering goes
through `huggingface_hub.ModelCard.from_template`, which writes the YAML header (license, tags, `library_name`,
`pipeline_tag`, model-index) the Hub reads. The templates ship in the wheel as the package `hf_lossfree_moe.model_cards`
(pyproject.toml maps the folder there), so an installed wheel renders cards as a clone does.
"""

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from jinja2 import Template

from .configuration_lossfree_moe import TESTED_TRANSFORMERS, TRANSFORMERS_REQUIREMENT, LossFreeMoeConfig
from .run_files import BIAS_PLOT, LOAD_HEATMAP_PLOT, MAXVIO_PLOT


# Jinja templates of `model_cards/`, read as package data of `TEMPLATES_PACKAGE`.
TEMPLATES_PACKAGE = "hf_lossfree_moe.model_cards"
DEFAULT_TEMPLATE = "lossfree_moe.md"
BALANCE_SECTION_TEMPLATE = "balance_section.md"
BALANCE_SECTION_FILE = "balance_card_section.md"
PLOT_TITLES = {
    MAXVIO_PLOT: "MaxVio_batch over training steps, per layer",
    LOAD_HEATMAP_PLOT: "Evaluation load per layer and expert, relative to the layer's mean",
    BIAS_PLOT: "Routing bias of each expert over training, per layer",
}
GLM4_MOE_TEMPLATE = "glm4_moe_export.md"
LICENSE = "apache-2.0"
TAGS = ["mixture-of-experts", "moe", "loss-free-balancing", "deepseek-moe", "custom_code"]
GLM4_MOE_TAGS = ["glm4_moe", "mixture-of-experts", "moe", "loss-free-balancing"]
PAPER = "arxiv:2408.15664"


@dataclass(frozen=True)
class DataSource:
    """Where the text of optimizer steps `first_step` to `last_step` (1-based, inclusive) came from."""

    description: str
    first_step: int
    last_step: int


def sample_prompt(documents: Iterable[str], words: int = 4) -> str:
    """The first `words` words of the first non-blank document: a prompt that fits the text the model learned."""
    for document in documents:
        if document.split():
            return " ".join(document.split()[:words])
    raise ValueError("sample_prompt needs at least one document with a word in it.")


def check_data_sources(data_sources: Sequence[DataSource], train_steps: int) -> None:
    """Raise `ValueError` unless the sources cover steps 1 to `train_steps` in order, each step once."""
    bounds = [(source.first_step, source.last_step) for source in data_sources]
    expected_first = [1] + [last + 1 for _, last in bounds[:-1]]
    contiguous = [first for first, _ in bounds] == expected_first and all(first <= last for first, last in bounds)
    if not bounds or not contiguous or bounds[-1][1] != train_steps:
        raise ValueError(f"data_sources must cover steps 1 to {train_steps} in order, each step once, got {bounds}.")


def count_active_parameters(config: LossFreeMoeConfig, num_parameters: int) -> int:
    """Parameters one token passes through: all but the routed experts it is not sent to (SwiGLU: 3 matrices)."""
    expert_parameters = 3 * config.hidden_size * config.moe_intermediate_size
    idle_experts = config.n_routed_experts - config.num_experts_per_tok
    return num_parameters - config.num_moe_layers * idle_experts * expert_parameters


def human_count(number: int) -> str:
    """1234567 -> "1.23M": parameter and token counts as people say them."""
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= divisor:
            return f"{number / divisor:.3g}{suffix}"
    return str(number)


def final_metrics(log_history: list[dict]) -> dict:
    """The last evaluation and the training summary of a log history, with perplexity = exp(eval_loss)."""
    evaluations = [entry for entry in log_history if "eval_loss" in entry]
    summaries = [entry for entry in log_history if "train_loss" in entry]
    if not evaluations or not summaries:
        raise ValueError("The log history needs an evaluation ('eval_loss') and a training summary ('train_loss').")
    evaluation, summary = evaluations[-1], summaries[-1]
    if "eval_maxvio_global" not in evaluation:
        raise ValueError("The last evaluation has no 'eval_maxvio_global': was LossFreeBalancingCallback used?")
    per_layer = dict(
        sorted(
            (int(key.rsplit("_", 1)[1]), value)
            for key, value in evaluation.items()
            if key.startswith("eval_maxvio_global/layer_")
        )
    )
    return {
        "eval_loss": evaluation["eval_loss"],
        "perplexity": math.exp(evaluation["eval_loss"]),
        "maxvio_global": evaluation["eval_maxvio_global"],
        "maxvio_global_per_layer": per_layer,
        "train_loss": summary["train_loss"],
        "train_steps": summary["step"],
    }


def render_model_card(
    config: LossFreeMoeConfig,
    num_parameters: int,
    log_history: list[dict],
    *,
    model_name: str,
    repo_id: str,
    dataset_description: str,
    eval_split_description: str,
    block_size: int,
    tokens_per_step: int,
    learning_rate: float,
    sample_prompt: str,
    dataset_id: str | None = None,
    base_model: str | None = None,
    data_sources: Sequence[DataSource] | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the card of a finished run.

    `sample_prompt` starts the usage example (text like the training data); `dataset_id` (a Hub dataset) and
    `base_model` go into the metadata. `data_sources` lists the text of each stretch of steps when a resumed run
    switched data; by default `dataset_description` covers every step. `template_path` defaults to the packaged
    template.
    """
    metrics = final_metrics(log_history)
    data_sources = list(data_sources or [DataSource(dataset_description, 1, metrics["train_steps"])])
    check_data_sources(data_sources, metrics["train_steps"])
    template = read_template(DEFAULT_TEMPLATE, template_path)
    eval_dataset = {"dataset_type": dataset_id or "custom", "dataset_name": dataset_id or dataset_description}
    card_data = ModelCardData(
        model_name=model_name,
        license=LICENSE,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=TAGS + [PAPER],
        datasets=[dataset_id] if dataset_id else None,
        base_model=base_model,
        eval_results=[
            EvalResult(
                task_type="text-generation",
                dataset_split="validation",
                metric_type="perplexity",
                metric_name="Perplexity",
                metric_value=round(metrics["perplexity"], 4),
                **eval_dataset,
            ),
            EvalResult(
                task_type="text-generation",
                dataset_split="validation",
                metric_type="maxvio_global",
                metric_name="MaxVio_global",
                metric_value=round(metrics["maxvio_global"], 4),
                **eval_dataset,
            ),
        ],
    )
    maxvio_rows = [(f"layer {layer}", value) for layer, value in metrics.pop("maxvio_global_per_layer").items()]
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=model_name,
        repo_id=repo_id,
        config=config,
        total_parameters=human_count(num_parameters),
        active_parameters=human_count(count_active_parameters(config, num_parameters)),
        dataset_description=dataset_description,
        eval_split_description=eval_split_description,
        block_size=block_size,
        tokens_per_step=tokens_per_step,
        train_tokens=human_count(tokens_per_step * metrics["train_steps"]),
        learning_rate=learning_rate,
        plots={"maxvio_batch": MAXVIO_PLOT, "eval_load_heatmap": LOAD_HEATMAP_PLOT, "bias_trajectories": BIAS_PLOT},
        maxvio_rows=maxvio_rows,
        sample_prompt=json.dumps(sample_prompt, ensure_ascii=False),  # a JSON string is a valid Python literal
        data_sources=data_sources,
        transformers_requirement=TRANSFORMERS_REQUIREMENT,
        tested_transformers=TESTED_TRANSFORMERS,
        **metrics,
    )


def render_glm4_moe_card(
    config: LossFreeMoeConfig,
    *,
    model_name: str,
    repo_id: str,
    original: str | None,
    eval_results: list[EvalResult] | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """The card of a stock `glm4_moe` export of a LossFreeMoe: what it is, where it came from, how to run it.

    `original` (a Hub id, URL or folder; a folder by its name only) is named in the text, linked when it is a Hub id
    or URL, and a Hub id also becomes the `base_model` metadata. `eval_results` (the original's, which the export reproduces) go into the
    model-index. `template_path` defaults to the packaged template.
    """
    if original is not None and os.path.isdir(original):
        original = Path(original).resolve().name  # the card travels with the folder, not with this machine
        original_url = None
    else:
        original_url = hub_url(original)
    is_hub_id = original_url is not None and not original.startswith(("http://", "https://"))
    card_data = ModelCardData(
        model_name=model_name,
        license=LICENSE,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=GLM4_MOE_TAGS + [PAPER],
        base_model=original if is_hub_id else None,
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_str=read_template(GLM4_MOE_TEMPLATE, template_path),
        model_name=model_name,
        repo_id=repo_id,
        config=config,
        original=original,
        original_url=original_url,
    )


def render_balance_section(
    log_history: list[dict],
    *,
    num_layers: int,
    num_experts: int,
    method: str,
    plots: Sequence[str] = (),
    template_path: str | os.PathLike | None = None,
) -> str:
    """A Markdown "Expert load balance" section for any model's card, from the figures the balancing callback logged:
    the last training log's MaxVio_batch (mean, worst layer, 90th percentile, effective-expert fraction) and, after an
    evaluation, the last evaluation's MaxVio_global per layer and load figures. `plots` are file names of
    `plotting.py`'s plots, shown with a title each."""
    rows = []
    training = [entry for entry in log_history if "maxvio_batch" in entry]
    if training:
        last = training[-1]
        rows += _balance_rows(last, "maxvio_batch", "batch", f"training, step {last.get('step', '?')}")
    evaluations = [entry for entry in log_history if any(key.endswith("_maxvio_global") for key in entry)]
    if evaluations:
        last = evaluations[-1]
        prefix = next(key for key in last if key.endswith("_maxvio_global"))[: -len("_maxvio_global")]
        rows += _balance_rows(last, f"{prefix}_maxvio_global", prefix, f"evaluation, step {last.get('step', '?')}")
        per_layer = sorted(
            (int(key.rsplit("_", 1)[1]), value)
            for key, value in last.items()
            if key.startswith(f"{prefix}_maxvio_global/layer_")
        )
        rows += [(f"MaxVio_global, layer {layer}", f"{value:.4f}") for layer, value in per_layer]
    template = Template(read_template(BALANCE_SECTION_TEMPLATE, template_path), keep_trailing_newline=True)
    return template.render(
        num_layers=num_layers,
        num_experts=num_experts,
        method=method,
        rows=rows,
        plots=[(PLOT_TITLES.get(name, name), name) for name in plots],
    )


def _balance_rows(entry: dict, maxvio_key: str, prefix: str, when: str) -> list[tuple[str, str]]:
    """(metric, value) rows of one log entry: MaxVio mean / worst layer / p90, then the load figures it has."""
    name = "MaxVio_batch" if maxvio_key == "maxvio_batch" else "MaxVio_global"
    figures = [
        (f"{name}, mean over layers ({when})", maxvio_key),
        (f"{name}, worst layer", f"{maxvio_key}/max"),
        (f"{name}, 90th percentile over layers", f"{maxvio_key}/p90"),
        ("effective-expert fraction exp(H)/E, mean over layers", f"{prefix}_effective_expert_fraction"),
        ("effective-expert fraction, least balanced layer", f"{prefix}_effective_expert_fraction/min"),
        ("dead-expert fraction", f"{prefix}_dead_expert_fraction"),
        ("load coefficient of variation", f"{prefix}_load_cv"),
        ("least-loaded expert / mean load", f"{prefix}_min_load_ratio"),
    ]
    return [(label, f"{entry[key]:.4f}") for label, key in figures if key in entry]


def read_template(name: str, template_path: str | os.PathLike | None = None) -> str:
    """The text of `template_path`, or of the packaged template `name` when no path is given."""
    if template_path is not None:
        return Path(template_path).read_text(encoding="utf-8")
    return files(TEMPLATES_PACKAGE).joinpath(name).read_text(encoding="utf-8")


def hub_url(name: str | None) -> str | None:
    """The web address of `name`: itself for a URL, the Hub page for a Hub id, None for a local folder or None."""
    if name is None or os.path.exists(name):
        return None
    if name.startswith(("http://", "https://")):
        return name
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return f"https://huggingface.co/{name}"
