"""Which processes' expert counts `LossFreeBalancer` sums, and the one collective that sums them.

The loads of a step are the tokens of the global batch through every layer, each counted once: the counts are summed
over exactly the processes whose counts differ. For a model loaded with `from_pretrained(..., distributed_config=...)`
those are its data-parallel ranks (`dp_replicate` x `fsdp`), which route different tokens, and its pipeline stages,
which route the same tokens through different layers. The ranks of a tensor-parallel group route the same tokens
through the same layers, and summing over them would count every token `tp_size` times; an expert-parallel group spans
TP ranks and, when `ep_size > tp_size`, FSDP ranks, so it needs no rule of its own. Without a `distributed_config`
(DDP, Accelerate's FSDP, a plain `init_process_group`) every process routes its own tokens, so the sum runs over the
whole world.

Pipeline stages hold different routers. Their counts are summed in one tensor of a fixed (all MoE layers, experts)
shape indexed by decoder-layer number, zero in the rows of the layers a stage does not hold, so every stage takes part
in the same collective and reads back the loads of its own routers.
"""

import torch
import torch.distributed as dist
from torch import nn

from .routers import decoder_layer_indices, layer_numbers


# Mesh dimensions of transformers' `DistributedConfig` whose ranks count differently: `dp_replicate` and `fsdp` ranks
# route different tokens, `pp` stages hold different layers; `tp` ranks route the same tokens through the same layers.
COUNTING_DIMS = ("pp", "dp_replicate", "fsdp")


def distributed_config_of(model: nn.Module):
    """The `DistributedConfig` the model was sharded with at load time, or None."""
    if not getattr(model, "is_distributed_loading_by_transformers", False):
        return None
    return getattr(model.config, "distributed_config", None)


def counting_group(model: nn.Module, process_group: "dist.ProcessGroup | None" = None) -> "dist.ProcessGroup | None":
    """The group whose summed counts are the global loads: `process_group` when given; for a model loaded with a
    `distributed_config`, its data-parallel ranks and pipeline stages; otherwise None, the whole world."""
    if process_group is not None or distributed_config_of(model) is None:
        return process_group
    mesh_manager = model._mesh_manager
    dims = tuple(dim for dim in COUNTING_DIMS if mesh_manager.get_mesh(dim).size() > 1)
    if not dims:
        return mesh_manager.get_mesh("fsdp").get_group()  # this process alone: nothing to sum
    mesh = mesh_manager.get_mesh(dims)
    return (mesh._flatten() if len(dims) > 1 else mesh).get_group()


class LoadSum:
    """Sums the (routers, experts) counts of this process with those of the other processes of its counting group.

    Args:
        model: The unwrapped model the routers belong to.
        router_names: The qualified name of each of this process's routers (rows of the counts).
        process_group: Overrides the group chosen by `counting_group`.
    """

    def __init__(self, model: nn.Module, router_names: list[str], process_group: "dist.ProcessGroup | None" = None):
        self.group = counting_group(model, process_group)
        self.layers = layer_numbers(router_names)
        self.all_layers = self.layers
        config = distributed_config_of(model)
        if config is not None and config.pp_size > 1 and self._size() > 1:
            self.all_layers = self._gather_layers(decoder_layer_indices(router_names))
        position = {layer: row for row, layer in enumerate(self.all_layers)}
        self._rows = [position[layer] for layer in self.layers]

    def all_reduce_(self, loads: torch.Tensor) -> torch.Tensor:
        """Replace this process's (routers, experts) `loads` by their sum over the counting group, in place."""
        if self._size() <= 1:
            return loads
        if self.all_layers == self.layers:
            dist.all_reduce(loads, op=dist.ReduceOp.SUM, group=self.group)
            return loads
        rows = torch.tensor(self._rows, device=loads.device)
        model_loads = loads.new_zeros(len(self.all_layers), loads.size(-1))  # (all MoE layers, E)
        model_loads[rows] = loads
        dist.all_reduce(model_loads, op=dist.ReduceOp.SUM, group=self.group)
        return loads.copy_(model_loads[rows])

    def _gather_layers(self, indices: list[int] | None) -> list[int]:
        """The decoder-layer indices of every pipeline stage's routers, each stage's checked on every rank alike."""
        gathered = [None] * self._size()
        dist.all_gather_object(gathered, indices, group=self.group)
        unnumbered = [rank for rank, layers in enumerate(gathered) if layers is None]
        if unnumbered:
            raise ValueError(
                "Under pipeline parallelism LossFreeBalancer matches the stages' routers by decoder-layer index "
                "(`layers.{i}.` in their names, one router per layer), but the routers at rank(s) "
                f"{unnumbered} of its process group have none, so their counts cannot be told apart."
            )
        idle = [rank for rank, layers in enumerate(gathered) if not layers]
        if idle:
            raise ValueError(
                "Under pipeline parallelism LossFreeBalancer needs a router on every stage, but the stage(s) at "
                f"rank(s) {idle} of its process group hold none. Choose a pp_size that puts an MoE layer on every "
                "stage."
            )
        return sorted({layer for layers in gathered for layer in layers})

    def _size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)


__all__ = ["LoadSum", "counting_group"]
