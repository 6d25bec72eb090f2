# Copyright 2026 The hf-lossfree-moe Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Configuration of LossFreeMoe, a DeepSeekMoE-style causal LM routed with auxiliary-loss-free load balancing.

Field names follow transformers' MoE models (DeepSeek-V3, GLM-4.5) so tools and users recognise them. Defaults are
the paper's (Wang et al., arXiv 2408.15664): sigmoid gate, un-normalised gate values, sign rule with u = 1e-3.
This file imports nothing from `hf_lossfree_moe`, so a saved model folder loads with `trust_remote_code=True`; it
first checks the installed transformers version, since the shipped model code builds on transformers internals.
"""

import math
from functools import wraps
from typing import Literal, get_args

import transformers
from packaging.specifiers import SpecifierSet


# The transformers versions this code requires; pyproject.toml requires the same. The model code builds on
# transformers internals (`create_causal_mask`, `capture_outputs`, `merge_with_config_defaults`, the experts
# interface) that change between releases: under 5.23 a model loads, then fails at its first forward
# (`create_causal_mask` takes no `cache` there). Saved configs and model cards state the range.
TRANSFORMERS_REQUIREMENT = ">=5.24,<6"
# The transformers release the test suite ran with; later ones within the range are allowed, not tested.
TESTED_TRANSFORMERS = "5.24"


def check_transformers_version() -> None:
    """Raise `ImportError` naming the installed and the required transformers versions when they do not match."""
    installed = transformers.__version__
    if not SpecifierSet(TRANSFORMERS_REQUIREMENT).contains(installed, prereleases=True):
        raise ImportError(
            f"LossFreeMoe needs transformers{TRANSFORMERS_REQUIREMENT}, but transformers {installed} is installed; "
            f'install a supported version with `pip install "transformers{TRANSFORMERS_REQUIREMENT}"`.'
        )


check_transformers_version()  # before the imports below, which an unsupported version may already fail

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


ScoringFunc = Literal["sigmoid", "softmax"]
LoadBalancing = Literal["loss_free", "aux_loss", "none", "expert_choice"]
BiasUpdateRule = Literal["sign", "error", "quantile", "smebu"]
BiasUpdateSchedule = Literal["constant", "linear_warmup", "cosine"]
BiasQuantileSolver = Literal["call_mean", "global_histogram"]
BiasType = Literal["additive", "multiplicative"]

# The paper's alpha for the loss-controlled baseline with a sigmoid gate (3e-4 is its softmax-gate value).
PAPER_AUX_LOSS_COEF = 1e-3


@strict
class LossFreeMoeConfig(PreTrainedConfig):
    r"""
    Configuration of a [`LossFreeMoeModel`]: shared experts plus fine-grained routed experts whose top-K selection
    adds a per-expert bias (`e_score_correction_bias`) to the routing scores. The bias only chooses experts; gate
    values come from the unbiased scores. `LossFreeBalancer` updates the bias once per optimizer step.

    Args:
        vocab_size (`int`, defaults to 32000): Vocabulary size.
        hidden_size (`int`, defaults to 1024): Width of the residual stream.
        intermediate_size (`int`, defaults to 2816): Hidden width of the dense SwiGLU FFN of the first
            `first_k_dense_replace` layers.
        moe_intermediate_size (`int`, defaults to 352): Hidden width of one routed or shared expert.
        num_hidden_layers (`int`, defaults to 12): Number of decoder layers.
        num_attention_heads (`int`, defaults to 16): Query heads; must divide `hidden_size`.
        num_key_value_heads (`int`, *optional*): Key/value heads (grouped-query attention); must divide
            `num_attention_heads`. Defaults to `num_attention_heads` (multi-head attention).
        head_dim (`int`, *optional*): Width of one attention head. Defaults to `hidden_size // num_attention_heads`.
        hidden_act (`str`, defaults to `"silu"`): Activation of the SwiGLU gates.
        max_position_embeddings (`int`, defaults to 4096): Longest sequence the rotary embedding is sized for.
        initializer_range (`float`, defaults to 0.02): Std of the normal initialisation.
        rms_norm_eps (`float`, defaults to 1e-6): RMSNorm epsilon.
        use_cache (`bool`, defaults to `True`): Return a KV cache from forward.
        tie_word_embeddings (`bool`, defaults to `False`): Share the input embedding with the LM head.
        rope_parameters (`dict`, *optional*): Rotary embedding parameters, as in transformers (`rope_theta`,
            `rope_type`, ...). `rope_theta` may also be passed on its own.
        attention_bias (`bool`, defaults to `False`): Bias in the attention projections.
        attention_dropout (`float`, defaults to 0.0): Dropout on attention probabilities, in [0, 1).
        n_routed_experts (`int`, defaults to 64): Routed experts per MoE layer (the paper: 64).
        n_shared_experts (`int`, defaults to 2): Always-on shared experts per MoE layer (the paper: 2); 0 disables.
        num_experts_per_tok (`int`, defaults to 6): Routed experts per token, K (the paper: 6).
        first_k_dense_replace (`int`, defaults to 1): Leading layers with a dense FFN instead of an MoE
            (DeepSeekMoE keeps the first layer dense).
        n_group (`int`, defaults to 1): Expert groups for group-limited routing (DeepSeek-V3); 1 disables it.
        topk_group (`int`, defaults to 1): Groups a token may route to when `n_group > 1`.
        norm_topk_prob (`bool`, defaults to `False`): Normalise the K gate values to sum to 1. The paper does not;
            DeepSeek-V3 does.
        routed_scaling_factor (`float`, defaults to 1.0): Multiplier on the routed gate values (DeepSeek-V3: 2.5).
        scoring_func (`str`, defaults to `"sigmoid"`): `"sigmoid"` (the paper's main setting) or `"softmax"`
            (its ablation).
        load_balancing (`str`, defaults to `"loss_free"`): `"loss_free"` (biased top-K, bias updated by
            `LossFreeBalancer`), `"aux_loss"` (the paper's loss-controlled baseline), `"none"`, or
            `"expert_choice"` (Zhou et al., 2022: each expert picks its tokens; a non-causal research baseline that
            must not generate text, see `expert_capacity_factor`).
        bias_update_rate (`float`, defaults to 1e-3): The update rate u of Algorithm 1 (the paper and DeepSeek-V3:
            1e-3); 0 keeps the bias fixed.
        bias_update_rule (`str`, defaults to `"sign"`): `"sign"`: `b += u * sign(mean - c)` (Algorithm 1);
            `"error"`: `b += u * (mean - c) / mean` (the paper's ablation); `"smebu"`: a momentum-smoothed,
            tanh-clamped, mean-centred step on the normalised deviation; `"quantile"`: Quantile Balancing, the bias
            that would have given every expert its share, from the router's scores (no step size; additive bias
            only). See `hf_lossfree_moe.update_rules`.
        bias_update_schedule (`str`, defaults to `"constant"`): Factor on the step: `"constant"`, `"linear_warmup"`
            (ramp over `bias_update_warmup_steps`), `"cosine"` (the warm-up, then cosine decay to 0).
        bias_update_warmup_steps (`int`, defaults to 0): Updates over which `"linear_warmup"` and `"cosine"` ramp up.
        bias_update_stop_fraction (`float`, defaults to 1.0): Fraction of training after which the bias stops
            moving (DeepSeek-V3: 0.966); 1 never stops.
        bias_quantile_ema (`float`, defaults to 1.0): Weight of the new candidate in Quantile Balancing's blend
            `b += w * (candidate - b)`; 1 replaces the bias.
        bias_update_momentum (`float`, defaults to 0.9): Momentum mu of the `"smebu"` rule, in [0, 1).
        bias_quantile_anneal_steps (`int`, defaults to 0): Quantile Balancing only: with A > 0 the weight of the new
            candidate is 1 for the first A updates (the first one a warm start from the first batch's quantiles),
            then A / n at update n, never below `bias_quantile_ema`; 0 keeps the constant `bias_quantile_ema`.
        bias_quantile_solver (`str`, defaults to `"call_mean"`): Quantile Balancing only: how the step's candidate
            is solved. `"call_mean"`: the mean of the candidates of every router call (each from its own tokens);
            `"global_histogram"`: the quantile of the whole optimizer step's tokens, over micro-batches and
            data-parallel ranks, read off a histogram summed over them.
        bias_quantile_histogram_bins (`int`, defaults to 1000): Bins per expert of `"global_histogram"`, spread
            evenly over `bias_quantile_histogram_range` on either side of each expert's current bias.
        bias_quantile_histogram_range (`float`, defaults to 1.0): Half-width of the histogram's bins around each
            expert's current bias, the largest move `"global_histogram"` can ask of a bias in one update (a quantile
            beyond it asks for this much, with a warning).
        batch_balance_iterations (`int`, defaults to 0): With I > 0, each training-mode forward routes its batch on
            the bias that balances that batch, I fixed-point passes of Quantile Balancing's threshold on the batch's
            own scores, started from the stored bias (BIP's per-batch dual); evaluation and generation route on the
            stored bias, which Quantile Balancing (required) learns. Balanced from the first step, but a token's
            training routing then depends on the other tokens of its batch. 0 routes on the stored bias.
        batch_balance_steps (`int`, defaults to 0): With `batch_balance_iterations` > 0, the optimizer steps after
            which `LossFreeBalancer` turns batch-balanced routing off, so that only the early steps, where the
            routing would collapse, see their batch; 0 keeps it on for the whole run.
        bias_type (`str`, defaults to `"additive"`): `"additive"`: select on `s + b`, b starts at 0;
            `"multiplicative"`: select on `s * b`, b starts at 1 (the paper's ablation).
        router_aux_loss_coef (`float`, *optional*): Weight alpha of the sequence-wise balance loss
            `alpha * sum_i f_i P_i`, summed over MoE layers. With `"aux_loss"` it must be > 0 and defaults to 1e-3,
            the paper's value for a sigmoid gate (3e-4 for softmax). With `"loss_free"` it defaults to 0; a value > 0
            adds DeepSeek-V3's complementary sequence-wise loss (DeepSeek-V3: 1e-4). Must be 0 with `"none"`.
        output_router_logits (`bool`, defaults to `False`): Return every MoE layer's router logits.
        expert_capacity_factor (`float`, defaults to 1.0): With `"expert_choice"`, each expert picks
            `ceil(factor * n * K / E)` of the n real tokens of a routing chunk; 1 gives the experts the work of top-K
            token choice (Zhou et al.'s compute-matched setting). In (0, n_routed_experts / num_experts_per_tok].
        expert_choice_chunk_size (`int`, *optional*): With `"expert_choice"`, sequences per routing chunk; None
            routes the whole batch as one chunk. The fewer sequences, the more a chunk tells about each one's future.
        expert_choice_shuffle (`bool`, defaults to `False`): With `"expert_choice"`, permute the batch's tokens
            before cutting the chunks, so that a chunk mixes many sequences (the paper's test of the leak).
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): Special token ids.

    Example:

    ```python
    >>> from hf_lossfree_moe import LossFreeMoeConfig, LossFreeMoeForCausalLM

    >>> config = LossFreeMoeConfig(hidden_size=128, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2)
    >>> model = LossFreeMoeForCausalLM(config)
    >>> model.model.layers[1].mlp.gate.e_score_correction_bias.dtype
    torch.float32
    ```
    """

    model_type = "lossfree_moe"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {"num_local_experts": "n_routed_experts"}

    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }
    # Whole experts per rank, reached through transformers' token dispatch (`DistributedConfig(ep_size=...)`).
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }

    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2816
    moe_intermediate_size: int = 352
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float | int = 1.0
    scoring_func: ScoringFunc = "sigmoid"
    load_balancing: LoadBalancing = "loss_free"
    bias_update_rate: float | int = 1e-3
    bias_update_rule: BiasUpdateRule = "sign"
    bias_update_schedule: BiasUpdateSchedule = "constant"
    bias_update_warmup_steps: int = 0
    bias_update_stop_fraction: float | int = 1.0
    bias_quantile_ema: float | int = 1.0
    bias_update_momentum: float | int = 0.9
    # Quantile Balancing's annealed weight: its scores drift fast early (track them) and its per-batch quantiles are
    # noisy late (average them); docs/balancing_rules.md has the measurements.
    bias_quantile_anneal_steps: int = 0
    # The global solver's bins: 1000 over +-1 around each bias resolve 0.002 (twice the paper's update rate), and
    # scores in (0, 1) (sigmoid, softmax) stay within +-1 of the cutoff while the biases lie close together.
    bias_quantile_solver: BiasQuantileSolver = "call_mean"
    bias_quantile_histogram_bins: int = 1000
    bias_quantile_histogram_range: float | int = 1.0
    batch_balance_iterations: int = 0
    batch_balance_steps: int = 0
    bias_type: BiasType = "additive"
    router_aux_loss_coef: float | int | None = None
    output_router_logits: bool = False
    # Expert Choice routing (load_balancing="expert_choice"), the paper's non-causal baseline.
    expert_capacity_factor: float | int = 1.0
    expert_choice_chunk_size: int | None = None
    expert_choice_shuffle: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _positive_int(self.hidden_size) and _positive_int(self.num_attention_heads):
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                "hidden_size",
                f"a multiple of num_attention_heads={self.num_attention_heads} (or set head_dim)",
                self.hidden_size,
            )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.router_aux_loss_coef is None:
            self.router_aux_loss_coef = PAPER_AUX_LOSS_COEF if self.load_balancing == "aux_loss" else 0.0
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict:
        """The config as saved, stating the transformers versions its model code needs (`transformers_requirement`)."""
        return {**super().to_dict(), "transformers_requirement": TRANSFORMERS_REQUIREMENT}

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    # Validators: `@strict` runs every `validate_*` method after `__init__` and on `config.validate()`, so a field
    # changed after construction is judged too. Each raises `ValueError` naming the field and the allowed values.

    def validate_architecture(self):
        super().validate_architecture()
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
        ):
            self._require(_positive_int(getattr(self, name)), name, "a positive integer")
        for name in ("n_shared_experts", "first_k_dense_replace"):
            self._require(getattr(self, name) >= 0, name, "a non-negative integer")
        from transformers.activations import ACT2FN  # here: it imports torch.distributed.tensor, seconds

        self._require(self.hidden_act in ACT2FN, "hidden_act", f"one of {sorted(ACT2FN)}")

    def validate_attention(self):
        self._require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_attention_heads",
            f"a multiple of num_key_value_heads={self.num_key_value_heads}",
        )
        self._require(
            _finite(self.attention_dropout) and 0 <= self.attention_dropout < 1, "attention_dropout", "in [0, 1)"
        )
        self._require(_finite(self.rms_norm_eps) and self.rms_norm_eps > 0, "rms_norm_eps", "a positive number")
        self._require(
            _finite(self.initializer_range) and self.initializer_range >= 0, "initializer_range", "a number >= 0"
        )

    def validate_experts(self):
        self._require(
            self.first_k_dense_replace <= self.num_hidden_layers,
            "first_k_dense_replace",
            f"at most num_hidden_layers={self.num_hidden_layers}",
        )
        self._require(
            self.num_experts_per_tok <= self.n_routed_experts,
            "num_experts_per_tok",
            f"at most n_routed_experts={self.n_routed_experts}",
        )
        self._require(
            _finite(self.routed_scaling_factor) and self.routed_scaling_factor > 0,
            "routed_scaling_factor",
            "a positive number",
        )

    def validate_routing_groups(self):
        self._require(
            self.n_routed_experts % self.n_group == 0,
            "n_group",
            f"a divisor of n_routed_experts={self.n_routed_experts}",
        )
        self._require(self.topk_group <= self.n_group, "topk_group", f"at most n_group={self.n_group}")
        experts_in_kept_groups = self.topk_group * (self.n_routed_experts // self.n_group)
        self._require(
            experts_in_kept_groups >= self.num_experts_per_tok,
            "topk_group",
            f"large enough that the kept groups hold at least num_experts_per_tok={self.num_experts_per_tok} "
            f"experts (they hold {experts_in_kept_groups})",
        )

    def validate_load_balancing(self):
        self._require(
            _finite(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0,
            "router_aux_loss_coef",
            "a number >= 0",
        )
        if self.load_balancing == "aux_loss":
            self._require(
                self.router_aux_loss_coef > 0,
                "router_aux_loss_coef",
                "> 0 with load_balancing='aux_loss' (the paper uses 1e-3 for a sigmoid gate, 3e-4 for softmax)",
            )
        if self.load_balancing == "none":
            self._require(
                self.router_aux_loss_coef == 0,
                "router_aux_loss_coef",
                "0 with load_balancing='none' (choose 'aux_loss' to train with a balance loss)",
            )

    def validate_expert_choice(self):
        # Runs before validate_experts (validators run in name order): no bound that assumes K <= E is checked here.
        self._require(
            _finite(self.expert_capacity_factor) and self.expert_capacity_factor > 0,
            "expert_capacity_factor",
            "a positive number (Zhou et al. and the default: 1)",
        )
        self._require(
            self.expert_choice_chunk_size is None or _positive_int(self.expert_choice_chunk_size),
            "expert_choice_chunk_size",
            "None (the whole batch) or a positive integer number of sequences",
        )
        if self.load_balancing == "expert_choice":
            most = self.n_routed_experts / self.num_experts_per_tok
            self._require(
                self.num_experts_per_tok > self.n_routed_experts or self.expert_capacity_factor <= most,
                "expert_capacity_factor",
                f"at most n_routed_experts / num_experts_per_tok = {most:g} with load_balancing='expert_choice' "
                "(each expert then picks every token)",
            )
            self._require(
                self.router_aux_loss_coef == 0,
                "router_aux_loss_coef",
                "0 with load_balancing='expert_choice' (Expert Choice is balanced by construction)",
            )

    def validate_batch_balance(self):
        self._require(
            _integer(self.batch_balance_iterations) and self.batch_balance_iterations >= 0,
            "batch_balance_iterations",
            "an integer >= 0 (0: route on the stored bias)",
        )
        self._require(
            _integer(self.batch_balance_steps) and self.batch_balance_steps >= 0,
            "batch_balance_steps",
            "an integer >= 0 (0: batch-balanced routing for the whole run)",
        )
        self._require(
            self.batch_balance_steps == 0 or self.batch_balance_iterations > 0,
            "batch_balance_steps",
            "0 unless batch_balance_iterations > 0 (it ends batch-balanced routing)",
        )
        if self.batch_balance_iterations > 0:
            needs = (self.load_balancing, self.bias_update_rule, self.bias_type)
            self._require(
                needs == ("loss_free", "quantile", "additive"),
                "batch_balance_iterations",
                f"0 unless load_balancing='loss_free', {BATCH_BALANCE_NEEDS_QUANTILE} and bias_type='additive' (got "
                f"{needs})",
            )

    def validate_bias_update(self):
        for field, (accepts, allowed) in BALANCING_FIELD_CHECKS.items():
            self._require(accepts(getattr(self, field)), field, allowed)
        self._require(
            quantile_fits_bias_type(self.bias_update_rule, self.bias_type), "bias_update_rule", QUANTILE_NEEDS_ADDITIVE
        )
        self._require(
            anneal_fits_rule(self.bias_update_rule, self.bias_quantile_anneal_steps),
            "bias_quantile_anneal_steps",
            ANNEAL_NEEDS_QUANTILE,
        )
        self._require(
            solver_fits_rule(self.bias_update_rule, self.bias_quantile_solver),
            "bias_quantile_solver",
            SOLVER_NEEDS_QUANTILE,
        )

    def _require(self, condition: bool, field: str, allowed: str):
        _require(condition, field, allowed, getattr(self, field))


def _require(condition: bool, field: str, allowed: str, value, owner: str = "LossFreeMoeConfig."):
    if not condition:
        raise ValueError(f"{owner}{field} must be {allowed}, got {value!r}.")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What each balancing field must be, as (test, description): the config's `validate_bias_update` and
# `hf_lossfree_moe.settings.BalancingSettings` both judge by this table, so a field has one rule and one message.
BALANCING_FIELD_CHECKS = {
    "bias_update_rate": (lambda v: _finite(v) and v >= 0, "a number >= 0 (the paper uses 1e-3)"),
    "bias_update_rule": (lambda v: v in get_args(BiasUpdateRule), f"one of {get_args(BiasUpdateRule)}"),
    "bias_update_schedule": (lambda v: v in get_args(BiasUpdateSchedule), f"one of {get_args(BiasUpdateSchedule)}"),
    "bias_update_warmup_steps": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "bias_update_stop_fraction": (
        lambda v: _finite(v) and 0 < v <= 1,
        "a number in (0, 1] (DeepSeek-V3: 0.966; 1: never stop)",
    ),
    "bias_quantile_ema": (
        lambda v: _finite(v) and 0 < v <= 1,
        "a number in (0, 1] (the weight of the new candidate; 1: no blending)",
    ),
    "bias_update_momentum": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "bias_quantile_anneal_steps": (
        lambda v: _integer(v) and v >= 0,
        "an integer >= 0 (0: a constant bias_quantile_ema)",
    ),
    "bias_quantile_solver": (
        lambda v: v in get_args(BiasQuantileSolver),
        f"one of {get_args(BiasQuantileSolver)}",
    ),
    "bias_quantile_histogram_bins": (lambda v: _integer(v) and v >= 2, "an integer >= 2"),
    "bias_quantile_histogram_range": (
        lambda v: _finite(v) and v > 0,
        "a number > 0 (the half-width of the bins around each bias)",
    ),
    "bias_type": (lambda v: v in get_args(BiasType), f"one of {get_args(BiasType)}"),
}
QUANTILE_NEEDS_ADDITIVE = (
    "other than 'quantile' with bias_type='multiplicative' (Quantile Balancing computes an additive bias)"
)


# A batch routed balanced counts balanced loads, which tell a count-driven rule nothing: only Quantile Balancing, which
# reads the scores, learns the stored bias that evaluation and generation route on.
BATCH_BALANCE_NEEDS_QUANTILE = "bias_update_rule='quantile'"
ANNEAL_NEEDS_QUANTILE = "0 unless bias_update_rule='quantile' (it anneals Quantile Balancing's weight)"


def anneal_fits_rule(rule, anneal_steps) -> bool:
    """Only Quantile Balancing has a weight to anneal: a schedule for another rule would silently do nothing."""
    return rule == "quantile" or anneal_steps == 0


SOLVER_NEEDS_QUANTILE = "'call_mean' unless bias_update_rule='quantile' (it solves Quantile Balancing's candidate)"


def solver_fits_rule(rule, solver) -> bool:
    """Only Quantile Balancing has a candidate to solve: another solver for another rule would silently do nothing."""
    return rule == "quantile" or solver == "call_mean"


def quantile_fits_bias_type(rule, bias_type) -> bool:
    """Quantile Balancing computes an additive bias: it cannot drive a multiplicative one."""
    return rule != "quantile" or bias_type == "additive"


def check_balancing_field(field: str, value) -> None:
    """Raise `ValueError` naming `field` when `value` is not what `BALANCING_FIELD_CHECKS` says it must be."""
    accepts, allowed = BALANCING_FIELD_CHECKS[field]
    _require(accepts(value), field, allowed, value, owner="")


def _allowed(field: str) -> str:
    annotation = LossFreeMoeConfig.__dataclass_fields__[field].type
    options = get_args(annotation)
    if options and all(isinstance(option, str) for option in options):
        return f"one of {options}"
    return f"of type {getattr(annotation, '__name__', annotation)}"


# Tested with huggingface_hub 2.4 and transformers 5.24: `@strict`'s `__setattr__` raises
# `StrictDataclassFieldValidationError` for a value of the wrong type, and `validate()` raises
# `StrictDataclassClassValidationError` caused by the validator's own error (checked in tests/test_compat.py, beside
# the other workarounds of compat.py; this one stays here, since a saved model folder loads this file alone).
def _raise_value_errors(config_class):
    """`@strict` wraps a bad value in its own error types; raise the `ValueError` naming the field instead, so every
    invalid value reaches the user the same way, at construction, on assignment and from `config.validate()`."""
    strict_setattr, strict_validate = config_class.__setattr__, config_class.validate

    @wraps(strict_setattr)
    def __setattr__(self, name, value):
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError as error:
            raise ValueError(f"LossFreeMoeConfig.{name} must be {_allowed(name)}, got {value!r}.") from error

    @wraps(strict_validate)
    def validate(self):
        try:
            strict_validate(self)
        except StrictDataclassClassValidationError as error:
            raise error.__cause__ from None

    config_class.__setattr__ = __setattr__
    config_class.validate = validate


_raise_value_errors(LossFreeMoeConfig)


__all__ = ["TESTED_TRANSFORMERS", "TRANSFORMERS_REQUIREMENT", "LossFreeMoeConfig", "check_transformers_version"]
