"""Pure-torch paths of the routed-LoRA op; they run on any device and are the numerical reference.

Two algorithms compute the same thing (see docs/kernel.md):

* dense-gated: E experts of rank r are one LoRA of rank E*r with a per-token block gate G. Two GEMMs,
  no gather, no sort, every expert parameter in the graph (so DDP never sees an unused parameter).
  Cost grows with E*r, not with k*r.
* grouped: tokens sorted by expert, one small GEMM pair per expert that received tokens. Cost grows
  with k*r plus a gather/scatter pass; it wins on CPU when E is much larger than k.

`apply_lora_experts` in `moe_peft.ops` picks between them.
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


def grouped(x, lora_A, lora_B, expert_idx, expert_weights, scaling: float) -> torch.Tensor:
    """Sort the (token, slot) pairs by expert and run one GEMM pair per expert that received tokens.

    The loop is over experts (at most E iterations), never over tokens.
    """
    num_tokens, k = expert_idx.shape
    num_experts, _, _ = lora_A.shape
    d_out = lora_B.shape[1]
    flat_idx = expert_idx.reshape(-1)  # [T*k]
    flat_w = expert_weights.reshape(-1).to(x.dtype)  # [T*k]
    pair_token = torch.arange(num_tokens, device=x.device).repeat_interleave(k)  # [T*k]
    keep = flat_idx >= 0  # null experts cost nothing here
    flat_idx, flat_w, pair_token = flat_idx[keep], flat_w[keep], pair_token[keep]  # [P]
    order = torch.argsort(flat_idx, stable=True)  # [P], pairs grouped by expert
    sorted_idx = flat_idx[order]
    counts = torch.bincount(sorted_idx, minlength=num_experts).tolist()  # one host sync per call
    tok = pair_token[order]  # [P]
    w = flat_w[order]  # [P]
    x_sorted = x.index_select(0, tok)  # [P, in]
    out = x.new_zeros(num_tokens, d_out)  # [T, out]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xs = x_sorted[start : start + n]  # [n, in]
        h = (xs @ lora_A[e].t()) * w[start : start + n, None]  # [n, r]
        out.index_add_(0, tok[start : start + n], h @ lora_B[e].t())  # [n, out] added at token rows
        start += n
    # Experts that received no token still take part in the graph (zero gradient), so DDP does not need
    # find_unused_parameters=True.
    out = out + 0.0 * (lora_A.sum() + lora_B.sum())
    return out * scaling


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
