"""Tells `LossFreeBalancer` when a forward runs inside `generate()`, so that decoding never steers the biases.

RL trainers (TRL's GRPO, online DPO) generate rollouts with the model in training mode under `no_grad`, which a router
hook cannot tell from a training forward (reentrant activation checkpointing runs its forward without grad too).
`GenerationTracker` wraps the generation entry points (`generate`, `generate_batch`) of the model and of every module
inside it, on the instances themselves: every way in (PEFT's `PeftModel.generate`, TRL's
`unwrap_model_for_generation`, `pipeline(...)`) reaches one of them. `remove()` deletes the wrappers, leaving the
instances as they were.

The tracking is per thread, so that a sampling thread (async RL) does not hide the training forwards of another
thread. `generate_batch` (continuous batching) decodes in a worker thread that it starts while its caller waits: a
thread started during a `generate_batch` call in progress counts as generating until the call returns, on behalf of
the caller (`calling_thread`).
"""

import threading
import types
from typing import Any

import torch
from torch import nn


GENERATION_METHODS = ("generate", "generate_batch")
_ABSENT = object()
# A generate_batch call in progress: the thread that made it, and the threads alive when it began.
BatchCall = tuple[threading.Thread, frozenset[threading.Thread]]


class GenerationTracker:
    """Tracks the generation calls in progress on a model, per thread."""

    def __init__(self, model: nn.Module):
        self._calls = 0  # in all threads: while 0, `active` is one comparison
        self._local = threading.local()  # .depth: the calls in progress in this thread
        # Per generate_batch call in progress: its caller and the threads alive when it began, so that its worker is
        # any thread not among them.
        self._batch_calls: tuple[BatchCall, ...] = ()
        self._lock = threading.Lock()
        self._wrapped: list[tuple[nn.Module, str, Any, types.MethodType]] = []
        for module in model.modules():
            for name in GENERATION_METHODS:
                if callable(getattr(type(module), name, None)):
                    self._wrap(module, name)

    @property
    def active(self) -> bool:
        """Whether this thread runs a generation call, or is the worker of a `generate_batch` call in progress."""
        if not self._calls:
            return False
        if torch.compiler.is_compiling():
            return True  # a graph cannot ask which thread runs it (dynamo cannot trace that): any generation excludes
        if getattr(self._local, "depth", 0):
            return True
        thread = threading.current_thread()
        return any(thread not in before for _, before in self._batch_calls)

    def calling_thread(self) -> threading.Thread:
        """The thread a forward of this thread runs for: the caller of the `generate_batch` call it is the worker of,
        else itself."""
        thread = threading.current_thread()
        return next((caller for caller, before in self._batch_calls if thread not in before), thread)

    def remove(self):
        """Delete every wrapper still in place; a wrapper something else has since replaced stays, counting for no one."""
        for module, name, previous, wrapper in self._wrapped:
            if module.__dict__.get(name) is not wrapper:
                continue
            if previous is _ABSENT:
                del module.__dict__[name]
            else:
                module.__dict__[name] = previous
        self._wrapped = []

    def _wrap(self, module: nn.Module, name: str):
        previous = module.__dict__.get(name, _ABSENT)
        tracker = self

        def tracked(self_module, *args, **kwargs):
            batch_call = (
                (threading.current_thread(), frozenset(threading.enumerate())) if name == "generate_batch" else None
            )
            tracker._enter(batch_call)
            try:
                if previous is not _ABSENT:
                    return previous(*args, **kwargs)
                return getattr(type(self_module), name)(self_module, *args, **kwargs)
            finally:
                tracker._exit(batch_call)

        # Bound to the instance, so a deep copy of the model (a reference model) generates with the copy.
        wrapper = types.MethodType(tracked, module)
        module.__dict__[name] = wrapper
        self._wrapped.append((module, name, previous, wrapper))

    def _enter(self, batch_call: BatchCall | None):
        self._local.depth = getattr(self._local, "depth", 0) + 1
        with self._lock:
            self._calls += 1
            if batch_call is not None:
                self._batch_calls += (batch_call,)

    def _exit(self, batch_call: BatchCall | None):
        with self._lock:
            if batch_call is not None:
                calls = list(self._batch_calls)
                calls.remove(batch_call)
                self._batch_calls = tuple(calls)
            self._calls -= 1
        self._local.depth -= 1


__all__ = ["GENERATION_METHODS", "GenerationTracker"]
