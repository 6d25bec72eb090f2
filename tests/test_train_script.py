"""scripts/train.py end to end: a few steps of a tiny model, the folder it leaves, and every bad input."""

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_lossfree_moe import LossFreeMoeConfig
from hf_lossfree_moe.checkpoints import FAULT_VARIABLE
from hf_lossfree_moe.data import embedded_datasets
from hf_lossfree_moe_scripts import train as train_script
from hf_lossfree_moe_scripts.run_record import RunRecord


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
]  # fmt: skip
FAST_RUN = ["--config_overrides", json.dumps(TINY_OVERRIDES), *FAST_TRAINING]
# Three checkpoints and no evaluation: a run to kill while it writes the second checkpoint.
KILLABLE_RUN = [*FAST_RUN, "--max_steps", "6", "--do_eval", "false"]
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
def trained(tmp_path_factory):
    """The script, run as a user runs it, for 4 steps on the embedded corpus, exporting a glm4_moe copy at the end."""
    output_dir = tmp_path_factory.mktemp("run") / "model"
    command = [sys.executable, str(SCRIPT), "--output_dir", str(output_dir), "--max_steps", "4", "--export_glm4_moe"]
    command += FAST_RUN
    result = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pin_memory" not in result.stderr  # no pinned memory asked for on a machine without an accelerator
    return output_dir, result.stdout


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run that `test_a_run_killed_while_checkpointing_resumes_to_the_uninterrupted_run` kills, left alone."""
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed subprocess
    try:
        train_script.main(["--output_dir", str(output_dir), *KILLABLE_RUN])
    finally:
        torch.set_num_threads(threads)
    return output_dir


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
        "run_record.json",
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


def test_progress_bar_shows_one_short_line_per_log(trained):
    """Under the bar each log is one line of headline figures; the per-layer ones stay in the logs."""
    _, stdout = trained
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 4", "step 4"]  # two logs, the end of training
    assert lines[0].startswith("step 2: loss ") and "| maxvio_batch " in lines[0]
    assert all(len(line) < 120 for line in lines) and "{'loss'" not in stdout


def test_disable_tqdm_hides_every_progress_bar(trained, tmp_path):
    output_dir, _ = trained
    command = [sys.executable, str(SCRIPT), "--model_name_or_path", str(output_dir), "--output_dir", str(tmp_path)]
    command += ["--max_steps", "1", "--do_eval", "false", "--disable_tqdm", "true", *FAST_TRAINING]
    result = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Tokenize" not in result.stderr and "%|" not in result.stderr  # neither datasets' bars nor the Trainer's


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


def test_every_output_numbers_layers_as_model_layers(trained):
    """Layer 0 is dense, so the MoE layers are 1 and 2 in the logs, the JSON files and the card."""
    output_dir, _ = trained
    state = json.loads((output_dir / "trainer_state.json").read_text())
    last_log = [entry for entry in state["log_history"] if "maxvio_batch" in entry][-1]
    assert sorted(key for key in last_log if key.startswith("maxvio_batch/layer_")) == [
        "maxvio_batch/layer_1",
        "maxvio_batch/layer_2",
    ]
    evaluation = json.loads((output_dir / "eval_results.json").read_text())
    assert sorted(key for key in evaluation if "/layer_" in key) == [
        "eval_effective_expert_fraction/layer_1",
        "eval_effective_expert_fraction/layer_2",
        "eval_maxvio_global/layer_1",
        "eval_maxvio_global/layer_2",
    ]
    assert json.loads((output_dir / "routing_history.json").read_text())["layers"] == [1, 2]
    card = (output_dir / "README.md").read_text()
    assert "| MaxVio_global, layer 1 |" in card and "| MaxVio_global, layer 2 |" in card


def test_card_usage_names_the_folder_not_this_machine_and_prompts_with_the_data(trained):
    output_dir, _ = trained
    card = (output_dir / "README.md").read_text()
    assert str(output_dir.parent) not in card
    assert 'AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True)' in card
    assert "`hf-lossfree-moe-train --model_name_or_path model`" in card
    prompt = re.search(r"inputs = tokenizer\((.*), return_tensors", card).group(1)
    first_held_out = embedded_datasets()["validation"][0]["text"]
    assert json.loads(prompt) == " ".join(first_held_out.split()[:4])  # fits the training text, whatever it is


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


def test_export_glm4_moe_leaves_a_stock_copy_with_the_same_logits(trained):
    output_dir, stdout = trained
    export_dir = output_dir.with_name("model-glm4_moe")
    assert f"Stock glm4_moe copy: {export_dir}" in stdout
    assert json.loads((export_dir / "config.json").read_text())["model_type"] == "glm4_moe"
    card = ModelCard.load(export_dir / "README.md")
    assert card.text.count("`model`") == 1 and str(output_dir.parent) not in card.content  # the original, by name
    trained_card = ModelCard.load(output_dir / "README.md")
    assert card.data.eval_results == trained_card.data.eval_results  # the same outputs, the same results
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    inputs = tokenizer("The for statement", return_tensors="pt")
    original = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    stock = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    assert type(stock).__name__ == "Glm4MoeForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(stock(**inputs).logits, original(**inputs).logits, rtol=0, atol=1e-5)


@pytest.fixture
def small_jsonl(tmp_path):
    """60 documents of 40 words, one JSON object per line."""
    rng = random.Random(0)
    words = "router expert token bias load balance layer score gate update sign mean step".split()
    documents = [{"text": " ".join(rng.choice(words) for _ in range(40))} for _ in range(60)]
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(document) + "\n" for document in documents))
    return path


def test_resume_restores_the_run_and_switches_data_only_when_asked(
    trained, tmp_path, small_jsonl, monkeypatch, one_thread
):
    output_dir, _ = trained
    run = tmp_path / "run"
    shutil.copytree(output_dir, run)
    with pytest.raises(
        SystemExit,
        match=rf"run on the embedded corpus 'python-docs', but this run would read --train_file {re.escape(str(small_jsonl))}",
    ):
        train_script.main(["--resume_from_checkpoint", str(run / "checkpoint-4"), "--train_file", str(small_jsonl)])

    # Asked for: steps 5-6 read the file; sizes, data flags and the output folder come from the run.
    switch = ["--resume_with_new_data", "--train_file", str(small_jsonl), "--max_steps", "6"]
    train_script.main(["--resume_from_checkpoint", str(run / "checkpoint-4"), *switch])
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [entry["step"] for entry in state["log_history"] if "maxvio_batch" in entry] == [2, 4, 6]
    assert json.loads((run / "routing_history.json").read_text())["steps"] == [0, 2, 4, 6]

    # The file changed in place since steps 5-6 read it: refused, naming it; restored, the run goes on.
    content = small_jsonl.read_text()
    small_jsonl.write_text(content.replace("router", "expert"))
    with pytest.raises(SystemExit, match=rf"--train_file {re.escape(str(small_jsonl))} changed since the checkpoint"):
        train_script.main(["--resume_from_checkpoint", str(run / "checkpoint-6"), "--max_steps", "8"])
    small_jsonl.write_text(content)

    # From another folder, with nothing but a longer budget: the file, the sizes and the folder are the run's.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    train_script.main(["--resume_from_checkpoint", os.path.relpath(run / "checkpoint-6"), "--max_steps", "8"])
    assert os.listdir(elsewhere) == []
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 8
    assert json.loads((run / "config.json").read_text())["hidden_size"] == TINY_OVERRIDES["hidden_size"]
    card = (run / "README.md").read_text()
    assert "- Data, by optimizer step:\n" in card
    assert "  - steps 1-4 (4 steps): the embedded corpus `python-docs`" in card
    assert "  - steps 5-8 (4 steps): the local file `small.jsonl`\n" in card
    assert "- 8 optimizer steps" in card


def test_checkpoint_without_a_record_needs_its_data_named(trained, tmp_path, one_thread):
    """A checkpoint of a plain Trainer or an older version: no run_record.json, so neither data nor sizes are known."""
    output_dir, _ = trained
    run = tmp_path / "run"
    shutil.copytree(output_dir / "checkpoint-4", run / "checkpoint-4")
    (run / "checkpoint-4" / "run_record.json").unlink()
    resume = ["--resume_from_checkpoint", str(run / "checkpoint-4"), *FAST_RUN, "--max_steps", "6"]
    with pytest.raises(SystemExit, match=r"checkpoint-4 is incomplete: it lacks run_record.json"):
        train_script.main(resume)  # its trainer_state.json names the file
    state_path = run / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["stateful_callbacks"]["LossFreeBalancingCallback"]["attributes"]["checkpoint_files"]
    state_path.write_text(json.dumps(state))  # as an older version wrote it
    with pytest.raises(
        SystemExit, match=r"holds no run_record.json, so it does not record the data its run read; give"
    ):
        train_script.main(resume)
    assert sorted(os.listdir(run)) == ["checkpoint-4"]

    train_script.main([*resume, "--resume_with_new_data"])
    card = (run / "README.md").read_text()
    assert "  - steps 1-4 (4 steps): data the checkpoint does not record (it holds no run_record.json)\n" in card
    assert "  - steps 5-6 (2 steps): the embedded corpus `python-docs`" in card


def test_resuming_a_finished_model_points_to_model_name_or_path(trained):
    output_dir, _ = trained
    before = sorted(os.listdir(output_dir))
    with pytest.raises(
        SystemExit, match=r"is not a checkpoint-<step> folder of a run; to continue training a finished"
    ):
        train_script.main(["--resume_from_checkpoint", str(output_dir), "--max_steps", "8"])
    assert sorted(os.listdir(output_dir)) == before


def test_a_changed_data_file_opens_a_new_stretch_when_asked_for(tmp_path):
    """With --resume_with_new_data, the card lists the steps before and after the change apart."""
    data = tmp_path / "data.txt"
    data.write_text("first version")
    record = RunRecord({"train_file": str(data)})
    record.start_training("the local file `data.txt`")
    record.end_at(4)
    record.save(tmp_path / "run_record.json")
    data.write_text("second version")

    resumed = RunRecord.load(tmp_path / "run_record.json")
    with pytest.raises(ValueError, match=rf"--train_file {re.escape(str(data))} changed since"):
        resumed.start_training("the local file `data.txt`")
    resumed.start_training("the local file `data.txt`", new_data=True)
    resumed.end_at(6)
    assert [(segment.first_step, segment.last_step) for segment in resumed.data_sources] == [(1, 4), (5, 6)]
    assert resumed.data_sources[1].files["train_file"]["size"] == len("second version")


def test_model_name_or_path_continues_training_with_new_balancing_flags(trained, tmp_path, one_thread):
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


# Runs the script as `python scripts/train.py ...` does, then says which of the modules that build the model, read
# the data and train were imported by the time it stopped.
RUN_AND_LIST_WORK_MODULES = """
import atexit, runpy, sys
WORK_MODULES = ("hf_lossfree_moe.modeling_lossfree_moe", "transformers.trainer", "hf_lossfree_moe.plotting")
atexit.register(lambda: print("work modules:", [name for name in WORK_MODULES if name in sys.modules]))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_until_error(arguments: list[str], **env) -> str:
    """The one `error:` line the script stops with, checked to come before the model, the data or the Trainer."""
    command = [sys.executable, "-c", RUN_AND_LIST_WORK_MODULES, str(SCRIPT), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, env={**SUBPROCESS_ENV, **env}, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Tokenize" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and result.stderr.strip().endswith(error_lines[0]), result.stderr[-3000:]
    assert "work modules: []" in result.stdout  # stopped before any model, data or training work
    return error_lines[0]


def test_missing_file_exits_non_zero_with_the_message(tmp_path):
    error = run_until_error(["--train_file", "missing.txt", "--output_dir", str(tmp_path / "out")])
    assert error == "error: --train_file: no such file: missing.txt"
    assert not (tmp_path / "out").exists()


def test_push_to_hub_offline_stops_at_once(tmp_path):
    error = run_until_error(["--push_to_hub", "--output_dir", str(tmp_path / "out")], HF_HUB_OFFLINE="1")
    assert error.startswith("error: --push_to_hub needs the Hub, but offline mode is on (HF_HUB_OFFLINE is set)")
    assert not (tmp_path / "out").exists()


def test_push_to_hub_without_a_token_stops_at_once(tmp_path):
    no_login = {"HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "", "HF_HUB_OFFLINE": "0"}
    error = run_until_error(["--push_to_hub", "--output_dir", str(tmp_path / "out")], **no_login)
    assert error == (
        "error: --push_to_hub needs a Hub token: log in with `hf auth login`, set HF_TOKEN, or pass --hub_token."
    )


def test_rerunning_into_a_finished_run_asks_for_overwrite(trained):
    output_dir, _ = trained
    before = sorted(os.listdir(output_dir))
    error = run_until_error(["--output_dir", str(output_dir), "--max_steps", "4", *FAST_RUN])
    assert error.startswith(
        f"error: --output_dir {output_dir} already holds a trained model; pass --overwrite_output_dir"
    )
    assert sorted(os.listdir(output_dir)) == before


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
        (["--config_overrides", '{"n_experts": 4}'], r"\['n_experts'\] are not fields of LossFreeMoeConfig"),
        (["--config_overrides", "hidden_size=4"], "--config_overrides must be a JSON object"),
        (["--resume_from_checkpoint", "nowhere"], "no such checkpoint folder: nowhere"),
        (["--model_name_or_path", "."] + ["--config_overrides", "{}"], "with --model_name_or_path only the balancing"),
        (["--export_glm4_moe", "--bias_type", "multiplicative"], r"LossFreeMoeConfig.bias_type must be 'additive'"),
        (["--model_name_or_path", "./no/such/model"], r"--model_name_or_path ./no/such/model: no such folder"),
        (["--tokenizer_name", "outputs/no/tokenizer"], r"--tokenizer_name outputs/no/tokenizer: no such folder"),
        (["--resume_with_new_data"], "--resume_with_new_data only applies with --resume_from_checkpoint"),
        (["--restore_callback_states_from_checkpoint"], "--restore_callback_states_from_checkpoint is not supported"),
    ],
)
def test_bad_arguments_stop_before_training(tmp_path, arguments, message):
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit, match=message) as stopped:
        train_script.main(["--output_dir", str(output_dir), *arguments])
    assert str(stopped.value.code).startswith("error: ") and "\n" not in str(stopped.value.code)
    assert not output_dir.exists()


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        ([], r"--train_file .*empty.jsonl is empty; it needs at least one document"),
        (
            [f"document {i} " * 20 for i in range(10)],
            r"--validation_split_percentage 5 holds out no document of the 10 in --train_file .*ten.jsonl; pass "
            r"--validation_file, or a --validation_split_percentage in \[6, 94\]",
        ),
    ],
    ids=["empty", "ten"],
)
def test_too_little_data_stops_with_the_fix(tmp_path, documents, message):
    path = tmp_path / ("empty.jsonl" if not documents else "ten.jsonl")
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    with pytest.raises(SystemExit, match=message) as stopped:
        train_script.main(["--train_file", str(path), "--output_dir", str(tmp_path / "out")])
    assert str(stopped.value.code).startswith("error: ") and "\n" not in str(stopped.value.code)
    assert not (tmp_path / "out").exists()


def test_invalid_choice_is_refused_with_the_allowed_values(capsys):
    with pytest.raises(SystemExit) as stopped:
        train_script.main(["--bias_update_rule", "cosine"])
    assert stopped.value.code == 2
    assert "error: argument --bias_update_rule/--bias-update-rule: invalid choice: 'cosine'" in capsys.readouterr().err


def test_help_describes_the_script_and_lists_allowed_values(capsys):
    with pytest.raises(SystemExit) as stopped:
        train_script.main(["--help"])
    assert stopped.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.split("\n\n")[1].startswith("Train a LossFreeMoe causal LM")
    for flag, choices in [
        ("load_balancing", "{loss_free,aux_loss,none,expert_choice}"),
        ("bias_update_rule", "{sign,error,quantile,smebu}"),
        ("bias_type", "{additive,multiplicative}"),
        ("scoring_func", "{sigmoid,softmax}"),
    ]:
        assert f"--{flag} {choices}" in help_text


def test_unknown_text_column_stops_before_training(tmp_path, small_csv):
    with pytest.raises(SystemExit, match=r"--text_column_name 'text' is not a column .* \['content'\]"):
        train_script.main(["--train_file", str(small_csv), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_output_dir_with_a_different_model_needs_overwrite(tmp_path, small_csv):
    output_dir = tmp_path / "out"
    # A stopped run's checkpoint. The ids the run gives its tokenizer's special tokens: <|endoftext|> (0) ends
    # documents, <|padding|> (1) pads.
    saved = LossFreeMoeConfig(
        **train_script.TINY_CONFIG, bias_update_rate=0.01, bos_token_id=0, eos_token_id=0, pad_token_id=1
    )
    saved.save_pretrained(output_dir / "checkpoint-3")
    before = sorted(os.listdir(output_dir))
    arguments = ["--train_file", str(small_csv), "--text_column_name", "content", "--output_dir", str(output_dir)]
    with pytest.raises(SystemExit, match=r"holds a different model \(bias_update_rate: 0.01 there, 0.001 now\)"):
        train_script.main(arguments + ["--max_steps", "1"])
    assert sorted(os.listdir(output_dir)) == before


def test_output_dir_without_a_model_needs_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    config = LossFreeMoeConfig(**train_script.TINY_CONFIG)
    with pytest.raises(ValueError, match="is not empty and holds no model; pass --overwrite_output_dir"):
        train_script.check_output_dir(str(tmp_path), config, overwrite=False)
    train_script.check_output_dir(str(tmp_path), config, overwrite=True)


def test_argument_file_is_read_as_a_config_file(tmp_path):
    arguments = {"output_dir": str(tmp_path / "out"), "bias_update_rate": 0.01, "block_size": 128, "max_steps": 7}
    (tmp_path / "args.json").write_text(json.dumps(arguments))
    model_args, data_args, training_args, _ = train_script.parse_arguments([str(tmp_path / "args.json")])
    assert (model_args.bias_update_rate, data_args.block_size, training_args.max_steps) == (0.01, 128, 7)
    assert train_script.build_config(model_args).bias_update_rate == 0.01


def test_a_finished_run_needs_overwrite_and_a_stopped_run_is_judged_by_its_checkpoint(tmp_path):
    config = LossFreeMoeConfig(**train_script.TINY_CONFIG)
    config.save_pretrained(tmp_path / "finished")
    with pytest.raises(ValueError, match="already holds a trained model; pass --overwrite_output_dir"):
        train_script.check_finished_output_dir(str(tmp_path / "finished"), overwrite=False)
    train_script.check_finished_output_dir(str(tmp_path / "finished"), overwrite=True)

    config.save_pretrained(tmp_path / "stopped" / "checkpoint-7")
    train_script.check_output_dir(str(tmp_path / "stopped"), config, overwrite=False)  # the same job, run again
    other = LossFreeMoeConfig(**{**train_script.TINY_CONFIG, "n_routed_experts": 8})
    with pytest.raises(ValueError, match=r"holds a different model \(n_routed_experts: 16 there, 8 now\)"):
        train_script.check_output_dir(str(tmp_path / "stopped"), other, overwrite=False)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", r"args.json is not valid JSON"), ('{"n_experts": 4}', r"keys are not used .*n_experts")],
)
def test_bad_argument_file_stops_before_training(tmp_path, content, message):
    (tmp_path / "args.json").write_text(content)
    with pytest.raises(SystemExit, match=message):
        train_script.main([str(tmp_path / "args.json")])


def routing_outcome(run: Path) -> tuple[list[int], list, dict[str, torch.Tensor]]:
    """The steps and biases of a finished run's routing history, and its final biases."""
    history = json.loads((run / "routing_history.json").read_text())
    weights = load_file(run / "model.safetensors")
    biases = {name: tensor for name, tensor in weights.items() if name.endswith("e_score_correction_bias")}
    return history["steps"], history["biases"], biases


@pytest.mark.parametrize(
    "stage",
    [
        pytest.param("before_balancer_files", marks=pytest.mark.slow),
        pytest.param("after_routing_history", marks=pytest.mark.slow),
        "after_run_record",
        pytest.param("after_trainer_state", marks=pytest.mark.slow),
    ],
)
def test_a_run_killed_while_checkpointing_resumes_to_the_uninterrupted_run(stage, uninterrupted, tmp_path, one_thread):
    """Killed at each stage of writing checkpoint-4 (save_total_limit=1): the newest complete checkpoint survives, an
    incomplete one is refused by name, and resuming ends with the uninterrupted run's biases and routing history."""
    run = tmp_path / "run"
    command = [sys.executable, str(SCRIPT), "--output_dir", str(run), *KILLABLE_RUN]
    environment = {**SUBPROCESS_ENV, FAULT_VARIABLE: f"{stage}@4"}
    killed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    if stage == "after_trainer_state":  # checkpoint-4 was complete before checkpoint-2 was deleted
        assert sorted(os.listdir(run)) == ["checkpoint-4"]
        resume_from = run / "checkpoint-4"
    else:
        assert sorted(os.listdir(run)) == ["checkpoint-2", "checkpoint-4"]
        with pytest.raises(
            SystemExit,
            match=r"checkpoint-4 is incomplete: it lacks trainer_state.json \(its writing was cut off\); the newest "
            r"complete one is checkpoint-2\.",
        ):
            train_script.main(["--resume_from_checkpoint", str(run / "checkpoint-4")])
        resume_from = run / "checkpoint-2"
    train_script.main(["--resume_from_checkpoint", str(resume_from)])

    steps, history, biases = routing_outcome(run)
    expected_steps, expected_history, expected_biases = routing_outcome(uninterrupted)
    assert steps == expected_steps == [0, 2, 4, 6]
    assert history == expected_history
    assert biases.keys() == expected_biases.keys() and len(biases) == 2
    for name, bias in expected_biases.items():
        assert torch.equal(biases[name], bias), name
