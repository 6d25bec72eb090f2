"""Router adapters for transformers' own MoE families whose layout differs from DeepSeek-V3's.

Most MoE families with an `e_score_correction_bias` route like DeepSeek-V3 (the router holds the bias and returns
`(router_logits, topk_weights, topk_indices)`), and `LossFreeBalancer` finds them without help. Three layouts differ;
the adapters below, registered when the package is imported, teach the balancer to read them:

- ERNIE-4.5-MoE, ERNIE-4.5-VL-MoE: the bias is an `nn.Parameter` of shape (1, E) in the router's `moe_statics`.
- MiniMax-M2, Hunyuan-V3, the vision MoE of dots3-note, AFMoE (as `expert_bias`): the MoE block holds the bias and
  hands it to its `gate` (AFMoE: `router`) as an argument on every call.
- Inkling: the router also scores the shared experts and returns their gate values as a fourth output.

Most MoE families have no bias at all (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, gpt-oss, ...), yet their routers keep the
same contract: a module with a top-K and a number of experts (its own `top_k` and `num_experts`, or its config's)
whose forward takes the hidden states and returns
`(router_logits, router_scores, router_indices)`. `TOPK_ROUTER_ADAPTER` finds them, so the balancer measures their
loads; `selection_bias.add_selection_bias` gives them a bias to balance on request.
"""

import inspect
import re
from functools import cache
from typing import Any

import torch
from torch import nn

from .routers import (
    BIAS_NAME,
    RouterAdapter,
    RouterLocation,
    deepseek_v3_topk_indices,
    holds_bias,
    register_router_adapter,
    wrapper_copies,
)


def _locate_statics_router(module: nn.Module) -> RouterLocation | None:
    statics = getattr(module, "moe_statics", None)
    if isinstance(statics, nn.Module) and holds_bias(statics):
        return RouterLocation(module, statics, BIAS_NAME)
    return None


STATICS_ADAPTER = RouterAdapter(
    name="moe_statics", locate=_locate_statics_router, topk_indices=deepseek_v3_topk_indices
)


# Names under which a block hands its bias to its router: DeepSeek-V3's, and AFMoE's `expert_bias`.
ARGUMENT_BIAS_NAMES = (BIAS_NAME, "expert_bias")


def _locate_bias_argument_gate(module: nn.Module) -> RouterLocation | None:
    """A block that holds the bias and passes it to its `gate` (or `router`): the gate routes, the block keeps it.

    A gate wrapped by PEFT's `modules_to_save` routes through its running copy.
    """
    own = {name for name, _ in (*module.named_buffers(recurse=False), *module.named_parameters(recurse=False))}
    for child in ("gate", "router"):
        gate = getattr(module, child, None)
        copies = wrapper_copies(gate) if isinstance(gate, nn.Module) else None
        if copies is not None:
            gate = copies[0]
        if not isinstance(gate, nn.Module):
            continue
        arguments = inspect.signature(gate.forward).parameters
        for name in ARGUMENT_BIAS_NAMES:
            if name in own and name in arguments:
                return RouterLocation(gate, module, name)
    return None


BIAS_ARGUMENT_ADAPTER = RouterAdapter(
    name="bias_argument", locate=_locate_bias_argument_gate, topk_indices=deepseek_v3_topk_indices
)


def _locate_shared_gates_router(module: nn.Module) -> RouterLocation | None:
    """A biased router with more weight rows than biases: the extra rows gate the shared experts."""
    weight = getattr(module, "weight", None)
    if (
        holds_bias(module)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.size(0) > getattr(module, BIAS_NAME).numel()
    ):
        return RouterLocation(module, module, BIAS_NAME)
    return None


def _routed_topk_indices(router: nn.Module, output: Any) -> torch.Tensor:
    """`(router_logits, topk_weights, topk_indices, shared_gates)` -> the (T, K) routed expert indices."""
    if not (isinstance(output, tuple) and len(output) == 4):
        raise ValueError(
            f"{type(router).__name__} scores its shared experts, so its forward should return the 4-tuple "
            f"(router_logits, topk_weights, topk_indices, shared_gates); got {type(output).__name__}."
        )
    return deepseek_v3_topk_indices(router, output[:3])


SHARED_GATES_ADAPTER = RouterAdapter(
    name="shared_gates", locate=_locate_shared_gates_router, topk_indices=_routed_topk_indices
)

# The last statement of a router forward that hands back its top-K choice: `return logits, weights, indices`.
_THREE_OUTPUTS = re.compile(r"\n\s*return\s+\w+\s*,\s*[\w.()]+\s*,\s*\w+\s*$")


@cache
def returns_topk_choice(router_class: type) -> bool:
    """Whether `router_class.forward` takes only the hidden states, selects with `topk` (or Phi-MoE's
    `sparsemixer`) and ends by returning three values: the `(router_logits, router_scores, router_indices)` contract.

    Read from the source once per class; a class whose source cannot be read is no such router.
    """
    if not isinstance(router_class, type) or not issubclass(router_class, nn.Module):
        return False
    try:
        source = inspect.getsource(router_class.forward).rstrip()
        parameters = list(inspect.signature(router_class.forward).parameters.values())[1:]
    except (OSError, TypeError, ValueError):
        return False
    required = [p for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    selects = "topk" in source or "sparsemixer" in source
    return len(required) == 1 and selects and _THREE_OUTPUTS.search(source) is not None


def _routing_size(module: nn.Module, attribute: str, config_fields: tuple[str, ...]) -> int | None:
    """The router's own `attribute`, else the first of `config_fields` its `config` has (e.g. Gemma 4's router)."""
    value = getattr(module, attribute, None)
    config = getattr(module, "config", None)
    for field in config_fields:
        if value is None:
            value = getattr(config, field, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _locate_topk_router(module: nn.Module) -> RouterLocation | None:
    """A router without a bias: a number of experts and a top-K, and a forward that returns its top-K choice."""
    if holds_bias(module) or not returns_topk_choice(type(module)):
        return None
    top_k = _routing_size(module, "top_k", ("num_experts_per_tok", "top_k_experts"))
    num_experts = _routing_size(module, "num_experts", ("num_experts", "num_local_experts"))
    if top_k is None or num_experts is None or not 0 < top_k <= num_experts:
        return None
    return RouterLocation(module, None, None, num_experts=num_experts)


def _topk_router_indices(router: nn.Module, output: Any) -> torch.Tensor:
    """`(router_logits, router_scores, router_indices)` -> the (T, K) integer expert indices."""
    indices = output[-1] if isinstance(output, tuple) and len(output) == 3 else None
    if not (isinstance(indices, torch.Tensor) and indices.dim() == 2 and not indices.is_floating_point()):
        raise ValueError(
            f"{type(router).__name__} was read as a top-K router, but its forward did not return "
            "(router_logits, router_scores, router_indices) with integer indices of shape (tokens, top_k). Register a "
            "`RouterAdapter` for it with `register_router_adapter`."
        )
    return indices


TOPK_ROUTER_ADAPTER = RouterAdapter(name="topk_router", locate=_locate_topk_router, topk_indices=_topk_router_indices)

for _adapter in (STATICS_ADAPTER, BIAS_ARGUMENT_ADAPTER, SHARED_GATES_ADAPTER, TOPK_ROUTER_ADAPTER):
    register_router_adapter(_adapter)


__all__ = [
    "BIAS_ARGUMENT_ADAPTER",
    "SHARED_GATES_ADAPTER",
    "STATICS_ADAPTER",
    "TOPK_ROUTER_ADAPTER",
    "returns_topk_choice",
]
