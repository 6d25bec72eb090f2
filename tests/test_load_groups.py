"""Which ranks' counts are summed: the counting group of a sharded model, and pipeline stages matched by layer."""

import pytest
import torch

from hf_lossfree_moe import LossFreeMoeForCausalLM
from hf_lossfree_moe.load_groups import LoadSum, counting_group


class _Mesh:
    """A device mesh of the given dimension sizes whose groups are named after its dimensions."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes

    def size(self) -> int:
        return int(torch.tensor(list(self.sizes.values())).prod())

    def get_group(self) -> str:
        return "+".join(self.sizes)

    def _flatten(self) -> "_Mesh":
        return _Mesh({"_".join(self.sizes): self.size()})


class _LoadedModel:
    """What `from_pretrained(..., distributed_config=...)` leaves on a model: its config and its meshes."""

    is_distributed_loading_by_transformers = True

    def __init__(self, **sizes):
        self.config = type("Config", (), {"distributed_config": object()})()
        self.sizes = {"pp": 1, "dp_replicate": 1, "fsdp": 1, "tp": 1, **sizes}
        self._mesh_manager = self

    def get_mesh(self, dims):
        dims = (dims,) if isinstance(dims, str) else dims
        return _Mesh({dim: self.sizes[dim] for dim in dims})


@pytest.mark.parametrize(
    "sizes, group",
    [
        (dict(tp=2), "fsdp"),  # a group of one: nothing is summed
        (dict(fsdp=2, tp=4), "fsdp"),
        (dict(dp_replicate=2, fsdp=2, tp=2), "dp_replicate_fsdp"),
        (dict(pp=2, tp=2), "pp"),
    ],
)
def test_counts_are_summed_over_the_ranks_that_route_different_tokens(sizes, group):
    model = _LoadedModel(**sizes)
    assert counting_group(model) == group
    assert counting_group(model, process_group="given") == "given"


def test_without_a_distributed_config_counts_are_summed_over_the_world(tiny_config):
    assert counting_group(LossFreeMoeForCausalLM(tiny_config())) is None


def test_pipeline_stages_whose_routers_have_no_layer_index_are_refused_alike(monkeypatch):
    """Stages' counts are matched by decoder-layer index; a stage numbering its routers by position (two routers in
    one layer) would have its rows summed with another stage's different layers, so every rank refuses instead."""

    def all_gather_object(gathered, indices, group=None):
        gathered[:] = [[1, 2], None]  # stage 1's routers share a layer: no index of their own

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    load_sum = LoadSum.__new__(LoadSum)
    load_sum.group, load_sum._size = None, lambda: 2
    with pytest.raises(ValueError, match=r"the routers at rank\(s\) \[1\] of its process group have none"):
        load_sum._gather_layers([1, 2])
