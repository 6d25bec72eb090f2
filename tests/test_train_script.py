"""scripts/train.py end to end: a few steps of a tiny model, the folder it leaves, and every bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_lossfree_moe import LossFreeMoeConfig


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
TINY_OVERRIDES = {
    "vocab_size": 400,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "n_routed_experts": 8,
}
FAST_TRAINING = [
    "--block_size", "32",
    "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "4",
    "--max_eval_samples", "8",
    "--logging_steps", "2",
    "--save_steps", "2",
    "--dataloader_pin_memory", "false",
]  # fmt: skip
FAST_RUN = ["--config_overrides", json.dumps(TINY_OVERRIDES), *FAST_TRAINING]
# One intra-op thread: tiny matrices gain nothing from more, and spinning threads stall on a shared machine.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

LOAD_WITHOUT_PACKAGE = """
import sys
sys.modules["hf_lossfree_moe"] = None  # any import of the package now fails
sys.path = [p for p in sys.path if "hf_lossfree_moe" not in p and not p.rstrip("/").endswith("src")]
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
inputs = tokenizer("The for statement", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
print(type(model).__module__)
print(output.shape[1] - inputs["input_ids"].shape[1], repr(tokenizer.decode(output[0])))
"""


@pytest.fixture(scope="module")
def train_script(load_script):
    return load_script("train")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The script, run as a user runs it, for 4 steps on the embedded corpus."""
    output_dir = tmp_path_factory.mktemp("run") / "model"
    command = [sys.executable, str(SCRIPT), "--output_dir", str(output_dir), "--max_steps", "4", *FAST_RUN]
    result = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result.stdout


def test_fast_run_leaves_a_complete_model_folder(trained):
    output_dir, _ = trained
    for name in (
        "model.safetensors",
        "config.json",
        "modeling_lossfree_moe.py",
        "configuration_lossfree_moe.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.json",
        "routing_history.json",
        "README.md",
        "maxvio_batch.png",
        "eval_load_heatmap.png",
        "bias_trajectories.png",
    ):
        assert (output_dir / name).is_file(), name
    config = json.loads((output_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lossfree_moe.LossFreeMoeForCausalLM"
    assert config["use_cache"] is True  # the Trainer's training-time use_cache=False is not shipped
    assert config["n_routed_experts"] == 8 and config["vocab_size"] == 400


def test_fast_run_prints_and_records_the_final_metrics(trained):
    output_dir, stdout = trained
    state = json.loads((output_dir / "trainer_state.json").read_text())
    evaluation = next(entry for entry in state["log_history"] if "eval_loss" in entry)
    perplexity = math.exp(evaluation["eval_loss"])
    assert f"validation perplexity: {perplexity:.2f}" in stdout
    assert f"eval_maxvio_global:    {evaluation['eval_maxvio_global']:.4f}" in stdout
    assert str(output_dir / "README.md") in stdout
    card_metrics = {r.metric_type: r.metric_value for r in ModelCard.load(output_dir / "README.md").data.eval_results}
    assert card_metrics["perplexity"] == round(perplexity, 4)
    assert [entry["step"] for entry in state["log_history"] if "maxvio_batch" in entry] == [2, 4]
    history = json.loads((output_dir / "routing_history.json").read_text())
    assert history["steps"] == [0, 2, 4]
    assert len(history["eval_loads"]) == 2 and len(history["eval_loads"][0]) == 8


def test_folder_loads_and_generates_without_the_package(trained):
    output_dir, _ = trained
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(output_dir)],
        capture_output=True,
        text=True,
        env=SUBPROCESS_ENV,
        cwd=output_dir.parent,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, generated = result.stdout.strip().splitlines()[-2:]
    assert module.startswith("transformers_modules.")  # the copied code, not hf_lossfree_moe
    assert generated.startswith("8 'The for statement")


def test_run_resumes_from_its_last_checkpoint_and_keeps_the_history(trained, train_script, tmp_path, one_thread):
    output_dir, _ = trained
    resumed = tmp_path / "resumed"
    train_script.main(
        [
            "--output_dir",
            str(resumed),
            "--max_steps",
            "6",
            "--resume_from_checkpoint",
            str(output_dir / "checkpoint-4"),
        ]
        + FAST_RUN
    )
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [entry["step"] for entry in state["log_history"] if "maxvio_batch" in entry] == [2, 4, 6]
    assert json.loads((resumed / "routing_history.json").read_text())["steps"] == [0, 2, 4, 6]


def test_model_name_or_path_continues_training_with_new_balancing_flags(trained, train_script, tmp_path, one_thread):
    output_dir, _ = trained
    continued = tmp_path / "continued"
    train_script.main(
        ["--model_name_or_path", str(output_dir), "--output_dir", str(continued), "--max_steps", "2"]
        + ["--bias_update_rate", "0"]  # DeepSeek-V3 stops the bias updates for its last tokens
        + FAST_TRAINING
    )
    config = json.loads((continued / "config.json").read_text())
    assert config["bias_update_rate"] == 0 and config["hidden_size"] == TINY_OVERRIDES["hidden_size"]
    before, after = (json.loads((run / "routing_history.json").read_text()) for run in (output_dir, continued))
    assert after["biases"][0] == after["biases"][-1] == before["biases"][-1]  # starts from the trained biases, kept


def test_missing_file_exits_non_zero_with_the_message(tmp_path):
    command = [sys.executable, str(SCRIPT), "--train_file", "missing.txt", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().endswith("error: --train_file: no such file: missing.txt")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("content\n" + "".join(f"line number {i}\n" for i in range(40)))
    return path


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--block_size", "300"], r"--block_size must be in \[1, max_position_embeddings=256\] .* got 300"),
        (
            ["--config_overrides", '{"num_experts_per_tok": 99}'],
            "num_experts_per_tok must be at most n_routed_experts",
        ),
        (
            ["--bias_update_rule", "cosine"],
            r"bias_update_rule must be one of \('sign', 'error', 'quantile', 'smebu'\), got 'cosine'",
        ),
        (["--config_overrides", '{"n_experts": 4}'], r"\['n_experts'\] are not fields of LossFreeMoeConfig"),
        (["--config_overrides", "hidden_size=4"], "--config_overrides must be a JSON object"),
        (["--resume_from_checkpoint", "nowhere"], "no such checkpoint folder: nowhere"),
        (["--model_name_or_path", "."] + ["--config_overrides", "{}"], "with --model_name_or_path only the balancing"),
    ],
)
def test_bad_arguments_stop_before_training(train_script, tmp_path, arguments, message):
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        train_script.main(["--output_dir", str(output_dir), *arguments])
    assert not output_dir.exists()


def test_unknown_text_column_stops_before_training(train_script, tmp_path, small_csv):
    with pytest.raises(SystemExit, match=r"--text_column_name 'text' is not a column .* \['content'\]"):
        train_script.main(["--train_file", str(small_csv), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_output_dir_with_a_different_model_needs_overwrite(train_script, tmp_path, small_csv):
    output_dir = tmp_path / "out"
    # The ids the run gives its tokenizer's special tokens: <|endoftext|> (0) ends documents, <|padding|> (1) pads.
    saved = LossFreeMoeConfig(
        **train_script.TINY_CONFIG, bias_update_rate=0.01, bos_token_id=0, eos_token_id=0, pad_token_id=1
    )
    saved.save_pretrained(output_dir)
    before = sorted(os.listdir(output_dir))
    arguments = ["--train_file", str(small_csv), "--text_column_name", "content", "--output_dir", str(output_dir)]
    with pytest.raises(SystemExit, match=r"holds a different model \(bias_update_rate: 0.01 there, 0.001 now\)"):
        train_script.main(arguments + ["--max_steps", "1"])
    assert sorted(os.listdir(output_dir)) == before


def test_output_dir_without_a_model_needs_overwrite(train_script, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    config = LossFreeMoeConfig(**train_script.TINY_CONFIG)
    with pytest.raises(ValueError, match="is not empty and holds no model; pass --overwrite_output_dir"):
        train_script.check_output_dir(str(tmp_path), config, overwrite=False)
    train_script.check_output_dir(str(tmp_path), config, overwrite=True)


def test_argument_file_is_read_as_a_config_file(train_script, tmp_path):
    arguments = {"output_dir": str(tmp_path / "out"), "bias_update_rate": 0.01, "block_size": 128, "max_steps": 7}
    (tmp_path / "args.json").write_text(json.dumps(arguments))
    model_args, data_args, training_args = train_script.parse_arguments([str(tmp_path / "args.json")])
    assert (model_args.bias_update_rate, data_args.block_size, training_args.max_steps) == (0.01, 128, 7)
    assert train_script.build_config(model_args).bias_update_rate == 0.01


def test_output_dir_with_the_same_model_is_reused_and_a_stopped_run_is_judged_by_its_checkpoint(
    train_script, tmp_path
):
    config = LossFreeMoeConfig(**train_script.TINY_CONFIG)
    config.save_pretrained(tmp_path / "finished")
    train_script.check_output_dir(str(tmp_path / "finished"), config, overwrite=False)  # rerunning the same job

    LossFreeMoeConfig(**{**train_script.TINY_CONFIG, "n_routed_experts": 8}).save_pretrained(
        tmp_path / "stopped" / "checkpoint-7"
    )
    with pytest.raises(ValueError, match=r"holds a different model \(n_routed_experts: 8 there, 16 now\)"):
        train_script.check_output_dir(str(tmp_path / "stopped"), config, overwrite=False)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", r"args.json is not valid JSON"), ('{"n_experts": 4}', r"keys are not used .*n_experts")],
)
def test_bad_argument_file_stops_before_training(train_script, tmp_path, content, message):
    (tmp_path / "args.json").write_text(content)
    with pytest.raises(SystemExit, match=message):
        train_script.main([str(tmp_path / "args.json")])
