"""Load-balance metrics from per-expert token counts: MaxVio (Wang et al., 2024).

`compute_maxvio()` is the one implementation the balancer, the Trainer callback, the `evaluate` module and the
scripts use. A layer that received no token has no MaxVio (its mean load is 0): it is skipped, named in
`MaxVio.skipped`, and the mean is taken over the other layers, so one idle router never hides the metric of the rest.
`compute_load_metrics()` adds the figures used to debug a routing collapse: dead experts, the spread of the loads and
the least-loaded expert.
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


__all__ = ["MaxVio", "compute_load_metrics", "compute_maxvio"]
