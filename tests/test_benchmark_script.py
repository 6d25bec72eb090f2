"""scripts/benchmark.py: a quick run writes a complete report; ratios and bad inputs behave. No timing is asserted."""

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_lossfree_moe_scripts import benchmark as benchmark_script


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
# One intra-op thread: spinning threads stall on a shared machine, and the quick shape gains nothing from more.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RESULT_KEYS = {
    "family",
    "parameters",
    "train_step_ms",
    "forward_ms",
    "decode_tokens_per_s",
    "train_step_peak_mb",
    "train_step_samples_ms",
    "forward_samples_ms",
    "decode_samples_ms",
    *(
        f"{metric}_vs_{reference}{suffix}"
        for metric in ("train_step_ms", "forward_ms", "decode_tokens_per_s")
        for reference in ("glm4_moe_best", "dense")
        for suffix in ("", "_range")
    ),
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The script as a user runs it, in --quick mode."""
    output = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--output_json", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text()), result.stdout


def test_quick_run_reports_every_contender(quick_run):
    report, _ = quick_run
    assert set(report) == {"config", "environment", "results", "balancing"}
    assert set(report["results"]) == {
        "LossFreeMoe sorted_mm",
        "LossFreeMoe grouped_mm",
        "LossFreeMoe eager",
        "LossFreeMoe sorted_mm, no balancing",
        "Glm4Moe grouped_mm",
        "Glm4Moe eager",
        "Llama dense twin (FFN 96)",
    }
    for name, result in report["results"].items():
        assert set(result) == RESULT_KEYS, name
        for key in ("train_step_ms", "forward_ms", "decode_tokens_per_s"):
            assert math.isfinite(result[key]) and result[key] > 0, (name, key)
        for key in ("train_step_samples_ms", "forward_samples_ms", "decode_samples_ms"):
            assert len(result[key]) == report["config"]["rounds"], (name, key)
        assert result["train_step_peak_mb"] is None or result["train_step_peak_mb"] >= 0


def test_without_output_json_only_the_table_is_printed(quick_run, tmp_path, monkeypatch, capsys):
    report, _ = quick_run
    monkeypatch.setattr(benchmark_script, "run", lambda args: report)  # the timing itself is the quick run's
    monkeypatch.chdir(tmp_path)
    benchmark_script.main(["--quick"])
    assert "LossFreeMoe sorted_mm" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # nothing written into the working folder


def test_quick_run_uses_the_same_shape_for_every_moe(quick_run):
    report, _ = quick_run
    params = {name: r["parameters"] for name, r in report["results"].items()}
    # LossFreeMoe and Glm4Moe hold the same embeddings, attention, routers and experts; the dense twin only the
    # active width.
    assert len({params[name] for name in params if "Llama" not in name}) == 1
    assert params["Llama dense twin (FFN 96)"] < params["Glm4Moe grouped_mm"]


def test_quick_run_ratios_refer_to_glm4_moe_best_and_dense(quick_run):
    results = quick_run[0]["results"]
    glm = [r for r in results.values() if r["family"] == "glm4_moe"]
    assert min(r["train_step_ms_vs_glm4_moe_best"] for r in glm) == pytest.approx(1.0)
    assert max(r["decode_tokens_per_s_vs_glm4_moe_best"] for r in glm) == pytest.approx(1.0)
    assert results["Llama dense twin (FFN 96)"]["forward_ms_vs_dense"] == pytest.approx(1.0)


def test_quick_run_balancing_section_and_table(quick_run):
    report, stdout = quick_run
    balancing = report["balancing"]
    assert balancing["balancer_step_layers"] == 27 and balancing["balancer_step_experts"] == 64
    assert balancing["balancer_step_ms"] > 0 and math.isfinite(balancing["overhead_pct"])
    step_ms = report["results"]["LossFreeMoe sorted_mm"]["train_step_ms"]
    assert 0 < balancing["work_ms"] < step_ms and 0 < balancing["work_pct"] < 100
    assert balancing["work_pct"] == pytest.approx(100 * balancing["work_ms"] / step_ms)
    assert report["environment"]["cpu_threads"] == 1
    for name in report["results"]:
        assert name in stdout
    assert "balancer.step() on 64 experts x 27 layers" in stdout


def test_balancing_work_times_the_hooks_around_the_balancers_and_nothing_before():
    """Two routers. A 20 ms sleep in each router's forward hooks, after the balancer's, falls inside the timed span:
    at least 40 ms per step. A 100 ms sleep in each router's forward pre-hook runs before any forward hook, outside
    it: were it counted, a step would show at least 200 ms."""
    args = benchmark_script.BenchmarkArguments(quick=True)
    contender = benchmark_script.build_contenders(args)[0]
    for router in contender.balancer.routers:
        router.register_forward_hook(lambda *_: time.sleep(0.02))
        router.register_forward_pre_hook(lambda *_: time.sleep(0.1))
    input_ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))
    work_s = benchmark_script.balancing_work_s(contender, input_ids, args)
    assert len(contender.balancer.routers) == 2
    assert 0.04 <= work_s < 0.2
    # The marker hooks are gone; the balancer's (and the sleeps) remain.
    assert [len(router._forward_hooks) for router in contender.balancer.routers] == [2, 2]
    assert len(contender.model._forward_pre_hooks) == 1 and len(contender.model._forward_hooks) == 1


def test_ratios_are_medians_of_per_round_ratios():
    """Three rounds. Round 2 ran while the machine was busy: every contender took about twice as long.

    ours / glm fast per round: 90/100, 180/200, 95/100 -> 0.90, 0.90, 0.95: median 0.90 (the ratio of the two
    medians, 95/100, would say 0.95). ours / dense: 1.5, 1.5, 95/60. Forward: the best Glm4Moe median is "glm slow"
    (20 ms): 30/20, 60/40, 33/20 -> median 1.5 (medians: 33/20 = 1.65). Decode rates compare reference time / time:
    glm fast 10/5, 20/10, 10/4 -> median 2.0 (medians: 10/5 = 2.0 too, but the range reaches 2.5).
    """

    def row(family, train, forward, decode_ms):
        return {
            "family": family,
            "train_step_ms": statistics.median(train),
            "train_step_samples_ms": train,
            "forward_ms": statistics.median(forward),
            "forward_samples_ms": forward,
            "decode_tokens_per_s": 1e3 / statistics.median(decode_ms),
            "decode_samples_ms": decode_ms,
        }

    results = {
        "ours": row("ours", [90.0, 180.0, 95.0], [30.0, 60.0, 33.0], [5.0, 10.0, 4.0]),
        "glm fast": row("glm4_moe", [100.0, 200.0, 100.0], [40.0, 80.0, 40.0], [10.0, 20.0, 10.0]),
        "glm slow": row("glm4_moe", [200.0, 400.0, 200.0], [20.0, 40.0, 20.0], [20.0, 40.0, 20.0]),
        "dense": row("dense", [60.0, 120.0, 60.0], [15.0, 30.0, 15.0], [2.5, 5.0, 2.5]),
    }
    benchmark_script.add_ratios(results)
    ours = results["ours"]
    assert ours["train_step_ms_vs_glm4_moe_best"] == pytest.approx(0.9)
    assert ours["train_step_ms_vs_glm4_moe_best_range"] == pytest.approx([0.9, 0.95])
    assert ours["train_step_ms_vs_dense"] == pytest.approx(1.5)
    assert ours["train_step_ms_vs_dense_range"] == pytest.approx([1.5, 95 / 60])
    assert ours["forward_ms_vs_glm4_moe_best"] == pytest.approx(1.5)
    assert ours["forward_ms_vs_glm4_moe_best_range"] == pytest.approx([1.5, 1.65])
    assert ours["decode_tokens_per_s_vs_glm4_moe_best"] == pytest.approx(2.0)
    assert ours["decode_tokens_per_s_vs_glm4_moe_best_range"] == pytest.approx([2.0, 2.5])
    assert ours["decode_tokens_per_s_vs_dense"] == pytest.approx(0.5)
    assert results["glm fast"]["train_step_ms_vs_glm4_moe_best_range"] == pytest.approx([1.0, 1.0])


def test_ratios_without_a_reference_are_none():
    results = {
        "ours": {
            "family": "ours",
            **{metric: 1.0 for metric in benchmark_script.METRICS},
            **{samples: [1.0] for samples, _ in benchmark_script.METRICS.values()},
        }
    }
    benchmark_script.add_ratios(results)
    for metric in benchmark_script.METRICS:
        for reference in ("glm4_moe_best", "dense"):
            assert results["ours"][f"{metric}_vs_{reference}"] is None
            assert results["ours"][f"{metric}_vs_{reference}_range"] is None


def test_balancing_overhead_is_the_median_of_paired_rounds():
    # A load spike in one round (2.0 vs 1.0) moves neither the pairing nor the median: rounds give +2%, +10%, +100%.
    assert benchmark_script.paired_overhead_pct([1.02, 2.2, 2.0], [1.0, 2.0, 1.0]) == pytest.approx(10.0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "tpu"], "device must be one of"),
        (["--dtype", "float16"], "dtype must be one of"),
        (["--implementations", "sorted_mm,no_such_kernel"], "implementations must be a comma-separated subset"),
        (["--glm_implementations", ""], "glm_implementations must be a comma-separated subset"),
        (["--rounds", "0"], "rounds must be >= 1"),
        (["--warmup", "-1"], "warmup must be >= 0"),
        (["--threads", "0"], "threads must be >= 1"),
    ],
)
def test_bad_arguments_raise(flags, message):
    with pytest.raises(ValueError, match=message):
        benchmark_script.main(flags)
