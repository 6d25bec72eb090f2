"""LossFreeBalancer: counts expert loads from outside the model and updates the router biases (Algorithm 1).

The model routes; this module balances. It is the front of four parts, each in its own module: the settings
(settings.py), the counting hooks (counting.py), the biases it may move (bias_storage.py) and the update of each
step (bias_update.py, with the rules of update_rules.py). Routers are found by behaviour (a module holding
`e_score_correction_bias` whose forward returns `(router_logits, topk_weights, topk_indices)`, the DeepSeek-V3
contract), so transformers' MoE families with that router work as they are; families with another layout plug in
through `register_router_adapter`.
"""

import warnings
import weakref

import torch
import torch.distributed as dist
from accelerate.utils import extract_model_from_parallel
from torch import nn

from .bias_storage import BiasStorage
from .bias_update import (
    BiasUpdate,
    bias_statistics,
    histogram_thresholds,
    load_statistics,
    mean_candidates,
    sum_over_ranks,
    warn_beyond_histogram_range,
    warn_non_finite,
    warn_nothing_counted,
)
from .counting import LoadMeasurement, TokenCounter, stack_rows
from .load_groups import LoadSum
from .routers import BIAS_NAME, FoundRouter, find_routers, layer_numbers, scoring_function
from .settings import BalancingSettings, is_legacy_positional, legacy_positional
from .update_rules import UpdateSchedule


_BALANCER_OF_ROUTER: "weakref.WeakKeyDictionary[nn.Module, LossFreeBalancer]" = weakref.WeakKeyDictionary()


def _setting(field: str, doc: str) -> property:
    """A balancer attribute that reads and writes `settings.<field>`, so an assignment is checked like the
    constructor's argument."""
    return property(
        lambda self: getattr(self.settings, field),
        lambda self, value: setattr(self.settings, field, value),
        doc=doc,
    )


class LossFreeBalancer:
    r"""Auxiliary-loss-free load balancing (Wang et al., 2024, Algorithm 1) for any model with biased top-K routers.

    Hooks count, per router, the tokens each expert received: exact int64 counts, padding excluded, only in
    training-mode forwards, never inside `generate()`, and never twice under activation checkpointing (see
    counting.py). Counts accumulate over micro-batches until `step()`, which you call once after each
    `optimizer.step()`. Forwards of a model in training mode under `torch.no_grad()` are counted (reentrant
    checkpointing runs the real forward without grad): put the model in eval mode, or use `measure()`, for forwards
    that must not steer the biases.

    A model has at most one balancer: a new one takes over the routers of the one attached before, whose hooks are
    removed (its `step()` then counts nothing and says so).

    Args:
        model: The model, possibly wrapped by DDP, FSDP or Accelerate. Its routers are found by behaviour.
        settings (`BalancingSettings`, *optional*): The update rate, rule, bias type, schedule, ...; unset fields come
            from `model.config`, else from `LossFreeMoeConfig`'s defaults. Models whose config says
            `load_balancing="aux_loss"` or `"none"` are only measured: their biases stay fixed.
        process_group (*optional*): The group the counts are summed over. Default: for a model loaded with
            `from_pretrained(..., distributed_config=...)`, its data-parallel ranks and pipeline stages (tensor- and
            expert-parallel ranks route the same tokens and are not summed twice); otherwise the whole world.
        **overrides: Fields of `BalancingSettings` set on top of `settings` (`bias_update_rate=1e-2`, ...); the
            names of earlier releases (`update_rate`, `rule`, `schedule`, `warmup_steps`, `stop_fraction`,
            `quantile_ema`, `momentum`) are accepted too. Settings passed by position in the order of earlier
            releases (`update_rate, rule, bias_type, center, frozen, process_group, ...`) still work, with a
            `DeprecationWarning`.

    Example:

    ```python
    >>> balancer = LossFreeBalancer(model)
    >>> for batch in loader:
    ...     model(**batch).loss.backward()
    ...     optimizer.step()
    ...     optimizer.zero_grad()
    ...     stats = balancer.step()  # {"maxvio_batch": ..., "maxvio_batch/layer_1": ..., "bias_abs_max": ...}
    ```
    """

    update_rate = _setting("bias_update_rate", "u, the update rate (`settings.bias_update_rate`).")
    rule = _setting("bias_update_rule", "The update rule (`settings.bias_update_rule`).")
    bias_type = _setting("bias_type", "`additive` or `multiplicative` (`settings.bias_type`).")
    quantile_ema = _setting("bias_quantile_ema", "Quantile Balancing's EMA weight (`settings.bias_quantile_ema`).")
    momentum = _setting("bias_update_momentum", "mu of `smebu` (`settings.bias_update_momentum`).")
    center = _setting("center", "Whether each layer's mean update is subtracted (`settings.center`).")
    frozen = _setting("frozen", "True, False, or None: frozen with the router's weights (`settings.frozen`).")
    total_steps = _setting("total_steps", "Optimizer steps of the run, for schedules that decay or stop.")

    def __init__(
        self,
        model: nn.Module,
        settings: BalancingSettings | None = None,
        *legacy_settings,
        process_group: "dist.ProcessGroup | None" = None,
        **overrides,
    ):
        if is_legacy_positional(settings, legacy_settings):
            overrides = legacy_positional("LossFreeBalancer", (settings, *legacy_settings), overrides)
            settings, process_group = None, overrides.pop("process_group", process_group)
        model = extract_model_from_parallel(model, keep_torch_compile=False)
        requested = BalancingSettings.of(settings, **overrides)
        self._settings = requested.resolved(getattr(model, "config", None))
        self.model = model
        found = find_routers(model)
        # Before any check that may fail on one pipeline stage only: this is a collective there.
        self._load_sum = LoadSum(model, [router.name for router in found], process_group)
        self.process_group = self._load_sum.group
        self.num_experts = _check_routers(model, found, self.settings.bias_update_rule)
        self._settings.add_assignment_check(
            lambda name, value: _check_rule_reads_scores(found, value) if name == "bias_update_rule" else None
        )
        if not found[0].has_bias:
            _check_measure_only(model, requested)
            self.frozen = True
            self._settings.add_assignment_check(lambda name, value: _refuse_updates(model, name, value))
        for previous in {_BALANCER_OF_ROUTER[r.module] for r in found if r.module in _BALANCER_OF_ROUTER}:
            previous.remove()  # two balancers would count every token twice
        for router in found:
            _BALANCER_OF_ROUTER[router.module] = self
        self._routers = found
        self._layers = layer_numbers([router.name for router in found])
        self._storage = BiasStorage(model, found, stacklevel=2)
        self._update = BiasUpdate(self.settings, len(found), self.num_experts)
        self._counter = TokenCounter(
            model,
            found,
            self._storage.devices(),
            self.num_experts,
            bias=self._storage.bias,
            quantile_solver=lambda: (
                self.settings.bias_quantile_solver if self.rule == "quantile" and self.updates_biases else None
            ),
            histogram_layout=lambda: (
                self.settings.bias_quantile_histogram_bins,
                self.settings.bias_quantile_histogram_range,
            ),
        )
        self._end_batch_balance()  # step 0: routers a previous balancer finished balance their batches again

    @property
    def settings(self) -> BalancingSettings:
        """The balancer's settings, resolved for its model; set its fields (checked like the constructor's
        arguments), not the object."""
        return self._settings

    @property
    def routers(self) -> list[nn.Module]:
        """The router modules, in layer order."""
        return [r.module for r in self._routers]

    @property
    def names(self) -> list[str]:
        """Qualified module names of `routers`."""
        return [r.name for r in self._routers]

    @property
    def layers(self) -> list[int]:
        """The number of each router's layer in metrics (`maxvio_batch/layer_{i}`): its decoder-layer index."""
        return list(self._layers)

    @property
    def device(self) -> torch.device:
        """Where `loads` and `biases()` live: the first router's bias device (its weights', without a bias)."""
        return self._storage.devices()[0]

    @property
    def loads(self) -> torch.Tensor:
        """(routers, experts) int64 token counts of this rank since the last `step()`."""
        return self._counter.train_counts.stacked(self.device)

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place: False after `remove()` or once another balancer took over the routers."""
        return self._counter.attached

    @property
    def updates_biases(self) -> bool:
        """False when `step()` only measures: frozen, u = 0, a model not trained loss-free, or routers without a
        bias."""
        return self.frozen is not True and self.update_rate > 0

    @property
    def schedule(self) -> UpdateSchedule:
        """The update-rate schedule (`settings.bias_update_schedule`, `..._warmup_steps`, `..._stop_fraction`)."""
        return self.settings.schedule

    @schedule.setter
    def schedule(self, schedule: UpdateSchedule):
        warnings.warn(
            "Assigning balancer.schedule is deprecated; set balancer.settings.bias_update_schedule, "
            "bias_update_warmup_steps and bias_update_stop_fraction.",
            DeprecationWarning,
            stacklevel=2,
        )
        if not isinstance(schedule, UpdateSchedule):
            raise ValueError(f"schedule must be an UpdateSchedule, got {type(schedule).__name__}.")
        self.settings.bias_update_schedule = schedule.kind
        self.settings.bias_update_warmup_steps = schedule.warmup_steps
        self.settings.bias_update_stop_fraction = schedule.stop_fraction

    @property
    def completed_steps(self) -> int:
        """Steps taken so far; the schedule's factor is that of the next one. The Trainer callback resumes it."""
        return self._update.completed_steps

    @completed_steps.setter
    def completed_steps(self, value: int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"completed_steps must be an integer >= 0, got {value!r}.")
        self._update.completed_steps = value
        self._end_batch_balance()

    def biases(self) -> torch.Tensor:
        """(routers, experts) fp32 copy of the current biases; (routers, 0) for routers without a bias."""
        return self._storage.stacked(self.device)

    def __len__(self) -> int:
        return len(self._routers)

    def step(self) -> dict[str, float]:
        """Update every bias from the loads of the whole optimizer step, then reset the counts.

        The counts of all layers are summed over the data-parallel ranks in one `all_reduce`, so every rank applies
        the same update and the biases stay identical. Each movable layer's bias then takes the step of the rule
        (see update_rules.py and docs/balancing_rules.md), scaled by the schedule's factor, in fp32 and in place (the
        module keeps the same tensor, so checkpoints and optimizers see it). A multiplicative bias gets the same
        additive step, from its neutral value 1. A layer that counted no token is left unchanged, and so is a layer
        whose router scored a NaN or an infinity during the step, with one warning naming the layers and the step:
        no rule writes a non-finite value into a bias or into the state it keeps between steps.

        Returns:
            Plain floats: `maxvio_batch` (mean over layers that received tokens), `maxvio_batch/layer_{i}` (i is
            the layer number of `layers`), `maxvio_batch/skipped_layers` (how many layers received no token, when
            any did not), `batch_dead_expert_fraction`, `batch_load_cv`, `batch_min_load_ratio` (see
            `compute_load_metrics`), `bias_update_factor` (the schedule's factor), `bias_abs_max` and `bias_abs_mean`
            (distance from the neutral bias, 0 or 1), and `bias_updated` (1.0 or 0.0). With no token counted since
            the last step there is no MaxVio entry, a warning says so (and says to call `model.train()` when the model
            ran in eval mode), and no bias moves. Also the spread over layers (`batch_effective_expert_fraction` with
            its `/layer_{i}` and `/min`, `maxvio_batch/max` and `maxvio_batch/p90`, see
            `compute_layer_spread_metrics`). Routers without a bias get no `bias_abs_*` entry.
        """
        solver = self.settings.bias_quantile_solver if self.rule == "quantile" else None
        counts = self._counter.take_step(self.device, solver)
        loads, quantile, non_finite = sum_over_ranks(
            counts.loads, counts.non_finite, counts.quantile, self._all_reduce
        )
        counted = loads.sum(dim=-1) > 0  # (L,)
        candidates = margins = None
        if solver == "call_mean":
            candidates, has_candidate = mean_candidates(quantile)
            counted &= has_candidate
        elif solver == "global_histogram":
            value_range = counts.histogram_layout[1]
            margins, has_threshold, beyond_range = histogram_thresholds(quantile, self.num_experts, value_range)
            counted &= has_threshold
        factor = self._update.next_factor(self.updates_biases)
        stats = load_statistics(loads, self.layers, factor)
        any_counted = bool(loads.sum() > 0)
        if not any_counted:
            warn_nothing_counted(self.attached, counts.ran_in_eval_mode, stacklevel=2)
        updated, skipped = [], []
        if any_counted and factor > 0:
            movable = counted & ~self._frozen_routers()  # (L,)
            skipped = (movable & non_finite).nonzero().flatten().tolist()
            movable &= ~non_finite
            rows = movable.nonzero().flatten().tolist()
            if rows:
                current = stack_rows([self._storage.bias(i) for i in rows], torch.device("cpu"), torch.float64)
                if margins is not None:  # the bias at which each expert would have received its share
                    candidates = torch.zeros_like(margins)
                    candidates[movable] = current - margins[movable]
                    if beyond_range[movable].any():
                        beyond = [self.layers[i] for i in rows if beyond_range[i]]
                        warn_beyond_histogram_range(self.completed_steps, beyond, value_range, stacklevel=2)
                deltas, finite = self._update.deltas(loads[movable], current, factor, movable, candidates)  # (L', E)
                updated = [index for index, ok in zip(rows, finite.tolist(), strict=True) if ok]
                skipped = sorted(skipped + [index for index in rows if index not in updated])
                if updated:
                    self._storage.add_(updated, deltas[finite], stacklevel=2)
                    self._storage.warn_if_left_out_of_adapter(updated, stacklevel=2)
        if skipped:
            warn_non_finite(self.completed_steps, [self.layers[index] for index in skipped], stacklevel=2)
        self._end_batch_balance()
        if self._routers[0].has_bias:
            stats.update(bias_statistics(self.biases(), self.bias_type, bool(updated)))
        else:
            stats["bias_updated"] = 0.0
        return stats

    def measure(self, eval_only: bool = False, all_threads: bool = False) -> LoadMeasurement:
        """A `LoadMeasurement` to use as a context manager: loads counted apart, training counts untouched. It
        counts the forwards of the thread that starts it, or of every thread with `all_threads=True`."""
        for name, value in (("eval_only", eval_only), ("all_threads", all_threads)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}.")
        return LoadMeasurement(self, eval_only, all_threads)

    def remove(self):
        """Detach every hook; the model is left as if the balancer had never been attached."""
        self._counter.remove()
        for router in self._routers:
            if _BALANCER_OF_ROUTER.get(router.module) is self:
                del _BALANCER_OF_ROUTER[router.module]

    def state_dict(self) -> dict:
        """What `step()` carries between steps besides the biases (which the model saves): the count of updates the
        schedule reads and the `"smebu"` momentum, as plain JSON values for a checkpoint."""
        return self._update.state_dict()

    def load_state_dict(self, state: dict):
        """Restore what `state_dict()` returned, e.g. when resuming from a checkpoint."""
        self._update.load_state_dict(state)
        self._end_batch_balance()

    def _end_batch_balance(self):
        """Route training batches on the stored bias once `batch_balance_steps` steps are done (routers that have
        the setting: this project's), and again on their own balancing bias if the count is set back."""
        for router in self.routers:
            steps = getattr(router, "batch_balance_steps", 0)
            if steps > 0:
                router.batch_balance_finished = self.completed_steps >= steps

    def _frozen_routers(self) -> torch.Tensor:
        """(routers,) bool: the routers whose bias stays: all when `frozen`, those with frozen weights when None."""
        if self.frozen is None:
            return torch.tensor([self._storage.weights_frozen(index) for index in range(len(self))])
        return torch.full((len(self),), bool(self.frozen))

    def _all_reduce(self, loads: torch.Tensor):
        self._load_sum.all_reduce_(loads)


def _check_routers(model: nn.Module, found: list[FoundRouter], rule: str) -> int:
    """The routers' common number of experts, or `ValueError` when the balancer cannot work with them."""
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no router: no module holds `{BIAS_NAME}` or returns its top-K choice. "
            "LossFreeBalancer needs top-K routers (register a `RouterAdapter` with `register_router_adapter` for "
            "other layouts)."
        )
    if len({r.has_bias for r in found}) != 1:
        with_bias = next(r.name for r in found if r.has_bias)
        without = next(r.name for r in found if not r.has_bias)
        raise ValueError(
            f"Some routers have a bias ({with_bias}) and others have none ({without}); LossFreeBalancer needs one or "
            "the other. Give the others one with `add_selection_bias(model)` where it supports them."
        )
    num_experts = {r.num_experts for r in found}
    if len(num_experts) != 1:
        raise ValueError(f"Every router must have the same number of experts, got {sorted(num_experts)}.")
    _check_rule_reads_scores(found, rule)
    return num_experts.pop()


def _check_rule_reads_scores(found: list[FoundRouter], rule: str) -> None:
    """`ValueError` when routers route their batches balanced (`batch_balance_iterations`) and `rule` is not Quantile
    Balancing, whose candidates come from the scores: every other rule reads the counts, balanced by construction
    there, and would leave the stored bias that evaluation routes on to noise. Also when `rule` is Quantile Balancing
    and a router's scores cannot be read."""
    balancing_batches = [r for r in found if getattr(r.module, "batch_balance_iterations", 0) > 0]
    if balancing_batches and rule != "quantile":
        first = balancing_batches[0]
        raise ValueError(
            f"bias_update_rule must be 'quantile' for routers that route each batch balanced ({first.name} has "
            f"batch_balance_iterations={first.module.batch_balance_iterations}), got {rule!r}: the counts of a "
            "balanced batch tell a count-driven rule nothing, so the bias used at evaluation would not learn."
        )
    if rule != "quantile":
        return
    unreadable = [r for r in found if r.adapter.scores is None and scoring_function(r.module) is None]
    if unreadable:
        raise ValueError(
            f"bias_update_rule='quantile' needs the routers' scores, but {unreadable[0].name} "
            f"({type(unreadable[0].module).__name__}) names a scoring function other than sigmoid or softmax. "
            "Give its `RouterAdapter` a `scores` function, or choose another bias_update_rule."
        )


def _check_measure_only(model: nn.Module, requested: BalancingSettings):
    """Routers without a bias are only measured: refuse a request to update what does not exist."""
    if requested.frozen is False or (requested.bias_update_rate is not None and requested.bias_update_rate > 0):
        raise ValueError(_measure_only_message(model))


def _refuse_updates(model: nn.Module, name: str, value) -> None:
    """The same refusal for a later assignment to the settings of a balancer that only measures (frozen is True)."""
    if (name == "frozen" and value is not True) or (name == "bias_update_rate" and value > 0):
        raise ValueError(_measure_only_message(model))


def _measure_only_message(model: nn.Module) -> str:
    return (
        f"The routers of {type(model).__name__} have no bias, so the balancer only measures their loads; leave "
        "bias_update_rate and frozen unset, or give them a bias first with `add_selection_bias(model)`."
    )


__all__ = ["LoadMeasurement", "LossFreeBalancer"]
