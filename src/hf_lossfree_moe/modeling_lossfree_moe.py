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
"""LossFreeMoe: a DeepSeekMoE-style causal LM whose router implements auxiliary-loss-free load balancing.

Each MoE layer has always-on shared experts and fine-grained routed experts. The router scores experts in fp32,
selects the top-K of `score + e_score_correction_bias` (or `score * bias`), and weights the chosen experts by their
*unbiased* scores. The router never changes its bias: `LossFreeBalancer` does, from outside, once per optimizer step.
Attention, norms, rotary embeddings and caches are transformers' own; so are the experts kernels, plus the default
`sorted_mm` (sorted_experts.py), faster on CPU.
`load_balancing="expert_choice"` swaps the router for Expert Choice routing (Zhou et al., 2022), the paper's
non-causal baseline: a research tool, never a text generator (docs/expert_choice.md).
This file imports nothing from `hf_lossfree_moe`, so a saved model folder loads with `trust_remote_code=True`. It
imports its configuration first, which stops an unsupported transformers version with an error naming the versions.
"""

from .configuration_lossfree_moe import LossFreeMoeConfig


# isort: split
from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .quantile_threshold import share_threshold_bias
from .sorted_experts import SORTED_MM


logger = logging.get_logger(__name__)


class LossFreeMoeRMSNorm(LlamaRMSNorm):
    pass


class LossFreeMoeRotaryEmbedding(LlamaRotaryEmbedding):
    pass


class LossFreeMoeMLP(nn.Module):
    """SwiGLU FFN: the dense layers' FFN and, `n_shared_experts` wide, the shared experts."""

    def __init__(self, config: LossFreeMoeConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def fp32_router_logits(hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(T, H) x (E, H) -> (T, E) logits in fp32, even under autocast (Trainer's --bf16): near-tied scores must not
    flip with rounding."""
    with torch.autocast(device_type=hidden_states.device.type, enabled=False):
        return F.linear(hidden_states.float(), weight.float())


def routing_scores(router_logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Routing scores s from fp32 logits: sigmoid (the paper) or softmax over experts (its ablation)."""
    if scoring_func == "sigmoid":
        return router_logits.sigmoid()
    return router_logits.softmax(dim=-1)


class LossFreeMoeTopkRouter(nn.Module):
    """Biased top-K routing: a pure function of the input, `weight` and the fp32 `e_score_correction_bias`.

    `forward(hidden_states (T, H)) -> (router_logits (T, E), topk_weights (T, K), topk_indices (T, K))`, the
    contract of transformers' DeepSeek-V3 router, so `LossFreeBalancer` treats both alike.

    With `batch_balance_iterations` > 0, a training-mode forward routes on the bias that balances its own batch
    (quantile_threshold.py, started from the stored bias; padding left out by `token_mask`): the batch is balanced
    from the first step, at the price of routing each token on statistics of the whole batch. Evaluation and
    generation route on the stored bias alone (the model passes `balance_batch=False` when decoding, in training mode
    too), and so does training once `LossFreeBalancer` has set `batch_balance_finished` after `batch_balance_steps`
    optimizer steps.
    """

    def __init__(self, config: LossFreeMoeConfig):
        super().__init__()
        self.hidden_dim = config.hidden_size
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.multiplicative = config.bias_type == "multiplicative"
        self.batch_balance_iterations = config.batch_balance_iterations
        self.batch_balance_steps = config.batch_balance_steps
        self.batch_balance_finished = False
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))
        # Persistent and fp32 in every load_balancing mode: checkpoints stay interchangeable, and 1e-3 steps
        # survive (in bf16, 1.0 + 1e-3 == 1.0).
        self.e_score_correction_bias = nn.Buffer(
            torch.full((self.num_experts,), self.neutral_bias, dtype=torch.float32)
        )

    @property
    def neutral_bias(self) -> float:
        return 1.0 if self.multiplicative else 0.0

    def score(self, router_logits: torch.Tensor) -> torch.Tensor:
        """Routing scores s from fp32 logits: sigmoid (the paper) or softmax (its ablation)."""
        return routing_scores(router_logits, self.scoring_func)

    @torch.no_grad()
    def select(
        self, scores: torch.Tensor, token_mask: torch.Tensor | None = None, balance_batch: bool = True
    ) -> torch.Tensor:
        """Indices of the top-K experts of the biased scores, within the best `topk_group` groups."""
        bias = self.e_score_correction_bias
        if balance_batch and self.training and self.batch_balance_iterations > 0 and not self.batch_balance_finished:
            balanced = share_threshold_bias(scores, bias, self.top_k, token_mask, self.batch_balance_iterations)
            bias = bias if balanced is None else balanced
        scores_for_choice = scores * bias if self.multiplicative else scores + bias  # (T, E)
        if self.n_group > 1:
            grouped = scores_for_choice.view(-1, self.n_group, self.num_experts // self.n_group)  # (T, G, E/G)
            group_scores = grouped.topk(min(2, grouped.size(-1)), dim=-1).values.sum(dim=-1)  # (T, G)
            kept_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # (T, topk_group)
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
            # -inf, not 0: with negative biases a zeroed expert of a masked group could still win.
            grouped = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf"))
            scores_for_choice = grouped.view(-1, self.num_experts)
        return scores_for_choice.topk(self.top_k, dim=-1, sorted=False).indices  # (T, K)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, balance_batch: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`token_mask` (T,) or (B, S), 0 for padding, is read by batch-balanced routing only; `balance_batch=False`
        routes on the stored bias in training mode too (decoding)."""
        router_logits = fp32_router_logits(hidden_states.reshape(-1, self.hidden_dim), self.weight)  # (T, E)
        scores = self.score(router_logits)  # (T, E)
        topk_indices = self.select(scores, token_mask, balance_batch)  # (T, K)
        topk_weights = scores.gather(1, topk_indices)  # (T, K): unbiased scores, the bias never weights
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, topk_weights * self.routed_scaling_factor, topk_indices

    def _apply(self, fn, recurse=True):
        """Keep the bias fp32 through `.to(dtype)`, `.half()`, `.bfloat16()`; device moves still apply."""
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if moved.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(device=moved.device)
        return self


EXPERT_CHOICE_WARNING = (
    "load_balancing='expert_choice' is a research baseline: each expert picks its tokens among all tokens of the "
    "routing chunk, so a token's output depends on later tokens of its sequence (and on other sequences). The model "
    "sees the future it is asked to predict; its loss is not a language model's, and it must not generate text."
)


class LossFreeMoeExpertChoiceRouter(nn.Module):
    """Expert Choice routing (Zhou et al., 2022): each expert picks the top-C tokens of its routing chunk.

    `C = ceil(expert_capacity_factor * n * K / E)` for a chunk of n real tokens, so the experts do the work of top-K
    token choice when the factor is 1 and every expert gets the same load: balanced by construction, hence no bias
    and no balancer. A chunk is `expert_choice_chunk_size` sequences of the batch (all of them by default); padding
    tokens are never picked and do not count in n. `expert_choice_shuffle` permutes the batch's tokens before cutting
    the chunks, so that a chunk holds tokens of many sequences (the paper's remedy for the leak, and a test of it).

    Not causal: a token's experts depend on the other tokens of its chunk, the future of its own sequence included.

    `forward(hidden_states (B, S, H), token_mask (B, S) or None) -> (router_logits (T, E), weights (T, M),
    indices (T, M))`: the experts that picked each token first, M the most any token got. A token picked by fewer
    experts fills its other slots with experts that did not pick it, at weight 0: every experts kernel takes them
    (an out-of-range id would not be safe outside expert parallelism), and they add nothing to the output.
    """

    # Tells `LossFreeBalancer`, which finds routers by behaviour, that this one has nothing to balance.
    routes_by_expert_choice = True

    def __init__(self, config: LossFreeMoeConfig):
        super().__init__()
        self.hidden_dim = config.hidden_size
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.capacity_factor = Fraction(config.expert_capacity_factor).limit_denominator(10**6)
        self.chunk_size = config.expert_choice_chunk_size
        self.shuffle = config.expert_choice_shuffle
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))
        logger.warning_once(EXPERT_CHOICE_WARNING)

    def capacity(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens each expert picks in chunks of `tokens` real tokens: ceil(factor * n * K / E), in exact integers
        (a float product such as 16.000001 would round up to one token too many)."""
        numerator = self.capacity_factor.numerator * self.top_k
        denominator = self.capacity_factor.denominator * self.num_experts
        return (tokens * numerator + denominator - 1) // denominator

    @torch.no_grad()
    def choose(self, scores: torch.Tensor, real: torch.Tensor, sequence_length: int) -> torch.Tensor:
        """(T, E) bool: which tokens each expert picks, from scores (T, E) and the real-token mask (T,)."""
        num_tokens, num_experts = scores.shape
        order = torch.randperm(num_tokens, device=scores.device) if self.shuffle else None
        if order is not None:
            scores, real = scores[order], real[order]
        num_sequences = num_tokens // sequence_length
        chunk = sequence_length * min(self.chunk_size or num_sequences, num_sequences)
        padding = -num_tokens % chunk
        candidates = F.pad(scores.masked_fill(~real[:, None], float("-inf")), (0, 0, 0, padding), value=float("-inf"))
        candidates = candidates.view(-1, chunk, num_experts)  # (G, chunk, E)
        capacity = self.capacity(F.pad(real, (0, padding)).view(-1, chunk).sum(dim=1))  # (G,)
        most = int(capacity.max())
        picked = candidates.topk(most, dim=1).indices  # (G, most, E): each expert's best tokens
        within = torch.arange(most, device=scores.device)[None, :, None] < capacity[:, None, None]  # (G, most, 1)
        chosen = torch.zeros_like(candidates, dtype=torch.bool)
        chosen.scatter_(1, picked, within.expand_as(picked))
        chosen = chosen.view(-1, num_experts)[:num_tokens]  # (T, E)
        if order is None:
            return chosen
        return torch.empty_like(chosen).index_copy_(0, order, chosen)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sequence_length = hidden_states.shape[-2]
        router_logits = fp32_router_logits(hidden_states.reshape(-1, self.hidden_dim), self.weight)  # (T, E)
        scores = routing_scores(router_logits, self.scoring_func)  # (T, E)
        real = torch.ones_like(scores[:, 0], dtype=torch.bool) if token_mask is None else token_mask.reshape(-1) != 0
        chosen = self.choose(scores, real, sequence_length)  # (T, E)
        weights = scores * chosen  # (T, E): unpicked experts weigh 0
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        most = max(int(chosen.sum(dim=-1).max()), 1)
        indices = chosen.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, :most]  # (T, M): picked first
        return router_logits, weights.gather(1, indices) * self.routed_scaling_factor, indices


@use_experts_implementation
class LossFreeMoeExperts(nn.Module):
    """Routed experts as 3-D weights; `config._experts_implementation` picks the kernel (sorted_mm, grouped_mm...)."""

    def __init__(self, config: LossFreeMoeConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Reference loop over the experts that received tokens.

        Under expert parallelism `top_k_index` holds local ids, and routes to another rank's experts carry the id
        `num_experts` with weight 0 (transformers' convention): they are skipped.
        """
        final_hidden_states = torch.zeros_like(hidden_states)  # (T, H)
        for expert_idx in top_k_index.unique().tolist():
            if expert_idx == self.num_experts:
                continue
            token_idx, top_k_pos = torch.where(top_k_index == expert_idx)
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            expert_out = expert_out * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, expert_out.to(final_hidden_states.dtype))
        return final_hidden_states


class LossFreeMoeSparseMoeBlock(nn.Module):
    """h = sum_shared FFN(x) + sum_i g_i FFN_i(x); the residual is added by the decoder layer."""

    def __init__(self, config: LossFreeMoeConfig):
        super().__init__()
        self.expert_choice = config.load_balancing == "expert_choice"
        self.gate = LossFreeMoeExpertChoiceRouter(config) if self.expert_choice else LossFreeMoeTopkRouter(config)
        self.experts = LossFreeMoeExperts(config)
        self.shared_experts = (
            LossFreeMoeMLP(config, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0
            else None
        )

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, balance_batch: bool = True
    ) -> torch.Tensor:
        """hidden_states (B, S, H); token_mask (B, S), 0 for padding, keeps padding out of Expert Choice and
        batch-balanced routing; `balance_batch=False` turns batch-balanced routing off (decoding)."""
        batch_shape = hidden_states.shape
        flat = hidden_states.reshape(-1, batch_shape[-1])  # (T, H)
        if self.expert_choice:
            _, topk_weights, topk_indices = self.gate(hidden_states, token_mask)
        else:
            _, topk_weights, topk_indices = self.gate(flat, token_mask, balance_batch)
        output = self.experts(flat, topk_indices, topk_weights).view(batch_shape)
        if self.shared_experts is not None:
            output = output + self.shared_experts(hidden_states)
        return output


class LossFreeMoeAttention(nn.Module):
    """Rotary grouped-query attention dispatched through transformers' attention interface."""

    def __init__(self, config: LossFreeMoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, heads, S, D)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, kv_heads, S, D)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class LossFreeMoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LossFreeMoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LossFreeMoeAttention(config, layer_idx)
        self.is_moe = layer_idx >= config.first_k_dense_replace
        if self.is_moe:
            self.mlp = LossFreeMoeSparseMoeBlock(config)
        else:
            self.mlp = LossFreeMoeMLP(config, config.intermediate_size)
        self.input_layernorm = LossFreeMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LossFreeMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_mask: torch.Tensor | None = None,
        balance_batch: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """`token_mask` (B, S), 0 for padding, keeps padding out of Expert Choice and batch-balanced routing;
        `balance_batch=False` turns batch-balanced routing off (decoding)."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        normed = self.post_attention_layernorm(hidden_states)
        return hidden_states + (self.mlp(normed, token_mask, balance_batch) if self.is_moe else self.mlp(normed))


class LossFreeMoePreTrainedModel(PreTrainedModel):
    config_class = LossFreeMoeConfig
    config: LossFreeMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LossFreeMoeDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # sorted_mm hands a traced forward to grouped_mm, whose routing has no data-dependent shapes.
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "router_logits": [
            OutputRecorder(LossFreeMoeTopkRouter, index=0),
            OutputRecorder(LossFreeMoeExpertChoiceRouter, index=0),
        ],
        "hidden_states": LossFreeMoeDecoderLayer,
        "attentions": LossFreeMoeAttention,
    }
    # Loading in bf16/fp16 must not round the bias: its 1e-3 updates would vanish.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Default to `sorted_mm`: faster than `grouped_mm` on CPU, and `grouped_mm` itself on accelerators."""
        return super().get_correct_experts_implementation(requested_experts or SORTED_MM)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, LossFreeMoeTopkRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.constant_(module.e_score_correction_bias, module.neutral_bias)
        elif isinstance(module, LossFreeMoeExpertChoiceRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LossFreeMoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)

    def routers(self) -> list[LossFreeMoeTopkRouter]:
        """The biased top-K router of every MoE layer, in layer order (none under Expert Choice routing)."""
        return [module for module in self.modules() if isinstance(module, LossFreeMoeTopkRouter)]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with every Auto class that loads the folder in `config.auto_map`.

        transformers lists only the saved class's own Auto class (and `AutoConfig`), so the folder of a
        `LossFreeMoeForCausalLM` would not load with `AutoModel.from_pretrained(folder, trust_remote_code=True)`.
        Entries already in `auto_map` (e.g. pointing at a Hub repository) are kept.
        """
        if self.is_remote_code():
            self.config.auto_map = {**_auto_map(self.config), **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)


def _auto_map(config: LossFreeMoeConfig) -> dict[str, str]:
    """`auto_map` entries for the code files that `save_pretrained` copies next to the weights."""

    def reference(cls: type) -> str:
        return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"

    return {
        "AutoConfig": reference(type(config)),
        "AutoModel": reference(LossFreeMoeModel),
        "AutoModelForCausalLM": reference(LossFreeMoeForCausalLM),
    }


class LossFreeMoeModel(LossFreeMoePreTrainedModel):
    def __init__(self, config: LossFreeMoeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LossFreeMoeDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LossFreeMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LossFreeMoeRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        balance_batch: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        r"""
        balance_batch (`bool`, defaults to `True`):
            Whether training-mode routers may route this batch balanced (`batch_balance_iterations`). A forward given
            a cache decodes (`generate()`, continuous batching) and routes on the stored bias, as `generate()` without
            a cache does by passing False: one decoding step of many sequences is no batch to balance.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        balance_batch = balance_batch and cache is None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -inputs_embeds.shape[1] :]  # (B, S): this forward's tokens
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                token_mask=token_mask,
                balance_batch=balance_batch,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


def sequence_balance_loss(
    scores: torch.Tensor,
    topk_indices: torch.Tensor,
    token_mask: torch.Tensor,
    num_experts: int,
    normalize_scores: bool,
) -> torch.Tensor:
    """The paper's per-sequence balance term `sum_i f_i P_i`, averaged over sequences, for one MoE layer.

    `f_i = N / (K T) * #{t : t selects i}` and `P_i = 1/T * sum_t s'[t, i]`, with T the sequence's real
    (non-padding) tokens and s' the scores normalised over experts. Sequences without real tokens are skipped.

    Args:
        scores: (B, S, E) routing scores. topk_indices: (B, S, K). token_mask: (B, S), 1 for real tokens.
        normalize_scores: divide s by its sum over experts (sigmoid gate); softmax scores already sum to 1.
    """
    top_k = topk_indices.size(-1)
    mask = token_mask.to(scores.dtype).unsqueeze(-1)  # (B, S, 1)
    probs = scores / scores.sum(dim=-1, keepdim=True) if normalize_scores else scores  # (B, S, E)
    selected = torch.zeros_like(scores).scatter_(-1, topk_indices, 1.0)  # (B, S, E)
    tokens = mask.sum(dim=1)  # (B, 1)
    has_tokens = tokens.squeeze(-1) > 0
    tokens = tokens[has_tokens]
    f = num_experts / top_k * (selected * mask).sum(dim=1)[has_tokens] / tokens  # (B', E)
    p = (probs * mask).sum(dim=1)[has_tokens] / tokens  # (B', E)
    return (f * p).sum(dim=-1).mean()


class LossFreeMoeForCausalLM(LossFreeMoePreTrainedModel, GenerationMixin):
    r"""
    LossFreeMoe with a language-modelling head.

    Example:

    ```python
    >>> import torch
    >>> from hf_lossfree_moe import LossFreeMoeConfig, LossFreeMoeForCausalLM

    >>> config = LossFreeMoeConfig(
    ...     vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    ... )
    >>> model = LossFreeMoeForCausalLM(config)
    >>> out = model(torch.randint(0, 128, (2, 16)), labels=torch.randint(0, 128, (2, 16)))
    >>> out.logits.shape
    torch.Size([2, 16, 128])
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: LossFreeMoeConfig):
        super().__init__(config)
        self.model = LossFreeMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        balance_batch: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for the language-modelling loss; -100 is ignored. With `router_aux_loss_coef > 0` the loss
            also includes `router_aux_loss_coef * aux_loss`.
        output_router_logits (`bool`, *optional*):
            Return each MoE layer's router logits and the (unweighted) balance loss `aux_loss`.
        balance_batch (`bool`, defaults to `True`):
            See `LossFreeMoeModel.forward`; `generate()` passes False.
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        add_aux_loss = labels is not None and self.config.router_aux_loss_coef > 0
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits or add_aux_loss,
            balance_batch=balance_batch,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)

        aux_loss = None
        if (output_router_logits or add_aux_loss) and self.config.load_balancing != "expert_choice":
            aux_loss = self.balance_loss(
                outputs.router_logits,
                outputs.last_hidden_state.shape[:2],
                attention_mask,
                balance_batch=balance_batch and cache is None,
            )
            if add_aux_loss:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
        )

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, refused under Expert Choice routing: decoding routes a chunk of one new token
        per sequence, where training routed whole sequences with their future, so the text would come from a model
        that never ran that way. Its forwards pass `balance_batch=False`."""
        if self.config.load_balancing == "expert_choice":
            raise ValueError(
                "LossFreeMoeConfig.load_balancing='expert_choice' cannot generate text: Expert Choice routing picks "
                "tokens by looking at the whole sequence, future included. Train with 'loss_free', 'aux_loss' or "
                "'none' to generate; use Expert Choice only to study its loss (docs/expert_choice.md)."
            )
        # In training mode too (RL rollouts), with or without a cache: decoding routes on the stored bias.
        return super().generate(*args, **{"balance_batch": False, **kwargs})

    def balance_loss(
        self,
        router_logits: tuple[torch.Tensor, ...],
        batch_shape: torch.Size,
        attention_mask: torch.Tensor | None,
        balance_batch: bool = True,
    ) -> torch.Tensor:
        """`sum over MoE layers of sequence_balance_loss`, padding excluded: the paper's L_balance / alpha. The routing
        is selected again as the forward selected it (`balance_batch`, padding left out of a balanced batch)."""
        batch_size, seq_len = batch_shape
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -seq_len:]
        total = 0.0
        for router, logits in zip(self.model.routers(), router_logits, strict=True):
            scores = router.score(logits)  # (T, E)
            topk_indices = router.select(scores, token_mask, balance_batch)  # (T, K)
            mask = torch.ones(batch_size, seq_len, device=scores.device) if token_mask is None else token_mask
            total = total + sequence_balance_loss(
                scores.view(batch_size, seq_len, -1),
                topk_indices.view(batch_size, seq_len, -1),
                mask.to(scores.device),
                router.num_experts,
                normalize_scores=router.scoring_func == "sigmoid",
            )
        return total


__all__ = [
    "LossFreeMoePreTrainedModel",
    "LossFreeMoeModel",
    "LossFreeMoeForCausalLM",
    "LossFreeMoeTopkRouter",
    "LossFreeMoeExpertChoiceRouter",
    "LossFreeMoeExperts",
    "LossFreeMoeSparseMoeBlock",
    "sequence_balance_loss",
]
