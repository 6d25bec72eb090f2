"""MaxVio and the load figures, by hand; the `evaluate` module."""

import math

import evaluate
import pytest
import torch

from hf_lossfree_moe import compute_maxvio
from hf_lossfree_moe.balance_metrics import compute_load_metrics
from hf_lossfree_moe.metrics import MAXVIO_METRIC_PATH


def test_maxvio_by_hand():
    loads = torch.tensor([[3, 1, 2, 2], [2, 2, 2, 2]])
    assert compute_maxvio(loads).per_layer == {0: 0.5, 1: 0.0}
    assert compute_maxvio(loads).mean == 0.25
    assert compute_maxvio(loads[0]).per_layer == {0: 0.5}
    assert compute_maxvio(loads, layers=[3, 5]).metrics("maxvio_batch") == {
        "maxvio_batch": 0.25,
        "maxvio_batch/layer_3": 0.5,
        "maxvio_batch/layer_5": 0.0,
    }
    with pytest.raises(ValueError, match=">= 0"):
        compute_maxvio(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="layers must number each of the 2 rows"):
        compute_maxvio(loads, layers=[1])


def test_maxvio_skips_a_layer_without_tokens_and_says_so():
    """An idle router (a vision expert on text, PEFT's idle copy) must not hide the other layers' metric."""
    result = compute_maxvio(torch.tensor([[0, 0, 0, 0], [6, 0, 2, 0]]), layers=[1, 2])
    assert result.per_layer == {2: 2.0}  # mean load 2, max 6: (6 - 2) / 2
    assert result.skipped == (1,)
    assert result.mean == 2.0
    assert result.metrics("eval_maxvio_global") == {
        "eval_maxvio_global": 2.0,
        "eval_maxvio_global/layer_2": 2.0,
        "eval_maxvio_global/skipped_layers": 1.0,
    }
    nothing = compute_maxvio(torch.zeros(2, 4))
    assert (nothing.mean, nothing.skipped) == (None, (0, 1))
    assert nothing.metrics("maxvio_batch") == {"maxvio_batch/skipped_layers": 2.0}


def test_maxvio_evaluate_module_loads_from_a_local_path():
    metric = evaluate.load(MAXVIO_METRIC_PATH)
    assert metric.compute(loads=[[3, 1, 2, 2], [2, 2, 2, 2]]) == {
        "maxvio": 0.25,
        "maxvio_per_layer": [0.5, 0.0],
        "skipped_layers": [],
    }
    assert metric.compute(loads=[[0, 0], [1, 3]]) == {
        "maxvio": 0.5,
        "maxvio_per_layer": [None, 0.5],
        "skipped_layers": [0],
    }
    with pytest.raises(ValueError, match=">= 0"):
        metric.compute(loads=[[1, -1]])


def test_load_metrics_by_hand():
    metrics = compute_load_metrics(torch.tensor([[4, 0, 2, 2], [0, 0, 0, 0], [2, 2, 2, 2]]), "eval")
    # layer 1 received no token and is left out; layer 0: mean 2, std sqrt(2); layer 2: balanced
    assert metrics == pytest.approx(
        {
            "eval_dead_expert_fraction": (0.25 + 0.0) / 2,
            "eval_load_cv": (math.sqrt(2) / 2 + 0.0) / 2,
            "eval_min_load_ratio": (0.0 + 1.0) / 2,
        }
    )
    assert compute_load_metrics(torch.zeros(2, 4), "eval") == {}
