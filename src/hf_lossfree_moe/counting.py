"""Counting the tokens each expert receives, from forward hooks on the model and its routers.

A router call counts toward the next `LossFreeBalancer.step()` when its router is in training mode, it runs outside
`generate()` (per thread, see generation.py) and it is no activation-checkpoint recomputation. Padding never counts:
tokens where the call's 2-D `attention_mask` is 0 or, without a mask, the trailing padding of a padding-free batch.
Counts are exact int64 tensors on each router's device, held here and never in module buffers: DDP broadcasts module
buffers from rank 0 before every forward and would overwrite rank-local counts. `LoadMeasurement` counts forwards
apart from the training counts, e.g. over a validation set.

What a forward counts depends only on its own thread: each thread has its own stack of padding masks, generation
calls and measurements, so a sampling thread's `generate()` (async RL) never lends its mask to, hides, or takes the
training forwards of the trainer's thread. A training call whose router scores hold a NaN or an infinity is recorded
per router, so that `step()` leaves that layer's bias alone instead of updating it from garbage routing. Quantile
Balancing's statistics (each call's candidate, or the margin histograms of the global solver) come from the same
training calls, computed without grad.
"""

import contextlib
import inspect
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from .balance_metrics import MaxVio, compute_maxvio
from .compat import in_backward
from .generation import GenerationTracker
from .routers import FoundRouter, read_scores
from .update_rules import quantile_candidate, quantile_histogram


if TYPE_CHECKING:
    from .balancing import LossFreeBalancer


# The label of a token without loss (transformers' `ignore_index`): padding-free collators give it to their padding.
IGNORE_INDEX = -100


def stack_rows(tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(len, numel) stack of flattened tensors on `device` (in `dtype`, default: theirs); one `torch.stack` when they
    already share a device, dtype and shape, as every router's counts and bias usually do."""
    dtype = dtype or tensors[0].dtype
    if len({(tensor.device, tensor.dtype, tensor.shape) for tensor in tensors}) == 1 and tensors[0].device == device:
        return torch.stack(tensors).detach().to(dtype).reshape(len(tensors), -1)
    return torch.stack([tensor.detach().reshape(-1).to(device=device, dtype=dtype) for tensor in tensors])


class ExpertCounts:
    """Exact token counts per router and expert: int64, on each router's device, with the number of the router's
    calls whose scores were not all finite.

    They exist from the start, so a compiled model does not recompile when the first count arrives.
    """

    def __init__(self, devices: list[torch.device], num_experts: int):
        self.num_experts = num_experts
        # A router still on the meta device (weights not loaded yet) gets its counts on the CPU until it moves.
        devices = [torch.device("cpu") if device.type == "meta" else device for device in devices]
        self._counts = [torch.zeros(num_experts, dtype=torch.int64, device=device) for device in devices]
        self._non_finite = [torch.zeros(1, dtype=torch.int64, device=device) for device in devices]

    def add_non_finite(self, index: int, scores: torch.Tensor):
        """Count one call of router `index` as non-finite when its `scores` hold a NaN or an infinity (no sync)."""
        non_finite = self._non_finite[index].to(scores.device)
        # Detached: under activation checkpointing, autograd must save nothing here that the recomputation would not.
        self._non_finite[index] = non_finite.add_((~torch.isfinite(scores.detach())).any().long())

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
        return stack_rows(self._counts, device)

    def non_finite_calls(self, device: torch.device) -> torch.Tensor:
        """(routers, 1) int64: the calls of each router whose scores were not all finite."""
        return stack_rows(self._non_finite, device)

    def reset(self):
        torch._foreach_zero_(self._counts + self._non_finite)


class QuantileCandidates:
    """Sum and number of Quantile Balancing's per-call candidate biases, per router: (E,) fp32 and a count."""

    def __init__(self, num_routers: int, num_experts: int):
        self.num_experts = num_experts
        self._sums: list[torch.Tensor | None] = [None] * num_routers
        self._calls = [0] * num_routers
        # Forwards in several threads (an evaluation, a sampler) add at once; the sum is a read-modify-write.
        self._lock = threading.Lock()

    def add(self, index: int, candidate: torch.Tensor):
        if torch.compiler.is_compiling():  # a graph cannot take a lock; its list updates run after it, in order
            self._add(index, candidate)
            return
        with self._lock:
            self._add(index, candidate)

    def _add(self, index: int, candidate: torch.Tensor):
        sums = self._sums[index]
        self._sums[index] = candidate if sums is None else sums.to(candidate.device) + candidate
        self._calls[index] += 1

    def take(self, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`stacked(device)` (None without a device), then `reset()`, with no `add` in between."""
        with self._lock:
            stacked = None if device is None else self.stacked(device)
            self.reset()
        return stacked

    def stacked(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(routers, experts) fp64 sums and (routers, 1) fp64 numbers of calls, on `device`."""
        rows = [
            torch.zeros(self.num_experts, dtype=torch.float64, device=device) if sums is None else sums.double()
            for sums in self._sums
        ]
        calls = torch.tensor(self._calls, dtype=torch.float64, device=device).unsqueeze(-1)
        return stack_rows(rows, device), calls

    def reset(self):
        self._sums = [None] * len(self._sums)
        self._calls = [0] * len(self._calls)


class QuantileHistograms:
    """Quantile Balancing's global-batch statistics, per router: the (E, bins + 2) int32 histogram of the margins of
    every training call of the step (`quantile_histogram`) and the number K of experts per token.

    A step's bins are those of the settings when its first call arrives, so every call of the step adds to the same
    bins and a changed setting takes effect at the next step. The histograms are allocated at a router's first call
    (none while Quantile Balancing is off). int32 counts are exact up to 2**31 tokens per rank and step.

    Args:
        num_routers, num_experts: The shape of what is counted.
        layout: The current `(bins, value_range)` of the settings.
    """

    def __init__(self, num_routers: int, num_experts: int, layout: Callable[[], tuple[int, float]]):
        self.num_experts = num_experts
        self._current_layout = layout
        self.layout: tuple[int, float] | None = None  # this step's (bins, value_range), from its first call
        self._histograms: list[torch.Tensor | None] = [None] * num_routers
        self._top_k = [0] * num_routers
        # Forwards in several threads add at once; the bins of a step must not change under a call binning into them.
        self._lock = threading.Lock()

    def add(self, index: int, scores: torch.Tensor, bias: torch.Tensor, top_k: int, token_mask: torch.Tensor | None):
        # a graph cannot take a lock; its list updates run after it, in order
        with contextlib.nullcontext() if torch.compiler.is_compiling() else self._lock:
            if self.layout is None:
                self.layout = self._current_layout()
            histogram = quantile_histogram(scores, bias, top_k, *self.layout, token_mask)
            existing = self._histograms[index]
            self._histograms[index] = histogram if existing is None else existing.to(histogram.device).add_(histogram)
            self._top_k[index] = top_k

    def take(self, device: torch.device | None) -> tuple[torch.Tensor | None, tuple[int, float]]:
        """`stacked(device)` (None without a device: a step that reads no histogram builds none) with the step's
        `(bins, value_range)`, then counting restarts, with no `add` in between."""
        with self._lock:
            stacked = None if device is None else self.stacked(device)
            layout = self.layout or self._current_layout()
            self._histograms = [None] * len(self._histograms)
            self.layout = None
        return stacked, layout

    def stacked(self, device: torch.device) -> torch.Tensor:
        """(routers, E * (bins + 2) + 1) fp64 on `device`: each router's flattened histogram, then the number of
        expert choices (tokens x K) behind it; zeros for a router without a call."""
        bins = (self.layout or self._current_layout())[0]
        rows = [
            torch.zeros(self.num_experts * (bins + 2) + 1, dtype=torch.float64, device=device)
            if histogram is None
            else torch.cat([histogram.reshape(-1), top_k * histogram[0].sum(dim=-1, keepdim=True)]).double()
            for histogram, top_k in zip(self._histograms, self._top_k, strict=True)
        ]
        return stack_rows(rows, device, torch.float64)


class LoadMeasurement:
    """Expert loads of forwards counted apart from the training loads, e.g. over a validation set.

    Made by `LossFreeBalancer.measure()`. Inside the `with` block every router forward of the thread that started it
    (and of the workers of its `generate_batch` calls) is counted here and not toward the next `step()`; with
    `eval_only=True` only forwards of routers in eval mode are, and training forwards keep counting toward `step()`.
    Other threads' forwards count as if no measurement were running, unless `all_threads=True`. Under `torch.distributed` every rank must leave
    the block (or call `stop()`): the counts are summed over the balancer's process group there, so `loads` are the
    global loads.

    Example:

    ```python
    >>> with balancer.measure() as measurement:
    ...     for batch in val_loader:
    ...         model(**batch)
    >>> measurement.maxvio_global  # MaxVio_global of the paper: mean over MoE layers
    ```
    """

    def __init__(self, balancer: "LossFreeBalancer", eval_only: bool, all_threads: bool = False):
        self.balancer = balancer
        self.eval_only = eval_only
        self.all_threads = all_threads
        self._counts = ExpertCounts(balancer._storage.devices(), balancer.num_experts)
        self._loads: torch.Tensor | None = None
        self.thread: threading.Thread | None = None  # the thread whose forwards it counts, once started; None: all

    def start(self) -> "LoadMeasurement":
        """Start counting (what `with` does on entry)."""
        self.balancer._counter.start_measurement(self)
        return self

    def stop(self) -> "LoadMeasurement":
        """Stop counting and sum the counts over the data-parallel ranks."""
        self.balancer._counter.stop_measurement(self)
        loads = self._counts.stacked(self.balancer.device)
        self.balancer._all_reduce(loads)
        self._loads = loads
        return self

    def reset(self):
        """Forget what was counted so far (no collective)."""
        self._counts.reset()

    def accepts(self, router_training: bool, thread: threading.Thread | None) -> bool:
        """Whether a forward of a router in this training mode, run for `thread` (None: any), is counted here."""
        return not (self.eval_only and router_training) and (thread is None or self.thread in (None, thread))

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
        return compute_maxvio(self.loads, self.balancer.layers)

    @property
    def maxvio_global(self) -> float | None:
        """The paper's MaxVio_global: `maxvio` averaged over the layers that received tokens (None if none did)."""
        return self.maxvio.mean


class StepCounts(NamedTuple):
    """What one rank counted for a step.

    Attributes:
        loads: (routers, experts) int64 token counts.
        non_finite: (routers, 1) int64 numbers of calls whose scores were not all finite.
        quantile: Quantile Balancing's (routers, columns) fp64 statistics, to be summed over ranks, or None: for
            `"call_mean"` the candidate sums and the number of calls, for `"global_histogram"` the histograms.
        histogram_layout: The `(bins, value_range)` of the histograms.
        ran_in_eval_mode: Whether eval-mode forwards went uncounted.
    """

    loads: torch.Tensor
    non_finite: torch.Tensor
    quantile: torch.Tensor | None
    histogram_layout: tuple[int, float]
    ran_in_eval_mode: bool


class TokenCounter:
    """The hooks of one balancer and what they count into: the training counts of the next step, Quantile
    Balancing's candidates, and the measurements in progress.

    Args:
        model: The unwrapped model; a pre-hook reads the padding of each of its calls.
        routers: The routers to count, in layer order.
        devices: Each router's bias device, where its counts live.
        num_experts: Experts per router.
        bias: The current bias of router `index`, read for Quantile Balancing's statistics.
        quantile_solver: The Quantile Balancing solver whose statistics training forwards collect (`"call_mean"`:
            candidates, `"global_histogram"`: histograms), None for none (asked per call, so settings changed after
            construction take effect).
        histogram_layout: The current `(bins, value_range)` of the global histograms.
    """

    def __init__(
        self,
        model: nn.Module,
        routers: list[FoundRouter],
        devices: list[torch.device],
        num_experts: int,
        bias: Callable[[int], torch.Tensor],
        quantile_solver: Callable[[], str | None],
        histogram_layout: Callable[[], tuple[int, float]],
    ):
        self.model = model
        self._routers = routers
        self._bias = bias
        self._quantile_solver = quantile_solver
        self.train_counts = ExpertCounts(devices, num_experts)
        self.candidates = QuantileCandidates(len(routers), num_experts)
        self.histograms = QuantileHistograms(len(routers), num_experts, histogram_layout)
        # Replaced, never changed in place, under `_lock`: the hooks of other threads iterate over it unlocked.
        self.measurements: tuple[LoadMeasurement, ...] = ()
        self.uncounted_eval_forwards = False  # since the last step(): eval-mode router calls no measurement took
        self._lock = threading.Lock()
        self._local = threading.local()  # .masks: this thread's stack of model calls' padding masks
        self._argument_positions = {
            name: _argument_position(model, name) for name in ("attention_mask", "input_ids", "position_ids", "labels")
        }
        self._generation = GenerationTracker(model)
        # Functions, not bound methods: a deep copy of the model (a reference model) copies them by reference, so its
        # hooks reach this counter, which ignores them, instead of a deep copy of it and of the balancer's group.
        self._hooks = [
            model.register_forward_pre_hook(
                lambda module, args, kwargs: self._capture_mask(module, args, kwargs), with_kwargs=True
            ),
            model.register_forward_hook(
                lambda module, args, output: self._release_mask(module, args, output), always_call=True
            ),
            *(
                router.module.register_forward_hook(
                    lambda module, args, output, index=index: self._count(index, module, output)
                )
                for index, router in enumerate(routers)
            ),
        ]

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def remove(self):
        """Detach every hook and generation wrapper; the model is left as if the counter had never been attached."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._generation.remove()
        with self._lock:
            self.measurements = ()

    def take_step(self, device: torch.device, solver: str | None) -> "StepCounts":
        """What this rank counted since the last step, with the statistics of Quantile Balancing's `solver` (None:
        none); counting then restarts."""
        loads = self.train_counts.stacked(device)
        non_finite = self.train_counts.non_finite_calls(device)
        self.train_counts.reset()
        candidates = self.candidates.take(device if solver == "call_mean" else None)
        histograms, layout = self.histograms.take(device if solver == "global_histogram" else None)
        quantile = torch.cat(candidates, dim=-1) if candidates is not None else histograms
        with self._lock:
            ran_in_eval_mode, self.uncounted_eval_forwards = self.uncounted_eval_forwards, False
        return StepCounts(loads, non_finite, quantile, layout, ran_in_eval_mode)

    def start_measurement(self, measurement: LoadMeasurement):
        with self._lock:
            if measurement in self.measurements:
                raise ValueError("This measurement is already counting.")
            measurement.thread = None if measurement.all_threads else threading.current_thread()
            self.measurements = (*self.measurements, measurement)

    def stop_measurement(self, measurement: LoadMeasurement):
        with self._lock:
            self.measurements = tuple(m for m in self.measurements if m is not measurement)

    def _note_uncounted_eval_forward(self):
        if torch.compiler.is_compiling():  # a graph cannot take a lock; the store runs after it
            self.uncounted_eval_forwards = True
            return
        with self._lock:  # not lost to a `take_step` reading and clearing the flag at the same time
            self.uncounted_eval_forwards = True

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

    @property
    def _masks(self) -> list[torch.Tensor | None]:
        """This thread's padding masks of the model calls in progress, innermost last."""
        return self._local.__dict__.setdefault("masks", [])

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
        return in_backward()

    def _count(self, index: int, module: nn.Module, output: Any):
        router = self._routers[index]
        if module is not router.module:
            return  # the router of a deep copy of the model
        topk_indices = router.adapter.topk_indices(router.module, output)  # (T, K)
        if self._recomputing():
            return
        # A graph cannot ask which thread runs it: compiled, every measurement in progress counts.
        thread = None if torch.compiler.is_compiling() else self._generation.calling_thread()
        sinks = [m._counts for m in self.measurements if m.accepts(router.module.training, thread)]
        if not sinks and router.module.training and not self._generation.active:
            sinks = [self.train_counts]
        if not sinks:
            if not router.module.training:
                self._note_uncounted_eval_forward()
            return
        token_mask = self._token_mask(topk_indices.size(0), topk_indices.device)
        for counts in sinks:
            counts.add(index, topk_indices, token_mask)
        if self.train_counts not in sinks:
            return
        scores = _routing_scores(router, output)
        if scores is not None:
            self.train_counts.add_non_finite(index, scores)
        solver = self._quantile_solver()
        if solver is None:
            return
        bias = self._bias(index).reshape(-1)
        # Without grad: under activation checkpointing, autograd must save nothing here (reading the scores from the
        # logits would) that the recomputation, which returns above, does not.
        with torch.no_grad():
            scores = read_scores(router, output)
            if solver == "global_histogram":
                self.histograms.add(index, scores, bias, topk_indices.size(-1), token_mask)
                return
            candidate = quantile_candidate(scores, bias, topk_indices.size(-1), token_mask)
        if candidate is not None:
            self.candidates.add(index, candidate)


def _routing_scores(router: FoundRouter, output: Any) -> torch.Tensor | None:
    """What the router selected on, to check for NaN and infinity: its adapter's scores, else its logits (the first
    output; an infinite logit is a finite sigmoid score but no sound routing); None when it returns neither."""
    if router.adapter.scores is not None:
        return router.adapter.scores(router.module, output)
    logits = output[0] if isinstance(output, (tuple, list)) and output else output
    return logits if isinstance(logits, torch.Tensor) and logits.is_floating_point() else None


def _argument_position(model: nn.Module, name: str) -> int | None:
    """Position of `name` among the positional arguments of `model.forward`, if it has one."""
    parameters = list(inspect.signature(model.forward).parameters.values())
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None


__all__ = [
    "ExpertCounts",
    "LoadMeasurement",
    "QuantileCandidates",
    "QuantileHistograms",
    "StepCounts",
    "TokenCounter",
    "stack_rows",
]
