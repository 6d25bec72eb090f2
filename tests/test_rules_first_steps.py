import pytest

from hf_lossfree_moe_scripts.rules_first_steps import run_figures


def test_run_figures_by_hand():
    # 50 collapsed steps, then 0.5, 1.5, 0.2, 2.0, 0.1: two steps above 1.0 after step 50, the last at step 54; the
    # final MaxVio_batch averages the last round(55 * 0.05) = 3 steps
    curve = [7.0] * 50 + [0.5, 1.5, 0.2, 2.0, 0.1]
    figures = run_figures(curve)
    assert figures["peak_after_50"] == 2.0
    assert figures["steps_above_1_after_50"] == 2
    assert figures["last_step_above_1"] == 54
    assert figures["final_maxvio_batch"] == pytest.approx((0.2 + 2.0 + 0.1) / 3)
