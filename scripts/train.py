#!/usr/bin/env python
"""Train a LossFreeMoe causal LM with auxiliary-loss-free load balancing, evaluate it, and package it for the Hub.

With no arguments it trains a tiny model (a few million parameters) on an embedded corpus, the documentation that
ships with Python, with a BPE tokenizer trained on the fly: minutes on a laptop CPU, no download. The output folder
then holds safetensors weights, the model code (`trust_remote_code=True`), the tokenizer, `trainer_state.json`,
plots and a README.md model card. Everything else is run_clm: `--dataset_name` or `--train_file` for real data,
`--model_name_or_path` to continue training, `--resume_from_checkpoint`, `--push_to_hub`, and every
`TrainingArguments` flag. Resuming restores the run: every argument not given again, data included, comes from the
checkpoint's run, and the output folder is the checkpoint's parent.

Installed, it is the `hf-lossfree-moe-train` command; from a clone, `python scripts/train.py`:

    hf-lossfree-moe-train                                      # the default job, what `make train` runs
    hf-lossfree-moe-train --dataset_name roneneldan/TinyStories --tokenizer_name gpt2 \\
        --config_overrides '{"hidden_size": 512, "num_hidden_layers": 8}' --output_dir outputs/tinystories
    hf-lossfree-moe-train --resume_from_checkpoint outputs/tinystories/checkpoint-250
    hf-lossfree-moe-train args.json                            # every argument from one JSON file
"""

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import LocalTokenNotFoundError, StrictDataclassError
from transformers import AutoConfig, HfArgumentParser, PreTrainedConfig, TrainingArguments

from hf_lossfree_moe import LossFreeMoeConfig
from hf_lossfree_moe.checkpoints import check_complete, checkpoint_step, run_checkpoints
from hf_lossfree_moe.configuration_lossfree_moe import BiasType, BiasUpdateRule, LoadBalancing, ScoringFunc
from hf_lossfree_moe.data import TextDataArguments, TextDatasets, check_data_file
from hf_lossfree_moe.run_files import ROUTING_HISTORY_FILE
from hf_lossfree_moe_scripts.run_record import (
    RUN_RECORD_FILE,
    RunRecord,
    given_arguments,
    recordable,
    resume_arguments,
    with_absolute_paths,
)


# The modules that build and train the model (the modeling code, the Trainer, plotting) take seconds to import: they
# are imported where first used, after every argument has been checked, so a mistake is reported at once.
if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

    from hf_lossfree_moe.plotting import RoutingHistory


DEFAULT_OUTPUT_DIR = "outputs/lossfree-moe-tiny"
# A few million parameters (2.7M, 1.7M active per token): learns visibly within minutes on 2 CPU cores, and its
# 16 fine-grained experts with top-2 routing give the balancer real work.
TINY_CONFIG = {
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 512,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
}
# The tiny job's training settings; any flag or argument-file key overrides them. 500 steps of 8 x 256 tokens are
# about 2.7 passes over the embedded corpus: loss falls from 8.3 to about 4.5 and the biases have time to balance.
# Pinned host memory only helps copies to an accelerator; without one, the DataLoader warns about it.
TRAINING_DEFAULTS = {
    "output_dir": DEFAULT_OUTPUT_DIR,
    "do_train": True,
    "do_eval": True,
    "max_steps": 500,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.1,
    "logging_steps": 10,
    "save_steps": 250,
    "save_total_limit": 1,
    "dataloader_pin_memory": torch.accelerator.is_available(),
}
BALANCING_FIELDS = (
    "load_balancing",
    "bias_update_rate",
    "bias_update_rule",
    "bias_type",
    "router_aux_loss_coef",
    "scoring_func",
)
# Keys of a saved config.json that say how it was saved or run, not which model it is (checkpoints written during
# training hold use_cache=False).
CONFIG_METADATA_KEYS = {
    "transformers_version",
    "transformers_requirement",
    "architectures",
    "auto_map",
    "dtype",
    "_name_or_path",
    "use_cache",
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A trained model (folder or Hub id) to continue training. Default: a new model."},
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Config (config.json, its folder, or a Hub id) of a new model. Default: the tiny config."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": 'JSON object of config fields to change in a new model, e.g. \'{"hidden_size": 256, '
            '"n_routed_experts": 32}\'.'
        },
    )
    load_balancing: LoadBalancing | None = field(
        default=None,
        metadata={
            "help": "loss_free, aux_loss (the paper's baseline), none, or expert_choice (the paper's non-causal "
            "baseline, for research only; see docs/expert_choice.md). Default: the config's."
        },
    )
    bias_update_rate: float | None = field(
        default=None, metadata={"help": "Bias update rate u (the paper: 1e-3). Default: the config's."}
    )
    bias_update_rule: BiasUpdateRule | None = field(
        default=None,
        metadata={
            "help": "sign (Algorithm 1), error, smebu or quantile (see docs/balancing_rules.md). Default: the config's."
        },
    )
    bias_type: BiasType | None = field(
        default=None, metadata={"help": "additive or multiplicative. Default: the config's."}
    )
    router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "Weight of the sequence-wise balance loss. Default: the config's."}
    )
    scoring_func: ScoringFunc | None = field(
        default=None, metadata={"help": "Gate: sigmoid (the paper) or softmax. Default: the config's."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into --output_dir even when it holds a different model (same model: always)."},
    )
    export_glm4_moe: bool = field(
        default=False,
        metadata={
            "help": "At the end, also save a stock GLM-4.5 (glm4_moe) copy in <output_dir>-glm4_moe: it loads without "
            "trust_remote_code and serves with vLLM and SGLang."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets go."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})

    def balancing_overrides(self) -> dict:
        return {name: getattr(self, name) for name in BALANCING_FIELDS if getattr(self, name) is not None}


@dataclass
class DataArguments(TextDataArguments):
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per training sequence; at most max_position_embeddings, its default."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "A tokenizer (folder or Hub id). Default: the model's, or a BPE trained on the data."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep at most this many validation blocks."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    resume_with_new_data: bool = field(
        default=False,
        metadata={
            "help": "With --resume_from_checkpoint: train on the data source given now although the checkpoint's "
            "run read another (the model card lists the steps of each)."
        },
    )


# `hf_lossfree_moe.data` names a parameter in backticks in its errors; here each is the flag the user typed.
DATA_FLAGS = {f"`{flag.name}`": f"--{flag.name}" for flag in fields(DataArguments)}
DATA_FLAGS["`text_column`"] = "--text_column_name"  # the loaders' name for the column flag


def in_flags(message: str) -> str:
    """`message` with every data parameter it names in backticks written as its flag, e.g. `train_file` as
    --train_file."""
    return re.sub(r"`\w+`", lambda name: DATA_FLAGS.get(name.group(0), name.group(0)), message)


@dataclass
class Job:
    """Everything `prepare` checked and built, ready to train."""

    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    text: TextDatasets
    train_dataset: "Dataset"
    eval_dataset: "Dataset"
    block_size: int
    checkpoint: str | None
    history: "RoutingHistory | None"
    record: RunRecord


def argument_parser() -> HfArgumentParser:
    return HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments, RunRecord]:
    """The arguments of this run and its record (see run_record.py).

    run_clm convention: a single `.json` argument is a file holding every argument. Either way they start from
    `TRAINING_DEFAULTS`, kept out of a `TrainingArguments` subclass so `training_args.bin` unpickles anywhere; a
    resumed run takes those not given again from the checkpoint's run.
    """
    if len(argv) == 1 and argv[0].endswith(".json"):
        given = read_argument_file(argv[0])
    else:
        argument_parser().parse_args(argv)  # --help, unknown flags and invalid choices stop here, as in argparse
        given = given_arguments(argument_parser(), argv)
    given = with_absolute_paths(given)
    record = RunRecord(recordable(given))
    checkpoint = given.get("resume_from_checkpoint")
    if given.get("resume_with_new_data") and checkpoint is None:
        raise ValueError("--resume_with_new_data only applies with --resume_from_checkpoint.")
    if checkpoint is not None:
        check_checkpoint(checkpoint)
        given, record, restored = resume_arguments(checkpoint, given)
        restored_flags = f" with its run's {', '.join('--' + name for name in restored)}" if restored else ""
        print(f"Resuming from {checkpoint}{restored_flags}; output folder: {given['output_dir']}")
    model_args, data_args, training_args = argument_parser().parse_dict({**TRAINING_DEFAULTS, **given})
    return model_args, data_args, training_args, record


def read_argument_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"Argument file not found: {path}")
    try:
        arguments = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"Argument file {path} is not valid JSON: {error}.") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"Argument file {path} must hold a JSON object of arguments, got {type(arguments).__name__}.")
    return arguments


def build_config(model_args: ModelArguments) -> PreTrainedConfig:
    """The config to train: the continued model's, or a new one; balancing flags apply to both.

    Rebuilt through `from_dict`, so the config's own checks judge every changed value.
    """
    overrides = model_args.balancing_overrides()
    if model_args.model_name_or_path is not None:
        if model_args.config_name is not None or model_args.config_overrides is not None:
            raise ValueError(
                "--config_name and --config_overrides build a new model; with --model_name_or_path only the "
                f"balancing flags ({', '.join('--' + name for name in BALANCING_FIELDS)}) may change its config."
            )
        base = AutoConfig.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, token=model_args.token
        )
        saved_bias_type = getattr(base, "bias_type", "additive")
        if overrides.get("bias_type", saved_bias_type) != saved_bias_type:
            raise ValueError(
                f"--bias_type cannot change when continuing training: the saved biases are {saved_bias_type}."
            )
    elif model_args.config_name is not None:
        base = AutoConfig.from_pretrained(
            model_args.config_name, cache_dir=model_args.cache_dir, token=model_args.token
        )
    else:
        base = LossFreeMoeConfig(**TINY_CONFIG)
    if model_args.model_name_or_path is None and model_args.config_overrides is not None:
        overrides = {**parse_config_overrides(model_args.config_overrides, base), **overrides}
    return type(base).from_dict({**base.to_dict(), **overrides})


def check_pretrained_name(name: str | None, argument: str) -> None:
    """A name written as a local path must exist; otherwise the Hub would reject it as a malformed repository id."""
    if name is None or os.path.exists(name):
        return
    written_as_path = name.startswith((".", "/", "~")) or name.endswith("/") or "\\" in name or name.count("/") > 1
    if written_as_path:
        raise ValueError(
            f"{argument} {name}: no such folder (a Hub repository id has the form 'name' or 'namespace/name')."
        )


def parse_config_overrides(text: str, base: PreTrainedConfig) -> dict:
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--config_overrides must be a JSON object, got {text!r} ({error}).") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--config_overrides must be a JSON object such as '{{\"hidden_size\": 256}}', got {text!r}.")
    unknown = sorted(key for key in overrides if not hasattr(base, key))
    if unknown:
        raise ValueError(f"--config_overrides: {unknown} are not fields of {type(base).__name__}.")
    return overrides


def resolve_block_size(block_size: int | None, config: PreTrainedConfig) -> int:
    max_positions = config.max_position_embeddings
    if block_size is None:
        return max_positions
    if not 0 < block_size <= max_positions:
        raise ValueError(
            f"--block_size must be in [1, max_position_embeddings={max_positions}] of the model config, "
            f"got {block_size}."
        )
    return block_size


def check_checkpoint(checkpoint: str | None) -> None:
    """A checkpoint to resume from must exist and be complete (its writing not cut off by a crash); a folder that is
    no checkpoint is refused by `resume_arguments`."""
    if checkpoint is None:
        return
    if not os.path.isdir(checkpoint):
        raise ValueError(f"--resume_from_checkpoint: no such checkpoint folder: {checkpoint}")
    if checkpoint_step(checkpoint) is None:
        return
    try:
        check_complete(checkpoint)
    except ValueError as error:
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: {error}") from None


def check_before_work(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """The checks that need nothing loaded, run before the model code, the data or the Trainer is touched."""
    check_hub_access(training_args)
    if training_args.resume_from_checkpoint is None:
        check_finished_output_dir(training_args.output_dir, model_args.overwrite_output_dir)
    for name in ("train_file", "validation_file"):
        if getattr(data_args, name) is not None:
            check_data_file(getattr(data_args, name), name)
    check_pretrained_name(model_args.model_name_or_path, "--model_name_or_path")
    check_pretrained_name(model_args.config_name, "--config_name")
    check_pretrained_name(data_args.tokenizer_name, "--tokenizer_name")


def check_hub_access(training_args: TrainingArguments) -> None:
    """With --push_to_hub: a token the Hub accepts and a repository it lets us write, or a `ValueError` saying which.

    The same calls the Trainer makes when it starts, made before minutes of data preparation and training.
    """
    if not training_args.push_to_hub:
        return
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            "--push_to_hub needs the Hub, but offline mode is on (HF_HUB_OFFLINE is set): unset it, or train without "
            "--push_to_hub and upload the folder later."
        )
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
    api = HfApi(token=training_args.hub_token)
    try:
        user = api.whoami()["name"]
        api.create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True)
    except LocalTokenNotFoundError:
        raise ValueError(
            "--push_to_hub needs a Hub token: log in with `hf auth login`, set HF_TOKEN, or pass --hub_token."
        ) from None
    except Exception as error:  # whatever stops the upload (network, token, permissions) stops the run here
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"--push_to_hub: cannot create or reach the Hub repository {repo_id} ({reason}).") from None
    print(f"Hub: {repo_id} is ready for the upload, as {user}.")


def check_finished_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse to train anew into the folder of a finished run (its model is at the top), as transformers' scripts do.

    A finished run continues with --model_name_or_path, an interrupted one with --resume_from_checkpoint.
    """
    if overwrite or not os.path.isfile(os.path.join(output_dir, "config.json")):
        return
    raise ValueError(
        f"--output_dir {output_dir} already holds a trained model; pass --overwrite_output_dir to train a new one "
        f"over it, --model_name_or_path {output_dir} with another --output_dir to train it further, or choose "
        "another --output_dir."
    )


def check_output_dir(output_dir: str, config: PreTrainedConfig, overwrite: bool, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to write into a folder that holds anything but a stopped run of this same model, unless told to overwrite.

    The folder's model is that of its newest checkpoint holding a config.json (a checkpoint whose writing was cut off
    may hold none); a folder with a finished model at the top is refused earlier, by `check_finished_output_dir`.
    `ignore` leaves out fields not known yet, such as the tokenizer's.
    """
    if overwrite or not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return
    saved_dirs = [Path(output_dir), *run_checkpoints(output_dir)]
    saved_dir = next((path for path in saved_dirs if (path / "config.json").is_file()), None)
    advice = "pass --overwrite_output_dir to replace it, or choose another --output_dir"
    if saved_dir is None:
        raise ValueError(f"--output_dir {output_dir} is not empty and holds no model; {advice}.")
    try:
        saved = comparable_config(AutoConfig.from_pretrained(saved_dir))
    except (ValueError, OSError, KeyError) as error:
        raise ValueError(
            f"--output_dir {output_dir} holds a model this script cannot read ({error}); {advice}."
        ) from None
    wanted = comparable_config(config)
    differences = sorted(
        key for key in set(saved) | set(wanted) if key not in ignore and saved.get(key) != wanted.get(key)
    )
    if differences:
        shown = ", ".join(f"{key}: {saved.get(key)!r} there, {wanted.get(key)!r} now" for key in differences[:5])
        raise ValueError(f"--output_dir {output_dir} holds a different model ({shown}); {advice}.")


def comparable_config(config: PreTrainedConfig) -> dict:
    """Every field as JSON would store it, without the keys that only say how the config was saved."""
    fields = json.loads(config.to_json_string(use_diff=False))
    return {key: value for key, value in fields.items() if key not in CONFIG_METADATA_KEYS}


def load_tokenizer(
    model_args: ModelArguments,
    data_args: DataArguments,
    checkpoint: str | None,
    text: TextDatasets,
    config: PreTrainedConfig,
) -> "PreTrainedTokenizerBase":
    """The named tokenizer, else the continued model's or checkpoint's, else a BPE trained on the training text."""
    from transformers import AutoTokenizer

    from hf_lossfree_moe.data import train_bpe_tokenizer

    source = data_args.tokenizer_name or model_args.model_name_or_path or checkpoint
    if source is not None:
        return AutoTokenizer.from_pretrained(source, cache_dir=model_args.cache_dir, token=model_args.token)
    train_texts = text.splits["train"][data_args.text_column_name]
    return train_bpe_tokenizer(train_texts, config.vocab_size, config.max_position_embeddings)


def prepare(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, record: RunRecord
) -> Job:
    """Check every input and build model and data; any bad input raises `ValueError` before training starts."""
    from transformers import AutoModelForCausalLM, set_seed

    from hf_lossfree_moe.data import tokenize_and_group
    from hf_lossfree_moe.export import check_glm4_moe_compatible

    config = build_config(model_args)
    if model_args.export_glm4_moe:
        check_glm4_moe_compatible(config)
    block_size = resolve_block_size(data_args.block_size, config)
    checkpoint = training_args.resume_from_checkpoint
    # The tokenizer sets these on a new model; it is read or trained with the data.
    token_fields = (
        () if model_args.model_name_or_path else ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
    )
    if checkpoint is None:
        check_output_dir(training_args.output_dir, config, model_args.overwrite_output_dir, ignore=token_fields)
    if training_args.disable_tqdm:  # the Trainer's bars follow the flag; those of data and weight loading too
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    text = data_args.load(cache_dir=model_args.cache_dir, token=model_args.token)
    if training_args.do_train:
        record.start_training(text.source, data_args.resume_with_new_data)
    tokenizer = load_tokenizer(model_args, data_args, checkpoint, text, config)
    if model_args.model_name_or_path is None:
        config.vocab_size = max(config.vocab_size, len(tokenizer))
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
    if checkpoint is None:
        check_output_dir(training_args.output_dir, config, model_args.overwrite_output_dir)

    with training_args.main_process_first(desc="tokenize and group"):
        blocks = tokenize_and_group(
            text.splits, tokenizer, block_size, data_args.text_column_name, data_args.preprocessing_num_workers
        )
    train_dataset, eval_dataset = blocks["train"], blocks["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    set_seed(training_args.seed)
    if model_args.model_name_or_path is None:
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir, token=model_args.token
        )
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    history = load_history(checkpoint)
    return Job(model, tokenizer, text, train_dataset, eval_dataset, block_size, checkpoint, history, record)


def load_history(checkpoint: str | None) -> "RoutingHistory | None":
    """The routing history saved with `checkpoint`, so a resumed run's plots cover the whole run.

    A checkpoint without one (a plain Trainer's) starts the history at its step, which is said, not left to notice
    on the plots.
    """
    from hf_lossfree_moe.plotting import RoutingHistory

    if checkpoint is None:
        return None
    path = Path(checkpoint, ROUTING_HISTORY_FILE)
    if not path.is_file():
        print(f"{checkpoint} holds no {ROUTING_HISTORY_FILE}: the routing history and its plots start at its step.")
        return None
    return RoutingHistory.load(path)


def run(job: Job, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """Train, evaluate, save model, state, routing history, plots and card; returns the evaluation metrics."""
    from transformers import ProgressCallback, Trainer, default_data_collator

    from hf_lossfree_moe import LossFreeBalancingCallback, add_balancing_callback, export_to_glm4_moe
    from hf_lossfree_moe.console import CompactProgressCallback
    from hf_lossfree_moe.plotting import RoutingHistoryRecorder

    class CardKeepingTrainer(Trainer):
        """A Trainer whose `push_to_hub` keeps the job's README.md instead of writing its generic card over it."""

        def create_model_card(self, *args, **kwargs):
            return None

    use_cache = job.model.config.use_cache  # the Trainer turns it off for training
    trainer = CardKeepingTrainer(
        model=job.model,
        args=training_args,
        train_dataset=job.train_dataset,
        eval_dataset=job.eval_dataset,
        processing_class=job.tokenizer,
        data_collator=default_data_collator,
    )
    if not training_args.disable_tqdm:  # one short line per log under the progress bar, not every per-layer figure
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(CompactProgressCallback)
    balancing = add_balancing_callback(trainer, LossFreeBalancingCallback(report=False))  # the recorder below reports
    recorder = RoutingHistoryRecorder(balancing, job.history)
    trainer.add_callback(recorder)
    balancing.add_checkpoint_file(RUN_RECORD_FILE, job.record.save_at)

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=job.checkpoint)
        job.model.config.use_cache = use_cache
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
    metrics = {}
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(metrics["eval_loss"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.should_save:
        package(trainer, recorder.history, job, model_args, data_args, metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    if model_args.export_glm4_moe and training_args.should_save:
        output_dir = Path(training_args.output_dir).resolve()
        export_dir = export_to_glm4_moe(
            job.model,
            output_dir.with_name(f"{output_dir.name}-glm4_moe"),
            tokenizer=job.tokenizer,
            original=trainer.hub_model_id if training_args.push_to_hub else str(output_dir),
        )
        print(f"Stock glm4_moe copy: {export_dir}  (loads without trust_remote_code; serve it as GLM-4.5)")
    return metrics


def package(
    trainer: "Trainer",
    history: "RoutingHistory",
    job: Job,
    model_args: ModelArguments,
    data_args: DataArguments,
    metrics: dict,
) -> None:
    """Write what the saved model lacks to be shared: state, routing history, plots and (after an evaluation) card.

    trainer_state.json comes after the files it is read with, as in a checkpoint.
    """
    from hf_lossfree_moe.model_card import DataSource, render_model_card, sample_prompt
    from hf_lossfree_moe.plotting import draw_run_plots

    args = trainer.args
    output_dir = Path(args.output_dir)
    history.save(output_dir / ROUTING_HISTORY_FILE)
    job.record.save_at(output_dir / RUN_RECORD_FILE, trainer.state.global_step)
    trainer.save_state()
    if not (args.do_train and args.do_eval):
        return
    plots = draw_run_plots(output_dir)
    card = render_model_card(
        job.model.config,
        job.model.num_parameters(),
        trainer.state.log_history,
        model_name=output_dir.name,
        # The Hub repository, or the folder's own name: the card travels with the folder, not with this machine.
        repo_id=trainer.hub_model_id or output_dir.name,
        sample_prompt=sample_prompt(job.text.splits["validation"][data_args.text_column_name]),
        data_sources=[
            DataSource(segment.description, segment.first_step, segment.last_step)
            for segment in job.record.data_sources
        ],
        dataset_description=job.text.source,
        eval_split_description=job.text.validation_source,
        block_size=job.block_size,
        tokens_per_step=(
            job.block_size * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        ),
        learning_rate=args.learning_rate,
        dataset_id=data_args.dataset_name,
        base_model=hub_id(model_args.model_name_or_path),
    )
    card.save(output_dir / "README.md")
    print_summary(output_dir, plots, metrics)


def hub_id(name_or_path: str | None) -> str | None:
    """`name_or_path` when it names a Hub repository rather than a local folder."""
    return None if name_or_path is None or os.path.isdir(name_or_path) else name_or_path


def print_summary(output_dir: Path, plots: list[Path], metrics: dict) -> None:
    num_layers = sum(key.startswith("eval_maxvio_global/layer_") for key in metrics)
    print(
        f"\nModel folder: {output_dir}  (weights, model code, tokenizer, trainer_state.json)\n"
        f"  model card: {output_dir / 'README.md'}\n"
        + "".join(f"  plot:       {path}\n" for path in plots)
        + f"  validation perplexity: {metrics['perplexity']:.2f}  (eval_loss {metrics['eval_loss']:.4f})\n"
        f"  eval_maxvio_global:    {metrics['eval_maxvio_global']:.4f}  (mean over {num_layers} MoE layers; "
        "0 = every expert got the same number of tokens)\n"
        f'Load it anywhere: AutoModelForCausalLM.from_pretrained("{output_dir}", trust_remote_code=True)'
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        model_args, data_args, training_args, record = parse_arguments(argv)
        check_before_work(model_args, data_args, training_args)
        job = prepare(model_args, data_args, training_args, record)
    except (ValueError, OSError, StrictDataclassError) as error:
        raise SystemExit("error: " + " ".join(in_flags(str(error)).split())) from None
    run(job, model_args, data_args, training_args)


if __name__ == "__main__":
    main()
