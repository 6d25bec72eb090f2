"""Bias update rules and update-rate schedules of `LossFreeBalancer`.

A rule turns the statistics of one optimizer step into an update of every layer's bias; `LossFreeBalancer` collects
those statistics, sums them over data-parallel ranks and applies the update in place, in fp32. Every rule needs the
per-expert token counts; Quantile Balancing (`"quantile"`) also needs one candidate bias per router call, computed from
the router's scores there and then, so that no score matrix outlives its forward.

- `"sign"`: `b += u * sign(mean(c) - c)` (Algorithm 1 of Wang et al., 2024).
- `"error"`: `b += u * (mean(c) - c) / mean(c)` (the paper's ablation).
- `"smebu"`: the normalised deviation `d = (mean(c) - c) / mean(c)` is soft-clamped, `tanh(d)`, smoothed with
  momentum, `m = mu * m + (1 - mu) * tanh(d)`, and taken as a mean-centred step, `b += u * (m - mean(m))`
  (after SMEBU, arXiv 2602.17004).
- `"quantile"`: Quantile Balancing (Megatron-LM's `quantile_balancing`). No step size: per router call each token's
  cutoff `alpha_t` is its (K+1)-th largest biased score `s + b`, and each expert's candidate threshold `beta_e` is the
  (ceil(T K / E) + 1)-th largest of `s[:, e] - alpha` over the T tokens, the threshold at which the expert would have
  received exactly its share. The candidate bias `-beta` is averaged over the router calls of the step (and the
  ranks), re-centred to mean 0 and blended in: `b += w * (candidate - b)`, with w the EMA weight (1: replace).
  With the `"global_histogram"` solver the candidate is instead the same quantile over every token of the optimizer
  step: each call adds its margins `s + b - alpha` to a per-expert histogram (`quantile_histogram`), the histograms
  are summed over the step's calls and ranks, and the threshold is read off the sum (`histogram_margin_quantiles`).

With `anneal_steps` A > 0 Quantile Balancing's weight anneals: 1 for the first A updates (so the first is a warm start,
the bias set from the first batch's quantiles), then `A / n` at update n, which averages the candidates over a window
that grows with training, and never below the weight given (see `quantile_weight`).

A schedule scales the step of every rule (u, or w for `"quantile"`) by a factor in [0, 1] that depends on the
number n = 1, 2, ... of the update being applied and on the total number of optimizer steps N.
"""

import math
from dataclasses import dataclass
from typing import get_args

import torch

from .configuration_lossfree_moe import BiasUpdateRule, BiasUpdateSchedule, check_balancing_field
from .quantile_threshold import share_threshold_bias


UPDATE_RULES = get_args(BiasUpdateRule)
SCHEDULES = get_args(BiasUpdateSchedule)


@dataclass(frozen=True)
class UpdateSchedule:
    """Factor on the step of the n-th update (n = 1, 2, ...) of a run of `total_steps` optimizer steps.

    - `"constant"`: 1.
    - `"linear_warmup"`: `min(1, n / warmup_steps)` (1 when `warmup_steps` is 0).
    - `"cosine"`: the warm-up, then `0.5 * (1 + cos(pi * (n - W) / (N - W)))` for n > W = `warmup_steps`, reaching 0
      at the last step.

    With `stop_fraction` f < 1 the factor is 0 for every update after step `f * N`: DeepSeek-V3 keeps u = 1e-3 for
    the first 14.3T of its 14.8T tokens (f = 0.966) and then stops updating the bias.
    """

    kind: str = "constant"
    warmup_steps: int = 0
    stop_fraction: float = 1.0

    def __post_init__(self):
        check_balancing_field("bias_update_schedule", self.kind)
        check_balancing_field("bias_update_warmup_steps", self.warmup_steps)
        check_balancing_field("bias_update_stop_fraction", self.stop_fraction)

    @property
    def needs_total_steps(self) -> bool:
        return self.kind == "cosine" or self.stop_fraction < 1

    def factor(self, update: int, total_steps: int | None = None) -> float:
        """The factor of update number `update` (1-based)."""
        if isinstance(update, bool) or not isinstance(update, int) or update < 1:
            raise ValueError(f"update must be an integer >= 1, got {update!r}.")
        if self.needs_total_steps:
            check_total_steps(total_steps)
            if update > self.stop_fraction * total_steps:
                return 0.0
        warmup = self.kind != "constant" and self.warmup_steps > 0
        if warmup and update <= self.warmup_steps:
            return update / self.warmup_steps
        if self.kind != "cosine":
            return 1.0
        decay_steps = total_steps - self.warmup_steps
        if decay_steps <= 0:
            return 1.0
        progress = min(1.0, (update - self.warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def check_total_steps(total_steps) -> None:
    """Raise `ValueError` unless `total_steps` is a positive integer (schedules that decay or stop need it)."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(
            "total_steps must be the number of optimizer steps of the run, an integer >= 1, when "
            f"bias_update_schedule is 'cosine' or bias_update_stop_fraction < 1; got {total_steps!r}. The Trainer "
            "callback takes it from the Trainer's max_steps; in a plain loop pass LossFreeBalancer(total_steps=...)."
        )


def quantile_weight(update: int, ema: float, anneal_steps: int = 0) -> float:
    """Weight w of the new candidate at Quantile Balancing's update number `update` (1-based).

    With `anneal_steps` A = 0, the constant `ema`. With A > 0, `max(ema, min(1, A / update))`: each of the first A
    updates replaces the bias by its step's candidate, tracking the fast early drift of the router's scores, and the
    weight then falls as 1 / n, an average over the last ~n / A steps, so the per-batch noise of the quantiles shrinks
    as training settles; `ema` is the floor.
    """
    if isinstance(update, bool) or not isinstance(update, int) or update < 1:
        raise ValueError(f"update must be an integer >= 1, got {update!r}.")
    if anneal_steps == 0:
        return ema
    return max(ema, min(1.0, anneal_steps / update))


def quantile_candidate(
    scores: torch.Tensor, bias: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Quantile Balancing's candidate bias `-beta` (E,) fp32 from one router call, or None when it has none: one pass
    of `share_threshold_bias` (scores (T, E), the router's current bias (E,), K, padding rows left out by
    `token_mask`)."""
    return share_threshold_bias(scores, bias, top_k, token_mask)


@torch.no_grad()
def quantile_histogram(
    scores: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    bins: int,
    value_range: float,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(E, bins + 2) int32 histogram of one router call's margins `s + b - alpha`, per expert, for the global solver.

    A token's margin for expert e is how far its biased score lies above its cutoff `alpha_t` (its (K+1)-th largest
    biased score): positive for the K experts it chose. Measured from the bias, the bins follow each expert's
    threshold, so `bins` equal bins over [-value_range, value_range) resolve the quantile wherever the bias is. Bin 0
    counts the margins below that range and bin `bins + 1` those at or above it; a NaN (a layer whose step is
    skipped) lands in bin 0. Every real token adds one count per expert; padding rows are left out.

    Args:
        scores: (T, E) routing scores s, the unbiased ones the router selects on with `s + bias`.
        bias: (E,) the router's current additive bias.
        top_k: K, experts per token.
        bins: Equal bins between -value_range and value_range.
        value_range: Half-width of the binned margins.
        token_mask: (T,) nonzero for real tokens.
    """
    scores = scores.float()
    if token_mask is not None:
        scores = scores[token_mask.to(scores.device) != 0]
    num_experts = scores.size(-1)
    biased = scores + bias.to(device=scores.device, dtype=torch.float32)  # (T, E)
    cutoff = biased.topk(top_k + 1, dim=-1, sorted=True).values[:, -1:]  # (T, 1): alpha_t
    position = biased.sub_(cutoff).add_(value_range).mul_(bins / (2 * value_range))  # (T, E), in bin widths
    position = position.floor_().add_(1).clamp_(0, bins + 1).nan_to_num_(0).long()
    position += torch.arange(num_experts, device=position.device) * (bins + 2)  # one run of bins per expert
    counts = torch.bincount(position.reshape(-1), minlength=num_experts * (bins + 2))
    return counts.view(num_experts, bins + 2).int()


@torch.no_grad()
def histogram_margin_quantiles(
    histograms: torch.Tensor, choices: torch.Tensor, value_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each expert's threshold margin over the whole step, read off its summed histogram.

    Args:
        histograms: (L, E, bins + 2) margin counts of the step, summed over its router calls and the ranks
            (`quantile_histogram`'s layout): integers, or the integer-valued fp64 sums of the collective.
        choices: (L,) expert choices behind them, tokens x K.
        value_range: The half-width the histograms were binned with.

    Returns:
        (L, E) fp64 margins d, (L,) whether each layer has a threshold, and (L,) whether some threshold lay beyond
        the binned range. With T tokens and a share of `ceil(T K / E)` per expert, the (share + 1)-th largest margin
        of expert e lies in the bin where the counts above it reach share + 1; d is interpolated inside that bin, as
        if its counts were spread evenly over it, at the point with exactly `share` counts above (as Megatron-LM's
        global-batch Quantile Balancing reads its histogram), so d is within one bin width of the exact margin. The
        candidate bias is `b - d`, the bias at which the expert would have received its share of the step's tokens.
        A threshold in bin 0 or `bins + 1` is known only to lie beyond the range: d is set to its edge. A layer has
        no threshold when the share is T or more (every expert could take every token) or it counted no token.
    """
    num_layers, num_experts, cells = histograms.shape
    bins = cells - 2
    width = 2 * value_range / bins
    tokens = histograms[:, 0].sum(dim=-1).long()  # (L,): every token counts once per expert
    share = (choices.long() + num_experts - 1) // num_experts  # (L,), exact
    cumulative = histograms.cumsum(dim=-1)  # (L, E, bins + 2): counts in a bin and the bins below it
    # the (share + 1)-th largest lies in the first bin with at least T - share counts at or below its top
    targets = (tokens - share).view(-1, 1, 1).expand(num_layers, num_experts, 1).to(histograms.dtype).contiguous()
    index = torch.searchsorted(cumulative, targets).clamp_(max=cells - 1)  # (L, E, 1)
    in_bin = histograms.gather(-1, index).double()
    counts_above = tokens.view(-1, 1, 1).double() - cumulative.gather(-1, index).double()
    upper_edge = -value_range + index.double() * width  # bin j >= 1 covers [-range + (j - 1) w, -range + j w)
    fraction = (share.view(-1, 1, 1).double() - counts_above) / in_bin.clamp(min=1)
    margins = (upper_edge - width * fraction).squeeze(-1)  # (L, E)
    index = index.squeeze(-1)
    below, beyond = index == 0, index == bins + 1
    margins = torch.where(below, -value_range, torch.where(beyond, value_range, margins))
    has_threshold = (tokens > 0) & (share < tokens)
    out_of_range = (below | beyond).any(dim=-1) & has_threshold
    return margins, has_threshold, out_of_range


def rule_update(
    rule: str,
    loads: torch.Tensor,
    biases: torch.Tensor,
    step_size: float,
    momentum_state: torch.Tensor | None = None,
    momentum: float = 0.0,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """(L, E) fp64 update of the layers given, each of which received tokens this step.

    Args:
        rule: One of `UPDATE_RULES`.
        loads: (L, E) token counts of the step, summed over ranks.
        biases: (L, E) current biases (used by `"quantile"`).
        step_size: u times the schedule factor (`"quantile"`: the EMA weight times the factor).
        momentum_state: (L, E) fp64 momentum of `"smebu"`, updated in place.
        momentum: mu of `"smebu"`.
        candidates: (L, E) mean candidate bias of `"quantile"` over the step's router calls and ranks.
    """
    loads = loads.double()  # exact for any count below 2**53
    mean = loads.mean(dim=-1, keepdim=True)  # (L, 1), > 0
    if rule == "sign":
        return step_size * (mean - loads).sign()
    if rule == "error":
        return step_size * (mean - loads) / mean
    if rule == "smebu":
        momentum_state.mul_(momentum).add_((1 - momentum) * torch.tanh((mean - loads) / mean))
        return step_size * (momentum_state - momentum_state.mean(dim=-1, keepdim=True))
    if rule == "quantile":
        target = candidates.double() - candidates.double().mean(dim=-1, keepdim=True)
        return step_size * (target - biases.double())
    raise ValueError(f"bias_update_rule must be one of {UPDATE_RULES}, got {rule!r}.")


__all__ = [
    "SCHEDULES",
    "UPDATE_RULES",
    "UpdateSchedule",
    "check_total_steps",
    "histogram_margin_quantiles",
    "quantile_candidate",
    "quantile_histogram",
    "quantile_weight",
    "rule_update",
]
