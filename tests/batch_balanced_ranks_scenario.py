"""Run by test_batch_balanced_routing.py under torchrun (2 CPU processes, gloo): batch-balanced routing with data
parallelism.

Every rank routes its own half of each step's batch on the bias that balances that half, as one process routes each
micro-batch under gradient accumulation, then steps the balancer; test_batch_balanced_routing.py runs the two halves
as two micro-batches of one process and compares the biases and the step's MaxVio_batch.
"""

import sys
from pathlib import Path

import torch

from conftest import TINY, write_rank_result
from hf_lossfree_moe import LossFreeBalancer, LossFreeMoeConfig, LossFreeMoeForCausalLM


STEPS, ROWS_PER_HALF, SEQ_LEN = 3, 2, 16
# Annealed with A = 1 and a floor of 0.5: the first update replaces the bias, the later ones blend with weight 1 / 2.
SETTINGS = dict(
    bias_update_rule="quantile", batch_balance_iterations=4, bias_quantile_anneal_steps=1, bias_quantile_ema=0.5
)


def half_batch(step: int, half: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * step + half)
    return torch.randint(3, TINY["vocab_size"], (ROWS_PER_HALF, SEQ_LEN), generator=generator)


def model() -> LossFreeMoeForCausalLM:
    """The same initial weights in every process, without touching the caller's random state."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LossFreeMoeForCausalLM(LossFreeMoeConfig(**TINY, **SETTINGS)).train()


def run(halves: tuple[int, ...]) -> dict:
    """Biases and MaxVio_batch after each step, with this process running the given halves of every step's batch."""
    balancer = LossFreeBalancer(model())
    biases, maxvio_batch = [], []
    for step in range(STEPS):
        with torch.no_grad():
            for half in halves:
                balancer.model(input_ids=half_batch(step, half))
        maxvio_batch.append(balancer.step()["maxvio_batch"])
        biases.append(balancer.biases().tolist())
    return {"biases": biases, "maxvio_batch": maxvio_batch}


if __name__ == "__main__":
    write_rank_result(Path(sys.argv[1]), lambda rank: run((rank,)))
