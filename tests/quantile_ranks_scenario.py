"""Run by test_bias_update.py under torchrun (2 CPU processes, gloo): Quantile Balancing over data-parallel ranks.

Each rank routes its own two micro-batches of different lengths (one padded) through the same model, then steps the
balancer, twice; per step it writes its local candidate sums and numbers of router calls (before the step) and its
biases after.
"""

import sys
from pathlib import Path

import torch

from conftest import TINY, write_rank_result
from hf_lossfree_moe import LossFreeBalancer, LossFreeMoeConfig, LossFreeMoeForCausalLM


def micro_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two (rows, 10) micro-batches per rank, different on each rank; the second has a padded row."""
    generator = torch.Generator().manual_seed(100 + rank)
    first = torch.randint(3, 128, (2, 10), generator=generator)
    second = torch.randint(3, 128, (2, 10), generator=generator)
    second_mask = torch.ones_like(second)
    second_mask[1, 4 + 3 * rank :] = 0
    return [(first, torch.ones_like(first)), (second, second_mask)]


def rank_result(rank: int) -> dict:
    torch.manual_seed(0)
    # annealed with A = 1: the first update replaces the bias, the second blends with weight 1 / 2
    config = LossFreeMoeConfig(
        **TINY, bias_update_rule="quantile", bias_quantile_anneal_steps=1, bias_quantile_ema=0.1
    )
    model = LossFreeMoeForCausalLM(config).train()
    balancer = LossFreeBalancer(model)
    result = {"sums": [], "calls": [], "biases": []}
    for _ in range(2):
        with torch.no_grad():
            for input_ids, attention_mask in micro_batches(rank):
                model(input_ids=input_ids, attention_mask=attention_mask)
        sums, calls = balancer._counter.candidates.stacked(balancer.device)
        balancer.step()
        result["sums"].append(sums.tolist())
        result["calls"].append(calls.tolist())
        result["biases"].append(balancer.biases().tolist())
    return result


if __name__ == "__main__":
    write_rank_result(Path(sys.argv[1]), rank_result)
