import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from packaging.specifiers import SpecifierSet

from hf_lossfree_moe import LossFreeMoeConfig, LossFreeMoeForCausalLM, configuration_lossfree_moe
from hf_lossfree_moe.configuration_lossfree_moe import TESTED_TRANSFORMERS, TRANSFORMERS_REQUIREMENT


PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# Loads a saved folder's remote code where the package cannot be imported, under a faked transformers version.
LOAD_UNDER_VERSION = """
import sys
sys.modules["hf_lossfree_moe"] = None  # any import of the package now fails
import transformers
transformers.__version__ = sys.argv[2]
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
except ImportError as error:
    print(f"ImportError: {error}")
"""


def test_defaults_follow_the_paper():
    config = LossFreeMoeConfig()
    assert config.model_type == "lossfree_moe"
    assert config.scoring_func == "sigmoid"
    assert config.load_balancing == "loss_free"
    assert config.bias_update_rate == 1e-3
    assert config.bias_update_rule == "sign"
    assert config.bias_type == "additive"
    assert config.norm_topk_prob is False
    assert config.routed_scaling_factor == 1.0
    assert config.router_aux_loss_coef == 0.0
    assert (config.n_routed_experts, config.n_shared_experts, config.num_experts_per_tok) == (64, 2, 6)


def test_aux_loss_coef_defaults_to_paper_alpha_only_for_aux_loss():
    assert LossFreeMoeConfig(load_balancing="aux_loss").router_aux_loss_coef == 1e-3
    assert LossFreeMoeConfig(load_balancing="none").router_aux_loss_coef == 0.0
    assert LossFreeMoeConfig(router_aux_loss_coef=1e-4).router_aux_loss_coef == 1e-4


def test_key_value_heads_default_to_attention_heads():
    assert LossFreeMoeConfig(hidden_size=64, num_attention_heads=8).num_key_value_heads == 8


def test_rope_theta_is_accepted_as_transformers_does(tiny_config):
    config = tiny_config(rope_theta=50_000.0)
    assert config.rope_parameters["rope_theta"] == 50_000.0
    assert config.rope_parameters["rope_type"] == "default"


def test_num_local_experts_alias(tiny_config):
    assert tiny_config().num_local_experts == 8


def test_json_round_trip(tmp_path, tiny_config):
    config = tiny_config(bias_update_rule="error", bias_type="multiplicative", n_group=2, topk_group=1)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["bias_update_rule"] == "error"
    reloaded = LossFreeMoeConfig.from_pretrained(tmp_path)
    for field in ("bias_update_rule", "bias_type", "n_group", "topk_group", "n_routed_experts"):
        assert getattr(reloaded, field) == getattr(config, field)


INVALID = [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok", "at most n_routed_experts=8"),
    ({"n_group": 3}, "n_group", "a divisor of n_routed_experts=8"),
    ({"n_group": 2, "topk_group": 3}, "topk_group", "at most n_group=2"),
    ({"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "topk_group", "kept groups hold"),
    ({"bias_update_rate": -1e-3}, "bias_update_rate", ">= 0"),
    ({"bias_update_rate": float("nan")}, "bias_update_rate", ">= 0"),
    ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef", ">= 0"),
    ({"load_balancing": "aux_loss", "router_aux_loss_coef": 0.0}, "router_aux_loss_coef", "> 0"),
    ({"load_balancing": "none", "router_aux_loss_coef": 1e-3}, "router_aux_loss_coef", "0 with"),
    ({"scoring_func": "relu"}, "scoring_func", "'sigmoid', 'softmax'"),
    ({"load_balancing": "lossfree"}, "load_balancing", "'loss_free', 'aux_loss', 'none'"),
    ({"bias_update_rule": "signum"}, "bias_update_rule", "'sign', 'error'"),
    ({"bias_type": "mult"}, "bias_type", "'additive', 'multiplicative'"),
    ({"hidden_act": "swish2"}, "hidden_act", "one of"),
    ({"hidden_size": 0}, "hidden_size", "positive"),
    ({"vocab_size": -5}, "vocab_size", "positive"),
    ({"n_routed_experts": 0}, "n_routed_experts", "positive"),
    ({"num_hidden_layers": 0}, "num_hidden_layers", "positive"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size", "positive"),
    ({"n_shared_experts": -1}, "n_shared_experts", "non-negative"),
    ({"first_k_dense_replace": 4}, "first_k_dense_replace", "at most num_hidden_layers=3"),
    ({"hidden_size": 66}, "hidden_size", "multiple of num_attention_heads=4"),
    ({"num_key_value_heads": 3}, "num_attention_heads", "multiple of num_key_value_heads=3"),
    ({"routed_scaling_factor": 0.0}, "routed_scaling_factor", "positive"),
    ({"attention_dropout": 1.0}, "attention_dropout", "[0, 1)"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps", "positive"),
]


@pytest.mark.parametrize("overrides,field,allowed", INVALID, ids=[case[1] + str(i) for i, case in enumerate(INVALID)])
def test_invalid_values_raise_naming_field_and_allowed_values(tiny_config, overrides, field, allowed):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    message = str(error.value)
    assert f"LossFreeMoeConfig.{field} must be" in message
    assert allowed in message


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("n_group", 3, "a divisor of n_routed_experts=8"),
        ("scoring_func", "relu", "one of ('sigmoid', 'softmax')"),
        ("bias_update_rate", -1.0, "a number >= 0"),
        ("num_experts_per_tok", 9, "at most n_routed_experts=8"),
        ("hidden_size", "wide", "of type int"),
    ],
)
def test_a_field_changed_after_construction_is_judged(tiny_config, field, value, allowed):
    """Scripts change configs after building them; an option is rejected on assignment or by `validate()`."""
    config = tiny_config()
    with pytest.raises(ValueError) as error:
        setattr(config, field, value)
        config.validate()
    assert f"LossFreeMoeConfig.{field} must be {allowed}" in str(error.value)


def test_head_dim_is_settable_like_deepseek_v3(tiny_config):
    assert tiny_config().head_dim == 64 // 4
    config = tiny_config(head_dim=32)
    assert config.head_dim == 32
    assert LossFreeMoeConfig.from_dict(config.to_dict()).head_dim == 32
    config.head_dim = 8
    config.validate()
    assert config.head_dim == 8
    with pytest.raises(ValueError, match="LossFreeMoeConfig.head_dim must be a positive integer"):
        tiny_config(head_dim=0)


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        ({"bias_update_rule": "qb"}, "bias_update_rule", "'quantile', 'smebu'"),
        ({"bias_update_schedule": "step"}, "bias_update_schedule", "'linear_warmup', 'cosine'"),
        ({"bias_update_warmup_steps": -1}, "bias_update_warmup_steps", "an integer >= 0"),
        ({"bias_update_stop_fraction": 0.0}, "bias_update_stop_fraction", "(0, 1]"),
        ({"bias_update_stop_fraction": 1.5}, "bias_update_stop_fraction", "(0, 1]"),
        ({"bias_quantile_ema": 0.0}, "bias_quantile_ema", "(0, 1]"),
        ({"bias_update_momentum": 1.0}, "bias_update_momentum", "[0, 1)"),
        ({"bias_update_rule": "quantile", "bias_quantile_anneal_steps": -1}, "bias_quantile_anneal_steps", ">= 0"),
        ({"bias_quantile_anneal_steps": 10}, "bias_quantile_anneal_steps", "unless bias_update_rule='quantile'"),
        (
            {"bias_update_rule": "quantile", "bias_quantile_solver": "global"},
            "bias_quantile_solver",
            "one of ('call_mean', 'global_histogram')",
        ),
        ({"bias_quantile_solver": "global_histogram"}, "bias_quantile_solver", "unless bias_update_rule='quantile'"),
        ({"bias_quantile_histogram_bins": 1}, "bias_quantile_histogram_bins", "an integer >= 2"),
        ({"bias_quantile_histogram_range": 0.0}, "bias_quantile_histogram_range", "a number > 0"),
        ({"bias_quantile_histogram_range": float("inf")}, "bias_quantile_histogram_range", "a number > 0"),
    ],
)
def test_config_rejects_bad_rule_settings_naming_the_field(overrides, field, allowed):
    with pytest.raises(ValueError, match=f"LossFreeMoeConfig.{field} must be") as error:
        LossFreeMoeConfig(**overrides)
    assert allowed in str(error.value)


def version_error(installed: str) -> str:
    return (
        f"LossFreeMoe needs transformers>=5.24,<6, but transformers {installed} is installed; install a supported "
        'version with `pip install "transformers>=5.24,<6"`.'
    )


def import_configuration_under(version: str, monkeypatch):
    """Execute the shipped configuration file afresh while transformers reports `version`."""
    monkeypatch.setattr(transformers, "__version__", version)
    spec = importlib.util.spec_from_file_location("configuration_probe", configuration_lossfree_moe.__file__)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.parametrize("version", ["5.23.0", "5.0.0", "4.57.1", "6.0.0", "5.24.0.dev0"])
def test_configuration_refuses_an_untested_transformers_naming_both_versions(version, monkeypatch):
    with pytest.raises(ImportError, match=f"^{re.escape(version_error(version))}$"):
        import_configuration_under(version, monkeypatch)


@pytest.mark.parametrize("version", ["5.24.0", "5.25.0", "5.26.0.dev0"])
def test_configuration_imports_under_a_tested_transformers(version, monkeypatch):
    import_configuration_under(version, monkeypatch)


def test_the_transformers_release_cards_call_tested_is_the_one_the_suite_runs_with():
    assert transformers.__version__.startswith(f"{TESTED_TRANSFORMERS}.")
    assert SpecifierSet(TRANSFORMERS_REQUIREMENT).contains(f"{TESTED_TRANSFORMERS}.0")


def test_package_requires_the_transformers_range_the_code_checks():
    required = re.findall(r'^\s*"transformers([^"]*)",$', PYPROJECT.read_text(), flags=re.MULTILINE)
    assert required == [TRANSFORMERS_REQUIREMENT]


def test_saved_folder_states_the_range_and_its_code_refuses_another_version(tiny_config, tmp_path):
    folder = tmp_path / "model"
    LossFreeMoeForCausalLM(tiny_config()).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["transformers_requirement"] == ">=5.24,<6"

    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_UNDER_VERSION, str(folder), "5.23.0"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Under the installed version the same folder loads: test_modeling.py's remote-code test.
    assert result.stdout.strip().splitlines()[-1] == f"ImportError: {version_error('5.23.0')}"
