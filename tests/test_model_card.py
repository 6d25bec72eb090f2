import math
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_lossfree_moe import LossFreeMoeForCausalLM
from hf_lossfree_moe.model_card import (
    DEFAULT_TEMPLATE,
    GLM4_MOE_TEMPLATE,
    DataSource,
    count_active_parameters,
    final_metrics,
    human_count,
    read_template,
    render_model_card,
    sample_prompt,
)


LOG_HISTORY = [
    {"step": 10, "loss": 5.0, "maxvio_batch": 0.5},
    {"step": 20, "train_loss": 4.5, "train_runtime": 12.0},
    {
        "step": 20,
        "eval_loss": math.log(20.0),
        "eval_maxvio_global": 0.0625,
        "eval_maxvio_global/layer_1": 0.05,
        "eval_maxvio_global/layer_2": 0.075,
    },
]


@pytest.fixture
def card(tiny_config):
    config = tiny_config()
    return render_model_card(
        config,
        LossFreeMoeForCausalLM(config).num_parameters(),
        LOG_HISTORY,
        model_name="lossfree-moe-tiny",
        repo_id="someone/lossfree-moe-tiny",
        dataset_description="the embedded corpus",
        eval_split_description="5% of the documents",
        block_size=64,
        tokens_per_step=512,
        learning_rate=2e-3,
        sample_prompt='She said "hi" and',
    )


def test_final_metrics_take_the_last_evaluation_and_perplexity_is_exp_loss():
    metrics = final_metrics(LOG_HISTORY)
    assert metrics["perplexity"] == pytest.approx(20.0)
    assert metrics["maxvio_global"] == 0.0625
    assert metrics["maxvio_global_per_layer"] == {1: 0.05, 2: 0.075}
    assert (metrics["train_loss"], metrics["train_steps"]) == (4.5, 20)


def test_final_metrics_need_an_evaluation_with_maxvio():
    with pytest.raises(ValueError, match="needs an evaluation"):
        final_metrics(LOG_HISTORY[:2])
    with pytest.raises(ValueError, match="no 'eval_maxvio_global'"):
        final_metrics(LOG_HISTORY[:2] + [{"step": 20, "eval_loss": 1.0}])


def test_card_metadata_is_what_the_hub_reads(card):
    data = ModelCard(str(card)).data  # parse the rendered text back, as the Hub does
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert {"mixture-of-experts", "arxiv:2408.15664"} <= set(data.tags)
    metrics = {result.metric_type: result.metric_value for result in data.eval_results}
    assert metrics == {"perplexity": 20.0, "maxvio_global": 0.0625}


def test_card_text_states_the_metrics_settings_and_usage(card):
    text = card.text
    assert "| validation perplexity | 20.00 |" in text
    assert "| MaxVio_global (mean over MoE layers) | 0.0625 |" in text
    assert "| MaxVio_global, layer 1 | 0.0500 |" in text  # decoder layer 1, as in the logs
    assert "| MaxVio_global, layer 2 | 0.0750 |" in text
    assert "| bias update rule | `sign` |" in text
    assert "| bias update rate u | 0.001 |" in text
    assert "| routed experts per MoE layer | 8 (width 32) |" in text
    assert "10.2K training tokens" in text  # 20 steps x 512 tokens
    for plot in ("maxvio_batch.png", "eval_load_heatmap.png", "bias_trajectories.png"):
        assert f"]({plot})" in text
    assert 'AutoModelForCausalLM.from_pretrained("someone/lossfree-moe-tiny", trust_remote_code=True)' in text
    assert (
        "It was tested with transformers 5.24; it requires\n`transformers>=5.24,<6` and refuses other versions" in text
    )
    assert "`hf-lossfree-moe-train --model_name_or_path someone/lossfree-moe-tiny`" in text
    assert "- Data: the embedded corpus\n" in text
    assert "arXiv:2408.15664" in text


def test_card_usage_example_is_valid_python_with_the_prompt(card):
    usage = card.text.split("## Usage")[1].split("```python\n")[1].split("```")[0]
    compile(usage, "usage", "exec")  # the prompt's quotes are escaped
    assert 'inputs = tokenizer("She said \\"hi\\" and", return_tensors="pt")' in usage


def test_sample_prompt_is_the_start_of_the_first_document_with_words():
    assert sample_prompt(["", "  \n", "import os\nimport sys  # two modules", "later"]) == "import os import sys"
    with pytest.raises(ValueError, match="at least one document with a word"):
        sample_prompt(["", " "])


def render_with_sources(tiny_config, data_sources):
    config = tiny_config()
    return render_model_card(
        config,
        LossFreeMoeForCausalLM(config).num_parameters(),
        LOG_HISTORY,
        model_name="m",
        repo_id="m",
        dataset_description="the local file `b.jsonl`",
        eval_split_description="5% of it",
        block_size=64,
        tokens_per_step=512,
        learning_rate=2e-3,
        sample_prompt="a",
        data_sources=data_sources,
    )


def test_card_lists_the_steps_of_each_data_source(tiny_config):
    sources = [DataSource("the embedded corpus", 1, 12), DataSource("the local file `b.jsonl`", 13, 20)]
    text = render_with_sources(tiny_config, sources).text
    assert (
        "- Data, by optimizer step:\n"
        "  - steps 1-12 (12 steps): the embedded corpus\n"
        "  - steps 13-20 (8 steps): the local file `b.jsonl`\n"
        "- 20 optimizer steps"
    ) in text


@pytest.mark.parametrize(
    "bounds", [[(1, 12), (14, 20)], [(1, 12), (12, 20)], [(2, 20)], [(1, 19)], [(1, 12), (13, 21)]]
)
def test_data_sources_must_cover_every_step_once(tiny_config, bounds):
    sources = [DataSource(f"source {index}", first, last) for index, (first, last) in enumerate(bounds)]
    with pytest.raises(ValueError, match="data_sources must cover steps 1 to 20 in order, each step once"):
        render_with_sources(tiny_config, sources)


def test_active_parameters_leave_out_the_unselected_experts(tiny_config):
    config = tiny_config()  # 2 MoE layers, 8 experts of 3 x 64 x 32 weights, top-2
    total = LossFreeMoeForCausalLM(config).num_parameters()
    assert count_active_parameters(config, total) == total - 2 * 6 * 3 * 64 * 32


@pytest.mark.parametrize(("number", "text"), [(999, "999"), (76_543, "76.5K"), (1_234_567, "1.23M"), (2e9, "2B")])
def test_human_count(number, text):
    assert human_count(number) == text


def test_templates_are_the_top_level_model_cards_folder():
    """The library reads its card templates from the repository's model_cards/, mapped onto a package of the wheel."""
    folder = Path(__file__).resolve().parents[1] / "model_cards"
    for name in (DEFAULT_TEMPLATE, GLM4_MOE_TEMPLATE):
        assert read_template(name) == (folder / name).read_text(encoding="utf-8")


def test_rendering_a_card_needs_no_plotting():
    """The card names the plot files; importing it must not import matplotlib and the plotting code."""
    imported = "import sys, hf_lossfree_moe.model_card; print(sorted(sys.modules))"
    modules = subprocess.check_output([sys.executable, "-c", imported], text=True)
    assert "'matplotlib'" not in modules and "'hf_lossfree_moe.plotting'" not in modules
