"""BalancingSettings: every setting of `LossFreeBalancer`, resolved in one place and judged by one set of rules.

The balancing fields carry the names, defaults and checks of `LossFreeMoeConfig` (`bias_update_rate`,
`bias_update_rule`, ...): a field left None takes the model's config value, else the config class's default. `center`,
`frozen` and `total_steps` belong to the balancer alone. Every assignment is checked, at construction and after it, so
`balancer.settings.bias_update_rate = float("nan")` fails as the constructor would. Once resolved for a model, the
settings also refuse what the constructor refuses for that model: an unset (None) balancing field, and an update
(`bias_update_rate > 0`, `frozen` other than True) of a model that is only measured; the balancer adds its own checks
(`add_assignment_check`), e.g. that Quantile Balancing can read its routers' scores.

Adding a balancing option touches two places: its field and check in `LossFreeMoeConfig` (`BALANCING_FIELD_CHECKS`)
and its field here.
"""

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .configuration_lossfree_moe import (
    ANNEAL_NEEDS_QUANTILE,
    BALANCING_FIELD_CHECKS,
    QUANTILE_NEEDS_ADDITIVE,
    SOLVER_NEEDS_QUANTILE,
    LossFreeMoeConfig,
    anneal_fits_rule,
    check_balancing_field,
    quantile_fits_bias_type,
    solver_fits_rule,
)
from .update_rules import UpdateSchedule, check_total_steps


# The keyword names of earlier releases, still accepted by `LossFreeBalancer` and `LossFreeBalancingCallback`.
ALIASES = {
    "update_rate": "bias_update_rate",
    "rule": "bias_update_rule",
    "schedule": "bias_update_schedule",
    "warmup_steps": "bias_update_warmup_steps",
    "stop_fraction": "bias_update_stop_fraction",
    "quantile_ema": "bias_quantile_ema",
    "momentum": "bias_update_momentum",
}
# The positional arguments of earlier releases' `LossFreeBalancer(model, ...)` and `LossFreeBalancingCallback(...)`,
# in their order (the callback took all but `total_steps`).
LEGACY_POSITIONAL = (
    "update_rate",
    "rule",
    "bias_type",
    "center",
    "frozen",
    "process_group",
    "schedule",
    "warmup_steps",
    "stop_fraction",
    "quantile_ema",
    "momentum",
    "total_steps",
)
# The balancer's own settings, which no config holds: (test, description).
BALANCER_FIELD_CHECKS = {
    "center": (lambda value: isinstance(value, bool), "True or False"),
    "frozen": (lambda value: value is None or isinstance(value, bool), "None, True or False"),
}


@dataclass
class BalancingSettings:
    """What `LossFreeBalancer` needs to know besides the model; None means "from the model's config".

    Attributes:
        bias_update_rate, bias_update_rule, bias_type, bias_update_schedule, bias_update_warmup_steps,
            bias_update_stop_fraction, bias_quantile_ema, bias_update_momentum, bias_quantile_anneal_steps,
            bias_quantile_solver, bias_quantile_histogram_bins, bias_quantile_histogram_range: As in
            `LossFreeMoeConfig`.
        center (`bool`, defaults to `False`): Subtract each layer's mean update, so the biases of a layer keep their
            mean (for `"sign"` the mean update is not 0 when fewer experts are over than under the mean load).
        frozen (`bool`, *optional*): `True` keeps every bias fixed while still measuring loads. `None` keeps fixed the
            bias of any router whose own weights are all frozen (`requires_grad=False`). `False` updates every bias.
        total_steps (`int`, *optional*): Optimizer steps of the run, needed by a `"cosine"` schedule or a stop
            fraction below 1 (the Trainer callback sets it from `max_steps`).
    """

    bias_update_rate: float | None = None
    bias_update_rule: str | None = None
    bias_type: str | None = None
    bias_update_schedule: str | None = None
    bias_update_warmup_steps: int | None = None
    bias_update_stop_fraction: float | None = None
    bias_quantile_ema: float | None = None
    bias_update_momentum: float | None = None
    bias_quantile_anneal_steps: int | None = None
    bias_quantile_solver: str | None = None
    bias_quantile_histogram_bins: int | None = None
    bias_quantile_histogram_range: float | None = None
    center: bool = False
    frozen: bool | None = None
    total_steps: int | None = None

    def __setattr__(self, name: str, value):
        if name in BALANCING_FIELD_CHECKS and (value is not None or self.__dict__.get("_resolved")):
            check_balancing_field(name, value)
        elif name in BALANCER_FIELD_CHECKS:
            accepts, allowed = BALANCER_FIELD_CHECKS[name]
            if not accepts(value):
                raise ValueError(f"{name} must be {allowed}, got {value!r}.")
        elif name == "total_steps" and value is not None:
            check_total_steps(value)
        if name in ("bias_update_rule", "bias_type"):
            rule = value if name == "bias_update_rule" else self.__dict__.get("bias_update_rule")
            bias_type = value if name == "bias_type" else self.__dict__.get("bias_type")
            if rule is not None and bias_type is not None and not quantile_fits_bias_type(rule, bias_type):
                raise ValueError(f"bias_update_rule must be {QUANTILE_NEEDS_ADDITIVE}, got {rule!r}.")
        if name in ("bias_update_rule", "bias_quantile_anneal_steps"):
            rule = value if name == "bias_update_rule" else self.__dict__.get("bias_update_rule")
            anneal = value if name == "bias_quantile_anneal_steps" else self.__dict__.get("bias_quantile_anneal_steps")
            if rule is not None and anneal is not None and not anneal_fits_rule(rule, anneal):
                raise ValueError(f"bias_quantile_anneal_steps must be {ANNEAL_NEEDS_QUANTILE}, got {anneal!r}.")
        if name in ("bias_update_rule", "bias_quantile_solver"):
            rule = value if name == "bias_update_rule" else self.__dict__.get("bias_update_rule")
            solver = value if name == "bias_quantile_solver" else self.__dict__.get("bias_quantile_solver")
            if rule is not None and solver is not None and not solver_fits_rule(rule, solver):
                raise ValueError(f"bias_quantile_solver must be {SOLVER_NEEDS_QUANTILE}, got {solver!r}.")
        measured_only = self.__dict__.get("_measured_only")
        if measured_only and ((name == "frozen" and value is not True) or (name == "bias_update_rate" and value > 0)):
            raise ValueError(_measured_only_message(measured_only))
        for check in self.__dict__.get("_assignment_checks", ()):
            check(name, value)
        super().__setattr__(name, value)

    def add_assignment_check(self, check: Callable[[str, Any], None]) -> None:
        """Run `check(field, value)` before every later assignment; it raises `ValueError` to refuse the value."""
        self.__dict__.setdefault("_assignment_checks", []).append(check)

    @classmethod
    def of(cls, settings: "BalancingSettings | None" = None, **overrides) -> "BalancingSettings":
        """A copy of `settings` (default: every field unset) with `overrides` set; the keyword names of earlier
        releases (`update_rate`, `rule`, ... see `ALIASES`) are accepted for the fields they name."""
        if settings is not None and not isinstance(settings, cls):
            raise ValueError(f"settings must be a BalancingSettings or None, got {type(settings).__name__}.")
        names = {field.name for field in fields(cls)}
        changes, given_as = {}, {}
        for name, value in overrides.items():
            field = ALIASES.get(name, name)
            if field not in names:
                raise TypeError(f"Unexpected balancing setting {name!r}; the settings are {sorted(names)}.")
            if field in changes:
                raise TypeError(f"{given_as[field]!r} and {name!r} name the same setting; pass one of them.")
            changes[field], given_as[field] = value, name
        return replace(settings or cls(), **changes)

    def resolved(self, config=None) -> "BalancingSettings":
        """A copy with every unset balancing field taken from the model's `config` when it has the field, else from
        `LossFreeMoeConfig`'s default. A config with `load_balancing` other than `"loss_free"` is only measured: its
        copy is frozen, and asking it to update raises."""
        defaults = {name: LossFreeMoeConfig.__dataclass_fields__[name].default for name in BALANCING_FIELD_CHECKS}
        changes = {
            name: getattr(config, name, default) for name, default in defaults.items() if getattr(self, name) is None
        }
        load_balancing = getattr(config, "load_balancing", "loss_free")
        if load_balancing != "loss_free":
            if self.frozen is False or (self.bias_update_rate is not None and self.bias_update_rate > 0):
                raise ValueError(_measured_only_message(load_balancing))
            changes["frozen"] = True
        resolved = replace(self, **changes)
        resolved.__dict__["_resolved"] = True
        resolved.__dict__["_measured_only"] = load_balancing if load_balancing != "loss_free" else None
        return resolved

    @property
    def schedule(self) -> UpdateSchedule:
        """The update-rate schedule of the (resolved) settings."""
        return UpdateSchedule(self.bias_update_schedule, self.bias_update_warmup_steps, self.bias_update_stop_fraction)

    def to_dict(self) -> dict:
        """The fields as plain values, e.g. for a Trainer checkpoint; `BalancingSettings(**to_dict())` rebuilds it."""
        return asdict(self)


def is_legacy_positional(settings, more: tuple) -> bool:
    """Whether a balancer or callback was called the way earlier releases took their settings: by position, starting
    with the update rate."""
    return bool(more) or (isinstance(settings, int | float) and not isinstance(settings, bool))


def legacy_positional(owner: str, values: tuple, overrides: dict, count: int = len(LEGACY_POSITIONAL)) -> dict:
    """`overrides` plus the positional `values` of an earlier release's `owner(...)`, named as it named them (see
    `LEGACY_POSITIONAL`), with a `DeprecationWarning` that gives the keyword spelling."""
    if len(values) > count:
        raise TypeError(f"{owner} takes at most {count} positional settings, got {len(values)}.")
    named = dict(zip(LEGACY_POSITIONAL[: len(values)], values, strict=True))
    repeated = sorted(set(named) & set(overrides))
    if repeated:
        raise TypeError(f"{owner} got {repeated[0]!r} both by position and by keyword.")
    spelling = ", ".join(f"{ALIASES.get(name, name)}={value!r}" for name, value in named.items())
    warnings.warn(
        f"Passing settings to {owner} by position is deprecated; pass them by keyword: {owner}(..., {spelling}).",
        DeprecationWarning,
        stacklevel=3,
    )
    return {**overrides, **named}


def _measured_only_message(load_balancing: str) -> str:
    return (
        f"The model's config.load_balancing is {load_balancing!r}, so its biases stay fixed and the balancer only "
        "measures loads; leave bias_update_rate and frozen unset (or pass frozen=True)."
    )


__all__ = ["ALIASES", "BalancingSettings", "is_legacy_positional", "legacy_positional"]
