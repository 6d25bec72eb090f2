"""A selection-only bias for MoE routers that were built without one (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, gpt-oss).

`add_selection_bias(model)` gives every such router an fp32 `e_score_correction_bias` buffer (zeros, one entry per
expert) and a forward that selects the top-K experts on `score + bias` while the gate values stay the unbiased
scores, the way DeepSeek-V3 routes. With a zero bias the routing is that of the stock router, bit for bit; the
balancer then finds and updates the bias like any other. Only routers whose forward is one this module reproduces
exactly (`ROUTER_KINDS`, compared by source) get a bias; any other is refused, never approximated.

The model's class becomes a subclass whose `save_pretrained` also writes this file and a two-line `modeling` file
into the folder and names them in `config.json`'s `auto_map`, so the folder loads with its biases, in a process
without hf_lossfree_moe, through `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

This file imports only torch and transformers: it is copied as it is into saved model folders.
"""

import inspect
import json
import re
import shutil
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


BIAS_NAME = "e_score_correction_bias"
MODELING_FILE = "modeling_selection_bias.py"


def _normalised(source: str) -> str:
    """Source text without comments and with runs of whitespace as one space: what a forward does, not its layout."""
    return re.sub(r"\s+", " ", re.sub(r"#[^\n]*", "", source)).strip()


# The stock forwards this module reproduces with a bias, as transformers writes them; a router is matched by its
# forward's normalised source. Softmax routers: Qwen3-MoE, Qwen2-MoE, OLMoE, FlexOlmo, Qwen3-Next, ... normalise the
# top-K weights when `norm_topk_prob` is set; Qwen3-VL-MoE and Qwen3.5-MoE always do; Mixtral and MiniMax always do
# and keep them in fp32.
_SOFTMAX_OPTIONAL_NORM = """
def forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    router_top_value = router_top_value.to(router_logits.dtype)
    router_scores = router_top_value
    return router_logits, router_scores, router_indices
"""
_SOFTMAX_NORM = """
def forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    router_top_value = router_top_value.to(router_logits.dtype)
    router_scores = router_top_value
    return router_logits, router_scores, router_indices
"""
_SOFTMAX_NORM_FP32 = """
def forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    router_scores = router_top_value
    return router_logits, router_scores, router_indices
"""
# gpt-oss: experts are selected on the logits themselves (with the router's own linear bias), and the weights are the
# softmax over the selected logits.
_LOGITS_SOFTMAX_OF_TOP = """
def forward(self, hidden_states):
    router_logits = F.linear(hidden_states, self.weight, self.bias)
    router_top_value, router_indices = torch.topk(router_logits, self.top_k, dim=-1)
    router_scores = torch.nn.functional.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
    return router_logits, router_scores, router_indices
"""


def _softmax_forward(normalise: str, cast: bool):
    """A biased softmax router forward: `normalise` is "always" or "if_configured" (`self.norm_topk_prob`)."""

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)  # (T, E)
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)  # (T, E) fp32
        bias = getattr(self, BIAS_NAME)  # (E,) fp32, selection only
        router_indices = torch.topk(router_probs + bias, self.top_k, dim=-1).indices  # (T, K)
        router_top_value = router_probs.gather(-1, router_indices)  # (T, K) unbiased scores
        if normalise == "always" or self.norm_topk_prob:
            router_top_value = router_top_value / router_top_value.sum(dim=-1, keepdim=True)
        if cast:
            router_top_value = router_top_value.to(router_logits.dtype)
        return router_logits, router_top_value, router_indices

    return forward


def _logits_forward(self, hidden_states):
    """gpt-oss with a bias: select on `logits + bias` in fp32, weight by the softmax of the selected logits."""
    router_logits = F.linear(hidden_states, self.weight, self.bias)  # (T, E)
    bias = getattr(self, BIAS_NAME)  # (E,) fp32, selection only
    router_indices = torch.topk(router_logits.float() + bias, self.top_k, dim=-1).indices  # (T, K)
    router_top_value = router_logits.gather(-1, router_indices)  # (T, K)
    router_scores = F.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
    return router_logits, router_scores, router_indices


# normalised stock forward -> (biased forward, what its scores are: the quantile rule reads them)
ROUTER_KINDS = {
    _normalised(_SOFTMAX_OPTIONAL_NORM): (_softmax_forward("if_configured", cast=True), "softmax"),
    _normalised(_SOFTMAX_NORM): (_softmax_forward("always", cast=True), "softmax"),
    _normalised(_SOFTMAX_NORM_FP32): (_softmax_forward("always", cast=False), "softmax"),
    _normalised(_LOGITS_SOFTMAX_OF_TOP): (_logits_forward, "identity"),
}


def _stock_forward_kind(router_class: type):
    try:
        source = inspect.getsource(router_class.forward)
    except (OSError, TypeError):
        return None
    return ROUTER_KINDS.get(_normalised(source))


def supports_selection_bias(router_class: type) -> bool:
    """Whether `add_selection_bias` can give routers of this class a bias: its forward is one of `ROUTER_KINDS`."""
    return isinstance(router_class, type) and (
        getattr(router_class, "_selection_bias_base", None) is not None
        or _stock_forward_kind(router_class) is not None
    )


def _apply_keeping_bias_fp32(self, fn, recurse=True):
    """Keep the bias fp32 through `.to(dtype)`, `.half()`, `.bfloat16()` (1e-3 steps vanish in bf16); device moves
    still apply."""
    bias = getattr(self, BIAS_NAME)
    type(self)._selection_bias_base._apply(self, fn, recurse)
    moved = getattr(self, BIAS_NAME)
    if moved.dtype != torch.float32:
        setattr(self, BIAS_NAME, bias.to(device=moved.device))
    return self


@cache
def _biased_router_class(router_class: type) -> type:
    forward, scoring = _stock_forward_kind(router_class)
    return type(
        f"{router_class.__name__}WithSelectionBias",
        (router_class,),
        {
            "forward": forward,
            "scoring_func": scoring,
            "_apply": _apply_keeping_bias_fp32,
            "_selection_bias_base": router_class,
            "__module__": __name__,
        },
    )


def _unbiased_topk_routers(model: nn.Module) -> list[nn.Module]:
    """Modules with integer `top_k` and `num_experts` whose forward is a stock top-K router forward."""
    return [
        module
        for module in model.modules()
        if isinstance(getattr(module, "top_k", None), int)
        and isinstance(getattr(module, "num_experts", None), int)
        and _stock_forward_kind(type(module)) is not None
    ]


def add_selection_bias(model: nn.Module) -> nn.Module:
    """Give every stock top-K router of `model` an fp32 selection-only bias, zero (routing unchanged until it moves).

    A router that already has one keeps it (the call is idempotent). The model's class becomes
    `with_selection_bias(its class)`, whose `save_pretrained` writes a folder that loads with the biases without this
    package. Raises `ValueError` when the model has no router this module can bias. Returns the model.
    """
    already = [module for module in model.modules() if getattr(type(module), "_selection_bias_base", None)]
    routers = _unbiased_topk_routers(model)
    if not routers and not already:
        raise ValueError(
            f"{type(model).__name__} has no router that add_selection_bias can give a bias: it supports routers whose "
            "forward is the stock Qwen3-MoE / Qwen2-MoE / OLMoE / Qwen3-VL-MoE / Mixtral / gpt-oss router forward."
        )
    for router in routers:
        device = router.weight.device
        router.register_buffer(BIAS_NAME, torch.zeros(router.num_experts, dtype=torch.float32, device=device))
        router.__class__ = _biased_router_class(type(router))
    if isinstance(model, nn.Module) and hasattr(model, "save_pretrained"):
        model.__class__ = with_selection_bias(type(model))
    return model


@cache
def with_selection_bias(model_class: type) -> type:
    """`model_class` whose instances get `add_selection_bias` when built (so `from_pretrained` loads the biases) and
    whose `save_pretrained` makes the folder loadable with `trust_remote_code=True` where this package is absent."""
    if getattr(model_class, "_selection_bias_model_base", None) is not None:
        return model_class

    def __init__(self, config, *args, **kwargs):
        model_class.__init__(self, config, *args, **kwargs)
        add_selection_bias(self)

    def save_pretrained(self, save_directory, *args, **kwargs):
        model_class.save_pretrained(self, save_directory, *args, **kwargs)
        write_remote_code(save_directory, model_class)

    def from_pretrained(cls, *args, output_loading_info=False, **kwargs):
        # A stock checkpoint has no bias, and transformers leaves a missing buffer as uninitialised memory: start
        # such biases at zero, so the model routes as the stock one until they move.
        model, info = model_class.from_pretrained.__func__(cls, *args, output_loading_info=True, **kwargs)
        with torch.no_grad():
            for name in info["missing_keys"]:
                if name.endswith(BIAS_NAME):
                    model.get_buffer(name).zero_()
        return (model, info) if output_loading_info else model

    keep_fp32 = [*(getattr(model_class, "_keep_in_fp32_modules_strict", None) or []), BIAS_NAME]
    return type(
        f"{model_class.__name__}WithSelectionBias",
        (model_class,),
        {
            "__init__": __init__,
            "save_pretrained": save_pretrained,
            "from_pretrained": classmethod(from_pretrained),
            "_keep_in_fp32_modules_strict": keep_fp32,
            "_selection_bias_model_base": model_class,
            "__module__": __name__,
        },
    )


def write_remote_code(save_directory, model_class: type) -> None:
    """Write this file and a `modeling` file naming `with_selection_bias(model_class)` into a saved model folder, and
    point `config.json`'s `auto_map` at it (for `AutoModelForCausalLM`)."""
    folder = Path(save_directory)
    if not (folder / "config.json").is_file():
        return  # a non-main process of a distributed save wrote nothing
    shutil.copyfile(__file__, folder / Path(__file__).name)
    class_name = f"{model_class.__name__}WithSelectionBias"
    (folder / MODELING_FILE).write_text(
        f"from {model_class.__module__} import {model_class.__name__}\n\n"
        f"from .{Path(__file__).stem} import with_selection_bias\n\n\n"
        f"{class_name} = with_selection_bias({model_class.__name__})\n",
        encoding="utf-8",
    )
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    entry = f"{Path(MODELING_FILE).stem}.{class_name}"
    config["auto_map"] = {**config.get("auto_map", {}), "AutoModelForCausalLM": entry}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["BIAS_NAME", "add_selection_bias", "supports_selection_bias", "with_selection_bias", "write_remote_code"]
