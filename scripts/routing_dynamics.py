"""Per-step routing dynamics of one replay run: why routing collapses early, and how far each bias is from the one
that would balance the batch it routed.

Trains one replay method (`scripts/reproduce/methods.py`) at the replay's scale with its full learning-rate schedule,
optionally stopping early, and records per optimizer step and MoE layer, from the router's own training forward:

- `lr`, `maxvio_batch`;
- `score_offset_range`: max - min over experts of the expert's mean score over the batch's tokens (what a bias must
  cancel), and `score_token_std`: the spread of one expert's score over the tokens (mean over experts; the room a
  bias has to move a few tokens rather than all of them);
- `bias_range`: max - min of the bias the batch was routed with;
- `target_gap`: max over experts of |b - q| with q the batch's own Quantile Balancing candidate, both centred (the
  bias error that routed this batch), and `target_move`: max |q_t - q_(t-1)| (how far the balancing bias moves in
  one step);
- `logit_abs_mean`: mean |router logit|;
- `stored_bias_maxvio`: the MaxVio the stored bias alone gives the batch (mean over layers), which differs from
  `maxvio_batch` only under batch-balanced routing (`batch_balance_iterations`), where it says how balanced the
  batch would have been with the bias that evaluation and generation use.

    python scripts/routing_dynamics.py --method loss_free --stop_step 120 --output dyn_sign.json
    python scripts/routing_dynamics.py --method loss_free_quantile --config '{"bias_quantile_anneal_steps": 100}' \
        --probe --output dyn_annealed.json
"""

import argparse
import json
import math
import statistics
import tempfile
import time

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from hf_lossfree_moe import add_balancing_callback, maxvio
from hf_lossfree_moe.data import TextDataArguments
from hf_lossfree_moe.quantile_threshold import share_threshold_bias
from hf_lossfree_moe.update_rules import quantile_candidate
from hf_lossfree_moe_scripts.reproduce.methods import METHODS, Method
from hf_lossfree_moe_scripts.reproduce.runs import (
    DEFAULT_SCALE,
    RunSpec,
    build_model,
    measure_held_out,
    prepare_blocks,
    spread_indices,
    training_arguments,
)


# Consecutive training blocks dealt to one fold at a time by `sample_floor`.
SAMPLE_FLOOR_CHUNKS = (1, 8, 32)


class DynamicsRecorder(TrainerCallback):
    """Reads every training router call (one per layer per step here) and stops training at `stop_step`."""

    def __init__(self, model, top_k: int, stop_step: int | None, keep_scores_until: int = 0):
        self.top_k, self.stop_step, self.keep_scores_until = top_k, stop_step, keep_scores_until
        self.kept_scores: list[list[torch.Tensor]] = []  # per step, per layer: (T, E) scores of the first steps
        self.targets: list[list[list[float]]] = []  # per step, per layer: the batch's centred candidate
        self.biases: list[list[list[float]]] = []
        self.routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self.current: list[dict] = [{} for _ in self.routers]
        self.previous_target: list[torch.Tensor | None] = [None] * len(self.routers)
        self.steps: list[dict] = []
        for index, router in enumerate(self.routers):
            router.register_forward_hook(lambda module, args, output, index=index: self._read(index, module, output))

    @torch.no_grad()
    def _read(self, index, module, output):
        if not module.training or torch._C._current_graph_task_id() != -1:
            return
        logits, _, topk_indices = output
        scores = logits.float().sigmoid()  # (T, E)
        bias = module.e_score_correction_bias.detach().float()
        target = quantile_candidate(scores, bias, self.top_k)
        target = target - target.mean()
        centred_bias = bias - bias.mean()
        if index == 0:
            self.targets.append([]), self.biases.append([])
            if len(self.targets) <= self.keep_scores_until:
                self.kept_scores.append([])
        self.targets[-1].append(target.tolist())
        self.biases[-1].append(centred_bias.tolist())
        if len(self.targets) <= self.keep_scores_until:
            self.kept_scores[-1].append(scores.clone())
        previous = self.previous_target[index]
        self.previous_target[index] = target
        offsets = scores.mean(dim=0)  # (E,)
        self.current[index] = {
            "score_offset_range": (offsets.max() - offsets.min()).item(),
            "score_token_std": scores.std(dim=0).mean().item(),
            "bias_range": (bias.max() - bias.min()).item(),
            "target_gap": (centred_bias - target).abs().max().item(),
            "target_move": None if previous is None else (target - previous).abs().max().item(),
            "logit_abs_mean": logits.float().abs().mean().item(),
            "stored_bias_maxvio": maxvio_of([scores], bias[None], self.top_k),
        }

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "maxvio_batch" not in logs:
            return
        record = {"step": state.global_step, "lr": logs.get("learning_rate"), "maxvio_batch": logs["maxvio_batch"]}
        for key in self.current[0]:
            values = [layer[key] for layer in self.current if layer.get(key) is not None]
            summary = statistics.mean if key == "stored_bias_maxvio" else max
            record[key] = summary(values) if values else None
        self.steps.append(record)
        if self.stop_step is not None and state.global_step >= self.stop_step:
            control.should_training_stop = True


@torch.no_grad()
def collect_scores(model, routers, blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Per router, the (N * S, E) eval-mode scores of `blocks` (N, S), routed with the current biases."""
    collected: list[list[torch.Tensor]] = [[] for _ in routers]
    hooks = [
        router.register_forward_hook(lambda m, a, out, i=i: collected[i].append(out[0].float().sigmoid()))
        for i, router in enumerate(routers)
    ]
    model.eval()
    for batch in blocks.split(batch_size):
        model(input_ids=batch, use_cache=False)
    for hook in hooks:
        hook.remove()
    return [torch.cat(parts) for parts in collected]


def maxvio_of(scores: list[torch.Tensor], biases: torch.Tensor, top_k: int) -> float:
    """Mean over layers of MaxVio of the loads that `scores` give under `biases` (L, E)."""
    values = []
    for layer_scores, bias in zip(scores, biases, strict=True):
        loads = torch.bincount((layer_scores + bias).topk(top_k, dim=-1).indices.flatten(), minlength=bias.numel())
        values.append((loads.max() / loads.float().mean() - 1).item())
    return sum(values) / len(values)


def fixed_point_candidate(scores: torch.Tensor, bias: torch.Tensor, top_k: int, rounds: int = 20) -> torch.Tensor:
    """Quantile Balancing iterated on one set of tokens until the bias is its own candidate (centred)."""
    bias = share_threshold_bias(scores, bias, top_k, passes=rounds)
    return bias - bias.mean()


def probe_held_out(model, routers, blocks, scale, top_k: int) -> dict:
    """How balanced held-out text would be under other biases, for the trained weights.

    Scores are collected once per split with the final biases; later layers' scores are held at those (a bias
    changes which experts a token reaches, hence the next layer's input, only slightly).
    """
    val = torch.tensor(blocks["validation"]["input_ids"])
    train = blocks["train"]
    train = torch.tensor(train.select(spread_indices(len(train), len(val)))["input_ids"])
    final = torch.stack([router.e_score_correction_bias.detach().float() for router in routers])
    val_scores = collect_scores(model, routers, val, scale.eval_batch_size)
    train_scores = collect_scores(model, routers, train, scale.eval_batch_size)
    tokens_per_step = scale.batch_size * scale.block_size
    train_global = torch.stack([fixed_point_candidate(s, b, top_k) for s, b in zip(train_scores, final, strict=True)])
    val_oracle = torch.stack([fixed_point_candidate(s, b, top_k) for s, b in zip(val_scores, final, strict=True)])
    per_batch = [
        torch.stack(
            [
                quantile_candidate(part, b, top_k) - quantile_candidate(part, b, top_k).mean()
                for part in s.split(tokens_per_step)
            ]
        )
        for s, b in zip(train_scores, final, strict=True)
    ]  # per layer (batches, E)
    batch_mean = torch.stack([candidates.mean(dim=0) for candidates in per_batch])
    centred_final = final - final.mean(dim=-1, keepdim=True)
    result = {}
    for name, bias in (
        ("final", final),
        ("train_global_quantile", train_global),
        ("mean_of_batch_quantiles", batch_mean),
        ("val_oracle_quantile", val_oracle),
    ):
        result[name] = {
            "maxvio_val": maxvio_of(val_scores, bias, top_k),
            "maxvio_train": maxvio_of(train_scores, bias, top_k),
            "max_abs_gap_to_train_global": (bias - bias.mean(dim=-1, keepdim=True) - train_global).abs().max().item(),
        }
    result["val_half_to_half"] = statistics.mean(
        held_out_fold_maxvio(val_scores, final, top_k, scale.block_size, folds=2, chunk_blocks=8)
    )
    result["train_sample_floor"] = sample_floor(model, routers, blocks, scale, top_k, final, len(val))
    result["batch_candidate_std"] = torch.stack([c.std(dim=0).mean() for c in per_batch]).mean().item()
    result["final_bias_rms_gap_to_train_global"] = (centred_final - train_global).pow(2).mean().sqrt().item()
    result["train_global_rms_gap_to_val_oracle"] = (train_global - val_oracle).pow(2).mean().sqrt().item()
    result["val_score_token_std"] = torch.stack([s.std(dim=0).mean() for s in val_scores]).mean().item()
    return result


def held_out_fold_maxvio(
    scores: list[torch.Tensor], biases: torch.Tensor, top_k: int, block_size: int, folds: int, chunk_blocks: int
) -> list[float]:
    """Per fold, the MaxVio (mean over layers) of its blocks routed with the bias that balances all other blocks exactly.

    The blocks are cut into chunks of `chunk_blocks` consecutive blocks, dealt to the folds in turn, so that every fold
    holds text of every part of the corpus but none of the other folds' documents: what a perfectly learnt bias leaves
    on held-out text of the same distribution and of a fold's size, by sampling alone.
    """
    values = [[] for _ in range(folds)]
    for layer_scores, bias in zip(scores, biases, strict=True):
        fold_of_token = torch.arange(layer_scores.size(0)) // (block_size * chunk_blocks) % folds
        for fold in range(folds):
            held_out = fold_of_token == fold
            balancing_rest = fixed_point_candidate(layer_scores[~held_out], bias, top_k)
            values[fold].append(maxvio_of([layer_scores[held_out]], balancing_rest[None], top_k))
    return [statistics.mean(layers) for layers in values]


def sample_floor(model, routers, blocks, scale, top_k: int, biases: torch.Tensor, held_out_blocks: int) -> dict:
    """`held_out_fold_maxvio` over every training block, in folds of about the validation split's size, for chunks of
    1, 8 and 32 consecutive blocks. A document spans one block or several, so one-block chunks share documents between
    folds (a floor too low), while longer chunks hold whole documents out, as the validation split does, at the price
    of fewer, larger units (a floor, if anything, too high). Folds differ in size by up to one chunk."""
    train = torch.tensor(blocks["train"]["input_ids"])
    scores = collect_scores(model, routers, train, scale.eval_batch_size)
    folds = max(2, len(train) // held_out_blocks)
    largest_chunk = max(SAMPLE_FLOOR_CHUNKS)
    if len(train) < largest_chunk * folds:
        raise ValueError(
            f"The sampling floor needs at least {largest_chunk * folds} training blocks for {folds} folds of "
            f"{largest_chunk}-block chunks, got {len(train)}."
        )
    result = {"folds": folds, "blocks_per_fold": len(train) / folds}
    for chunk_blocks in SAMPLE_FLOOR_CHUNKS:
        values = held_out_fold_maxvio(scores, biases, top_k, scale.block_size, folds, chunk_blocks)
        result[f"chunk_{chunk_blocks}"] = {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values),
            "per_fold": values,
        }
    return result


def held_out_maxvio(model, balancer, blocks, scale) -> dict:
    """Perplexity and MaxVio_global on the validation split, as the replay measures them."""
    val = torch.tensor(blocks["validation"]["input_ids"])
    val_loss, loads = measure_held_out(model, balancer, val, scale.eval_batch_size)
    return {"val_perplexity": math.exp(val_loss), "maxvio_global": maxvio(loads, balancer.layers).mean}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="loss_free", help=f"One of {sorted(METHODS)}.")
    parser.add_argument("--config", default="{}", help="JSON of config fields added to the method's.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop_step", type=int, default=None, help="Stop here; the lr schedule stays the full run's.")
    parser.add_argument("--max_steps", type=int, default=DEFAULT_SCALE.max_steps)
    parser.add_argument("--output", required=True)
    parser.add_argument("--keep_scores_until", type=int, default=0, help="Save the scores of the first steps (.pt).")
    parser.add_argument("--probe", action="store_true", help="After training, probe held-out balance (see above).")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = METHODS[args.method]
    method = Method(base.name, base.label, {**base.config, **json.loads(args.config)})
    scale = DEFAULT_SCALE.__class__(**{**DEFAULT_SCALE.__dict__, "max_steps": args.max_steps})
    text = TextDataArguments(validation_split_percentage=10).load()
    blocks, vocab_size = prepare_blocks(text.splits, scale.vocab_size, scale.block_size)
    spec = RunSpec(method, args.seed, scale, blocks, vocab_size)
    model = build_model(method, scale, vocab_size, args.seed)
    recorder = DynamicsRecorder(model, scale.num_experts_per_tok, args.stop_step, args.keep_scores_until)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(model=model, args=training_arguments(spec, output_dir), train_dataset=blocks["train"])
        trainer.remove_callback(PrinterCallback)
        balancer = add_balancing_callback(trainer).balancer
        trainer.add_callback(recorder)
        trainer.train()
    record = {"method": method.name, "config": method.config, "seed": args.seed, "steps": recorder.steps}
    record["maxvio_global"] = held_out_maxvio(model, balancer, blocks, scale)
    record.update(targets=recorder.targets, biases=recorder.biases)
    if args.probe:
        record["probe"] = probe_held_out(model, recorder.routers, blocks, scale, scale.num_experts_per_tok)
        print(json.dumps(record["probe"], indent=1))
    if recorder.kept_scores:
        torch.save(recorder.kept_scores, args.output.replace(".json", "_scores.pt"))
    with open(args.output, "w", encoding="utf-8") as file:
        json.dump(record, file)
    print(f"{len(recorder.steps)} steps in {time.perf_counter() - start:.0f} s; held out: {record['maxvio_global']}")


if __name__ == "__main__":
    main()
