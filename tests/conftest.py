import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hf_lossfree_moe import LossFreeMoeConfig, LossFreeMoeForCausalLM
from hf_lossfree_moe_scripts.reproduce.runs import Scale


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

# A replay model small enough for unit tests: 3 layers (the first dense), 8 routed experts, top-2.
REPLAY_TINY_SCALE = Scale(
    vocab_size=300,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    block_size=16,
    batch_size=4,
    max_steps=5,
    eval_batch_size=3,
)


@pytest.fixture
def tiny_config():
    """Factory for a tiny config (layer 0 dense, layers 1-2 MoE with 8 experts, top-2); kwargs override."""

    def make(**overrides):
        return LossFreeMoeConfig(**{**TINY, **overrides})

    return make


# Experts per token of TINY.
TOP_K = 2


def padded_batch(lengths, seq_len=12, vocab=128):
    """input_ids (B, S) with right padding (pad id 0) and the matching 2-D attention_mask."""
    input_ids = torch.randint(3, vocab, (len(lengths), seq_len))
    attention_mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def record_topk(model):
    """Hooks that keep each router's (T, K) indices of every call, in router order."""
    calls = {router: [] for router in model.routers()}
    for router in model.routers():
        router.register_forward_hook(lambda module, args, output: calls[module].append(output[2].clone()))
    return calls


class ToyRouter(nn.Module):
    """Top-K of fixed per-token scores plus the bias; returns the DeepSeek-V3 router triple."""

    def __init__(self, scores: torch.Tensor, top_k: int):
        super().__init__()
        self.scores = scores  # (T, E)
        self.top_k = top_k
        self.e_score_correction_bias = nn.Buffer(torch.zeros(scores.size(1)))

    def forward(self, hidden_states):
        indices = (self.scores + self.e_score_correction_bias).topk(self.top_k, dim=-1).indices  # (T, K)
        return self.scores, self.scores.gather(1, indices), indices


class ToyModel(nn.Module):
    def __init__(self, *routers):
        super().__init__()
        self.layers = nn.ModuleList(routers)

    def forward(self, hidden_states=None, attention_mask=None):
        for router in self.layers:
            router(hidden_states)


@pytest.fixture
def model(tiny_config):
    """The tiny LossFreeMoe in training mode."""
    return LossFreeMoeForCausalLM(tiny_config()).train()


def tiny_model(**overrides) -> LossFreeMoeForCausalLM:
    """A seeded tiny LossFreeMoe in training mode; overrides are config fields."""
    torch.manual_seed(0)
    return LossFreeMoeForCausalLM(LossFreeMoeConfig(**{**TINY, **overrides})).train()


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
    return [json.loads(rank_result_path(out_dir, rank).read_text()) for rank in range(2)]


def rank_result_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f"rank{rank}.json"


def write_rank_result(out_dir: Path, result_of_rank: Callable[[int], dict]) -> None:
    """The body of a script `run_on_two_ranks` launches: joins the gloo group and writes `result_of_rank(rank)` where
    `run_on_two_ranks` reads it."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rank_result_path(out_dir, rank).write_text(json.dumps(result_of_rank(rank)))
    dist.barrier()
    dist.destroy_process_group()
