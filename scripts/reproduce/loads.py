"""Expert loads the replay reads from the routers themselves: per validation sequence, and per training step of
Expert Choice models, which `LossFreeBalancer` refuses (they have no bias to balance).

Per-sequence loads give MaxVio over computation batches of any size (the paper's expert-parallelism question, RQ3):
token-choice routing is a function of each token alone (tests/test_causality.py), so the load of a batch is the sum
of the loads of its sequences, whichever batch they were computed in.
"""

import math
import statistics
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from hf_lossfree_moe import LossFreeMoeForCausalLM, compute_maxvio
from hf_lossfree_moe.modeling_lossfree_moe import LossFreeMoeExpertChoiceRouter, LossFreeMoeTopkRouter


def moe_routers(model: LossFreeMoeForCausalLM) -> tuple[list[int], list[nn.Module]]:
    """The decoder-layer numbers and routers of the MoE layers, whichever way they route."""
    pairs = [
        (index, layer.mlp.gate)
        for index, layer in enumerate(model.model.layers)
        if isinstance(getattr(layer.mlp, "gate", None), (LossFreeMoeTopkRouter, LossFreeMoeExpertChoiceRouter))
    ]
    return [index for index, _ in pairs], [router for _, router in pairs]


def routed_tokens(router: nn.Module, output: tuple, num_experts: int) -> torch.Tensor:
    """(T, E) int64: 1 where the token went to the expert. Expert Choice fills unused slots at weight 0."""
    _, weights, indices = output
    routed = F.one_hot(indices, num_experts)  # (T, K, E)
    if isinstance(router, LossFreeMoeExpertChoiceRouter):
        routed = routed * (weights != 0).unsqueeze(-1)
    return routed.sum(dim=1)


class RouterLoads:
    """Forward hooks that hand each MoE layer's routed tokens to `add(position, (T, E) counts)`, position being the
    layer's place among the MoE layers."""

    def __init__(self, model: LossFreeMoeForCausalLM, add, training_only: bool = False):
        self.layers, routers = moe_routers(model)
        self.num_experts = model.config.n_routed_experts
        self._handles = [
            router.register_forward_hook(self._hook(position, add, training_only))
            for position, router in enumerate(routers)
        ]

    def _hook(self, position: int, add, training_only: bool):
        def hook(module, args, output):
            if training_only and not (module.training and torch.is_grad_enabled()):
                return
            add(position, routed_tokens(module, output, self.num_experts).detach())

        return hook

    def remove(self):
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def evaluate_by_sequence(
    model: LossFreeMoeForCausalLM, blocks: torch.Tensor, batch_size: int
) -> tuple[float, torch.Tensor]:
    """Mean next-token cross-entropy over `blocks` (N, S) and the loads of every sequence, (N, MoE layers, experts).

    The batches are consecutive blocks of `batch_size`: under Expert Choice they are the routing chunks' batches.
    """
    model.eval()
    per_layer: list[list[torch.Tensor]] = []
    shape: list[int] = []  # (B, S) of the batch in progress

    def add(position: int, counts: torch.Tensor):
        per_layer[position].append(counts.view(*shape, -1).sum(dim=1).cpu())  # (B, E)

    counter = RouterLoads(model, add)
    per_layer.extend([] for _ in counter.layers)
    loss_sum, predicted = 0.0, 0
    try:
        for batch in blocks.split(batch_size):
            batch = batch.to(model.device)  # (B, S)
            shape[:] = batch.shape
            logits = model(input_ids=batch, use_cache=False).logits  # (B, S, V)
            targets = batch[:, 1:]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
            loss_sum += loss.item()
            predicted += targets.numel()
    finally:
        counter.remove()
    return loss_sum / predicted, torch.stack([torch.cat(rows) for rows in per_layer], dim=1)  # (N, L, E)


def computation_batch_sizes(num_sequences: int) -> list[int]:
    """1, 2, 4, ... sequences up to the whole split (which ends the list)."""
    sizes = [2**power for power in range(int(math.log2(num_sequences)) + 1) if 2**power < num_sequences]
    return [*sizes, num_sequences]


def maxvio_by_batch_size(
    sequence_loads: torch.Tensor, layers: Sequence[int], sizes: Sequence[int], seed: int = 0
) -> dict[int, float]:
    """MaxVio (mean over layers) of computation batches of each size, averaged over the batches.

    Sequences are shuffled once (`seed`), as a data loader does, then cut into consecutive batches; an incomplete
    last batch is left out. `sequence_loads` is (N, layers, experts).
    """
    order = torch.randperm(sequence_loads.size(0), generator=torch.Generator().manual_seed(seed))
    shuffled = sequence_loads[order]
    result = {}
    for size in sizes:
        batches = shuffled[: shuffled.size(0) // size * size].view(-1, size, *shuffled.shape[1:]).sum(dim=1)
        result[size] = statistics.fmean(compute_maxvio(loads, layers).mean for loads in batches)
    return result


class StepLoadsCallback(TrainerCallback):
    """MaxVio_batch of every optimizer step from the routers' own choices, for models no balancer watches.

    Counts training-mode forwards with grad (not evaluation, not activation-checkpoint recomputation under no_grad).
    """

    def __init__(self, model: LossFreeMoeForCausalLM):
        self.counter = RouterLoads(model, self._add, training_only=True)
        self.loads = torch.zeros(len(self.counter.layers), self.counter.num_experts, dtype=torch.int64)
        self.maxvio_batch: list[float] = []

    def _add(self, position: int, counts: torch.Tensor):
        self.loads[position] += counts.sum(dim=0).cpu()

    def on_step_end(self, args, state, control, **kwargs):
        self.maxvio_batch.append(compute_maxvio(self.loads, self.counter.layers).mean)
        self.loads.zero_()

    def remove(self):
        self.counter.remove()
