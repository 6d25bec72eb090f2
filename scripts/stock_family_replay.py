#!/usr/bin/env python
"""Replay-sized comparison on a stock family without a bias: its own auxiliary loss vs. the opt-in loss-free bias.

Both arms train the same Qwen3-MoE (or another `--family` that `add_selection_bias` supports) from the same initial
weights on the same blocks in the same order, with the shape and budget of `scripts/reproduce_paper.py` (docs/replay.md):

- `aux_loss`: the family's own auxiliary loss (`output_router_logits=True`, `router_aux_loss_coef`), routing
  unchanged (the bias is added but frozen at 0, so the balancer only measures);
- `loss_free`: no auxiliary loss, the selection bias updated by the sign rule (u = 1e-3).

Validation perplexity (model called without labels, so the aux loss does not count) and MaxVio_global on the
validation blocks go to results.json and results.md in `--output_dir`. Single-threaded; about 15 minutes per arm at
the default budget on one CPU core.

    python scripts/stock_family_replay.py --output_dir stock_replay
    python scripts/stock_family_replay.py --max_steps 20 --output_dir stock_replay_smoke    # pipeline check
"""

import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, PrinterCallback, Trainer, set_seed

from hf_lossfree_moe import LossFreeBalancingCallback, add_balancing_callback, add_selection_bias
from hf_lossfree_moe.balance_metrics import compute_maxvio
from hf_lossfree_moe_scripts.reproduce.runs import DEFAULT_SCALE, RunSpec, measure_held_out, training_arguments
from hf_lossfree_moe_scripts.reproduce.runs import prepare_blocks as prepare_replay_blocks
from hf_lossfree_moe_scripts.reproduce_paper import DataArguments


ARMS = ("aux_loss", "loss_free")


@dataclass
class StockReplayArguments:
    output_dir: str = field(default="stock_replay", metadata={"help": "Folder for results.json and results.md."})
    family: str = field(default="qwen3_moe", metadata={"help": "A model type whose routers take the opt-in bias."})
    max_steps: int = field(default=DEFAULT_SCALE.max_steps, metadata={"help": "Optimizer steps per arm."})
    aux_loss_coef: float = field(default=1e-3, metadata={"help": "router_aux_loss_coef of the aux-loss arm."})
    update_rate: float = field(default=1e-3, metadata={"help": "u of the loss-free arm (sign rule)."})
    seed: int = field(default=0, metadata={"help": "Seed of the initial weights and the batch order."})


def build_model(family: str, vocab_size: int, arm: str, args: StockReplayArguments):
    """The replay's shape (4 layers, the first dense, hidden 128, 16 experts of width 64, top-2) in `family`."""
    scale = DEFAULT_SCALE
    config = AutoConfig.for_model(
        family,
        vocab_size=vocab_size,
        hidden_size=scale.hidden_size,
        num_hidden_layers=scale.num_hidden_layers,
        num_attention_heads=scale.num_attention_heads,
        num_key_value_heads=scale.num_attention_heads,
        head_dim=scale.hidden_size // scale.num_attention_heads,
        intermediate_size=scale.intermediate_size,
        moe_intermediate_size=scale.moe_intermediate_size,
        num_experts=scale.n_routed_experts,
        num_experts_per_tok=scale.num_experts_per_tok,
        mlp_only_layers=[0],
        max_position_embeddings=scale.block_size,
        output_router_logits=arm == "aux_loss",
        router_aux_loss_coef=args.aux_loss_coef if arm == "aux_loss" else 0.0,
    )
    set_seed(args.seed)
    return add_selection_bias(AutoModelForCausalLM.from_config(config))


def run_arm(arm: str, blocks, vocab_size: int, args: StockReplayArguments) -> dict:
    start = time.perf_counter()
    model = build_model(args.family, vocab_size, arm, args)
    # training_arguments reads only the scale and the seed of a run's spec
    spec = RunSpec(None, args.seed, replace(DEFAULT_SCALE, max_steps=args.max_steps), blocks, vocab_size)
    training_args = training_arguments(spec, str(Path(args.output_dir) / arm))
    trainer = Trainer(model=model, args=training_args, train_dataset=blocks["train"])
    trainer.remove_callback(PrinterCallback)
    update_rate = args.update_rate if arm == "loss_free" else 0.0
    callback = add_balancing_callback(trainer, LossFreeBalancingCallback(bias_update_rate=update_rate, report=False))
    trainer.train()
    balancer = callback.balancer
    val_blocks = torch.tensor(blocks["validation"]["input_ids"])  # (N, S)
    val_loss, loads = measure_held_out(model, balancer, val_blocks, DEFAULT_SCALE.eval_batch_size)
    steps = [log for log in trainer.state.log_history if "maxvio_batch" in log]
    tail = steps[-max(1, len(steps) // 20) :]
    held_out = compute_maxvio(loads, balancer.layers)
    return {
        "arm": arm,
        "val_perplexity": math.exp(val_loss),
        "maxvio_global": held_out.mean,
        "maxvio_global_per_layer": held_out.per_layer,
        "final_maxvio_batch": sum(log["maxvio_batch"] for log in tail) / len(tail),
        "bias_abs_max": balancer.biases().abs().max().item(),
        "wall_time_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None):
    parser = HfArgumentParser((StockReplayArguments, DataArguments), description=__doc__)
    args, data_args = parser.parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)
    text = data_args.load()
    blocks, vocab_size = prepare_replay_blocks(text.splits, DEFAULT_SCALE.vocab_size, DEFAULT_SCALE.block_size)
    results = [run_arm(arm, blocks, vocab_size, args) for arm in ARMS]
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    lines = [
        f"{args.family}, seed {args.seed}, {args.max_steps} steps x {DEFAULT_SCALE.batch_size} x "
        f"{DEFAULT_SCALE.block_size} tokens; data: {text.source}",
        "",
        "| arm | validation perplexity | MaxVio_global | MaxVio_batch (last 5% of steps) | wall time |",
        "|---|---|---|---|---|",
        *(
            f"| {r['arm']} | {r['val_perplexity']:.2f} | {r['maxvio_global']:.3f} | {r['final_maxvio_batch']:.3f} "
            f"| {r['wall_time_s'] / 60:.1f} min |"
            for r in results
        ),
        "",
    ]
    (output_dir / "results.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
