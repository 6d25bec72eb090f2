import importlib.util
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


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="session")
def load_script():
    """Import `scripts/<name>.py` as a module, so that a script's own functions can be tested directly."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def one_thread():
    """Tiny matrices: a second thread only waits on the other tests sharing the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
