"""Pure-torch paths of the routed-LoRA op; they run on any device and are the numerical reference.

* dense_gated: E experts of rank r are one LoRA of rank E*r with a per-token block gate G, through
  plain autograd: the independent check of the Functions in fused.py (tests) and the algorithm's
  shortest statement.
* per_expert_loop: the loop transformers' Mixtral and most MoE-LoRA code use; a benchmark baseline.

The fast paths live in fused.py (torch) and triton_ops.py (Triton); docs/kernel.md describes them.
"""

from __future__ import annotations

import torch


def expert_gate(expert_idx: torch.Tensor, expert_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter (idx, w) into a dense gate G [T, E]; slots with index -1 (null experts) add nothing.

    Differentiable with respect to `expert_weights`.
    """
    valid = expert_idx >= 0  # [T, k]
    w = torch.where(valid, expert_weights, torch.zeros_like(expert_weights))  # [T, k]
    gate = expert_weights.new_zeros(expert_idx.shape[0], num_experts)  # [T, E]
    # G[t, idx[t, j]] += w[t, j]; an expert picked twice by one token gets the sum (same as the loop)
    return gate.scatter_add(1, expert_idx.clamp_min(0), w)  # [T, E]


def dense_gated(x, lora_A, lora_B, expert_idx, expert_weights, scaling: float) -> torch.Tensor:
    """y = scaling * ((x A_all^T) * G) B_all^T, all experts as one LoRA of rank E*r."""
    num_tokens = x.shape[0]
    num_experts, rank, d_in = lora_A.shape
    d_out = lora_B.shape[1]
    u = x @ lora_A.reshape(num_experts * rank, d_in).t()  # [T, in] @ [in, E*r] -> [T, E*r]
    gate = expert_gate(expert_idx, expert_weights.to(u.dtype), num_experts)  # [T, E]
    h = u.view(num_tokens, num_experts, rank) * gate.unsqueeze(-1)  # [T, E, r] * [T, E, 1]
    b_all = lora_B.permute(1, 0, 2).reshape(d_out, num_experts * rank)  # [E, out, r] -> [out, E*r]
    return (h.reshape(num_tokens, num_experts * rank) @ b_all.t()) * scaling  # [T, E*r] @ [E*r, out] -> [T, out]


def per_expert_loop(x, lora_A, lora_B, expert_idx, expert_weights, scaling: float) -> torch.Tensor:
    """The loop transformers' Mixtral and most MoE-LoRA code use: a mask per expert. Baseline only."""
    out = x.new_zeros(x.shape[0], lora_B.shape[1])  # [T, out]
    for e in range(lora_A.shape[0]):
        tok, slot = torch.where(expert_idx == e)  # tokens routed to e, and in which slot
        if tok.numel() == 0:
            continue
        h = (x[tok] @ lora_A[e].t()) @ lora_B[e].t()  # [n, out]
        out.index_add_(0, tok, h * expert_weights[tok, slot, None].to(x.dtype))
    return out * scaling
