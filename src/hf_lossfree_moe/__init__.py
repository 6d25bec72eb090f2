"""hf-lossfree-moe: auxiliary-loss-free load balancing (Wang et al., 2024) for Hugging Face Transformers.

Importing the package registers `LossFreeMoe` with the Auto classes and marks its classes for
`save_pretrained` to write their code, so saved folders load with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from . import families  # noqa: F401  (registers router adapters for transformers' MoE families)
from .balance_metrics import MaxVio, compute_maxvio
from .balancing import LoadMeasurement, LossFreeBalancer
from .callbacks import LossFreeBalancingCallback, add_balancing_callback
from .configuration_lossfree_moe import LossFreeMoeConfig
from .export import export_to_glm4_moe
from .metrics import MAXVIO_METRIC_PATH
from .modeling_lossfree_moe import LossFreeMoeForCausalLM, LossFreeMoeModel, LossFreeMoePreTrainedModel
from .routers import RouterAdapter, RouterLocation, register_router_adapter
from .selection_bias import add_selection_bias, with_selection_bias
from .settings import BalancingSettings


# The name of `compute_maxvio` in earlier releases, kept so their code runs unchanged.
maxvio = compute_maxvio

__version__ = "0.1.0"

AutoConfig.register(LossFreeMoeConfig.model_type, LossFreeMoeConfig, exist_ok=True)
AutoModel.register(LossFreeMoeConfig, LossFreeMoeModel, exist_ok=True)
AutoModelForCausalLM.register(LossFreeMoeConfig, LossFreeMoeForCausalLM, exist_ok=True)
LossFreeMoeConfig.register_for_auto_class()
LossFreeMoeModel.register_for_auto_class("AutoModel")
LossFreeMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "MAXVIO_METRIC_PATH",
    "BalancingSettings",
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
