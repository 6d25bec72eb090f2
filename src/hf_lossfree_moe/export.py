"""Save a trained LossFreeMoe as a stock GLM-4.5 (`glm4_moe`) checkpoint: no remote code, servable as GLM-4.5 is.

With a sigmoid gate and an additive bias, `LossFreeMoeForCausalLM` computes what transformers' `Glm4MoeForCausalLM`
computes with full rotary (`partial_rotary_factor=1.0`), no QK-norm and no multi-token-prediction layers: the same
router (the fp32 `e_score_correction_bias` selects, unbiased sigmoid scores weight, `norm_topk_prob`,
`routed_scaling_factor`, group-limited routing), the same shared and routed experts, the same parameter names. The
export wraps the trained tensors (no copy) in a `Glm4MoeForCausalLM` and lets transformers save it, so the folder is
laid out as GLM-4.5's own checkpoints are. What GLM-4.5 cannot express is refused before anything is written.
"""

import copy
import os
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard
from transformers import AutoConfig, AutoTokenizer, Glm4MoeConfig, Glm4MoeForCausalLM, PreTrainedTokenizerBase
from transformers.utils import cached_file

from .configuration_lossfree_moe import LossFreeMoeConfig
from .modeling_lossfree_moe import LossFreeMoeForCausalLM


# (field, the value GLM-4.5 needs, why). Fields not listed carry over as they are.
GLM4_MOE_REQUIREMENTS = (
    ("scoring_func", "sigmoid", "GLM-4.5 routes with a sigmoid gate"),
    ("bias_type", "additive", "GLM-4.5 selects experts on score + bias"),
    ("attention_bias", False, "GLM-4.5's attention output projection has no bias"),
    ("hidden_act", "silu", "vLLM and SGLang run GLM-4.5's experts with SiLU only"),
)


def check_glm4_moe_compatible(config: LossFreeMoeConfig) -> None:
    """Raise `ValueError` naming the first field GLM-4.5 cannot express; return quietly otherwise."""
    if not isinstance(config, LossFreeMoeConfig):
        raise ValueError(f"Only LossFreeMoe models export to glm4_moe, got a {type(config).__name__}.")
    for field, needed, reason in GLM4_MOE_REQUIREMENTS:
        value = getattr(config, field)
        if value != needed:
            raise ValueError(
                f"Cannot export to glm4_moe: LossFreeMoeConfig.{field} must be {needed!r} ({reason}), got {value!r}."
            )
    experts_per_group = config.n_routed_experts // config.n_group
    if experts_per_group < 2:
        raise ValueError(
            "Cannot export to glm4_moe: LossFreeMoeConfig.n_group must leave at least 2 experts per group (GLM-4.5 "
            f"scores a group by the sum of its top-2 experts), got n_group={config.n_group} for "
            f"n_routed_experts={config.n_routed_experts}."
        )


# Router attribute -> config field: what each router copied from the config when the model was built.
ROUTER_SETTINGS = {
    "top_k": "num_experts_per_tok",
    "n_group": "n_group",
    "topk_group": "topk_group",
    "norm_topk_prob": "norm_topk_prob",
    "routed_scaling_factor": "routed_scaling_factor",
    "scoring_func": "scoring_func",
}


def check_routers_follow_config(model: LossFreeMoeForCausalLM) -> None:
    """Raise `ValueError` when a router computes with another value than `model.config` says.

    The routers copy their settings from the config when the model is built, so a config edited afterwards no longer
    describes the model; the export is written from the config and would compute something else.
    """
    for router in model.model.routers():
        for attribute, field in ROUTER_SETTINGS.items():
            used, declared = getattr(router, attribute), getattr(model.config, field)
            if used != declared:
                raise ValueError(
                    f"Cannot export to glm4_moe: LossFreeMoeConfig.{field} is {declared!r}, but the model's routers "
                    f"were built with {used!r} and compute with it. Set the config back, or build (or reload) the "
                    "model from the edited config before exporting."
                )


def to_glm4_moe_config(config: LossFreeMoeConfig) -> Glm4MoeConfig:
    """The `Glm4MoeConfig` that computes what `config` computes (checked first with `check_glm4_moe_compatible`).

    A model without shared experts gets one whose weights are zero (see `glm4_moe_state_dict`): GLM-4.5 always runs
    one. `rope_theta` and `partial_rotary_factor` are also written at the top level, where GLM-4.5's own config.json
    has them, for readers that predate `rope_parameters`.
    """
    check_glm4_moe_compatible(config)
    rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 1.0}
    glm_config = Glm4MoeConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.moe_intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        use_cache=config.use_cache,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope_parameters,
        attention_bias=False,
        attention_dropout=config.attention_dropout,
        n_routed_experts=config.n_routed_experts,
        n_shared_experts=max(config.n_shared_experts, 1),
        num_experts_per_tok=config.num_experts_per_tok,
        first_k_dense_replace=config.first_k_dense_replace,
        n_group=config.n_group,
        topk_group=config.topk_group,
        norm_topk_prob=config.norm_topk_prob,
        routed_scaling_factor=float(config.routed_scaling_factor),
        use_qk_norm=False,
        num_mtp_layers=0,
        output_router_logits=config.output_router_logits,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    glm_config.rope_theta = rope_parameters["rope_theta"]
    glm_config.partial_rotary_factor = 1.0
    return glm_config


def glm4_moe_state_dict(model: LossFreeMoeForCausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors under their GLM-4.5 names (the same names), plus zero shared experts if it has none.

    A shared expert with zero weights outputs exactly 0 (SiLU(0) * 0 = 0, then a zero projection), and its gradients
    are 0 too, so it stays inert through further training.
    """
    state_dict = model.state_dict()
    config = model.config
    if config.n_shared_experts > 0:
        return state_dict
    hidden, width = config.hidden_size, config.moe_intermediate_size
    reference = model.get_input_embeddings().weight
    shapes = {"gate_proj": (width, hidden), "up_proj": (width, hidden), "down_proj": (hidden, width)}
    for layer in range(config.first_k_dense_replace, config.num_hidden_layers):
        for name, shape in shapes.items():
            state_dict[f"model.layers.{layer}.mlp.shared_experts.{name}.weight"] = reference.new_zeros(shape)
    return state_dict


def export_to_glm4_moe(
    model_or_path: LossFreeMoeForCausalLM | str | os.PathLike,
    save_directory: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    original: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write `model_or_path` to `save_directory` as a `glm4_moe` checkpoint that stock transformers loads.

    The folder holds config.json (`model_type: glm4_moe`), safetensors weights (biases in fp32), the generation
    config, the tokenizer and a README.md model card. `AutoModelForCausalLM.from_pretrained(save_directory)` then
    gives the same logits as the original, without `trust_remote_code` and without this package.

    Args:
        model_or_path: A `LossFreeMoeForCausalLM`, or a folder or Hub id holding one.
        save_directory: Where to write; created if missing. Must not be the original's own folder.
        tokenizer: Saved with the export. Default: the tokenizer saved with the original, if it has one.
        original: Hub id, URL or folder of the original model, named and linked in the card (a folder by its name
            only: the card travels, this machine's paths do not). Default: the folder or Hub id the model was loaded
            from. The evaluation results of the original's card (its model-index) carry over: the export computes
            the same outputs.
        repo_id: Where the export will live (a Hub id), used in the card's usage examples. Default: the name of
            `save_directory`.

    Returns:
        The export folder.
    """
    save_directory = Path(save_directory)
    if save_directory.is_file():
        raise ValueError(f"save_directory must be a folder, got the file {save_directory}.")
    source = _source_of(model_or_path)
    if source is not None and Path(source).is_dir() and Path(source).resolve() == save_directory.resolve():
        raise ValueError(f"save_directory must differ from the original model's folder, got {save_directory}.")
    if isinstance(model_or_path, LossFreeMoeForCausalLM):
        check_glm4_moe_compatible(model_or_path.config)
        check_routers_follow_config(model_or_path)
        model = model_or_path
    else:
        check_glm4_moe_compatible(_saved_config(source))
        model = LossFreeMoeForCausalLM.from_pretrained(source)
    if tokenizer is None and source is not None:
        tokenizer = _saved_tokenizer(source)
    from .model_card import render_glm4_moe_card  # here, not at the top: it imports matplotlib

    card = render_glm4_moe_card(
        model.config,
        model_name=Path(repo_id).name if repo_id else save_directory.resolve().name,
        repo_id=repo_id or save_directory.resolve().name,
        original=original or source,
        eval_results=_saved_eval_results(source if source is not None else _folder_or_none(original)),
    )

    with torch.device("meta"):
        glm_model = Glm4MoeForCausalLM(to_glm4_moe_config(model.config))
    glm_model.load_state_dict(glm4_moe_state_dict(model), strict=True, assign=True)
    glm_model.generation_config = copy.deepcopy(model.generation_config)
    glm_model.save_pretrained(save_directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    card.save(save_directory / "README.md")
    return save_directory


def _source_of(model_or_path) -> str | None:
    """The folder or Hub id the model comes from, or None for a model built in memory."""
    if isinstance(model_or_path, LossFreeMoeForCausalLM):
        return model_or_path.name_or_path or None
    if isinstance(model_or_path, (str, os.PathLike)):
        return str(model_or_path)
    raise ValueError(
        "model_or_path must be a LossFreeMoeForCausalLM or the folder or Hub id of a saved one, "
        f"got {type(model_or_path).__name__}."
    )


def _saved_config(source: str) -> LossFreeMoeConfig:
    config = AutoConfig.from_pretrained(source)
    if not isinstance(config, LossFreeMoeConfig):
        raise ValueError(
            f"model_or_path must hold a LossFreeMoe model (model_type 'lossfree_moe'), got {config.model_type!r} "
            f"in {source}."
        )
    return config


def _saved_tokenizer(source: str) -> PreTrainedTokenizerBase | None:
    if cached_file(source, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False) is None:
        return None
    return AutoTokenizer.from_pretrained(source)


def _folder_or_none(path: str | None) -> str | None:
    return path if path is not None and os.path.isdir(path) else None


def _saved_eval_results(source: str | None) -> list[EvalResult] | None:
    """The evaluation results in the model-index of the README.md card of `source`, the model's folder or Hub id.

    For a model built in memory `source` is the `original` argument, read only when it is a folder: a Hub id or URL
    named there is not fetched.
    """
    if source is None or source.startswith(("http://", "https://")):
        return None
    card_path = cached_file(
        source,
        "README.md",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    return None if card_path is None else ModelCard.load(card_path).data.eval_results


__all__ = ["check_glm4_moe_compatible", "export_to_glm4_moe", "to_glm4_moe_config", "glm4_moe_state_dict"]
