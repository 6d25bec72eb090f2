"""`sorted_mm`: an experts kernel for transformers' experts interface, faster on CPU; registered on import.

On CPU, transformers' `grouped_mm` spends a good part of a training step outside its matrix products: the backward
of the gather `hidden_states[perm // K]` and of the un-permutation `out[inv_perm]` is a serial `index_put_` scatter,
and the routing weights scale the wide (T*K, H) expert outputs. This kernel sorts the K copies of the tokens by expert
once, gathers them with `index_select` (whose backward is a parallel `index_add_`), runs one `mm` per expert that
received tokens over its contiguous rows, applies the routing weights to the narrower (T*K, F) activation, and sums
each token's copies back with `index_add_`: no inverse permutation, no serial scatter. On other devices, and for
expert layouts other than concatenated [gate; up] weights without biases, it is transformers' `grouped_mm`.
This file imports nothing from `hf_lossfree_moe`, so it travels with the modeling file to the Hub.
"""

import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward


SORTED_MM = "sorted_mm"


class _ExpertsLinear(torch.autograd.Function):
    """`x[rows] @ weight[e].T` for each `(e, rows)` segment: one `mm` per expert that received tokens.

    Only the experts that received tokens are visited, so decoding one token costs K `mm` calls, not E.
    """

    @staticmethod
    def forward(ctx, x, weight, segments):
        out = x.new_empty(x.size(0), weight.size(1))  # (S, out)
        for expert, rows in segments:
            torch.mm(x[rows], weight[expert].t(), out=out[rows])
        ctx.save_for_backward(x, weight)
        ctx.segments = segments
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(x) if need_x else None
        grad_weight = None
        if need_weight:
            grad_weight = torch.empty_like(weight)  # every expert with tokens is overwritten below
            idle = sorted(set(range(weight.size(0))) - {expert for expert, _ in ctx.segments})
            grad_weight[idle] = 0
        for expert, rows in ctx.segments:
            grad_rows = grad_out[rows]
            if need_x:
                torch.mm(grad_rows, weight[expert], out=grad_x[rows])
            if need_weight:
                torch.mm(grad_rows.t(), x[rows], out=grad_weight[expert])
        return grad_x, grad_weight, None


def _expert_segments(sorted_ids: torch.Tensor) -> list[tuple[int, slice]]:
    """`(expert, rows)` of each expert that received tokens: its block of rows among the expert-sorted copies."""
    experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    segments, start = [], 0
    for expert, count in zip(experts.tolist(), counts.tolist(), strict=True):
        segments.append((expert, slice(start, start + count)))
        start += count
    return segments


def _has_plain_layout(experts: nn.Module) -> bool:
    """Concatenated [gate; up] weights of shape (E, out, in), no biases, no post-norm, no expert parallelism."""
    return (
        experts.has_gate
        and experts.is_concatenated
        and not experts.is_transposed
        and not experts.has_bias
        and not experts.has_post_expert_norm
        and not experts._is_expert_parallel
    )


def sorted_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward for CPU; elsewhere, or for another weight layout, transformers' `grouped_mm`."""
    if hidden_states.device.type != "cpu" or not _has_plain_layout(self):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    sorted_ids, expert_order = top_k_index.reshape(-1).sort(stable=True)  # (S,), S = T * K
    # expert_order holds the token-major position (token * K + k) of each expert-sorted copy.
    sorted_token = expert_order.div(top_k_index.size(-1), rounding_mode="floor")  # (S,)
    sorted_weights = top_k_weights.reshape(-1).index_select(0, expert_order).unsqueeze(-1)  # (S, 1)
    segments = _expert_segments(sorted_ids)

    # index_select's backward is a parallel index_add_, unlike the serial index_put_ behind `hidden_states[index]`.
    sorted_states = hidden_states.to(self.gate_up_proj.dtype).index_select(0, sorted_token)  # (S, H)
    gate_up = _ExpertsLinear.apply(sorted_states, self.gate_up_proj, segments)  # (S, 2F)
    # The routing weight scales the (S, F) activation rather than the wider (S, H) output: same product, less work.
    activation = (self._apply_gate(gate_up) * sorted_weights).to(gate_up.dtype)  # (S, F)
    expert_out = _ExpertsLinear.apply(activation, self.down_proj, segments)  # (S, H)
    # Each token's K outputs summed in fp32 (or wider), as transformers' kernels do.
    acc_dtype = torch.promote_types(expert_out.dtype, torch.float32)
    output = expert_out.new_zeros(hidden_states.shape, dtype=acc_dtype)  # (T, H)
    output.index_add_(0, sorted_token, expert_out.to(acc_dtype))
    return output.to(hidden_states.dtype)


ExpertsInterface.register(SORTED_MM, sorted_mm_experts_forward)
