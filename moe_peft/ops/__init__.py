"""The one op that applies routed LoRA experts: every token-routed method ends here.

    y[t] = scaling * sum_j w[t, j] * B[idx[t, j]] @ (A[idx[t, j]] @ x[t])

Special cases on the same op: dense routing (k = E), rank-wise routing (SMoRA: E experts of rank 1),
null experts (index -1 contributes exactly zero), one expert (plain LoRA).
"""

from __future__ import annotations

import torch

from .reference import dense_gated, expert_gate, grouped, per_expert_loop

__all__ = [
    "apply_lora_experts",
    "choose_torch_path",
    "expert_gate",
    "dense_gated",
    "grouped",
    "per_expert_loop",
    "BACKENDS",
]

BACKENDS = ("auto", "torch", "dense", "grouped", "triton")

# Measured on a 2-core CPU, forward+backward, T=2048, d=512/1024 (benchmarks/cpu_paths.py): the grouped path
# beats dense-gated only when dense does at least GROUPED_MIN_RATIO times the useful work (E / k experts
# computed per selected one) AND each expert's rank is large enough (GROUPED_MIN_RANK) for its small GEMMs
# to outweigh the gather/scatter. Rank-1 experts (SMoRA) are 10x faster dense at any E.
GROUPED_MIN_RATIO = 16
GROUPED_MIN_RANK = 16


def choose_torch_path(num_experts: int, rank: int, k: int) -> str:
    """Which pure-torch algorithm `backend="torch"` uses for these shapes."""
    if num_experts >= GROUPED_MIN_RATIO * k and rank >= GROUPED_MIN_RANK:
        return "grouped"
    return "dense"


def _check(x, lora_A, lora_B, expert_idx, expert_weights) -> None:
    if x.dim() != 2:
        raise ValueError(
            f"apply_lora_experts: x must be [T, in], got shape {tuple(x.shape)}; flatten batch dims first."
        )
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(
            f"apply_lora_experts: lora_A must be [E, r, in] and lora_B [E, out, r], got {tuple(lora_A.shape)} "
            f"and {tuple(lora_B.shape)}."
        )
    num_experts, rank, d_in = lora_A.shape
    if lora_B.shape[0] != num_experts or lora_B.shape[2] != rank:
        raise ValueError(
            f"apply_lora_experts: lora_B {tuple(lora_B.shape)} does not match lora_A {tuple(lora_A.shape)}: "
            "expected [E, out, r] with the same E and r."
        )
    if x.shape[1] != d_in:
        raise ValueError(f"apply_lora_experts: x has {x.shape[1]} features but lora_A expects in={d_in}.")
    if expert_idx.dim() != 2 or expert_idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"apply_lora_experts: expert_idx must be [T, k] with T={x.shape[0]}, got {tuple(expert_idx.shape)}."
        )
    if expert_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"apply_lora_experts: expert_idx must be an integer tensor, got {expert_idx.dtype}.")
    if expert_weights.shape != expert_idx.shape:
        raise ValueError(
            f"apply_lora_experts: expert_weights {tuple(expert_weights.shape)} must have the shape of expert_idx "
            f"{tuple(expert_idx.shape)}."
        )


def apply_lora_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_idx: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Apply routed LoRA experts and return the delta.

    Args:
        x: `[T, in]` token features (already dropped out, if dropout is used).
        lora_A: `[E, r, in]` stacked down-projections.
        lora_B: `[E, out, r]` stacked up-projections.
        expert_idx: `[T, k]` long; -1 marks an empty slot (null expert), which contributes zero.
        expert_weights: `[T, k]` routing weights; gradients flow into them (the router trains through this op).
        scaling: the LoRA scaling (`lora_alpha / r` for most methods).
        backend: `"auto"` (the fastest correct path for the device), `"torch"` (pure torch, picks dense or
            grouped by shape), `"dense"`, `"grouped"`, or `"triton"` (the fused GPU kernel).

    Returns:
        `[T, out]` in the dtype of `lora_A` (x is cast to it, as PEFT's LoRA does).
    """
    if backend not in BACKENDS:
        raise ValueError(f"apply_lora_experts: backend must be one of {BACKENDS}, got {backend!r}.")
    _check(x, lora_A, lora_B, expert_idx, expert_weights)
    expert_idx = expert_idx.long()
    x = x.to(lora_A.dtype)
    if x.shape[0] == 0:
        return x.new_zeros(0, lora_B.shape[1])
    if backend == "triton":
        raise NotImplementedError(
            "apply_lora_experts: the fused Triton backend is not part of this release yet; use backend='torch' "
            "(or 'auto', which falls back to it)."
        )
    if backend in ("auto", "torch"):
        backend = choose_torch_path(lora_A.shape[0], lora_A.shape[1], expert_idx.shape[1])
    if backend == "dense":
        return dense_gated(x, lora_A, lora_B, expert_idx, expert_weights, scaling)
    return grouped(x, lora_A, lora_B, expert_idx, expert_weights, scaling)
