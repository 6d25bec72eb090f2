"""export_to_glm4_moe: stock transformers, without this package, computes what the LossFreeMoe computed."""

import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig, Glm4MoeForCausalLM

from conftest import TINY
from hf_lossfree_moe import LossFreeBalancer, LossFreeMoeConfig, LossFreeMoeForCausalLM, export_to_glm4_moe
from hf_lossfree_moe.data import train_bpe_tokenizer
from hf_lossfree_moe_scripts import export as export_script


NEW_TOKENS = 6
ROUND_TRIPS = {
    "plain": dict(num_key_value_heads=4),
    "grouped": dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
    "first_k_dense": dict(num_hidden_layers=4, first_k_dense_replace=2, n_shared_experts=0, load_balancing="none"),
    "gqa": dict(
        num_key_value_heads=1,
        load_balancing="aux_loss",
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
    ),
    "tied": dict(tie_word_embeddings=True, n_shared_experts=2),
}
# Runs in a fresh interpreter where `import hf_lossfree_moe` fails: the folders must stand on stock transformers.
LOAD_WITHOUT_PACKAGE = """
import sys
sys.modules["hf_lossfree_moe"] = None
sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

inputs_path, results_path, *folders = sys.argv[1:]
input_ids = torch.load(inputs_path)
results = {}
for folder in folders:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(input_ids).logits
    generated = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS, do_sample=False
    )
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    results[folder] = {
        "module": type(model).__module__,
        "logits": logits,
        "generated": generated,
        "biases": [router.e_score_correction_bias for router in routers],
    }
    if folder.endswith("from_path"):
        results[folder]["encoded"] = AutoTokenizer.from_pretrained(folder)("The for statement").input_ids
torch.save(results, results_path)
""".replace("NEW_TOKENS", str(NEW_TOKENS))


def trained_looking_model(config: LossFreeMoeConfig) -> LossFreeMoeForCausalLM:
    """Random weights and biases far from 0 with fp32-only digits, so routing depends on them as after training."""
    model = LossFreeMoeForCausalLM(config).eval()
    for router in model.model.routers():
        router.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts) * 0.05 + 1e-5)
    return model


def greedy(model, input_ids):
    return model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS, do_sample=False
    )


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"The for statement iterates over item {i} of a sequence." for i in range(50)]
    return train_bpe_tokenizer(texts, vocab_size=TINY["vocab_size"] + 200, model_max_length=128)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """Every round-trip model, its export, and what a process without this package computes from each export."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    input_ids = torch.randint(3, TINY["vocab_size"], (2, 10))
    cases = {}
    for name, overrides in ROUND_TRIPS.items():
        model = trained_looking_model(LossFreeMoeConfig(**{**TINY, **overrides}))
        cases[name] = (model, export_to_glm4_moe(model, root / name))

    # From a saved folder, with the tokenizer and a generation config that must travel along.
    model = trained_looking_model(LossFreeMoeConfig(**{**TINY, "vocab_size": len(tokenizer)}))
    model.generation_config.repetition_penalty = 1.0
    model.generation_config.max_new_tokens = 17
    model.save_pretrained(root / "original")
    tokenizer.save_pretrained(root / "original")
    cases["from_path"] = (model, export_to_glm4_moe(root / "original", root / "from_path"))

    torch.save(input_ids, root / "inputs.pt")
    command = [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(root / "inputs.pt"), str(root / "results.pt")]
    result = subprocess.run(
        command + [str(folder) for _, folder in cases.values()],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=root,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = torch.load(root / "results.pt")
    return input_ids, {name: (model, folder, results[str(folder)]) for name, (model, folder) in cases.items()}


@pytest.mark.parametrize("name", [*ROUND_TRIPS, "from_path"])
def test_stock_transformers_without_the_package_gives_the_same_logits_and_continuation(exported, name):
    input_ids, cases = exported
    model, _, stock = cases[name]
    assert stock["module"] == "transformers.models.glm4_moe.modeling_glm4_moe"
    with torch.no_grad():
        logits = model(input_ids).logits
    torch.testing.assert_close(stock["logits"], logits, rtol=0, atol=1e-5)
    assert torch.equal(stock["generated"], greedy(model, input_ids))


@pytest.mark.parametrize("name", [*ROUND_TRIPS, "from_path"])
def test_biases_arrive_exactly_in_fp32(exported, name):
    _, cases = exported
    model, folder, stock = cases[name]
    originals = [router.e_score_correction_bias for router in model.model.routers()]
    assert len(stock["biases"]) == len(originals) == model.config.num_moe_layers
    for loaded, original in zip(stock["biases"], originals, strict=True):
        assert loaded.dtype == torch.float32 and torch.equal(loaded, original)
    with safe_open(folder / "model.safetensors", "pt") as weights:
        layer = model.config.first_k_dense_replace
        assert weights.get_slice(f"model.layers.{layer}.mlp.gate.e_score_correction_bias").get_dtype() == "F32"


def test_config_is_plain_glm4_moe_with_full_rotary_and_no_remote_code(exported):
    _, cases = exported
    _, folder, _ = cases["grouped"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "glm4_moe" and config["architectures"] == ["Glm4MoeForCausalLM"]
    assert "auto_map" not in config and not list(folder.glob("*.py"))
    assert config["rope_parameters"]["partial_rotary_factor"] == config["partial_rotary_factor"] == 1.0
    assert (config["use_qk_norm"], config["num_nextn_predict_layers"], config["attention_bias"]) == (False, 0, False)
    assert (config["n_group"], config["topk_group"], config["norm_topk_prob"]) == (4, 2, True)
    assert (config["routed_scaling_factor"], config["head_dim"]) == (2.5, 16)


def test_experts_are_saved_one_by_one_as_in_glm45_checkpoints(exported):
    """Serving engines read GLM-4.5's per-expert layout, not transformers' fused in-memory tensors."""
    _, cases = exported
    model, folder, _ = cases["plain"]
    with safe_open(folder / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
        up = weights.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight")
    assert "model.layers.1.mlp.experts.gate_up_proj" not in names
    assert {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(8)} <= names
    width = model.config.moe_intermediate_size
    assert torch.equal(up, model.model.layers[1].mlp.experts.gate_up_proj[3, width:])  # gate rows first, then up


def test_a_model_without_shared_experts_gets_zero_shared_experts(exported):
    _, cases = exported
    _, folder, _ = cases["first_k_dense"]
    assert json.loads((folder / "config.json").read_text())["n_shared_experts"] == 1
    with safe_open(folder / "model.safetensors", "pt") as weights:
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert not weights.get_tensor(f"model.layers.3.mlp.shared_experts.{name}.weight").any()


def test_tied_embeddings_stay_tied(exported):
    _, cases = exported
    for name, tied in (("tied", True), ("plain", False)):
        _, folder, _ = cases[name]
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert (model.lm_head.weight is model.get_input_embeddings().weight) is tied


def test_tokenizer_generation_config_and_card_travel(exported, tokenizer):
    _, cases = exported
    _, folder, stock = cases["from_path"]
    assert stock["encoded"] == tokenizer("The for statement").input_ids
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.max_new_tokens, generation.repetition_penalty) == (17, 1.0)

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "glm4_moe" in card.data.tags
    assert "custom_code" not in card.data.tags
    assert "`original`" in card.text  # the original, named by its folder's name
    assert "trained with **auxiliary-loss-free load balancing**" in card.text
    assert (
        f'AutoModelForCausalLM.from_pretrained("{folder.name}")' in card.text
        and "trust_remote_code=True" not in card.text
    )
    assert str(folder.parent) not in card.content  # no path of this machine


def test_card_keeps_the_original_cards_evaluation_results_and_no_local_path(tmp_path, tiny_config):
    original = tmp_path / "my-run"
    trained_looking_model(tiny_config()).save_pretrained(original)
    results = [
        EvalResult("text-generation", "custom", "docs", "perplexity", 91.5, dataset_split="validation"),
        EvalResult("text-generation", "custom", "docs", "maxvio_global", 0.0625, dataset_split="validation"),
    ]
    ModelCard.from_template(ModelCardData(model_name="my-run", eval_results=results)).save(original / "README.md")

    card = ModelCard.load(export_to_glm4_moe(str(original), tmp_path / "my-run-glm4_moe") / "README.md")
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        ("perplexity", 91.5),
        ("maxvio_global", 0.0625),
    ]
    assert str(tmp_path) not in card.content and "`my-run`" in card.text
    assert 'from_pretrained("my-run-glm4_moe")' in card.text


def test_card_links_a_hub_original_and_says_how_other_models_were_trained(tmp_path, tiny_config):
    model = trained_looking_model(tiny_config(load_balancing="aux_loss"))
    folder = export_to_glm4_moe(
        model, tmp_path / "out", original="someone/lossfree-moe-tiny", repo_id="someone/lossfree-moe-tiny-glm4_moe"
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "someone/lossfree-moe-tiny"
    assert "[someone/lossfree-moe-tiny](https://huggingface.co/someone/lossfree-moe-tiny)" in card.text
    assert "trained with the auxiliary balance loss (coefficient 0.001)" in card.text
    assert "loss-free balancing**" not in card.text
    assert "vllm serve someone/lossfree-moe-tiny-glm4_moe" in card.text


def test_bf16_model_exports_bf16_weights_and_fp32_biases(tmp_path, tiny_config):
    model = trained_looking_model(tiny_config()).to(torch.bfloat16)
    folder = export_to_glm4_moe(model, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.dtype == torch.bfloat16
    for stock, original in zip(
        [layer.mlp.gate.e_score_correction_bias for layer in loaded.model.layers[1:]],
        model.model.routers(),
        strict=True,
    ):
        assert stock.dtype == torch.float32 and torch.equal(stock, original.e_score_correction_bias)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(scoring_func="softmax"), r"scoring_func must be 'sigmoid' \(GLM-4.5 routes with a sigmoid gate\)"),
        (dict(bias_type="multiplicative"), r"bias_type must be 'additive'"),
        (dict(attention_bias=True), r"attention_bias must be False \(GLM-4.5's attention output projection"),
        (dict(hidden_act="gelu"), r"hidden_act must be 'silu'"),
        (dict(n_group=8, topk_group=2), r"n_group must leave at least 2 experts per group .* got n_group=8"),
    ],
)
def test_what_glm45_cannot_express_is_refused_before_writing(tmp_path, tiny_config, overrides, message):
    model = LossFreeMoeForCausalLM(tiny_config(**overrides))
    with pytest.raises(ValueError, match=message):
        export_to_glm4_moe(model, tmp_path / "out")
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=message):
        export_to_glm4_moe(tmp_path / "saved", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("field", "value"), [("norm_topk_prob", True), ("routed_scaling_factor", 2.5), ("num_experts_per_tok", 3)]
)
def test_a_config_edited_after_the_model_was_built_is_refused(tmp_path, tiny_config, field, value):
    """The routers compute with what they copied at construction; an export written from the edited config would not
    compute what the model computes."""
    model = LossFreeMoeForCausalLM(tiny_config())
    setattr(model.config, field, value)
    with pytest.raises(
        ValueError, match=rf"LossFreeMoeConfig.{field} is {value!r}, but the model's routers were built"
    ):
        export_to_glm4_moe(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_sources_and_destinations_are_refused(tmp_path, tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="save_directory must differ from the original model's folder"):
        export_to_glm4_moe(tmp_path / "saved", tmp_path / "saved")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="save_directory must be a folder"):
        export_to_glm4_moe(model, tmp_path / "file")
    with pytest.raises(ValueError, match="model_or_path must be a LossFreeMoeForCausalLM .* got Glm4MoeForCausalLM"):
        export_to_glm4_moe(Glm4MoeForCausalLM.from_pretrained(export_to_glm4_moe(model, tmp_path / "glm")), "x")
    with pytest.raises(ValueError, match="model_or_path must hold a LossFreeMoe model .* got 'glm4_moe'"):
        export_to_glm4_moe(tmp_path / "glm", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_stock_glm4_moe_export_keeps_balancing_with_lossfree_balancer(exported):
    """Fine-tuning the export with `LossFreeBalancer`: every step moves each bias by u * sign(mean load - load)."""
    _, cases = exported
    original, folder, _ = cases["plain"]
    model = Glm4MoeForCausalLM.from_pretrained(folder).train()
    balancer = LossFreeBalancer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = balancer.biases()
    assert torch.equal(start, torch.stack([router.e_score_correction_bias for router in original.model.routers()]))
    for _ in range(3):
        batch = torch.randint(3, TINY["vocab_size"], (4, 16))
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loads, before = balancer.loads.double(), balancer.biases()
        balancer.step()
        expected = before + 1e-3 * (loads.mean(dim=-1, keepdim=True) - loads).sign().float()
        torch.testing.assert_close(balancer.biases(), expected, rtol=0, atol=0)
    assert not torch.equal(balancer.biases(), start)


class RecordingHfApi:
    calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs["folder_path"]))


def test_script_exports_and_pushes_the_folder(tmp_path, tiny_config, monkeypatch, capsys):
    LossFreeMoeForCausalLM(tiny_config()).save_pretrained(tmp_path / "saved")
    monkeypatch.setattr(export_script, "HfApi", RecordingHfApi)
    monkeypatch.setattr(RecordingHfApi, "calls", [])
    output_dir = tmp_path / "out"
    arguments = ["--model", str(tmp_path / "saved"), "--output_dir", str(output_dir)]
    export_script.main(arguments + ["--push_to_hub", "--hub_model_id", "someone/tiny-glm4_moe"])
    assert json.loads((output_dir / "config.json").read_text())["model_type"] == "glm4_moe"
    assert "vllm serve someone/tiny-glm4_moe" in (output_dir / "README.md").read_text()
    assert RecordingHfApi.calls == [
        ("create_repo", "someone/tiny-glm4_moe", {"private": False, "exist_ok": True}),
        ("upload_folder", "someone/tiny-glm4_moe", output_dir),
    ]
    assert "Pushed to https://huggingface.co/someone/tiny-glm4_moe" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--push_to_hub"], r"^error: --push_to_hub needs --hub_model_id"),
        ([], r"^error: Cannot export to glm4_moe: LossFreeMoeConfig.scoring_func must be 'sigmoid'"),
    ],
)
def test_script_errors_are_one_line_and_write_nothing(tmp_path, tiny_config, arguments, message):
    LossFreeMoeForCausalLM(tiny_config(scoring_func="softmax")).save_pretrained(tmp_path / "saved")
    with pytest.raises(SystemExit, match=message):
        export_script.main(["--model", str(tmp_path / "saved"), "--output_dir", str(tmp_path / "out"), *arguments])
    assert not (tmp_path / "out").exists()
