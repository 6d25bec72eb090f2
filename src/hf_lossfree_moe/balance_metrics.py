"""Load-balance metrics from per-expert token counts: MaxVio (Wang et al., 2024).

`compute_maxvio()` is the one implementation the balancer, the Trainer callback, the `evaluate` module and the
scripts use. A layer that received no token has no MaxVio (its mean load is 0): it is skipped, named in
`MaxVio.skipped`, and the mean is taken over the other layers, so one idle router never hides the metric of the rest.
`compute_load_metrics()` adds the figures used to debug a routing collapse: dead experts, the spread of the loads and
the least-loaded expert. `compute_layer_spread_metrics()` adds what other frameworks report and what a mean over
layers hides: the effective-expert fraction exp(H)/E of each layer, and the worst layer and 90th percentile over
layers, so one collapsing layer shows.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaxVio:
    """MaxVio `(max_i load_i - mean load) / mean load` of every layer that received tokens.

    Attributes:
        per_layer: `{layer: MaxVio}` in row order, for the layers that received tokens.
        skipped: The layers that received no token, left out of `per_layer` and `mean`.
    """

    per_layer: dict[int, float]
    skipped: tuple[int, ...]

    @property
    def mean(self) -> float | None:
        """Mean over the layers in `per_layer` (the paper's average over MoE layers); None if every layer was skipped."""
        if not self.per_layer:
            return None
        return sum(self.per_layer.values()) / len(self.per_layer)

    def metrics(self, name: str) -> dict[str, float]:
        """Log entries: `name` (the mean), `{name}/layer_{i}` per layer, and `{name}/skipped_layers` when any was."""
        entries = {} if self.mean is None else {name: self.mean}
        entries.update({f"{name}/layer_{layer}": value for layer, value in self.per_layer.items()})
        if self.skipped:
            entries[f"{name}/skipped_layers"] = float(len(self.skipped))
        return entries


def compute_maxvio(loads: torch.Tensor | Sequence, layers: Sequence[int] | None = None) -> MaxVio:
    """MaxVio of `(layers, experts)` loads (an `(experts,)` row is one layer), exact in fp64.

    Args:
        loads: Tokens each expert received, per layer: a tensor or nested sequence of finite numbers >= 0.
        layers: The number of each row, e.g. its decoder-layer index (default: 0, 1, ...).
    """
    loads = _checked_loads(loads)
    layers = list(range(loads.size(0))) if layers is None else list(layers)
    if len(layers) != loads.size(0):
        raise ValueError(f"layers must number each of the {loads.size(0)} rows of loads, got {layers}.")
    mean = loads.mean(dim=-1)  # (L,)
    values = ((loads.amax(dim=-1) - mean) / mean).tolist()  # (L,), nan where mean == 0
    counted = (mean > 0).tolist()
    return MaxVio(
        per_layer={layer: value for layer, value, ok in zip(layers, values, counted, strict=True) if ok},
        skipped=tuple(layer for layer, ok in zip(layers, counted, strict=True) if not ok),
    )


def compute_load_metrics(loads: torch.Tensor | Sequence, name: str) -> dict[str, float]:
    """Means over the layers that received tokens of three load figures of `(layers, experts)` loads:

    - `{name}_dead_expert_fraction`: the fraction of experts that received no token;
    - `{name}_load_cv`: the coefficient of variation of the loads, std / mean (population std);
    - `{name}_min_load_ratio`: the least-loaded expert's load over the mean load.

    Empty when no layer received a token.
    """
    loads = _checked_loads(loads)
    loads = loads[loads.sum(dim=-1) > 0]  # (L', E)
    if loads.size(0) == 0:
        return {}
    mean = loads.mean(dim=-1)  # (L',)
    return {
        f"{name}_dead_expert_fraction": (loads == 0).double().mean().item(),
        f"{name}_load_cv": (loads.std(dim=-1, correction=0) / mean).mean().item(),
        f"{name}_min_load_ratio": (loads.amin(dim=-1) / mean).mean().item(),
    }


SPREAD_PERCENTILE = 90


def compute_layer_spread_metrics(
    loads: torch.Tensor | Sequence, name: str, maxvio_name: str, layers: Sequence[int] | None = None
) -> dict[str, float]:
    """How unevenly the layers of `(layers, experts)` loads are balanced, over the layers that received tokens:

    - `{name}_effective_expert_fraction`: the mean over layers of exp(H) / E, where H is the entropy (in nats) of the
      layer's load distribution c / sum(c): 1 when every expert gets the same load, 1/E when one expert gets all;
    - `{name}_effective_expert_fraction/layer_{i}` per layer and `.../min`, the least balanced layer;
    - `{maxvio_name}/max`: MaxVio of the worst layer; `{maxvio_name}/p90`: the 90th percentile of the layers' MaxVio
      (linear interpolation), so a mean that looks fine cannot hide one collapsing layer.

    `layers` numbers the rows as `compute_maxvio` does. Empty when no layer received a token.
    """
    loads = _checked_loads(loads)
    layers = list(range(loads.size(0))) if layers is None else list(layers)
    counted = loads.sum(dim=-1) > 0  # (L,)
    if not counted.any():
        return {}
    per_layer_maxvio = torch.tensor(list(compute_maxvio(loads, layers).per_layer.values()), dtype=torch.float64)
    shares = loads[counted] / loads[counted].sum(dim=-1, keepdim=True)  # (L', E)
    entropy = -torch.special.xlogy(shares, shares).sum(dim=-1)  # (L',) nats, 0 log 0 = 0
    fraction = entropy.exp() / loads.size(-1)  # (L',)
    counted_layers = [layer for layer, ok in zip(layers, counted.tolist(), strict=True) if ok]
    entries = {
        f"{name}_effective_expert_fraction": fraction.mean().item(),
        f"{name}_effective_expert_fraction/min": fraction.min().item(),
        **{
            f"{name}_effective_expert_fraction/layer_{layer}": value
            for layer, value in zip(counted_layers, fraction.tolist(), strict=True)
        },
        f"{maxvio_name}/max": per_layer_maxvio.max().item(),
        f"{maxvio_name}/p{SPREAD_PERCENTILE}": torch.quantile(per_layer_maxvio, SPREAD_PERCENTILE / 100).item(),
    }
    return entries


def _checked_loads(loads: torch.Tensor | Sequence) -> torch.Tensor:
    """(layers, experts) fp64 CPU copy of `loads`, or `ValueError`."""
    loads = torch.as_tensor(loads).detach()
    if loads.dim() == 1:
        loads = loads.unsqueeze(0)
    if loads.dim() != 2 or loads.size(-1) == 0 or loads.is_complex():
        raise ValueError(f"loads must be (layers, experts) or (experts,) numbers, got shape {tuple(loads.shape)}.")
    loads = loads.cpu().double()
    if not torch.isfinite(loads).all() or (loads < 0).any():
        raise ValueError(f"loads must be finite and >= 0, got {loads.tolist()}.")
    return loads


__all__ = ["MaxVio", "compute_layer_spread_metrics", "compute_load_metrics", "compute_maxvio"]
