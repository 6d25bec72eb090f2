"""`import hf_lossfree_moe` stays light: the heavy modules load when a name needing them is first used."""

import pickle
import subprocess
import sys

import pytest

import hf_lossfree_moe


# Each takes seconds to import and none is needed before a model, a balancer or a Trainer is: the modeling utilities
# pull in torch._dynamo, the mask builders and (through the Trainer's utilities) PEFT when it is installed.
HEAVY_MODULES = [
    "torch._dynamo",
    "transformers.masking_utils",
    "transformers.modeling_utils",
    "transformers.trainer_utils",
    "torch.distributed.tensor",
    "peft",
    "datasets",
    "matplotlib",
]
CHECK = f"""
import sys
import hf_lossfree_moe
print(sorted(name for name in {HEAVY_MODULES!r} if name in sys.modules))
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.for_model("lossfree_moe", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=32, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, vocab_size=64)
print(type(AutoModelForCausalLM.from_config(config)).__name__)
"""


def test_import_loads_no_heavy_module_and_the_first_config_registers_the_models():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["[]", "LossFreeMoeForCausalLM"]


UNPICKLE_CHECK = """
import pickle, sys
import hf_lossfree_moe
from transformers import AutoModelForCausalLM
config = pickle.loads(sys.stdin.buffer.read())
print(type(AutoModelForCausalLM.from_config(config)).__name__)
"""


def test_a_config_unpickled_in_a_fresh_process_builds_its_model_through_the_auto_classes(tiny_config):
    """A worker process that receives a pickled config (multiprocessing, Ray) never runs the config's __init__."""
    payload = pickle.dumps(tiny_config())
    result = subprocess.run([sys.executable, "-c", UNPICKLE_CHECK], input=payload, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert result.stdout.decode().splitlines() == ["LossFreeMoeForCausalLM"]


def test_every_public_name_resolves_and_is_listed():
    for name in hf_lossfree_moe.__all__:
        assert getattr(hf_lossfree_moe, name) is not None, name
    assert set(hf_lossfree_moe.__all__) <= set(dir(hf_lossfree_moe))
    assert hf_lossfree_moe.LossFreeMoeForCausalLM.__module__ == "hf_lossfree_moe.modeling_lossfree_moe"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'LossFreeBalancerr'"):
        hf_lossfree_moe.LossFreeBalancerr  # noqa: B018


@pytest.mark.parametrize(
    "name", ["LossFreeMoeTopkRouter", "LossFreeMoeExperts", "LossFreeMoeSparseMoeBlock", "sequence_balance_loss"]
)
def test_names_earlier_releases_exported_still_resolve_with_a_deprecation_warning(name):
    from hf_lossfree_moe import modeling_lossfree_moe

    with pytest.warns(DeprecationWarning, match=rf"hf_lossfree_moe.{name} is deprecated; import it from "):
        value = getattr(hf_lossfree_moe, name)
    assert value is getattr(modeling_lossfree_moe, name)
    assert name not in hf_lossfree_moe.__all__
