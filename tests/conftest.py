import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_lossfree_moe import LossFreeMoeConfig


TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


@pytest.fixture
def tiny_config():
    """Factory for a tiny config (layer 0 dense, layers 1-2 MoE with 8 experts, top-2); kwargs override."""

    def make(**overrides):
        return LossFreeMoeConfig(**{**TINY, **overrides})

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny matrices: a second thread only waits on the other tests sharing the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_on_two_ranks(script: Path, out_dir: Path, timeout: int) -> list[dict]:
    """Run `script out_dir` under torchrun on two gloo ranks; each rank writes `rank{i}.json` there, returned in rank
    order. A failed launch fails the test with the end of its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    process = subprocess.run(
        [*command, str(script), str(out_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]
