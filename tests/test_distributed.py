"""Two CPU processes (gloo) launched with torchrun; the scenarios themselves are in `distributed_scenarios.py`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_scenarios import LENGTHS, global_batch, make_model
from hf_lossfree_moe import LossFreeBalancer


TOP_K = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks ended with, one run for all tests of this module."""
    out_dir = tmp_path_factory.mktemp("dist")
    script = Path(__file__).parent / "distributed_scenarios.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    process = subprocess.run(
        [*command, str(script), str(out_dir)],
        capture_output=True,
        text=True,
        timeout=540,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def single_process_step():
    """Loads and biases of one process routing the whole global batch."""
    model = make_model()
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = global_batch()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    loads = balancer.loads
    balancer.step()
    return loads, balancer.biases()


def test_half_batches_on_two_ranks_update_like_one_process(ranks, single_process_step):
    loads, biases = single_process_step
    local = [torch.tensor(rank["half_batch_ddp"]["local_loads"]) for rank in ranks]
    # each rank kept its own counts under DDP's buffer broadcast ...
    assert local[0].sum(dim=-1).tolist() == [TOP_K * (LENGTHS[0] + LENGTHS[1])] * 2
    assert local[1].sum(dim=-1).tolist() == [TOP_K * (LENGTHS[2] + LENGTHS[3])] * 2
    assert torch.equal(local[0] + local[1], loads)
    # ... and step() summed them: both ranks hold the single-process biases
    for rank in ranks:
        assert torch.equal(torch.tensor(rank["half_batch_ddp"]["biases"]), biases)


def test_trainer_with_ddp_keeps_biases_identical_across_ranks(ranks):
    first, second = (rank["trainer_ddp"] for rank in ranks)
    assert first["wrapper"] == second["wrapper"] == "DistributedDataParallel"
    assert first["local_tokens"] != second["local_tokens"]  # the ranks routed different data ...
    assert first["maxvio_batch"] == second["maxvio_batch"]  # ... but logged the MaxVio of the global step
    assert len(first["maxvio_batch"]) == 3
    assert first["biases"] == second["biases"]
    assert torch.tensor(first["biases"]).abs().max() > 0


def test_fsdp2_sharded_model_keeps_biases_identical_across_ranks(ranks, single_process_step):
    first, second = (rank["fsdp2"] for rank in ranks)
    assert first["sharded"] == "DTensor"
    assert first["biases"] == second["biases"]
    assert torch.equal(torch.tensor(first["biases"][0]), single_process_step[1])
    assert first["biases"][-1] != first["biases"][0]
