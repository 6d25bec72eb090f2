"""Where each router's bias lives, and the rules for touching it: in place, in fp32, never while its router is frozen.

The bias is looked up on its owner module at every use rather than held, since `model.bfloat16()`, FSDP or `setattr`
may swap the tensor. A bias that is not fp32 is replaced once by an fp32 copy (in bf16, 1 + 1e-3 == 1); after that
every update is `add_` on the module's own tensor, so checkpoints and optimizers see it. On a PEFT model whose
`save_pretrained` writes only the adapter, a bias the adapter would not carry is named in a warning when it moves.
Routers without a bias (stock families the balancer only measures) have none to keep: `stacked()` is then
(routers, 0).
"""

import warnings

import torch
from torch import nn

from .counting import stack_rows
from .routers import FoundRouter


# The bias that leaves routing as the scores alone would route: added (0) or multiplied (1).
NEUTRAL_BIAS = {"additive": 0.0, "multiplicative": 1.0}


class BiasStorage:
    """The biases of the found routers, made fp32 tensors without gradient when built.

    Args:
        model: The unwrapped model (its `peft_config`, if any, tells which biases an adapter saves).
        routers: The routers whose biases are kept, in layer order.
        stacklevel: Frames between the warnings of construction and the user's call.
    """

    def __init__(self, model: nn.Module, routers: list[FoundRouter], stacklevel: int = 2):
        self._routers = routers
        self._weight_slots = [_weight_slots(router) for router in routers]
        self._not_in_adapter = _biases_left_out_of_adapter(model, routers)
        self._warned_adapter = False
        for index, router in enumerate(routers):
            if router.has_bias:
                self.prepare(index, stacklevel=stacklevel + 1)

    def __len__(self) -> int:
        return len(self._routers)

    def bias(self, index: int) -> torch.Tensor | None:
        """The router's bias, or None for a router without one."""
        router = self._routers[index]
        return getattr(router.bias_owner, router.bias_attr) if router.has_bias else None

    def devices(self) -> list[torch.device]:
        """Where each router's bias lives; for a router without one, where its weights are."""
        return [self._device(index) for index in range(len(self))]

    def stacked(self, device: torch.device) -> torch.Tensor:
        """(routers, experts) fp32 copy of the current biases on `device`; (routers, 0) when the routers have none."""
        if not any(router.has_bias for router in self._routers):
            return torch.zeros(len(self), 0, device=device)
        return stack_rows([self.bias(index) for index in range(len(self))], device, torch.float32)

    def _device(self, index: int) -> torch.device:
        bias = self.bias(index)
        if bias is not None:
            return bias.device
        tensors = [*self._routers[index].module.parameters(), *self._routers[index].module.buffers()]
        return tensors[0].device if tensors else torch.device("cpu")

    def fp32_bias(self, index: int, stacklevel: int = 2) -> torch.Tensor:
        """The router's bias, upcast first if something cast it since the last look (e.g. `model.bfloat16()`)."""
        bias = self.bias(index)
        if bias.dtype != torch.float32 or bias.requires_grad:
            self.prepare(index, stacklevel=stacklevel + 1)
            bias = self.bias(index)
        return bias

    def weights_frozen(self, index: int) -> bool:
        """Whether the router has weights besides its bias and none of them trains.

        Looked up by (module, name) at every step rather than held: FSDP and `setattr` may swap a parameter object.
        """
        weights = [module._parameters.get(name) for module, name in self._weight_slots[index]]
        weights = [weight for weight in weights if weight is not None]
        return bool(weights) and not any(weight.requires_grad for weight in weights)

    def prepare(self, index: int, stacklevel: int = 2):
        """Make the bias an fp32 tensor without gradient, in place of the module's own, warning when it was not."""
        router = self._routers[index]
        owner, attr = router.bias_owner, router.bias_attr
        bias = getattr(owner, attr)
        if isinstance(bias, nn.Parameter) and bias.requires_grad:
            warnings.warn(
                f"{router.name}: {attr} is a parameter that requires grad; the balancer, not the optimizer, updates "
                "it, so requires_grad is set to False (DDP would otherwise wait for a gradient that never comes).",
                stacklevel=stacklevel + 1,
            )
            bias.requires_grad_(False)
        if bias.dtype == torch.float32:
            return
        warnings.warn(
            f"{router.name}: {attr} is {bias.dtype}; updates of 1e-3 would round away (in bf16, 1 + 1e-3 == 1), so it "
            "is replaced by an fp32 copy.",
            stacklevel=stacklevel + 1,
        )
        upcast = bias.detach().float()
        if isinstance(bias, nn.Parameter):
            setattr(owner, attr, nn.Parameter(upcast, requires_grad=False))
        else:
            owner.register_buffer(attr, upcast, persistent=attr not in owner._non_persistent_buffers_set)

    def add_(self, indices: list[int], deltas: torch.Tensor, stacklevel: int = 2):
        """`bias[i] += deltas[row]` in place for the routers `indices` (one row each), in fp32: one fused
        `_foreach_add_` per device (one per step on a single GPU)."""
        biases = [self.fp32_bias(index, stacklevel=stacklevel + 1) for index in indices]
        by_device: dict[torch.device, list[int]] = {}
        for position, bias in enumerate(biases):
            by_device.setdefault(bias.device, []).append(position)
        for device, positions in by_device.items():
            targets = [biases[position] for position in positions]
            rows = deltas[positions].to(device=device, dtype=torch.float32)
            if len({bias.shape for bias in targets}) == 1:
                rows = rows.view(len(targets), *targets[0].shape).unbind(0)
            else:
                rows = [row.view_as(bias) for row, bias in zip(rows, targets, strict=True)]
            with torch.no_grad():
                torch._foreach_add_(targets, rows)

    def warn_if_left_out_of_adapter(self, updated: list[int], stacklevel: int = 2):
        """Warn once when a moved bias lives where the PEFT model's adapter-only `save_pretrained` does not look."""
        left_out = [index for index in updated if self._not_in_adapter[index] is not None]
        if self._warned_adapter or not left_out:
            return
        self._warned_adapter = True
        module_names = sorted({self._not_in_adapter[index] for index in left_out})
        warnings.warn(
            f"LossFreeBalancer moved the biases of {len(left_out)} routers (e.g. {self._routers[left_out[0]].name}) "
            "that this PEFT model's `save_pretrained` leaves out: it writes only the adapter. Add the modules holding "
            f"them to the adapter config, `modules_to_save={module_names}`, to save the trained biases with the "
            "adapter, or save the merged model (`model.merge_and_unload().save_pretrained(...)`).",
            stacklevel=stacklevel + 1,
        )


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
        if not router.has_bias:
            left_out.append(None)
            continue
        owner = names[router.bias_owner]
        if "modules_to_save" in owner.split("."):
            left_out.append(None)
        else:
            outer = min(owner, router.name, key=len)
            left_out.append(outer.rsplit(".", 1)[-1])
    return left_out


__all__ = ["NEUTRAL_BIAS", "BiasStorage"]
