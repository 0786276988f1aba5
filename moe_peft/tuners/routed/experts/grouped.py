"""The frozen base experts' GEMMs on (token, slot) pairs sorted by expert.

    pairs p = t*k + j, sorted by idx[t, j]:  y[p] = W_{e(p)} x[p]            (W [E, out, in], or [E, in, out])

On CUDA with bf16 the GEMMs are one `torch.nn.functional.grouped_mm` call (no Python loop, no host sync);
elsewhere (CPU, or CUDA in another dtype, which `grouped_mm` does not take) one `mm` per expert, the torch
path. The autograd.Function saves the input only when the expert weights train: with frozen experts the
backward needs W alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class SortedPairs:
    """(token, slot) pairs grouped by expert: everything the grouped GEMMs and the LoRA op need."""

    order: torch.Tensor  # [P] pair ids t*k + j, grouped by expert
    token: torch.Tensor  # [P] the token of each sorted pair
    expert: torch.Tensor  # [P, 1] its expert (the op's idx for one slot per row)
    offsets: torch.Tensor  # [E] int32 end of each expert's group (grouped_mm)
    counts: Optional[list[int]]  # [E] on the host, only where a per-expert loop runs (one sync)


def _use_grouped_mm(x: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and hasattr(F, "grouped_mm")
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


def sort_pairs(top_k_index: torch.Tensor, num_experts: int, like: torch.Tensor) -> SortedPairs:
    """Group the (token, slot) pairs of `top_k_index [T, k]` by expert; `like` tells where the GEMMs run."""
    k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)  # [T, k] -> [P]
    order = torch.argsort(flat, stable=True)  # [P]
    expert = flat.index_select(0, order)  # [P], ascending
    # counts without bincount (which syncs on CUDA to size its output): scatter ones into [E]
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, expert, torch.ones_like(expert, dtype=torch.int32))  # [E]
    host = None if _use_grouped_mm(like) else counts.tolist()
    return SortedPairs(
        order=order,
        token=torch.div(order, k, rounding_mode="floor"),  # [P]
        expert=expert.unsqueeze(1),  # [P] -> [P, 1]
        offsets=torch.cumsum(counts, 0, dtype=torch.int32),  # [E]
        counts=host,
    )


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, pairs: SortedPairs) -> torch.Tensor:
    """a [P, K] sorted by expert, b [E, K, N] (any strides) -> [P, N], y[p] = a[p] @ b[e(p)]."""
    if pairs.counts is None:
        return F.grouped_mm(a, b, offs=pairs.offsets)
    out = a.new_empty(a.shape[0], b.shape[2])  # [P, N]
    start = 0
    for e, n in enumerate(pairs.counts):
        if n:
            torch.mm(a[start : start + n], b[e], out=out[start : start + n])  # [n, K] @ [K, N]
        start += n
    return out


class GroupedLinear(torch.autograd.Function):
    """y = x W_e^T per sorted pair (W [E, out, in]; `transposed`: W [E, in, out], y = x W_e)."""

    @staticmethod
    def forward(ctx, x, weight, pairs, transposed):
        w_in_out = weight if transposed else weight.transpose(1, 2)  # [E, in, out], a view
        y = _grouped_mm(x.to(weight.dtype), w_in_out, pairs)  # [P, out]
        ctx.pairs, ctx.transposed = pairs, transposed
        ctx.save_for_backward(weight, x if weight.requires_grad else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, x = ctx.saved_tensors
        pairs, transposed = ctx.pairs, ctx.transposed
        dy = dy.contiguous().to(weight.dtype)
        dx = d_weight = None
        if ctx.needs_input_grad[0]:
            w_out_in = weight.transpose(1, 2) if transposed else weight  # [E, out, in], a view
            dx = _grouped_mm(dy, w_out_in, pairs)  # [P, out] -> [P, in]
        if ctx.needs_input_grad[1]:
            # base experts rarely train (they are frozen under PEFT): one GEMM per expert, on any device
            d_weight = torch.zeros_like(weight)
            counts = pairs.counts
            if counts is None:
                counts = torch.diff(pairs.offsets, prepend=pairs.offsets.new_zeros(1)).tolist()  # [E]
            start = 0
            for e, n in enumerate(counts):
                if n:
                    g = dy[start : start + n].t() @ x[start : start + n].to(weight.dtype)  # [out, n] @ [n, in]
                    d_weight[e] = g.t() if transposed else g
                start += n
        return dx, d_weight, None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, pairs: SortedPairs, transposed: bool) -> torch.Tensor:
    return GroupedLinear.apply(x, weight, pairs, transposed)
