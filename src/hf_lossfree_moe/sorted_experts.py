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
"""`sorted_mm`: an experts kernel for transformers' experts interface, faster on CPU; registered on import.

On CPU, transformers' `grouped_mm` spends a good part of a training step outside its matrix products: the backward
of the gather `hidden_states[perm // K]` and of the un-permutation `out[inv_perm]` is a serial `index_put_` scatter,
and the routing weights scale the wide (T*K, H) expert outputs. This kernel sorts the K copies of the tokens by expert
once, gathers them with `index_select` (whose backward is a parallel `index_add_`), multiplies each expert's
contiguous rows by its weights (one `grouped_mm` call when a quarter or more of the experts are busy, one `mm` per
active expert when fewer are), applies the routing weights to the narrower (T*K, F) activation, and sums each
token's copies back with `index_add_`: no inverse permutation, no serial scatter. Under expert parallelism, routes
to another rank's experts (local id `num_experts`, weight 0) sort last and are dropped. On other devices, while
`torch.compile` traces (the segment loop reads counts back to Python, which a full graph cannot), and for expert
layouts other than concatenated [gate; up] weights without biases, it is transformers' `grouped_mm`.
This file imports nothing from `hf_lossfree_moe`, so it travels with the modeling file to the Hub.
"""

from typing import NamedTuple

import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward
from transformers.utils import is_torch_greater_or_equal


SORTED_MM = "sorted_mm"
# torch.nn.functional.grouped_mm is the public name of torch._grouped_mm from torch 2.10 on. This file also runs as a
# saved model's remote code under older torch: before 2.9 there is no CPU kernel, and the loop does all the work.
if is_torch_greater_or_equal("2.9", accept_dev=True):
    _grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
else:
    _grouped_mm = None
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _ExpertRows(NamedTuple):
    """Where each expert's copies lie among the expert-sorted rows.

    `segments` lists `(expert, rows)` for the experts that received tokens; `offsets` holds every expert's end row,
    the layout `grouped_mm` takes; `num_rows` counts the rows routed to these experts. Ids of `num_experts` and
    above (expert parallelism's other-rank sentinel) sort after them and belong to no segment.
    """

    segments: list[tuple[int, slice]]
    offsets: torch.Tensor
    num_rows: int

    @classmethod
    def from_sorted_ids(cls, sorted_ids: torch.Tensor, num_experts: int) -> "_ExpertRows":
        counts = torch.bincount(sorted_ids, minlength=num_experts)[:num_experts]  # (E,)
        offsets = counts.cumsum(0, dtype=torch.int32)  # (E,)
        segments, start = [], 0
        for expert, end in enumerate(offsets.tolist()):
            if end > start:
                segments.append((expert, slice(start, end)))
            start = end
        return cls(segments, offsets, start)


def _grouped_mm_applies(x: torch.Tensor, weight: torch.Tensor, rows: _ExpertRows) -> bool:
    """Whether one `grouped_mm` call beats a Python loop of `mm`s here, and accepts these tensors.

    `grouped_mm` visits every expert, idle or not, for about a microsecond each, while the loop pays several
    microseconds of Python per expert with tokens: one call wins once a quarter of the experts have tokens
    (training, prefill), the loop wins when decoding a few tokens over many experts. On CPU the kernel takes
    contiguous 16-bit and 32-bit floats whose rows, and (torch <= 2.10) start, are aligned to 16 bytes; weights
    memory-mapped from a checkpoint need not start aligned.
    """
    aligned = (
        x.data_ptr(),
        weight.data_ptr(),
        x.size(1) * x.element_size(),  # rows of x and of each weight matrix (its input width)
        weight.size(1) * weight.element_size(),  # rows of the output, and of its gradient in the backward
    )
    return (
        _grouped_mm is not None
        and 4 * len(rows.segments) >= weight.size(0)
        and x.dtype == weight.dtype
        and x.dtype in _GROUPED_MM_DTYPES
        and x.is_contiguous()
        and weight.is_contiguous()
        and all(address % 16 == 0 for address in aligned)
    )


class _ExpertsLinear(torch.autograd.Function):
    """`x[rows] @ weight[e].T` for each expert's block of expert-sorted rows; idle experts get a zero gradient.

    The same path, `grouped_mm` or the loop over active experts, serves the forward and the backward.
    """

    @staticmethod
    def forward(ctx, x, weight, rows):
        ctx.grouped = _grouped_mm_applies(x, weight, rows)
        if ctx.grouped:
            out = _grouped_mm(x, weight.transpose(1, 2), offs=rows.offsets)  # (S, out)
        else:
            out = x.new_empty(x.size(0), weight.size(1))  # (S, out)
            for expert, segment in rows.segments:
                torch.mm(x[segment], weight[expert].t(), out=out[segment])
        ctx.save_for_backward(x, weight)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        rows = ctx.rows
        if ctx.grouped:
            grad_out = grad_out.contiguous()
            grad_x = _grouped_mm(grad_out, weight, offs=rows.offsets) if need_x else None
            # An idle expert is an empty group: its weight gradient comes out zero.
            grad_weight = _grouped_mm(grad_out.t(), x, offs=rows.offsets) if need_weight else None
            return grad_x, grad_weight, None
        grad_x = torch.empty_like(x) if need_x else None
        grad_weight = None
        if need_weight:
            grad_weight = torch.empty_like(weight)  # every expert with tokens is overwritten below
            idle = sorted(set(range(weight.size(0))) - {expert for expert, _ in rows.segments})
            grad_weight[idle] = 0
        for expert, segment in rows.segments:
            grad_rows = grad_out[segment]
            if need_x:
                torch.mm(grad_rows, weight[expert], out=grad_x[segment])
            if need_weight:
                torch.mm(grad_rows.t(), x[segment], out=grad_weight[expert])
        return grad_x, grad_weight, None


def _has_plain_layout(experts: nn.Module) -> bool:
    """Concatenated [gate; up] weights of shape (E, out, in), no biases, no post-norm."""
    return (
        experts.has_gate
        and experts.is_concatenated
        and not experts.is_transposed
        and not experts.has_bias
        and not experts.has_post_expert_norm
    )


def sorted_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward for CPU in eager mode; while compiling, elsewhere, or for another weight layout,
    transformers' `grouped_mm`."""
    if torch.compiler.is_compiling() or hidden_states.device.type != "cpu" or not _has_plain_layout(self):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    sorted_ids, expert_order = top_k_index.reshape(-1).sort(stable=True)  # (T * K,)
    rows = _ExpertRows.from_sorted_ids(sorted_ids, self.gate_up_proj.size(0))
    # Other-rank routes (expert parallelism's sentinel id, weight 0) sort last: drop them, as the eager loop skips them.
    expert_order = expert_order[: rows.num_rows]  # (S,), S <= T * K copies routed here
    # expert_order holds the token-major position (token * K + k) of each expert-sorted copy.
    sorted_token = expert_order.div(top_k_index.size(-1), rounding_mode="floor")  # (S,)
    sorted_weights = top_k_weights.reshape(-1).index_select(0, expert_order).unsqueeze(-1)  # (S, 1)

    # index_select's backward is a parallel index_add_, unlike the serial index_put_ behind `hidden_states[index]`.
    sorted_states = hidden_states.to(self.gate_up_proj.dtype).index_select(0, sorted_token)  # (S, H)
    gate_up = _ExpertsLinear.apply(sorted_states, self.gate_up_proj, rows)  # (S, 2F)
    # The routing weight scales the (S, F) activation rather than the wider (S, H) output: same product, less work.
    activation = (self._apply_gate(gate_up) * sorted_weights).to(gate_up.dtype)  # (S, F)
    expert_out = _ExpertsLinear.apply(activation, self.down_proj, rows)  # (S, H)
    # Each token's K outputs summed in fp32 (or wider), as transformers' kernels do.
    acc_dtype = torch.promote_types(expert_out.dtype, torch.float32)
    output = expert_out.new_zeros(hidden_states.shape, dtype=acc_dtype)  # (T, H)
    output.index_add_(0, sorted_token, expert_out.to(acc_dtype))
    return output.to(hidden_states.dtype)


ExpertsInterface.register(SORTED_MM, sorted_mm_experts_forward)
