"""Run by test_bias_update.py under torchrun (2 CPU processes, gloo): Quantile Balancing solved over the global batch.

Two toy routers with fixed scores stand for the MoE layers, so a token scores the same whichever rank routes it. At
every step each rank routes its part of two micro-batches (6 and 7 of their 13 tokens), steps the balancer, and
records its biases; test_bias_update.py routes the whole micro-batches in one process and compares.
"""

import sys
from pathlib import Path

import torch

from conftest import ToyModel, ToyRouter, write_rank_result
from hf_lossfree_moe import LossFreeBalancer


STEPS, MICRO_BATCHES, TOKENS, EXPERTS, TOP_K = 3, 2, 13, 8, 2
# annealed with A = 1 and a floor of 0.5: the first update replaces the bias, the later ones blend with weight 1 / 2
SETTINGS = dict(
    rule="quantile", bias_quantile_solver="global_histogram", bias_quantile_anneal_steps=1, bias_quantile_ema=0.5
)


def micro_batch_scores(step: int, micro_batch: int) -> list[torch.Tensor]:
    """(TOKENS, EXPERTS) logits of each of the two layers; expert 0 is popular."""
    generator = torch.Generator().manual_seed(1000 * step + micro_batch)
    scores = [torch.randn(TOKENS, EXPERTS, generator=generator) for _ in range(2)]
    for layer in scores:
        layer[:, 0] += 1.0
    return scores


def toy_model() -> ToyModel:
    return ToyModel(*(ToyRouter(torch.zeros(1, EXPERTS), TOP_K) for _ in range(2))).train()


def run(balancer: LossFreeBalancer, rows: slice) -> list:
    """The biases after each step, with every router routing `rows` of each micro-batch."""
    biases = []
    for step in range(STEPS):
        for micro_batch in range(MICRO_BATCHES):
            for router, scores in zip(balancer.model.layers, micro_batch_scores(step, micro_batch), strict=True):
                router.scores = scores[rows]
            balancer.model()
        balancer.step()
        biases.append(balancer.biases().tolist())
    return biases


def rank_result(rank: int) -> dict:
    rows = slice(0, 6) if rank == 0 else slice(6, TOKENS)
    return {"biases": run(LossFreeBalancer(toy_model(), **SETTINGS), rows)}


if __name__ == "__main__":
    write_rank_result(Path(sys.argv[1]), rank_result)
