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
"""The bias under which every expert would receive exactly its share of a set of tokens (Quantile Balancing).

Quantile Balancing (`bias_update_rule="quantile"`) takes one pass of it per router call, after routing, and updates
the bias from it once per step. Batch-balanced routing (`batch_balance_iterations`) takes a few passes on the batch's
own scores before the router selects, so the batch is routed balanced (the per-batch dual of BIP, arXiv 2502.15451).
This file imports torch alone: a saved model folder carries it beside the model code, which loads it relatively.
"""

import math

import torch


@torch.no_grad()
def share_threshold_bias(
    scores: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    token_mask: torch.Tensor | None = None,
    passes: int = 1,
) -> torch.Tensor | None:
    """(E,) fp32 bias `-beta` after `passes` fixed-point passes from `bias`, or None when the tokens have none.

    One pass: each token's cutoff `alpha_t` is its (K+1)-th largest biased score `s + b`; each expert's threshold
    `beta_e` is the (ceil(T K / E) + 1)-th largest of `s[:, e] - alpha` over the T tokens, the threshold at which that
    expert would have received exactly its share; `b` becomes `-beta`. The next pass recomputes the cutoffs under the
    new bias. Adding a constant to every score moves every `alpha_t` by the same constant, so the result does not
    depend on the scores' offset.

    Args:
        scores: (T, E) routing scores s, the unbiased ones the router selects on with `s + bias`.
        bias: (E,) the router's additive bias, the first pass's starting point.
        top_k: K, experts per token.
        token_mask: (T,) nonzero for real tokens; padding rows are left out.
        passes: fixed-point passes, >= 1.

    With T real tokens and a share of `ceil(T K / E)` tokens per expert, there is no threshold when the share is T or
    more (e.g. a single token): every expert could take every token.
    """
    scores = scores.float()
    if token_mask is not None:
        scores = scores[token_mask.to(scores.device).reshape(-1) != 0]
    num_tokens, num_experts = scores.shape
    share = math.ceil(num_tokens * top_k / num_experts)
    if share >= num_tokens:
        return None
    bias = bias.to(device=scores.device, dtype=torch.float32)
    for _ in range(passes):
        cutoff = (scores + bias).topk(top_k + 1, dim=-1, sorted=True).values[:, -1:]  # (T, 1): alpha_t
        # the (share + 1)-th largest of each column, the columns made rows: contiguous top-k is the fastest on CPU
        residual = (scores - cutoff).T.contiguous()  # (E, T)
        bias = -residual.topk(share + 1, dim=-1, sorted=False).values.amin(dim=-1)  # (E,): -beta
    return bias
