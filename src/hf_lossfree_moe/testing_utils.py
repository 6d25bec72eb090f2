"""Tiny, randomly initialised models of transformers' MoE families, for tests and the support table.

`moe_families()` lists every mixture-of-experts family of the installed transformers, `correction_bias_families()`
those whose modeling code has an `e_score_correction_bias`, and `build_tiny_model()` builds a CPU-sized text model of
one, so the test suite and `scripts/support_table.py` cover each family without a list of names to keep up to date. Like transformers' own
`testing_utils`, this module is not imported by the package: it reads transformers' source files.
"""

import inspect
import re
from functools import cache
from importlib import import_module
from pathlib import Path

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from .routers import BIAS_NAME


@cache
def correction_bias_families() -> tuple[str, ...]:
    """Model types (folders of `transformers.models`) whose modeling code has an `e_score_correction_bias`."""
    models = Path(transformers.__file__).parent / "models"
    return tuple(
        sorted(
            path.parent.name
            for path in models.glob("*/modeling_*.py")
            if BIAS_NAME in path.read_text(encoding="utf-8")
        )
    )


# Modeling code that names experts and picks some of them per token (`topk`, `top_k`, or Switch's `argmax`).
_NAMES_EXPERTS = re.compile(r"\bexperts\b")
_PICKS_EXPERTS = re.compile(r"topk|top_k|argmax")


@cache
def moe_families() -> tuple[str, ...]:
    """Model types (folders of `transformers.models`) whose modeling code routes tokens to experts: it names
    `experts` and selects per token with `topk`, `top_k` or `argmax`. Read from the sources, so a new transformers
    release brings its new families into the tests and the support table by itself."""
    models = Path(transformers.__file__).parent / "models"
    families = set()
    for path in models.glob("*/modeling_*.py"):
        text = path.read_text(encoding="utf-8")
        if _NAMES_EXPERTS.search(text) and _PICKS_EXPERTS.search(text):
            families.add(path.parent.name)
    return tuple(sorted(families))


@cache
def tiny_model_class(family: str) -> type[PreTrainedModel]:
    """The family's text model: its `*ForCausalLM`, else its `*TextModel` (multimodal families without one), else its
    `*ForConditionalGeneration` (encoder-decoder families)."""
    if family not in moe_families():
        raise ValueError(f"family must be one of {list(moe_families())}, got {family!r}.")
    module = import_module(f"transformers.models.{family}.modeling_{family}")
    classes = [
        cls
        for cls in vars(module).values()
        if inspect.isclass(cls) and issubclass(cls, PreTrainedModel) and cls.__module__ == module.__name__
    ]
    for suffix in ("ForCausalLM", "TextModel", "ForConditionalGeneration"):
        matches = [cls for cls in classes if cls.__name__.endswith(suffix)]
        if matches:
            return matches[0]
    raise ValueError(f"family {family!r} has no *ForCausalLM, *TextModel or *ForConditionalGeneration class.")


# Every field here is set only where the family's config has it (under this name or an alias).
TINY_FIELDS = dict(
    vocab_size=128,
    unpadded_vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # 8 routed experts, top-2, every layer MoE, routing groups of one (tests ask for real groups explicitly)
    n_routed_experts=8,
    num_experts=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    num_experts_per_token=2,
    top_k_experts=2,
    moe_topk=2,
    n_shared_experts=1,
    num_shared_experts=1,
    first_k_dense_replace=0,
    moe_layer_start_index=0,
    zero_expert_num=0,
    n_group=1,
    topk_group=1,
    num_expert_group=1,
    moe_intermediate_size=32,
    moe_hidden_size=32,
    expert_ffn_hidden_size=32,
    shared_expert_intermediate_size=32,
    moe_shared_expert_intermediate_size=32,
    shared_intermediate_size=32,
    share_expert_dim=32,
    ffn_hidden_size=128,
    dense_intermediate_size=128,
    # multi-head latent attention and sparse-attention indexers
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    index_head_dim=16,
    index_n_heads=2,
    # linear-attention and Mamba mixers
    linear_head_dim=16,
    linear_num_heads=4,
    mamba_num_heads=4,
    mamba_head_dim=16,
    ssm_state_size=16,
    n_groups=1,
)
# Latent-attention fields the family leaves at 0 (NoPE, no query compression) keep their default.
_LATENT_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
# What the generic fields cannot express; each entry says why.
FAMILY_FIXES = {
    # at two layers the default pattern is all linear attention, and the model needs an attention layer to measure
    # the sequence length
    "bailing_hybrid": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen3_5_moe": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen4_exp": dict(layer_types=["linear_attention", "indexed_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0),
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention"]),
    "glm5_next": dict(layer_types=["linear_attention", "full_attention"]),
    # per-modality expert sizes; multimodal rope sections must add up to head_dim // 2 (after partial rotary)
    "ernie4_5_vl_moe": dict(
        moe_intermediate_size=[32, 32],
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [3, 3, 2]},
    ),
    "glm4v_moe": dict(
        rope_parameters={
            "rope_theta": 10000.0,
            "rope_type": "default",
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1],
        }
    ),
    "hy_v4_vl": dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [2, 1, 1]}),
    # MoE blocks that are off by default, or left to the last layers of a full-size model
    "gemma4": dict(enable_moe_block=True),
    "diffusion_gemma": dict(enable_moe_block=True),
    "flint": dict(mlp_only_layers=[]),
    "lfm2_moe": dict(num_dense_layers=0, layer_types=["conv", "full_attention"]),
    "deepseek_ocr2": dict(mlp_layer_types=["sparse", "sparse"]),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),
    # supports top-1 routing only
    "zaya": dict(num_experts_per_tok=1),
    # builds a sliding-window mask on every forward, so it needs a window even when no layer slides
    "step3p7": dict(sliding_window=16),
}


def tiny_config_kwargs(family: str, num_layers: int = 2) -> dict:
    """Config arguments that make `family` tiny: `TINY_FIELDS` it knows, every layer MoE, plus `FAMILY_FIXES`."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}.")
    config_class = tiny_model_class(family).config_class
    defaults = config_class().to_dict()
    aliases = getattr(config_class, "attribute_map", {})
    kwargs = {
        field: value
        for field, value in TINY_FIELDS.items()
        if (field in defaults or (field in aliases and aliases[field] not in TINY_FIELDS))
        and not (field in _LATENT_FIELDS and not defaults.get(field))
    }
    kwargs["num_hidden_layers" if "num_hidden_layers" in defaults else "num_layers"] = num_layers
    if "kv_lora_rank" in kwargs:  # latent attention: every head has its own key, the rotary part is head_dim
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if "qk_rope_head_dim" in kwargs:
            kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
    default_layers = defaults.get("num_hidden_layers", defaults.get("num_layers"))
    for field, value in defaults.items():
        if isinstance(value, list) and len(value) == default_layers:
            # the last layer of a full-size model is an MoE layer; other per-layer lists are rebuilt for num_layers
            kwargs[field] = [value[-1]] * num_layers if field.startswith("mlp") else None
    return {**kwargs, **FAMILY_FIXES.get(family, {})}


def build_tiny_model(family: str, num_layers: int = 2, **config_overrides) -> PreTrainedModel:
    """A randomly initialised, CPU-sized text model of `family` (hidden 64, 8 experts, top-2), in fp32.

    Example:

    ```python
    >>> model = build_tiny_model("deepseek_v3", n_group=4, topk_group=2)
    >>> LossFreeBalancer(model).names
    ['model.layers.0.mlp.gate', 'model.layers.1.mlp.gate']
    ```
    """
    model_class = tiny_model_class(family)
    config = model_class.config_class(**{**tiny_config_kwargs(family, num_layers), **config_overrides})
    return model_class(config)


def build_tiny_tokenizer(vocab_size: int = TINY_FIELDS["vocab_size"]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer matching the tiny models' special ids: `<pad>` 0, `<s>` 1, `</s>` 2, then the words
    `w3` ... `w{vocab_size - 1}`, split on whitespace (any other word is read as `<pad>`); it adds `<s>` in front of
    every text. Built in memory, so
    tests and examples that need a tokenizer (TRL's trainers, lm-eval) download nothing.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 4:
        raise ValueError(f"vocab_size must be an integer >= 4, got {vocab_size!r}.")
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: index for index, token in enumerate(specials + [f"w{i}" for i in range(3, vocab_size)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )


__all__ = [
    "FAMILY_FIXES",
    "TINY_FIELDS",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "correction_bias_families",
    "moe_families",
    "tiny_config_kwargs",
    "tiny_model_class",
]
