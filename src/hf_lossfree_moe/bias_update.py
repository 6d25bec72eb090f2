"""The per-step bias update: the step's counts summed over ranks, the rule and its schedule, and what a step reports.

The rules themselves are pure functions in update_rules.py; this module holds what they need between steps (the
count of updates the schedule reads, the SMEBU momentum) and turns one step's global loads into fp64 updates of the
layers that may move. Counts are int64 until here, so they are finite, and a layer that counted no token is left
out. A layer whose router scored a NaN or an infinity during the step (on any rank) is left out too, with a warning:
its routing, its counts and Quantile Balancing's candidates came from garbage. Any update or momentum that still
comes out non-finite is dropped the same way, so nothing non-finite reaches a bias or the state between steps.
"""

import warnings
from collections.abc import Callable

import torch

from .balance_metrics import compute_layer_spread_metrics, compute_load_metrics, compute_maxvio
from .bias_storage import NEUTRAL_BIAS
from .settings import BalancingSettings
from .update_rules import histogram_margin_quantiles, quantile_weight, rule_update


class BiasUpdate:
    """The update rule of `settings` with the state it carries between steps.

    Attributes:
        completed_steps: Updates so far (steps of the run, counted or not); the schedule's n is the next one.
        momentum_state: (routers, experts) fp64 momentum of the `"smebu"` rule.
    """

    def __init__(self, settings: BalancingSettings, num_routers: int, num_experts: int):
        self.settings = settings
        self.completed_steps = 0
        self.momentum_state = torch.zeros(num_routers, num_experts, dtype=torch.float64)

    def next_factor(self, updates_biases: bool) -> float:
        """Count one more step and return its schedule factor; 0 when the balancer only measures."""
        self.completed_steps += 1
        if not updates_biases:
            return 0.0
        return self.settings.schedule.factor(self.completed_steps, self.settings.total_steps)

    def deltas(
        self,
        loads: torch.Tensor,
        biases: torch.Tensor,
        factor: float,
        movable: torch.Tensor,
        candidates: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, E) fp64 update of the `movable` layers (an (routers,) mask), each of which received tokens, and (L,)
        whether each update is finite; a layer whose update or momentum is not keeps its momentum.

        `loads`, `biases` and `candidates` hold the rows of those layers. The schedule's factor multiplies u (for
        `"quantile"`, the EMA weight of this update, annealed with `bias_quantile_anneal_steps`); `center=True` then
        subtracts the mean of each layer's update.
        """
        settings = self.settings
        if settings.bias_update_rule == "quantile":
            rate = quantile_weight(
                self.completed_steps, settings.bias_quantile_ema, settings.bias_quantile_anneal_steps
            )
        else:
            rate = settings.bias_update_rate
        state = self.momentum_state[movable]
        delta = rule_update(
            settings.bias_update_rule,
            loads,
            biases,
            factor * rate,
            momentum_state=state,
            momentum=settings.bias_update_momentum,
            candidates=None if candidates is None else candidates[movable],
        )
        if settings.center:
            delta = delta - delta.mean(dim=-1, keepdim=True)
        finite = torch.isfinite(delta).all(dim=-1) & torch.isfinite(state).all(dim=-1)  # (L,)
        rows = movable.nonzero().flatten()
        self.momentum_state[rows[finite]] = state[finite]
        return delta, finite

    def state_dict(self) -> dict:
        return {"completed_steps": self.completed_steps, "momentum": self.momentum_state.tolist()}

    def load_state_dict(self, state: dict):
        momentum = torch.tensor(state["momentum"], dtype=torch.float64)
        if momentum.shape != self.momentum_state.shape:
            raise ValueError(
                f"state['momentum'] must have shape {tuple(self.momentum_state.shape)} (routers, experts), got "
                f"{tuple(momentum.shape)}: the state comes from another model."
            )
        self.momentum_state.copy_(momentum)
        self.completed_steps = int(state["completed_steps"])


def sum_over_ranks(
    loads: torch.Tensor,
    non_finite: torch.Tensor,
    quantile: torch.Tensor | None,
    all_reduce: Callable[[torch.Tensor], None],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The step's global (L, E) int64 loads on the CPU, Quantile Balancing's statistics summed over ranks (None
    without them) and which (L,) layers saw non-finite scores on some rank, from this rank's loads, its (L, 1)
    numbers of non-finite calls and its (L, columns) fp64 Quantile Balancing statistics (`StepCounts.quantile`).

    One collective: loads and non-finite calls travel together, with Quantile Balancing's statistics too, in fp64
    (exact for counts below 2**53; a NaN candidate sum stays in its own column).
    """
    num_experts = loads.size(-1)
    if quantile is None:
        gathered = torch.cat([loads, non_finite], dim=-1)  # (L, E + 1) int64
        all_reduce(gathered)
        gathered = gathered.cpu()
        return gathered[:, :num_experts], None, gathered[:, -1] > 0
    gathered = torch.cat([loads.double(), non_finite.double(), quantile], dim=-1)  # (L, E + 1 + columns)
    all_reduce(gathered)
    gathered = gathered.cpu()
    loads = gathered[:, :num_experts].round().long()
    return loads, gathered[:, num_experts + 1 :], gathered[:, num_experts] > 0


def mean_candidates(summed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`"call_mean"`: the (L, E) fp64 mean candidates over the step's router calls and ranks, and (L,) which layers
    had a call with a candidate, from the summed `(sums, calls)` columns."""
    sums, calls = summed[:, :-1], summed[:, -1:]
    return sums / calls.clamp(min=1), calls.squeeze(-1) > 0


def histogram_thresholds(
    summed: torch.Tensor, num_experts: int, value_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`"global_histogram"`: `histogram_margin_quantiles` of the summed (L, E * (bins + 2) + 1) statistics: (L, E)
    margins (the candidate is the bias minus them), (L,) which layers have one and which lay beyond the range."""
    histograms = summed[:, :-1].reshape(summed.size(0), num_experts, -1)  # (L, E, bins + 2), exact integers in fp64
    return histogram_margin_quantiles(histograms, summed[:, -1], value_range)


def load_statistics(loads: torch.Tensor, layers: list[int], factor: float) -> dict[str, float]:
    """`maxvio_batch` (+ per layer), the `batch_*` load figures, the spread over layers and the schedule's
    `bias_update_factor`."""
    stats = compute_maxvio(loads, layers).metrics("maxvio_batch")
    stats.update(compute_load_metrics(loads, "batch"))
    stats.update(compute_layer_spread_metrics(loads, "batch", "maxvio_batch", layers))
    stats["bias_update_factor"] = factor
    return stats


def bias_statistics(biases: torch.Tensor, bias_type: str, updated: bool) -> dict[str, float]:
    """`bias_abs_max` and `bias_abs_mean` (distance from the neutral bias, 0 or 1) and `bias_updated` (1.0 or 0.0)."""
    distance = (biases - NEUTRAL_BIAS[bias_type]).abs()  # (L, E)
    return {
        "bias_abs_max": distance.max().item(),
        "bias_abs_mean": distance.mean().item(),
        "bias_updated": float(updated),
    }


def warn_non_finite(step: int, layers: list[int], stacklevel: int = 2):
    """Say which layers kept their bias at optimizer step `step` because of non-finite scores or updates."""
    warnings.warn(
        f"LossFreeBalancer.step() {step}: the router scores of layer(s) {', '.join(map(str, layers))} held NaN or "
        "infinite values (check the inputs and activations of this step), so their biases, and their momentum, were "
        "left as they were for this step.",
        stacklevel=stacklevel + 1,
    )


def warn_beyond_histogram_range(step: int, layers: list[int], value_range: float, stacklevel: int = 2):
    """Say which layers' global quantile lay beyond the histogram's range, so their candidate moved by the range."""
    warnings.warn(
        f"LossFreeBalancer.step() {step}: the quantile of some experts of layer(s) {', '.join(map(str, layers))} lay "
        f"more than bias_quantile_histogram_range={value_range:g} from their bias, so their candidate moved by that "
        "range only; a wider range (or more steps) reaches it.",
        stacklevel=stacklevel + 1,
    )


def warn_nothing_counted(attached: bool, ran_in_eval_mode: bool, stacklevel: int = 2):
    """Say that a step counted no token, and the likely reason."""
    reason = (
        "this balancer is detached: `remove()` was called or a newer balancer took over the routers."
        if not attached
        else "the model ran in eval mode, whose forwards never count toward the biases: call model.train() "
        "before training (from_pretrained returns a model in eval mode)."
        if ran_in_eval_mode
        else "counting needs training-mode forwards of the model the balancer is attached to."
    )
    warnings.warn(
        f"LossFreeBalancer.step(): no token was counted since the last step, so no bias moved; {reason}",
        stacklevel=stacklevel + 1,
    )


__all__ = [
    "BiasUpdate",
    "bias_statistics",
    "histogram_thresholds",
    "load_statistics",
    "mean_candidates",
    "sum_over_ranks",
    "warn_beyond_histogram_range",
    "warn_non_finite",
    "warn_nothing_counted",
]
