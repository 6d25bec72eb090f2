"""Replay the paper's experiments at small scale: loss-free vs. aux-loss vs. no balancing, plus its ablations.

Every method trains the same-shape DeepSeekMoE-style model from the same initial weights, on the same data in the same
order, for several seeds; the results folder gets a Markdown table in the paper's format (results.md), every number
(results.json), the MaxVio_batch curves (maxvio_batch_<comparison>.png) and per-expert load heatmaps
(expert_loads_<method>.png). Installed, it is the `hf-lossfree-moe-reproduce` command.

    python scripts/reproduce_paper.py --quick --output_dir results_quick     # pipeline check: under a minute
    python scripts/reproduce_paper.py --output_dir results                   # 3 methods x 3 seeds: ~35 min, 2 cores
    python scripts/reproduce_paper.py --ablations all --seeds 0 --output_dir results_ablations    # 12 methods
    python scripts/reproduce_paper.py --ablations rules --skip_main --output_dir results_rules    # update rules
    python scripts/reproduce_paper.py --ablations expert_choice --seeds 0 --output_dir results_ec  # Expert Choice
    python scripts/reproduce_paper.py --device cuda --hidden_size 512 --max_steps 5000 --output_dir results_gpu
"""

import argparse
import sys
from dataclasses import dataclass, field, fields, make_dataclass, replace

from transformers import HfArgumentParser

from hf_lossfree_moe.data import TextDataArguments
from hf_lossfree_moe_scripts.reproduce.batch_report import leakage_setting
from hf_lossfree_moe_scripts.reproduce.methods import ABLATIONS, is_expert_choice, methods_of, select_comparisons
from hf_lossfree_moe_scripts.reproduce.report import describe_settings, write_outputs
from hf_lossfree_moe_scripts.reproduce.runs import (
    DEFAULT_SCALE,
    DEVICES,
    QUICK_SCALE,
    Scale,
    plan_execution,
    prepare_blocks,
    replay,
)


@dataclass
class ReplayArguments:
    output_dir: str = field(default="reproduce_results", metadata={"help": "Folder for the table, JSON and plots."})
    quick: bool = field(
        default=False, metadata={"help": "Smoke test: a tiny model, a few steps and seed 0 unless --seeds is given."}
    )
    seeds: list[int] | None = field(
        default=None, metadata={"help": "Seeds of every method (default: 0 1 2; with --quick: 0)."}
    )
    ablations: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"Ablations besides the main comparison: 'all' or any of {sorted(ABLATIONS)}, "
            "space- or comma-separated."
        },
    )
    runs_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder where every finished run is saved as {method}_seed{seed}.json; runs found there are read "
            "back instead of trained, so an interrupted replay resumes. Runs must share the scale and data."
        },
    )
    skip_main: bool = field(
        default=False, metadata={"help": "Leave out the main comparison (aux loss, loss-free, none): ablations only."}
    )
    device: str = field(default="cpu", metadata={"help": f"One of {DEVICES}."})
    bf16: bool = field(default=False, metadata={"help": "Train in bf16 mixed precision (GPUs)."})
    workers: int | None = field(
        default=None,
        metadata={"help": "Runs trained at once in separate processes (default on CPU: one per core; GPU: 1)."},
    )


@dataclass
class DataArguments(TextDataArguments):
    validation_split_percentage: int = field(
        default=10,
        metadata={
            "help": "Percent of the documents held out when the data has no validation split. 10, not 5: "
            "MaxVio_global should measure balance over many documents, and 5%% of the embedded corpus is dominated "
            "by a few long ones."
        },
    )


# Every Scale field as an optional flag: unset flags keep the preset's value (DEFAULT_SCALE, or QUICK_SCALE).
ScaleArguments = make_dataclass(
    "ScaleArguments",
    [
        (
            spec.name,
            spec.type | None,
            field(
                default=None,
                metadata={
                    "help": f"{spec.metadata['help']} Default {getattr(DEFAULT_SCALE, spec.name)}, "
                    f"with --quick {getattr(QUICK_SCALE, spec.name)}."
                },
            ),
        )
        for spec in fields(Scale)
    ],
)


def main(argv: list[str] | None = None):
    parser = HfArgumentParser(
        (ReplayArguments, ScaleArguments, DataArguments),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay_args, scale_args, data_args = parser.parse_args_into_dataclasses(args=argv)
    overrides = {name: value for name, value in vars(scale_args).items() if value is not None}
    scale = replace(QUICK_SCALE if replay_args.quick else DEFAULT_SCALE, **overrides)
    seeds = replay_args.seeds or ([0] if replay_args.quick else [0, 1, 2])
    comparisons = select_comparisons(replay_args.ablations, include_main=not replay_args.skip_main)

    text = data_args.load()
    blocks, vocab_size = prepare_blocks(text.splits, scale.vocab_size, scale.block_size, data_args.text_column_name)
    data = f"{text.source}; validation: {text.validation_source}"
    num_runs = len(methods_of(comparisons)) * len(seeds)
    execution = plan_execution(num_runs, replay_args.device, replay_args.workers, replay_args.bf16)
    settings = describe_settings(scale, blocks, vocab_size, data, seeds)
    settings["execution"] = f"{execution.describe()}; wall time covers training and evaluation"
    if any(is_expert_choice(method) for method in methods_of(comparisons)):
        settings["expert_choice_leakage_bound"] = leakage_setting(scale)
    results = replay(comparisons, seeds, scale, blocks, vocab_size, execution, replay_args.runs_dir)
    output_dir = write_outputs(replay_args.output_dir, comparisons, results, settings, scale, replay_args.quick)
    kind = "Pipeline check (--quick, not a result)" if replay_args.quick else "Results"
    print(f"{kind} in {output_dir}: results.md, results.json, maxvio_batch_*.png, expert_loads_*.png")


if __name__ == "__main__":
    main(sys.argv[1:])
