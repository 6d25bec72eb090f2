"""Tells `LossFreeBalancer` when a forward runs inside `generate()`, so that decoding never steers the biases.

RL trainers (TRL's GRPO, online DPO) generate rollouts with the model in training mode under `no_grad`, which a router
hook cannot tell from a training forward (reentrant activation checkpointing runs its forward without grad too).
`GenerationTracker` wraps the generation entry points (`generate`, `generate_batch`) of the model and of every module
inside it, on the instances themselves: every way in (PEFT's `PeftModel.generate`, TRL's
`unwrap_model_for_generation`, `pipeline(...)`) reaches one of them, and a forward pays nothing. `remove()` deletes
the wrappers, leaving the instances as they were.
"""

import types
from typing import Any

from torch import nn


GENERATION_METHODS = ("generate", "generate_batch")
_ABSENT = object()


class GenerationTracker:
    """Counts the generation calls in progress on a model; `active` is True while any runs.

    The count is shared by all threads: `generate_batch` decodes in a worker thread while the caller waits.
    """

    def __init__(self, model: nn.Module):
        self.depth = 0
        self._wrapped: list[tuple[nn.Module, str, Any, types.MethodType]] = []
        for module in model.modules():
            for name in GENERATION_METHODS:
                if callable(getattr(type(module), name, None)):
                    self._wrap(module, name)

    @property
    def active(self) -> bool:
        return self.depth > 0

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
            tracker.depth += 1
            try:
                if previous is not _ABSENT:
                    return previous(*args, **kwargs)
                return getattr(type(self_module), name)(self_module, *args, **kwargs)
            finally:
                tracker.depth -= 1

        # Bound to the instance, so a deep copy of the model (a reference model) generates with the copy.
        wrapper = types.MethodType(tracked, module)
        module.__dict__[name] = wrapper
        self._wrapped.append((module, name, previous, wrapper))


__all__ = ["GENERATION_METHODS", "GenerationTracker"]
