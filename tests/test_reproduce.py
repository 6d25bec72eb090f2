import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import REPLAY_TINY_SCALE as TINY_SCALE
from hf_lossfree_moe import LossFreeBalancer, compute_maxvio
from hf_lossfree_moe_scripts import reproduce_paper
from hf_lossfree_moe_scripts.reproduce.methods import (
    ABLATIONS,
    MAIN_COMPARISON,
    METHODS,
    methods_of,
    select_comparisons,
)
from hf_lossfree_moe_scripts.reproduce.report import (
    PIPELINE_CHECK_NOTE,
    format_mean_std,
    markdown_report,
    markdown_table,
    mean_std,
    moving_average,
    summarize,
    write_json,
)
from hf_lossfree_moe_scripts.reproduce.runs import (
    Execution,
    RunResult,
    RunSpec,
    Scale,
    build_model,
    final_mean,
    first_step_staying_below,
    measure_held_out,
    peak_after,
    plan_execution,
    run_all,
    spread_indices,
)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_result(method: str, seed: int, perplexity: float, maxvio_global: float, maxvio_batch: float, wall: float):
    return RunResult(
        method=method,
        seed=seed,
        val_loss=math.log(perplexity),
        val_perplexity=perplexity,
        maxvio_global=maxvio_global,
        maxvio_global_per_layer={1: maxvio_global},
        maxvio_global_train=maxvio_global / 2,
        final_maxvio_batch=maxvio_batch,
        maxvio_batch=[maxvio_batch],
        bias_abs_max=[0.0],
        train_loss=[1.0],
        val_loads=[[1, 1]],
        layers=[1],
        router_names=["model.layers.1.mlp.gate"],
        final_biases=[[0.0, 0.0]],
        wall_time_s=wall,
        val_load_metrics={"val_load_cv": maxvio_global / 4, "val_min_load_ratio": 0.5},
    )


@pytest.fixture
def hand_made_results():
    """Three seeds per main method. loss_free: perplexity 10, 11, 12 (mean 11, sample std 1); aux_loss: 9, 9, 12
    (mean 10, std sqrt(3)); none: 20 each (std 0)."""
    return [
        run_result("loss_free", 0, 10.0, 0.1, 0.5, 100.0),
        run_result("loss_free", 1, 11.0, 0.2, 0.5, 110.0),
        run_result("loss_free", 2, 12.0, 0.3, 0.5, 120.0),
        run_result("aux_loss", 0, 9.0, 0.7, 1.0, 90.0),
        run_result("aux_loss", 1, 9.0, 0.7, 1.0, 90.0),
        run_result("aux_loss", 2, 12.0, 1.0, 1.0, 120.0),
        run_result("none", 0, 20.0, 3.0, 4.0, 80.0),
        run_result("none", 1, 20.0, 3.0, 4.0, 80.0),
        run_result("none", 2, 20.0, 3.0, 4.0, 80.0),
    ]


def test_summary_is_mean_and_sample_std_over_seeds(hand_made_results):
    summary = summarize(hand_made_results)
    assert list(summary) == ["loss_free", "aux_loss", "none"]
    assert summary["loss_free"]["val_perplexity"] == {"mean": 11.0, "std": 1.0, "n": 3, "runs": 3}
    assert summary["loss_free"]["maxvio_global"]["mean"] == pytest.approx(0.2)
    assert summary["loss_free"]["maxvio_global"]["std"] == pytest.approx(0.1)
    assert summary["aux_loss"]["val_perplexity"]["std"] == pytest.approx(math.sqrt(3))
    assert summary["none"]["wall_time_s"] == {"mean": 80.0, "std": 0.0, "n": 3, "runs": 3}
    # a one-step MaxVio_batch of 0.5 is never below 0.5; a run that never balances has no step to average
    assert summary["none"]["steps_to_balance"] == {"mean": None, "std": None, "n": 0, "runs": 3}


def test_markdown_table_rows_in_the_papers_format(hand_made_results):
    table = markdown_table(MAIN_COMPARISON, summarize(hand_made_results)).splitlines()
    assert table[0] == (
        "| Method | Validation perplexity | MaxVio_global | MaxVio_global, training blocks | MaxVio_batch (final) "
        "| MaxVio_batch, peak after step 50 | Steps until MaxVio_batch stays < 0.5 | Load CV, validation "
        "| Min / mean load, validation | Wall time (s) | Paper, 1B: perplexity / MaxVio_global |"
    )
    assert table[2:] == [
        "| Loss-Controlled (aux loss, α=1e-3) | 10.00 ± 1.73 | 0.800 ± 0.173 | 0.400 ± 0.087 | 1.000 ± 0.000 "
        "| 1.00 ± 0.00 | never | 0.200 ± 0.043 | 0.50 ± 0.00 | 100 ± 17 | 9.56 / 0.72 |",
        "| Loss-Free (u=1e-3, sign) | 11.00 ± 1.00 | 0.200 ± 0.100 | 0.100 ± 0.050 | 0.500 ± 0.000 | 0.50 ± 0.00 "
        "| never | 0.050 ± 0.025 | 0.50 ± 0.00 | 110 ± 10 | 9.50 / 0.04 |",
        "| No balancing | 20.00 ± 0.00 | 3.000 ± 0.000 | 1.500 ± 0.000 | 4.000 ± 0.000 | 4.00 ± 0.00 | never "
        "| 0.750 ± 0.000 | 0.50 ± 0.00 | 80 ± 0 | — |",
    ]


def test_one_seed_is_reported_without_a_spread(hand_made_results):
    one_seed = [result for result in hand_made_results if result.seed == 0]
    report = markdown_report([MAIN_COMPARISON], summarize(one_seed), {"seeds": [0]})
    assert "| Loss-Free (u=1e-3, sign) | 10.00 | 0.100 | 0.050 | 0.500 | 0.50 | never | 0.025 | 0.50 | 100 |" in report
    assert "- seeds: [0]" in report
    assert "over 1 seed(s)" in report


def test_only_a_pipeline_check_page_says_it_is_no_result(hand_made_results):
    summary = summarize(hand_made_results)
    assert "pipeline check" not in markdown_report([MAIN_COMPARISON], summary, {"seeds": [0, 1, 2]})
    quick = markdown_report([MAIN_COMPARISON], summary, {"seeds": [0, 1, 2]}, pipeline_check=True)
    assert quick.splitlines()[:3] == [
        "# Auxiliary-loss-free load balancing: small-scale replay",
        "",
        PIPELINE_CHECK_NOTE,
    ]


def test_json_holds_every_run_and_the_summary(hand_made_results, tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"seeds": [0, 1, 2]}, TINY_SCALE, hand_made_results, summarize(hand_made_results))
    payload = json.loads(path.read_text())
    assert payload["pipeline_check"] is False
    assert payload["settings"] == {"seeds": [0, 1, 2]}
    assert payload["scale"]["n_routed_experts"] == 8
    assert payload["summary"]["loss_free"]["val_perplexity"] == {"mean": 11.0, "std": 1.0, "n": 3, "runs": 3}
    assert [(run["method"], run["seed"]) for run in payload["runs"]][:3] == [("loss_free", s) for s in (0, 1, 2)]
    assert [run["val_perplexity"] for run in payload["runs"] if run["method"] == "aux_loss"] == [9.0, 9.0, 12.0]


def test_final_maxvio_batch_averages_the_last_five_percent_of_steps():
    assert final_mean(list(range(100))) == pytest.approx((95 + 96 + 97 + 98 + 99) / 5)
    assert final_mean([4.0, 2.0]) == 2.0


def test_saved_runs_are_read_back_instead_of_trained(tmp_path):
    saved = run_result("loss_free", 1, 10.0, 0.1, 0.5, 100.0)
    (tmp_path / "loss_free_seed1.json").write_text(json.dumps(asdict(saved)))
    spec = RunSpec(METHODS["loss_free"], 1, TINY_SCALE, blocks=None, vocab_size=128, runs_dir=str(tmp_path))
    assert spec.saved_result == tmp_path / "loss_free_seed1.json"
    assert run_all([spec], Execution()) == [saved]  # blocks=None: training it would fail


def test_collapse_figures_of_a_maxvio_batch_curve():
    curve = [7.0] * 30 + [0.8] * 30 + [0.4, 0.6] + [0.3] * 10  # 72 steps
    assert peak_after(curve, 50) == 0.8
    assert peak_after(curve[:40], 50) == 7.0  # a run shorter than the collapse phase: its whole curve
    assert first_step_staying_below(curve, 0.5) == 63  # the 0.4 at step 61 does not last
    assert first_step_staying_below(curve[:62], 0.5) is None


def test_a_metric_missing_in_some_runs_is_averaged_over_the_others():
    stats = mean_std([100, None, 200])
    assert stats == {"mean": 150.0, "std": pytest.approx(math.sqrt(5000)), "n": 2, "runs": 3}
    assert format_mean_std(stats, 0) == "150 ± 71 (2 of 3 runs)"
    assert format_mean_std(mean_std([None]), 0, "never") == "never"


def test_training_blocks_for_balance_are_spread_over_the_split():
    assert spread_indices(10, 5) == [0, 2, 4, 6, 8]
    assert spread_indices(10, 3) == [0, 3, 6]
    assert spread_indices(4, 9) == [0, 1, 2, 3]


def test_curves_are_smoothed_by_a_trailing_mean():
    assert moving_average([1.0, 2.0, 3.0, 6.0], window=2) == [1.0, 1.5, 2.5, 4.5]


def test_maxvio_global_counts_every_validation_token_apart_from_training(tiny_config):
    """Biases of +10 force every token to experts 0 and 1 (scores are in (0, 1)): each MoE layer's loads are
    [N, N, 0, ..., 0] for N validation tokens, so MaxVio = (N - 2N/8) / (2N/8) = 3."""
    model = build_model(METHODS["loss_free"], TINY_SCALE, vocab_size=128, seed=0)
    balancer = LossFreeBalancer(model)
    for router in balancer.routers:
        router.e_score_correction_bias[:2] = 10.0
    blocks = torch.randint(0, 128, (7, 16))  # 112 tokens in batches of 3, 3 and 1
    _, loads = measure_held_out(model, balancer, blocks, batch_size=3)
    expected = torch.zeros(2, 8, dtype=torch.int64)
    expected[:, :2] = 112
    assert torch.equal(loads, expected)
    assert balancer.loads.sum() == 0  # training loads untouched: the next step() sees none of these tokens
    assert list(compute_maxvio(loads).per_layer.values()) == [3.0, 3.0]


def test_validation_loss_leaves_out_the_balance_loss():
    """An aux-loss model's `loss` includes alpha * aux_loss; `measure_held_out` reports the language-model loss alone, which is
    that of the same weights without a balance loss (same seed, same weights for every method)."""
    aux_model = build_model(METHODS["aux_loss"], TINY_SCALE, vocab_size=128, seed=3)
    plain_model = build_model(METHODS["none"], TINY_SCALE, vocab_size=128, seed=3).eval()
    blocks = torch.randint(0, 128, (5, 16))
    balancer = LossFreeBalancer(aux_model)
    loss, _ = measure_held_out(aux_model, balancer, blocks, batch_size=2)
    with torch.no_grad():
        lm_loss = plain_model(input_ids=blocks, labels=blocks).loss.item()
        with_balance = aux_model(input_ids=blocks, labels=blocks).loss.item()
    assert loss == pytest.approx(lm_loss, rel=1e-5)
    assert with_balance > lm_loss + 1e-4


def test_every_method_starts_from_the_same_weights_for_a_seed():
    reference = dict(build_model(METHODS["loss_free"], TINY_SCALE, 128, seed=1).named_parameters())
    for name in ("aux_loss", "none", "loss_free_error", "softmax_loss_free", "loss_free_seq_aux"):
        parameters = dict(build_model(METHODS[name], TINY_SCALE, 128, seed=1).named_parameters())
        assert all(torch.equal(parameters[key], value) for key, value in reference.items()), name
    other_seed = dict(build_model(METHODS["loss_free"], TINY_SCALE, 128, seed=2).named_parameters())
    assert not torch.equal(other_seed["lm_head.weight"], reference["lm_head.weight"])


def test_ablation_selection():
    comparisons = select_comparisons(["all"])
    assert [c.name for c in comparisons] == ["main", *ABLATIONS]
    names = [method.name for method in methods_of(comparisons)]
    assert len(names) == len(set(names))
    # "all" reaches every method but the one kept for single trials (docs/balancing_rules.md, settings chosen)
    assert set(names) == set(METHODS) - {"loss_free_quantile_no_ema"}
    assert [c.name for c in select_comparisons(["rule", "rule"])] == ["main", "rule"]
    assert [c.name for c in select_comparisons(["softmax,rule"])] == ["main", "softmax", "rule"]
    assert [c.name for c in select_comparisons([])] == ["main"]
    assert [c.name for c in select_comparisons(["rules"], include_main=False)] == ["rules"]
    with pytest.raises(ValueError, match="--skip_main needs at least one comparison"):
        select_comparisons([], include_main=False)
    with pytest.raises(ValueError, match="--ablations must be 'all' or names among"):
        select_comparisons(["learning_rate"])


def test_bad_scale_and_workers_raise():
    with pytest.raises(ValueError, match="--max_steps must be > 0"):
        Scale(max_steps=0)
    with pytest.raises(ValueError, match="--learning_rate must be a finite number"):
        Scale(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="--batch_size must be an integer"):
        Scale(batch_size=2.5)
    with pytest.raises(ValueError, match="--workers must be an integer >= 1"):
        plan_execution(3, "cpu", workers=0)
    with pytest.raises(ValueError, match="--device must be one of"):
        plan_execution(3, "tpu")
    if torch.cuda.is_available():
        assert plan_execution(9, "cuda") == Execution("cuda", 1, None, False)
    else:
        with pytest.raises(ValueError, match="--device cuda needs a CUDA GPU"):
            plan_execution(9, "cuda")
    assert plan_execution(1, "cpu").workers == 1
    assert plan_execution(1, "cpu").threads is None  # runs in this process leave torch's threads alone


def check_outputs(output_dir: Path, steps: int, comparisons: list[str]):
    results = json.loads((output_dir / "results.json").read_text())
    runs = {run["method"]: run for run in results["runs"]}
    methods = methods_of(select_comparisons([name for name in comparisons if name != "main"]))
    assert list(runs) == [method.name for method in methods]
    for method in methods:
        run = runs[method.name]
        assert len(run["maxvio_batch"]) == steps
        # Rows and per-layer values are numbered by decoder layer, as in the logs: layer 0 is dense.
        moe_layers = list(range(1, len(run["val_loads"]) + 1))
        assert run["layers"] == moe_layers
        assert [int(layer) for layer in run["maxvio_global_per_layer"]] == moe_layers
        assert math.isfinite(run["val_perplexity"]) and run["val_perplexity"] > 1
        assert run["maxvio_global"] >= 0 and run["maxvio_global_train"] >= 0
        neutral = 1.0 if method.config.get("bias_type") == "multiplicative" else 0.0
        moved = max(abs(b - neutral) for row in run["final_biases"] for b in row)
        if method.config["load_balancing"] != "loss_free":
            assert moved == 0, method.name  # aux-loss and unbalanced models are only measured
        elif method.config.get("bias_update_rule", "sign") == "sign":
            # The sign rule moves each bias by -u, 0 or +u per step: a multiple of u, at most `steps` of them.
            rate = method.config.get("bias_update_rate", 1e-3)
            units = [(b - neutral) / rate for row in run["final_biases"] for b in row]
            assert all(abs(unit - round(unit)) < 1e-3 for unit in units), method.name
            assert 0 < moved <= steps * rate + 1e-6, method.name  # fp32 biases
        else:
            assert moved > 0, method.name
    report = (output_dir / "results.md").read_text()
    for method in methods:
        assert f"| {method.label} |" in report
    # Every run here is --quick: its page and JSON say first that the numbers are no result.
    assert report.splitlines()[2].startswith("**A pipeline check, not a result.**")
    assert results["pipeline_check"] is True
    pngs = [f"maxvio_batch_{name}.png" for name in comparisons] + [f"expert_loads_{m.name}.png" for m in methods]
    pngs.append("maxvio_by_batch_size.png")
    if any(method.config["load_balancing"] == "expert_choice" for method in methods):
        pngs.append("training_loss_expert_choice.png")
        assert "## Expert Choice: what the leak is worth (RQ4)" in report
    assert "## MaxVio over computation batches of growing size (RQ3)" in report
    for png in pngs:
        assert (output_dir / png).read_bytes()[:8] == PNG_MAGIC


def test_cut_down_replay_of_every_ablation_writes_tables_json_and_plots(tmp_path, one_thread):
    rng = random.Random(0)
    words = "router expert token bias load balance layer score gate update sign mean step".split()
    paragraphs = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(60)]
    train_file = tmp_path / "corpus.txt"
    train_file.write_text("\n\n".join(paragraphs))
    output_dir = tmp_path / "results"
    reproduce_paper.main(
        [
            "--quick",
            "--train_file",
            str(train_file),
            "--validation_split_percentage",
            "20",
            "--vocab_size",
            "300",
            "--block_size",
            "16",
            "--max_steps",
            "4",
            "--ablations",
            "all",
            "--workers",
            "1",
            "--output_dir",
            str(output_dir),
        ]
    )
    check_outputs(output_dir, steps=4, comparisons=["main", *ABLATIONS])


def test_quick_replay_end_to_end(tmp_path):
    """The documented smoke test, on the embedded corpus, with the default worker processes (about 40 s on 2 busy
    cores)."""
    reproduce_paper.main(["--quick", "--output_dir", str(tmp_path)])
    check_outputs(tmp_path, steps=40, comparisons=["main"])
