"""How `LossFreeBalancer` finds the routers of a model and reads what they chose.

Routers are found by behaviour, not by class: by default a module holding `e_score_correction_bias` whose forward
returns `(router_logits, topk_weights, topk_indices)`, the contract of transformers' DeepSeek-V3 router. Families with
another layout, or with no bias at all (whose loads are only measured), plug in a `RouterAdapter` (see families.py). Discovery is a pure function of the model: no state is
kept between calls. Copies of a router that do not run, such as the original that PEFT's `modules_to_save` keeps
beside the trained copy, are not routers: each MoE layer has one, the copy its forward goes through.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .compat import scoring_function_from_source


BIAS_NAME = "e_score_correction_bias"


@dataclass(frozen=True)
class RouterLocation:
    """A router and where its correction bias lives: `getattr(bias_owner, bias_attr)`, one entry per expert.

    A router without a bias (its loads can be measured, not balanced) has `bias_owner=None`, `bias_attr=None` and
    says its number of experts in `num_experts`.
    """

    router: nn.Module
    bias_owner: nn.Module | None
    bias_attr: str | None
    num_experts: int | None = None

    def __post_init__(self):
        if self.bias_owner is None and not (isinstance(self.num_experts, int) and self.num_experts > 0):
            raise ValueError(
                f"A RouterLocation without a bias must give num_experts (an integer > 0), got {self.num_experts!r}."
            )


@dataclass(frozen=True)
class RouterAdapter:
    """How the balancer reads one family of routers.

    Attributes:
        name: The family's name, shown in errors; registering a second adapter with the same name replaces the first.
        locate: Given any module of the model, the `RouterLocation` it makes known, or None. The located router is
            the module whose forward output holds the top-K expert indices; it may be the module itself or a child
            (e.g. a block that holds the bias and hands it to its `gate`).
        topk_indices: The `(T, K)` integer expert indices, read from the router's forward output.
        scores: The `(T, E)` fp32 routing scores the router selects on before adding its bias, read from its forward
            output; needed only by `bias_update_rule="quantile"`. Default (None): `router_scores`, the router's
            scoring function applied to `router_logits`, the first output.
    """

    name: str
    locate: Callable[[nn.Module], RouterLocation | None]
    topk_indices: Callable[[nn.Module, Any], torch.Tensor]
    scores: Callable[[nn.Module, Any], torch.Tensor] | None = None


def holds_bias(module: nn.Module) -> bool:
    """Whether `module` itself (not a child) has an `e_score_correction_bias` buffer or parameter."""
    own_tensors = (name for name, _ in (*module.named_buffers(recurse=False), *module.named_parameters(recurse=False)))
    return BIAS_NAME in own_tensors


def routes_by_expert_choice(module: nn.Module) -> bool:
    """Whether `module` is an Expert Choice router, as it says with `routes_by_expert_choice = True`: its experts pick
    their tokens, so every expert gets the same load by construction and there is no bias to balance."""
    return getattr(module, "routes_by_expert_choice", False) is True


def deepseek_v3_topk_indices(router: nn.Module, output: Any) -> torch.Tensor:
    """The (T, K) indices of a `(router_logits, topk_weights, topk_indices)` output."""
    indices = output[-1] if isinstance(output, tuple) and len(output) == 3 else None
    if not (
        isinstance(indices, torch.Tensor)
        and indices.dim() == 2
        and not indices.is_floating_point()
        and not indices.is_complex()
    ):
        raise ValueError(
            f"{type(router).__name__} holds `{BIAS_NAME}`, but its forward does not return "
            "(router_logits, topk_weights, topk_indices) with integer topk_indices of shape (tokens, top_k). Tell "
            "LossFreeBalancer how to read this router: register a `RouterAdapter` with `register_router_adapter`."
        )
    return indices


SCORING_FUNCTION_ATTRIBUTES = ("scoring_func", "score_function", "scoring_function", "score_fn")
NAMED_SCORING_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "softmax": lambda logits: logits.softmax(dim=-1),
    "identity": lambda logits: logits,
}


def scoring_function(router: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The function that turns the router's logits into its scores, or None when it cannot be told.

    The router's own `scoring_func` / `score_function` / `scoring_function` / `score_fn` says it: a name
    (`"sigmoid"`, `"softmax"`) or the callable itself (e.g. `ACT2FN[config.scoring_func]`). A router without one is
    read by the code of its `forward` (`compat.scoring_function_from_source`).
    """
    for attribute in SCORING_FUNCTION_ATTRIBUTES:
        value = getattr(router, attribute, None)
        if isinstance(value, str):
            return NAMED_SCORING_FUNCTIONS.get(value)
        if callable(value):
            return value
    return NAMED_SCORING_FUNCTIONS[scoring_function_from_source(type(router), BIAS_NAME)]


def router_scores(router: nn.Module, output: Any) -> torch.Tensor:
    """The (T, E) fp32 scores of a router whose first output is `router_logits`: its scoring function applied."""
    function = scoring_function(router)
    logits = output[0] if isinstance(output, tuple) else None
    if function is None or not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(
            f"{type(router).__name__}: bias_update_rule='quantile' needs the router's scores, and they cannot be "
            "read from its output (router_logits first, and a scoring function named by `scoring_func`). Give its "
            "`RouterAdapter` a `scores` function, or choose another bias_update_rule."
        )
    return function(logits.float().reshape(-1, logits.size(-1))).float()


def read_scores(router: "FoundRouter", output: Any) -> torch.Tensor:
    """The (T, E) fp32 scores of one forward of a found router, checked against its number of experts."""
    read = router.adapter.scores or router_scores
    scores = read(router.module, output)
    num_experts = router.num_experts
    if scores.dim() != 2 or scores.size(-1) != num_experts:
        raise ValueError(
            f"{router.name}: bias_update_rule='quantile' needs (tokens, {num_experts}) scores, but its "
            f"'{router.adapter.name}' adapter read shape {tuple(scores.shape)}. Give the adapter a `scores` function."
        )
    return scores


DEEPSEEK_V3_ADAPTER = RouterAdapter(
    name="deepseek_v3",
    locate=lambda module: RouterLocation(module, module, BIAS_NAME) if holds_bias(module) else None,
    topk_indices=deepseek_v3_topk_indices,
)
_FAMILY_ADAPTERS: dict[str, RouterAdapter] = {}


def register_router_adapter(adapter: RouterAdapter) -> None:
    """Teach `LossFreeBalancer` a router family; family adapters are tried before the DeepSeek-V3 default."""
    if not isinstance(adapter, RouterAdapter):
        raise ValueError(f"adapter must be a RouterAdapter, got {type(adapter).__name__}.")
    _FAMILY_ADAPTERS[adapter.name] = adapter


@dataclass(frozen=True)
class FoundRouter:
    """A router found in a model: its qualified name, the module, the adapter that reads it, where its bias is
    (`bias_owner` None for a router without one) and its number of experts."""

    name: str
    module: nn.Module
    adapter: RouterAdapter
    bias_owner: nn.Module | None
    bias_attr: str | None
    num_experts: int

    @property
    def has_bias(self) -> bool:
        return self.bias_owner is not None


def wrapper_copies(module: nn.Module) -> tuple[nn.Module, list[nn.Module]] | None:
    """`(running, idle)` copies of the module a PEFT-style wrapper holds, or None if `module` is no such wrapper.

    PEFT's `ModulesToSaveWrapper` (recognised by its `original_module` and `modules_to_save` children) keeps the
    original module and one trainable copy per adapter; its forward runs the copy of the active adapter, or the
    original while adapters are disabled.
    """
    original = module._modules.get("original_module")
    copies = module._modules.get("modules_to_save")
    if not isinstance(original, nn.Module) or not isinstance(copies, nn.ModuleDict):
        return None
    active = list(getattr(module, "active_adapters", None) or [])
    if getattr(module, "disable_adapters", False) or not active or active[0] not in copies:
        running = original
    else:
        running = copies[active[0]]
    return running, [copy for copy in (original, *copies.values()) if copy is not running]


def idle_modules(model: nn.Module) -> set[nn.Module]:
    """Modules of `model` that never run as routers: wrappers of `wrapper_copies` and everything in their idle copies.

    A wrapper hands out its running copy's attributes, so a family adapter reading attributes would find the router
    a second time through it.
    """
    idle = set()
    for module in model.modules():
        copies = wrapper_copies(module)
        if copies is not None:
            idle.add(module)
            idle.update(inner for copy in copies[1] for inner in copy.modules())
    return idle


def find_routers(model: nn.Module) -> list[FoundRouter]:
    """Every router of `model` in module order (layer order), each with the adapter that reads it.

    A bias that a family adapter claims is not also read by the DeepSeek-V3 default (e.g. a module that only stores
    the bias for its router), so no bias is counted twice. Of a router wrapped by PEFT's `modules_to_save`, only the
    copy that runs when the routers are found is one (see `wrapper_copies`).
    """
    adapters = [*_FAMILY_ADAPTERS.values(), DEEPSEEK_V3_ADAPTER]
    idle = idle_modules(model)
    names = {module: name for name, module in model.named_modules()}
    expert_choice = [name for module, name in names.items() if routes_by_expert_choice(module)]
    if expert_choice:
        raise ValueError(
            f"{expert_choice[0]} routes by Expert Choice (load_balancing='expert_choice'): each expert picks its "
            "tokens, so loads are balanced by construction and there is no bias to update. LossFreeBalancer and its "
            "callback do not apply; train such a model without them."
        )
    located = []
    for module in names:
        if module in idle:
            continue
        for adapter in adapters:
            location = adapter.locate(module)
            if location is not None:
                located.append((adapter, location))
                break
    claimed = {
        (location.bias_owner, location.bias_attr)
        for adapter, location in located
        if adapter is not DEEPSEEK_V3_ADAPTER
    }
    # A router that a block hands its bias to (e.g. LFM2-MoE's, whose bias argument is optional) is not also a router
    # without a bias.
    biased = {location.router for _, location in located if location.bias_owner is not None}
    found = [
        FoundRouter(names[loc.router], loc.router, adapter, loc.bias_owner, loc.bias_attr, _num_experts(loc))
        for adapter, loc in located
        if (adapter is not DEEPSEEK_V3_ADAPTER or (loc.bias_owner, loc.bias_attr) not in claimed)
        and (loc.bias_owner is not None or loc.router not in biased)
    ]
    order = {module: position for position, module in enumerate(names)}
    return sorted(found, key=lambda router: order[router.module])


def _num_experts(location: RouterLocation) -> int:
    if location.bias_owner is None:
        return location.num_experts
    return getattr(location.bias_owner, location.bias_attr).numel()


def decoder_layer_indices(router_names: list[str]) -> list[int] | None:
    """Each router's decoder-layer index, read from `layers.{i}.` in its name; None unless every router has its own
    (a name without an index, or two routers in one layer, e.g. separate text and vision experts)."""
    matches = [re.search(r"(?:^|\.)layers\.(\d+)\.", name) for name in router_names]
    numbers = [int(match.group(1)) if match else None for match in matches]
    if None in numbers or len(set(numbers)) != len(numbers):
        return None
    return numbers


def layer_numbers(router_names: list[str]) -> list[int]:
    """The number of each router in metrics: its decoder-layer index (`model.layers[i]` is what users see), or, where
    `decoder_layer_indices` finds none, its position 0, 1, ..., so that every number names one router."""
    indices = decoder_layer_indices(router_names)
    return list(range(len(router_names))) if indices is None else indices


__all__ = [
    "BIAS_NAME",
    "DEEPSEEK_V3_ADAPTER",
    "FoundRouter",
    "RouterAdapter",
    "RouterLocation",
    "find_routers",
    "holds_bias",
    "idle_modules",
    "decoder_layer_indices",
    "layer_numbers",
    "read_scores",
    "register_router_adapter",
    "routes_by_expert_choice",
    "wrapper_copies",
    "router_scores",
    "scoring_function",
]
