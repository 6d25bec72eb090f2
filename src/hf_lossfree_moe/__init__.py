"""hf-lossfree-moe: auxiliary-loss-free load balancing (Wang et al., 2024) for Hugging Face Transformers.

Importing the package registers `LossFreeMoe` with the Auto classes and marks its classes for
`save_pretrained` to write their code, so saved folders load with `trust_remote_code=True`.

The import stays light: the modeling code pulls in transformers' modeling utilities, `torch._dynamo` and the mask
builders, and the callbacks the Trainer's machinery, several seconds together. Those modules load when first used:
when a name below is first read from the package, or when the first `LossFreeMoeConfig` is built (a model always
starts from one), which also registers the model classes with `AutoModel` and `AutoModelForCausalLM`.
"""

import importlib
import threading
import warnings

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from . import families  # noqa: F401  (registers router adapters for transformers' MoE families)
from .balance_metrics import MaxVio, compute_maxvio
from .configuration_lossfree_moe import LossFreeMoeConfig
from .metrics import MAXVIO_METRIC_PATH
from .settings import BalancingSettings


# The name of `compute_maxvio` in earlier releases, kept so their code runs unchanged.
maxvio = compute_maxvio

__version__ = "0.1.0"

# Public name -> the module that defines it, imported on first access (PEP 562).
_LAZY_NAMES = {
    "LoadMeasurement": "balancing",
    "LossFreeBalancer": "balancing",
    "LossFreeBalancingCallback": "callbacks",
    "add_balancing_callback": "callbacks",
    "CompactProgressCallback": "console",
    "export_to_glm4_moe": "export",
    "LossFreeMoeForCausalLM": "modeling_lossfree_moe",
    "LossFreeMoeModel": "modeling_lossfree_moe",
    "LossFreeMoePreTrainedModel": "modeling_lossfree_moe",
    "RouterAdapter": "routers",
    "RouterLocation": "routers",
    "register_router_adapter": "routers",
    "add_selection_bias": "selection_bias",
    "with_selection_bias": "selection_bias",
}
# Names earlier releases exported from the package, now read from their module: they still work, with a warning.
_DEPRECATED_NAMES = {
    name: "modeling_lossfree_moe"
    for name in ("LossFreeMoeTopkRouter", "LossFreeMoeExperts", "LossFreeMoeSparseMoeBlock", "sequence_balance_loss")
}
_registration_lock = threading.Lock()
_models_registered = False


def register_model_classes() -> None:
    """Register the model classes with the Auto classes and for `save_pretrained` to copy their code (once)."""
    global _models_registered
    with _registration_lock:
        if _models_registered:
            return
        from .modeling_lossfree_moe import LossFreeMoeForCausalLM, LossFreeMoeModel

        AutoModel.register(LossFreeMoeConfig, LossFreeMoeModel, exist_ok=True)
        AutoModelForCausalLM.register(LossFreeMoeConfig, LossFreeMoeForCausalLM, exist_ok=True)
        LossFreeMoeModel.register_for_auto_class("AutoModel")
        LossFreeMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        _models_registered = True


def _post_init_registering_models(self, **kwargs):
    register_model_classes()
    _config_post_init(self, **kwargs)


def _setstate_registering_models(self, state):
    register_model_classes()
    dict_state, slot_state = state if isinstance(state, tuple) else (state, None)
    self.__dict__.update(dict_state or {})
    for key, value in (slot_state or {}).items():
        object.__setattr__(self, key, value)


def __getattr__(name: str):
    if name in _DEPRECATED_NAMES:
        module = _DEPRECATED_NAMES[name]
        warnings.warn(
            f"hf_lossfree_moe.{name} is deprecated; import it from hf_lossfree_moe.{module}.",
            DeprecationWarning,
            stacklevel=2,
        )
        register_model_classes()
        return getattr(importlib.import_module(f".{module}", __name__), name)
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _LAZY_NAMES[name]
    if module == "modeling_lossfree_moe":
        register_model_classes()
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_NAMES])


AutoConfig.register(LossFreeMoeConfig.model_type, LossFreeMoeConfig, exist_ok=True)
LossFreeMoeConfig.register_for_auto_class()
# A model is always built from a config, so the first config built is when the model classes are first needed.
_config_post_init = LossFreeMoeConfig.__post_init__
LossFreeMoeConfig.__post_init__ = _post_init_registering_models
# A config can also arrive unpickled (a worker process, `copy.deepcopy`), without `__post_init__`.
LossFreeMoeConfig.__setstate__ = _setstate_registering_models

__all__ = [
    "MAXVIO_METRIC_PATH",
    "BalancingSettings",
    "CompactProgressCallback",
    "LoadMeasurement",
    "LossFreeBalancer",
    "LossFreeBalancingCallback",
    "LossFreeMoeConfig",
    "LossFreeMoeForCausalLM",
    "LossFreeMoeModel",
    "LossFreeMoePreTrainedModel",
    "MaxVio",
    "RouterAdapter",
    "RouterLocation",
    "add_balancing_callback",
    "add_selection_bias",
    "compute_maxvio",
    "export_to_glm4_moe",
    "register_router_adapter",
    "with_selection_bias",
]
