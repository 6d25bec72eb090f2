"""LossFreeBalancer: counts expert loads from outside the model and updates the router biases (Algorithm 1).

The model routes; this module balances. Forward hooks on every router count how many tokens each expert received
(padding excluded, training forwards only, none inside `generate()`, never twice under activation checkpointing).
`step()`, called once per optimizer step, sums the counts over data-parallel ranks in one collective and moves every
bias in place, in fp32: `b += u * sign(mean(c) - c)`, or another rule of update_rules.py. Routers are found by
behaviour (a module holding `e_score_correction_bias` whose forward returns `(router_logits, topk_weights,
topk_indices)`, the DeepSeek-V3 contract), so transformers' MoE families with that router work as they are; families
with another layout plug in through `register_router_adapter`.
"""

import inspect
import math
import warnings
import weakref
from typing import Any, get_args

import torch
import torch.distributed as dist
from accelerate.utils import extract_model_from_parallel
from torch import nn

from .configuration_lossfree_moe import BiasType
from .generation import GenerationTracker
from .load_metrics import MaxVio, load_metrics, maxvio
from .process_groups import LoadSum
from .routers import BIAS_NAME, FoundRouter, find_routers, layer_numbers, read_scores, scoring_function
from .update_rules import (
    UPDATE_RULES,
    UpdateSchedule,
    check_rule_options,
    check_schedule,
    check_total_steps,
    quantile_candidate,
    rule_update,
)


BIAS_TYPES = get_args(BiasType)
# Used when the model's config does not say (e.g. transformers' DeepSeek-V3): the paper's and DeepSeek-V3's values.
DEFAULT_UPDATE_RATE = 1e-3
DEFAULT_UPDATE_RULE = "sign"
DEFAULT_BIAS_TYPE = "additive"
DEFAULT_SCHEDULE = "constant"
DEFAULT_WARMUP_STEPS = 0
DEFAULT_STOP_FRACTION = 1.0
DEFAULT_QUANTILE_EMA = 1.0
DEFAULT_MOMENTUM = 0.9
NEUTRAL_BIAS = {"additive": 0.0, "multiplicative": 1.0}
# The label of a token without loss (transformers' `ignore_index`): padding-free collators give it to their padding.
IGNORE_INDEX = -100


class _ExpertCounts:
    """Exact token counts per router and expert: int64, on each router's device.

    Plain tensors held by the balancer, never module buffers: DDP broadcasts module buffers from rank 0 before every
    forward (`broadcast_buffers=True`) and would overwrite rank-local counts. They exist from the start, so a compiled
    model does not recompile when the first count arrives.
    """

    def __init__(self, devices: list[torch.device], num_experts: int):
        self.num_experts = num_experts
        # A router still on the meta device (weights not loaded yet) gets its counts on the CPU until it moves.
        self._counts = [
            torch.zeros(num_experts, dtype=torch.int64, device="cpu" if device.type == "meta" else device)
            for device in devices
        ]

    def add(self, index: int, topk_indices: torch.Tensor, token_mask: torch.Tensor | None):
        """Count the `(T, K)` expert indices of one router call; `token_mask` (T,) int64 is 0 for padding."""
        counts = self._counts[index].to(topk_indices.device)  # the same tensor unless the model moved
        if token_mask is None:
            per_choice = torch.ones_like(topk_indices, dtype=torch.int64)  # (T, K)
        else:
            per_choice = token_mask.unsqueeze(-1).expand_as(topk_indices)  # (T, K)
        self._counts[index] = counts.index_add_(0, topk_indices.reshape(-1), per_choice.reshape(-1))

    def stacked(self, device: torch.device) -> torch.Tensor:
        """(routers, experts) copy of the counts on `device`."""
        return _stack_on(self._counts, device)

    def reset(self):
        torch._foreach_zero_(self._counts)


class _QuantileCandidates:
    """Sum and number of Quantile Balancing's per-call candidate biases, per router: (E,) fp32 and a count."""

    def __init__(self, num_routers: int, num_experts: int):
        self.num_experts = num_experts
        self._sums: list[torch.Tensor | None] = [None] * num_routers
        self._calls = [0] * num_routers

    def add(self, index: int, candidate: torch.Tensor):
        sums = self._sums[index]
        self._sums[index] = candidate if sums is None else sums.to(candidate.device) + candidate
        self._calls[index] += 1

    def stacked(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(routers, experts) fp64 sums and (routers, 1) fp64 numbers of calls, on `device`."""
        rows = [
            torch.zeros(self.num_experts, dtype=torch.float64, device=device) if sums is None else sums.double()
            for sums in self._sums
        ]
        calls = torch.tensor(self._calls, dtype=torch.float64, device=device).unsqueeze(-1)
        return _stack_on(rows, device), calls

    def reset(self):
        self._sums = [None] * len(self._sums)
        self._calls = [0] * len(self._calls)


class LoadMeasurement:
    """Expert loads of forwards counted apart from the training loads, e.g. over a validation set.

    Made by `LossFreeBalancer.measure()`. Inside the `with` block every router forward is counted here and not
    toward the next `step()`; with `eval_only=True` only forwards of routers in eval mode are, and training forwards
    keep counting toward `step()`. Under `torch.distributed` every rank must leave the block (or call `stop()`):
    the counts are summed over the balancer's process group there, so `loads` are the global loads.

    Example:

    ```python
    >>> with balancer.measure() as measurement:
    ...     for batch in val_loader:
    ...         model(**batch)
    >>> measurement.maxvio_global  # MaxVio_global of the paper: mean over MoE layers
    ```
    """

    def __init__(self, balancer: "LossFreeBalancer", eval_only: bool):
        self.balancer = balancer
        self.eval_only = eval_only
        self._counts = _ExpertCounts(balancer._bias_devices(), balancer.num_experts)
        self._loads: torch.Tensor | None = None

    def start(self) -> "LoadMeasurement":
        """Start counting (what `with` does on entry)."""
        self.balancer._start_measurement(self)
        return self

    def stop(self) -> "LoadMeasurement":
        """Stop counting and sum the counts over the data-parallel ranks."""
        self.balancer._stop_measurement(self)
        loads = self._counts.stacked(self.balancer.device)
        self.balancer._all_reduce(loads)
        self._loads = loads
        return self

    def reset(self):
        """Forget what was counted so far (no collective)."""
        self._counts.reset()

    def accepts(self, router_training: bool) -> bool:
        """Whether a forward of a router in this training mode is counted here."""
        return not (self.eval_only and router_training)

    def __enter__(self) -> "LoadMeasurement":
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def loads(self) -> torch.Tensor:
        """(routers, experts) int64 loads: global once stopped, this rank's while counting."""
        return self._counts.stacked(self.balancer.device) if self._loads is None else self._loads.clone()

    @property
    def maxvio(self) -> MaxVio:
        """MaxVio of `loads` per layer (numbered as `LossFreeBalancer.layers`); layers with no token are skipped."""
        return maxvio(self.loads, self.balancer.layers)

    @property
    def maxvio_global(self) -> float | None:
        """The paper's MaxVio_global: `maxvio` averaged over the layers that received tokens (None if none did)."""
        return self.maxvio.mean


_BALANCER_OF_ROUTER: "weakref.WeakKeyDictionary[nn.Module, LossFreeBalancer]" = weakref.WeakKeyDictionary()


class LossFreeBalancer:
    r"""Auxiliary-loss-free load balancing (Wang et al., 2024, Algorithm 1) for any model with biased top-K routers.

    Hooks count, per router, the tokens each expert received: exact int64 counts, padding excluded, only in
    training-mode forwards, and never during backward, so activation-checkpoint recomputation (reentrant or not) does
    not count tokens twice. Counts accumulate over micro-batches until `step()`, which you call once after each
    `optimizer.step()`.

    Padding is what the model call says it is: tokens where the 2-D `attention_mask` is 0; without a mask, the
    trailing padding of a padding-free batch (TRL's `padding_free` collator with `pad_to_multiple_of`): the tokens at
    the end of a row that all have position id 0, label -100 and the config's `pad_token_id`. Everything else counts.

    Forwards inside `generate()` (or `generate_batch()`) of the model or any module in it never count toward `step()`,
    in training or eval mode, with or without grad: rollouts of RL trainers do not steer the biases. This holds per
    thread (see `GenerationTracker`): another thread's training forwards still count. Other forwards of a model in
    training mode under `torch.no_grad()` are counted: reentrant checkpointing runs the real forward without grad, so
    grad mode cannot tell them apart. Put the model in eval mode, or use `measure()`, for forwards that must not steer
    the biases.

    A model has at most one balancer: a new one takes over the routers of the one attached before, whose hooks are
    removed (its `step()` then counts nothing and says so).

    Args:
        model: The model, possibly wrapped by DDP, FSDP or Accelerate. Its routers are found by behaviour.
        update_rate (`float`, *optional*): u; defaults to `model.config.bias_update_rate`, else 1e-3. 0 only measures.
        rule (`str`, *optional*): `"sign"`: `b += u * sign(mean - c)` (Algorithm 1); `"error"`:
            `b += u * (mean - c) / mean`; `"smebu"`; `"quantile"` (Quantile Balancing, from the router's scores; see
            update_rules.py). Defaults to `model.config.bias_update_rule`, else `"sign"`.
        bias_type (`str`, *optional*): `"additive"` (routers select on `s + b`, neutral bias 0) or
            `"multiplicative"` (they select on `s * b`, neutral bias 1). Defaults to `model.config.bias_type`, else
            `"additive"`. The update is the same rule in both cases (see `step`); the type sets the neutral value
            the bias statistics are measured from.
        center (`bool`, defaults to `False`): Subtract each layer's mean update, so the biases of a layer keep their
            mean (for `"sign"` the mean update is not 0 when fewer experts are over than under the mean load).
        frozen (`bool`, *optional*): `True` keeps every bias fixed while still measuring loads. `None` (default)
            keeps fixed the bias of any router whose own weights are all frozen (`requires_grad=False`), so freezing
            a router freezes its routing. `False` updates every bias.
        process_group (*optional*): The group the counts are summed over. Default: for a model loaded with
            `from_pretrained(..., distributed_config=...)`, its data-parallel ranks and pipeline stages (tensor- and
            expert-parallel ranks route the same tokens and are not summed twice); otherwise the whole world.
        schedule, warmup_steps, stop_fraction (*optional*): The update-rate schedule (`UpdateSchedule`); default:
            `model.config.bias_update_schedule`, `bias_update_warmup_steps`, `bias_update_stop_fraction`, else
            constant, 0, 1.
        quantile_ema (`float`, *optional*): Weight w of the new candidate for `"quantile"`; default:
            `model.config.bias_quantile_ema`, else 1.
        momentum (`float`, *optional*): mu of `"smebu"`; default: `model.config.bias_update_momentum`, else 0.9.
        total_steps (`int`, *optional*): Optimizer steps of the run, needed by a `"cosine"` schedule or a stop
            fraction below 1 (the Trainer callback sets it from `max_steps`). Settable later as `total_steps`.

    Models whose config says `load_balancing="aux_loss"` or `"none"` are only measured: their biases stay fixed.

    On a PEFT model whose `save_pretrained` writes only the adapter, `step()` warns once when it moves a bias the
    adapter would not carry (the router is not in the adapter's `modules_to_save`).

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

    def __init__(
        self,
        model: nn.Module,
        update_rate: float | None = None,
        rule: str | None = None,
        bias_type: str | None = None,
        center: bool = False,
        frozen: bool | None = None,
        process_group: "dist.ProcessGroup | None" = None,
        schedule: str | None = None,
        warmup_steps: int | None = None,
        stop_fraction: float | None = None,
        quantile_ema: float | None = None,
        momentum: float | None = None,
        total_steps: int | None = None,
    ):
        model = extract_model_from_parallel(model, keep_torch_compile=False)
        config = getattr(model, "config", None)
        self.update_rate = _setting(update_rate, config, "bias_update_rate", DEFAULT_UPDATE_RATE)
        self.rule = _setting(rule, config, "bias_update_rule", DEFAULT_UPDATE_RULE)
        self.bias_type = _setting(bias_type, config, "bias_type", DEFAULT_BIAS_TYPE)
        self.quantile_ema = _setting(quantile_ema, config, "bias_quantile_ema", DEFAULT_QUANTILE_EMA)
        self.momentum = _setting(momentum, config, "bias_update_momentum", DEFAULT_MOMENTUM)
        check_settings(self.update_rate, self.rule, self.bias_type, center, frozen)
        check_rule_options(self.rule, self.quantile_ema, self.momentum)
        self.schedule = UpdateSchedule(
            _setting(schedule, config, "bias_update_schedule", DEFAULT_SCHEDULE),
            _setting(warmup_steps, config, "bias_update_warmup_steps", DEFAULT_WARMUP_STEPS),
            _setting(stop_fraction, config, "bias_update_stop_fraction", DEFAULT_STOP_FRACTION),
        )
        if self.rule == "quantile" and self.bias_type != "additive":
            raise ValueError("rule='quantile' computes an additive bias; it needs bias_type='additive'.")
        self._total_steps = None
        if total_steps is not None:
            self.total_steps = total_steps
        self.completed_steps = 0
        load_balancing = getattr(config, "load_balancing", "loss_free")
        if load_balancing != "loss_free" and (frozen is False or (update_rate is not None and update_rate > 0)):
            raise ValueError(
                f"The model's config.load_balancing is {load_balancing!r}, so its biases stay fixed and the "
                "balancer only measures loads; leave update_rate and frozen unset (or pass frozen=True)."
            )
        self.model = model
        self.center = center
        self.frozen = True if load_balancing != "loss_free" else frozen

        found = find_routers(model)
        # Before any check that may fail on one pipeline stage only: this is a collective there.
        self._load_sum = LoadSum(model, [router.name for router in found], process_group)
        self.process_group = self._load_sum.group
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no router: no module holds `{BIAS_NAME}`. LossFreeBalancer needs biased "
                "top-K routers (register a `RouterAdapter` with `register_router_adapter` for other layouts)."
            )
        num_experts = {getattr(r.bias_owner, r.bias_attr).numel() for r in found}
        if len(num_experts) != 1:
            raise ValueError(f"Every router must have the same number of experts, got {sorted(num_experts)}.")
        if self.rule == "quantile":
            unreadable = [r for r in found if r.adapter.scores is None and scoring_function(r.module) is None]
            if unreadable:
                raise ValueError(
                    f"rule='quantile' needs the routers' scores, but {unreadable[0].name} "
                    f"({type(unreadable[0].module).__name__}) names a scoring function other than sigmoid or softmax. "
                    "Give its `RouterAdapter` a `scores` function, or choose another rule."
                )
        for previous in {_BALANCER_OF_ROUTER[r.module] for r in found if r.module in _BALANCER_OF_ROUTER}:
            previous.remove()  # two balancers would count every token twice
        self._routers = found
        self._layers = layer_numbers([router.name for router in found])
        self._weight_slots = [_weight_slots(router) for router in found]
        self.num_experts = num_experts.pop()
        self._train_counts = _ExpertCounts(self._bias_devices(), self.num_experts)
        self._candidates = _QuantileCandidates(len(found), self.num_experts) if self.rule == "quantile" else None
        self._momentum_state = torch.zeros(len(found), self.num_experts, dtype=torch.float64)
        self._measurements: list[LoadMeasurement] = []
        self._masks: list[torch.Tensor | None] = []
        self._argument_positions = {
            name: _argument_position(model, name) for name in ("attention_mask", "input_ids", "position_ids", "labels")
        }
        self._not_in_adapter = _biases_left_out_of_adapter(model, found)
        self._warned_adapter = False
        self._uncounted_eval_forwards = False  # since the last step(): eval-mode router calls no measurement took
        for index, router in enumerate(found):
            _BALANCER_OF_ROUTER[router.module] = self
            self._prepare_bias(index)
        self._generation = GenerationTracker(model)
        # Functions, not bound methods: a deep copy of the model (a reference model) copies them by reference, so its
        # hooks reach this balancer, which ignores them, instead of a deep copy of it and of its process group.
        self._hooks = [
            model.register_forward_pre_hook(
                lambda module, args, kwargs: self._capture_mask(module, args, kwargs), with_kwargs=True
            ),
            model.register_forward_hook(
                lambda module, args, output: self._release_mask(module, args, output), always_call=True
            ),
            *(
                r.module.register_forward_hook(
                    lambda module, args, output, index=index: self._count(index, module, output)
                )
                for index, r in enumerate(found)
            ),
        ]

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
        """Where `loads` and `biases()` live: the first router's bias device."""
        return self._bias(0).device

    @property
    def loads(self) -> torch.Tensor:
        """(routers, experts) int64 token counts of this rank since the last `step()`."""
        return self._train_counts.stacked(self.device)

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place: False after `remove()` or once another balancer took over the routers."""
        return bool(self._hooks)

    @property
    def updates_biases(self) -> bool:
        """False when `step()` only measures: frozen, u = 0, or a model not trained loss-free."""
        return self.frozen is not True and self.update_rate > 0

    def biases(self) -> torch.Tensor:
        """(routers, experts) fp32 copy of the current biases."""
        return _stack_on([self._bias(index) for index in range(len(self))], self.device, torch.float32)

    def __len__(self) -> int:
        return len(self._routers)

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps of the run, for schedules that decay or stop (None: not given)."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int):
        check_total_steps(value)
        self._total_steps = value

    def step(self) -> dict[str, float]:
        """Update every bias from the loads of the whole optimizer step, then reset the counts.

        The counts of all layers are summed over the data-parallel ranks in one `all_reduce`, so every rank applies
        the same update and the biases stay identical. The update, in fp32 and in place (the module keeps the same
        tensor, so checkpoints and optimizers see it), with c the loads and u the update rate:

        - `"sign"`: `b += u * sign(mean(c) - c)` (Algorithm 1);
        - `"error"`: `b += u * (mean(c) - c) / mean(c)` (the paper's ablation);
        - `"smebu"` and `"quantile"`: see update_rules.py; `"quantile"` takes the mean over router calls and ranks of
          the candidate biases computed at each router call, and its counts, sums and numbers of calls travel in
          one fp64 `all_reduce`;
        - the schedule's factor for this update multiplies u (for `"quantile"`, the EMA weight);
        - `center=True` then subtracts the mean of each layer's update.

        A multiplicative bias (routers select on `s * b`) gets the same additive step, from the paper's starting
        value 1: near 1 a step of u scales a score by 1 +- u, a change of the same size as the additive variant's
        (sigmoid scores are O(1)), so one update rate serves both; `b *= 1 + u * sign(...)` would be the same to
        first order and only drifts apart once b is far from 1. Counts are int64, so they are finite, and a layer that
        counted no token is left unchanged: nothing non-finite can reach a bias.

        Returns:
            Plain floats: `maxvio_batch` (mean over layers that received tokens), `maxvio_batch/layer_{i}` (i is
            the layer number of `layers`), `maxvio_batch/skipped_layers` (how many layers received no token, when
            any did not), `batch_dead_expert_fraction`, `batch_load_cv`, `batch_min_load_ratio` (see
            `load_metrics`), `bias_update_factor` (the schedule's factor), `bias_abs_max` and `bias_abs_mean` (distance from the neutral bias, 0 or 1), and
            `bias_updated` (1.0 or 0.0). With no token counted since the last step there is no MaxVio entry, a
            warning says so (and says to call `model.train()` when the model ran in eval mode), and no bias moves.
        """
        loads = self.loads  # (L, E)
        self._train_counts.reset()
        ran_in_eval_mode, self._uncounted_eval_forwards = self._uncounted_eval_forwards, False
        candidates = None
        if self._candidates is None:
            self._all_reduce(loads)
        else:
            sums, calls = self._candidates.stacked(self.device)
            self._candidates.reset()
            gathered = torch.cat([loads.double(), sums, calls], dim=-1)  # (L, 2E + 1): one collective
            self._all_reduce(gathered)
            gathered = gathered.cpu()
            loads = gathered[:, : self.num_experts].round().long()
            sums, calls = gathered[:, self.num_experts : -1], gathered[:, -1:]
            candidates = sums / calls.clamp(min=1)  # (L, E): mean over calls and ranks
        loads = loads.cpu()
        counted = loads.sum(dim=-1) > 0  # (L,)
        if candidates is not None:
            counted &= calls.squeeze(-1) > 0
        any_counted = bool(loads.sum() > 0)
        self.completed_steps += 1
        factor = self.schedule.factor(self.completed_steps, self._total_steps) if self.updates_biases else 0.0
        stats = maxvio(loads, self.layers).metrics("maxvio_batch")
        stats.update(load_metrics(loads, "batch"))
        stats["bias_update_factor"] = factor
        if not any_counted:
            reason = (
                "this balancer is detached: `remove()` was called or a newer balancer took over the routers."
                if not self.attached
                else "the model ran in eval mode, whose forwards never count toward the biases: call model.train() "
                "before training (from_pretrained returns a model in eval mode)."
                if ran_in_eval_mode
                else "counting needs training-mode forwards of the model the balancer is attached to."
            )
            warnings.warn(
                f"LossFreeBalancer.step(): no token was counted since the last step, so no bias moved; {reason}",
                stacklevel=2,
            )
        biases = [self._bias(index) for index in range(len(self))]
        updated = []
        if self.updates_biases and any_counted and factor > 0:
            movable = counted.clone()
            if self.frozen is None:
                movable &= torch.tensor([not self._weights_frozen(index) for index in range(len(self))])
            updated = movable.nonzero().flatten().tolist()
            for index in updated:
                biases[index] = self._fp32_bias(index)
            if updated:
                current = _stack_on([biases[index] for index in updated], torch.device("cpu"), torch.float64)
                delta = self._update(loads[movable], current, factor, movable, candidates)
                self._add_updates([biases[index] for index in updated], delta.float())
                self._warn_if_left_out_of_adapter(updated)
        distance = (_stack_on(biases, self.device, torch.float32) - NEUTRAL_BIAS[self.bias_type]).abs()  # (L, E)
        stats["bias_abs_max"] = distance.max().item()
        stats["bias_abs_mean"] = distance.mean().item()
        stats["bias_updated"] = float(bool(updated))
        return stats

    def measure(self, eval_only: bool = False) -> LoadMeasurement:
        """A `LoadMeasurement` to use as a context manager: loads counted apart, training counts untouched."""
        if not isinstance(eval_only, bool):
            raise ValueError(f"eval_only must be True or False, got {eval_only!r}.")
        return LoadMeasurement(self, eval_only)

    def remove(self):
        """Detach every hook; the model is left as if the balancer had never been attached."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._generation.remove()
        self._measurements = []
        for router in self._routers:
            if _BALANCER_OF_ROUTER.get(router.module) is self:
                del _BALANCER_OF_ROUTER[router.module]

    def state_dict(self) -> dict:
        """What `step()` carries between steps besides the biases (which the model saves): the count of updates the
        schedule reads and the `"smebu"` momentum, as plain JSON values for a checkpoint."""
        return {"completed_steps": self.completed_steps, "momentum": self._momentum_state.tolist()}

    def load_state_dict(self, state: dict):
        """Restore what `state_dict()` returned, e.g. when resuming from a checkpoint."""
        momentum = torch.tensor(state["momentum"], dtype=torch.float64)
        if momentum.shape != self._momentum_state.shape:
            raise ValueError(
                f"state['momentum'] must have shape {tuple(self._momentum_state.shape)} (routers, experts), got "
                f"{tuple(momentum.shape)}: the state comes from another model."
            )
        self._momentum_state.copy_(momentum)
        self.completed_steps = int(state["completed_steps"])

    def _update(
        self,
        loads: torch.Tensor,
        biases: torch.Tensor,
        factor: float,
        movable: torch.Tensor,
        candidates: torch.Tensor | None,
    ) -> torch.Tensor:
        """(L, E) fp64 update of the `movable` layers, each of which received tokens."""
        step_size = factor * (self.quantile_ema if self.rule == "quantile" else self.update_rate)
        state = self._momentum_state[movable]
        delta = rule_update(
            self.rule,
            loads,
            biases,
            step_size,
            momentum_state=state,
            momentum=self.momentum,
            candidates=None if candidates is None else candidates[movable],
        )
        self._momentum_state[movable] = state
        if self.center:
            delta = delta - delta.mean(dim=-1, keepdim=True)
        return delta

    @staticmethod
    @torch.no_grad()
    def _add_updates(biases: list[torch.Tensor], deltas: torch.Tensor):
        """`biases[i] += deltas[i]` in place, one fused `_foreach_add_` per device (one per step on a single GPU)."""
        by_device: dict[torch.device, list[int]] = {}
        for position, bias in enumerate(biases):
            by_device.setdefault(bias.device, []).append(position)
        for device, positions in by_device.items():
            targets = [biases[position] for position in positions]
            rows = deltas[positions].to(device)
            if len({bias.shape for bias in targets}) == 1:
                rows = rows.view(len(targets), *targets[0].shape).unbind(0)
            else:
                rows = [row.view_as(bias) for row, bias in zip(rows, targets, strict=True)]
            torch._foreach_add_(targets, rows)

    def _warn_if_left_out_of_adapter(self, updated: list[int]):
        left_out = [index for index in updated if self._not_in_adapter[index] is not None]
        if self._warned_adapter or not left_out:
            return
        self._warned_adapter = True
        module_names = sorted({self._not_in_adapter[index] for index in left_out})
        warnings.warn(
            f"LossFreeBalancer moved the biases of {len(left_out)} routers (e.g. {self.names[left_out[0]]}) that this "
            "PEFT model's `save_pretrained` leaves out: it writes only the adapter. Add the modules holding them to "
            f"the adapter config, `modules_to_save={module_names}`, to save the trained biases with the adapter, or "
            "save the merged model (`model.merge_and_unload().save_pretrained(...)`).",
            stacklevel=3,
        )

    def _fp32_bias(self, index: int) -> torch.Tensor:
        """The router's bias, upcast first if something cast it since the last look (e.g. `model.bfloat16()`)."""
        bias = self._bias(index)
        if bias.dtype != torch.float32 or bias.requires_grad:
            self._prepare_bias(index)
            bias = self._bias(index)
        return bias

    def _weights_frozen(self, index: int) -> bool:
        """Whether the router has weights besides its bias and none of them trains.

        Looked up by (module, name) at every step rather than held: FSDP and `setattr` may swap a parameter object.
        """
        weights = [module._parameters.get(name) for module, name in self._weight_slots[index]]
        weights = [weight for weight in weights if weight is not None]
        return bool(weights) and not any(weight.requires_grad for weight in weights)

    def _bias_devices(self) -> list[torch.device]:
        return [self._bias(index).device for index in range(len(self))]

    def _bias(self, index: int) -> torch.Tensor:
        router = self._routers[index]
        return getattr(router.bias_owner, router.bias_attr)

    def _prepare_bias(self, index: int):
        """Make the bias an fp32 tensor without gradient, in place of the module's own, warning when it was not."""
        router = self._routers[index]
        owner, attr = router.bias_owner, router.bias_attr
        bias = getattr(owner, attr)
        if isinstance(bias, nn.Parameter) and bias.requires_grad:
            warnings.warn(
                f"{router.name}: {attr} is a parameter that requires grad; the balancer, not the optimizer, updates "
                "it, so requires_grad is set to False (DDP would otherwise wait for a gradient that never comes).",
                stacklevel=3,
            )
            bias.requires_grad_(False)
        if bias.dtype == torch.float32:
            return
        warnings.warn(
            f"{router.name}: {attr} is {bias.dtype}; updates of 1e-3 would round away (in bf16, 1 + 1e-3 == 1), so it "
            "is replaced by an fp32 copy.",
            stacklevel=3,
        )
        upcast = bias.detach().float()
        if isinstance(bias, nn.Parameter):
            setattr(owner, attr, nn.Parameter(upcast, requires_grad=False))
        else:
            owner.register_buffer(attr, upcast, persistent=attr not in owner._non_persistent_buffers_set)

    def _start_measurement(self, measurement: LoadMeasurement):
        if measurement in self._measurements:
            raise ValueError("This measurement is already counting.")
        self._measurements.append(measurement)

    def _stop_measurement(self, measurement: LoadMeasurement):
        if measurement in self._measurements:
            self._measurements.remove(measurement)

    def _all_reduce(self, loads: torch.Tensor):
        self._load_sum.all_reduce_(loads)

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict):
        if module is not self.model:
            return  # a deep copy of the model (e.g. a reference model) carries the hooks; they ignore it
        mask = self._argument("attention_mask", args, kwargs)
        if isinstance(mask, torch.Tensor) and mask.dim() != 2 and not self._generation.active:
            warnings.warn(
                f"attention_mask of shape {tuple(mask.shape)} is not a 2-D padding mask; every token is counted.",
                stacklevel=2,
            )
        if mask is None:
            mask = self._padding_free_mask(args, kwargs)
        self._masks.append(mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)

    def _argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        """The value of the model call's argument `name`, passed by keyword or by position."""
        if name in kwargs:
            return kwargs[name]
        position = self._argument_positions[name]
        return args[position] if position is not None and len(args) > position else None

    def _padding_free_mask(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """(B, L) 0 on the trailing padding of a padding-free batch, 1 elsewhere; None when the call cannot say.

        A padding-free collator packs sequences into one row, restarting `position_ids` at 0 for each; padding up to
        `pad_to_multiple_of` gets position 0, label -100 and the pad id, so only padding ends a row with tokens that
        all carry those three.
        """
        config = getattr(self.model, "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        pad_token_id = getattr(config, "pad_token_id", None)
        tensors = [self._argument(name, args, kwargs) for name in ("input_ids", "position_ids", "labels")]
        if pad_token_id is None or not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in tensors):
            return None
        input_ids, position_ids, labels = tensors
        if not input_ids.shape == position_ids.shape == labels.shape:
            return None
        padding = (position_ids == 0) & (labels == IGNORE_INDEX) & (input_ids == pad_token_id)  # (B, L)
        trailing = padding.flip(-1).long().cumprod(dim=-1).flip(-1)  # (B, L), 1 from the last non-padding on
        return 1 - trailing

    def _release_mask(self, module: nn.Module, args: tuple, output: Any):
        if module is self.model and self._masks:
            self._masks.pop()

    def _token_mask(self, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """(T,) int64, 0 for padding, from the mask of the current model call; None when every token counts."""
        mask = self._masks[-1] if self._masks else None
        if mask is None:
            return None
        batch_size, mask_length = mask.shape
        tokens_per_row = num_tokens // batch_size
        if num_tokens % batch_size or tokens_per_row > mask_length:
            raise ValueError(
                f"A router saw {num_tokens} tokens, which does not fit the attention_mask of shape "
                f"{tuple(mask.shape)} the model was called with."
            )
        # With a cache the mask covers past tokens too; the routers see only the last `tokens_per_row` columns.
        return (mask[:, mask_length - tokens_per_row :] != 0).reshape(-1).to(device=device, dtype=torch.int64)

    def _recomputing(self) -> bool:
        """Whether this router call is activation checkpointing recomputing, in backward, a forward already counted.

        Eagerly, autograd says whether a backward is running. A hook that `torch.compile` traces cannot ask autograd
        without cutting the graph at every router, so there a recomputation is recognised by running outside any
        call of the model (whose hooks fill `_masks`): a backward starts after the model's forward has returned.
        """
        if torch.compiler.is_compiling():
            return not self._masks
        return torch._C._current_graph_task_id() != -1

    def _count(self, index: int, module: nn.Module, output: Any):
        router = self._routers[index]
        if module is not router.module:
            return  # the router of a deep copy of the model
        topk_indices = router.adapter.topk_indices(router.module, output)  # (T, K)
        if self._recomputing():
            return
        sinks = [m._counts for m in self._measurements if m.accepts(router.module.training)]
        if not sinks and router.module.training and not self._generation.active:
            sinks = [self._train_counts]
        if not sinks:
            self._uncounted_eval_forwards |= not router.module.training
            return
        token_mask = self._token_mask(topk_indices.size(0), topk_indices.device)
        for counts in sinks:
            counts.add(index, topk_indices, token_mask)
        if self._candidates is not None and self._train_counts in sinks and self.updates_biases:
            bias = self._bias(index).reshape(-1)
            candidate = quantile_candidate(read_scores(router, output), bias, topk_indices.size(-1), token_mask)
            if candidate is not None:
                self._candidates.add(index, candidate)


def _setting(value, config, field: str, default):
    if value is not None:
        return value
    return getattr(config, field, default)


def check_settings(
    update_rate=None,
    rule=None,
    bias_type=None,
    center=False,
    frozen=None,
    schedule=None,
    warmup_steps=None,
    stop_fraction=None,
    quantile_ema=None,
    momentum=None,
    total_steps=None,
):
    """Raise `ValueError` naming a bad balancer setting; None stands for "from the model's config" and passes."""
    is_number = isinstance(update_rate, (int, float)) and not isinstance(update_rate, bool)
    if update_rate is not None and not (is_number and math.isfinite(update_rate) and update_rate >= 0):
        raise ValueError(f"update_rate must be a finite number >= 0 (the paper uses 1e-3), got {update_rate!r}.")
    if rule is not None and rule not in UPDATE_RULES:
        raise ValueError(f"rule must be one of {UPDATE_RULES}, got {rule!r}.")
    if bias_type is not None and bias_type not in BIAS_TYPES:
        raise ValueError(f"bias_type must be one of {BIAS_TYPES}, got {bias_type!r}.")
    if not isinstance(center, bool):
        raise ValueError(f"center must be True or False, got {center!r}.")
    if frozen is not None and not isinstance(frozen, bool):
        raise ValueError(f"frozen must be None, True or False, got {frozen!r}.")
    check_schedule(
        DEFAULT_SCHEDULE if schedule is None else schedule,
        DEFAULT_WARMUP_STEPS if warmup_steps is None else warmup_steps,
        DEFAULT_STOP_FRACTION if stop_fraction is None else stop_fraction,
    )
    check_rule_options(
        rule or DEFAULT_UPDATE_RULE,
        DEFAULT_QUANTILE_EMA if quantile_ema is None else quantile_ema,
        DEFAULT_MOMENTUM if momentum is None else momentum,
    )
    if total_steps is not None:
        check_total_steps(total_steps)


def _weight_slots(router: FoundRouter) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every parameter of the router except its bias, recorded when the balancer is
    built: a parameter swapped in under the same name is seen, one added to the router later is not."""
    return [
        (module, name)
        for module in router.module.modules()
        for name, parameter in module._parameters.items()
        if parameter is not None and not (module is router.bias_owner and name == router.bias_attr)
    ]


def _biases_left_out_of_adapter(model: nn.Module, found: list[FoundRouter]) -> list[str | None]:
    """Per router, on a PEFT model (one with a `peft_config`, whose `save_pretrained` writes only the adapter): the
    module name to add to `modules_to_save` so the adapter carries its bias, or None when it already does.

    None for every router of a model without adapters. The bias is saved with the adapter when it lives in a
    `modules_to_save` copy; the module to name is the outer of the router and the module holding its bias.
    """
    peft_config = getattr(model, "peft_config", None)
    if not (isinstance(peft_config, dict) and peft_config):
        return [None] * len(found)
    names = {module: name for name, module in model.named_modules()}
    left_out = []
    for router in found:
        owner = names[router.bias_owner]
        if "modules_to_save" in owner.split("."):
            left_out.append(None)
        else:
            outer = min(owner, router.name, key=len)
            left_out.append(outer.rsplit(".", 1)[-1])
    return left_out


def _stack_on(tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(len, numel) stack of flattened tensors on `device` (in `dtype`, default: theirs); one `torch.stack` when they
    already share a device, dtype and shape, as every router's counts and bias usually do."""
    dtype = dtype or tensors[0].dtype
    if len({(tensor.device, tensor.dtype, tensor.shape) for tensor in tensors}) == 1 and tensors[0].device == device:
        return torch.stack(tensors).detach().to(dtype).reshape(len(tensors), -1)
    return torch.stack([tensor.detach().reshape(-1).to(device=device, dtype=dtype) for tensor in tensors])


def _argument_position(model: nn.Module, name: str) -> int | None:
    """Position of `name` among the positional arguments of `model.forward`, if it has one."""
    parameters = list(inspect.signature(model.forward).parameters.values())
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None


__all__ = ["LoadMeasurement", "LossFreeBalancer"]
