"""The one op that applies routed LoRA experts: every token-routed method ends here.

    y[t] = scaling * sum_j w[t, j] * B[idx[t, j]] @ (A[idx[t, j]] @ x[t])

Special cases on the same op: dense routing (k = E), rank-wise routing (SMoRA: E experts of rank 1),
null experts (index -1 contributes exactly zero), one expert (plain LoRA), per-sample adapter selection
(k = 1, w = the adapter's scaling, idx = the sample's adapter; see `apply_lora_per_sample`, whose torch path is
the batched matmuls of per_sample.py).

Backends (docs/kernel.md):
  "triton"  fused Triton kernels, forward and backward: Path D (dense-gated) while E*r <= DENSE_MAX_R,
            Path S (sorted pairs) beyond; "triton_dense" / "triton_sorted" force one of them.
  "torch"   the same dense-gated math in one autograd.Function (any device), or the grouped per-expert
            GEMMs where they are faster on CPU (E >= 16k and r >= 16); "dense" / "grouped" force one.
  "auto"    Triton on CUDA when the shapes suit it, else "torch" (CPU, tiny T, float64).
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

from .fused import RoutedLoRAFunction, TorchDense, TorchSorted, compute_dtype
from .per_sample import PerSampleLoRAFunction
from .reference import dense_gated, expert_gate, per_expert_loop

__all__ = [
    "apply_lora_experts",
    "apply_lora_per_sample",
    "linear_lora_per_sample",
    "choose_per_sample_path",
    "linear_lora_experts",
    "choose_backend",
    "choose_torch_path",
    "expert_gate",
    "dense_gated",
    "per_expert_loop",
    "BACKENDS",
]

BACKENDS = ("auto", "torch", "dense", "grouped", "triton", "triton_dense", "triton_sorted")

# Measured on a 2-core CPU, forward+backward, T=2048, d=1024 (benchmarks/cpu_paths.py, table in README.md):
# dense-gated costs ~E*r columns per token, grouped ~k*(r + GROUPED_OVERHEAD_RANK) (its gather/scatter
# passes cost about as much as 8 more rank columns). Grouped is used when dense would do more than
# GROUPED_MIN_RATIO times its work: it then wins at every measured shape (rank 4..64, E 8..64), and dense
# keeps the rank-1 SMoRA shapes (10x faster there) and dense routing (k = E).
GROUPED_MIN_RATIO = 2
GROUPED_OVERHEAD_RANK = 8
# Path D reads x and writes y once but computes all E*r columns; Path S reads x and passes y k times but
# computes k*r. docs/kernel.md puts the crossover at E*r ~ 200-270 on an H100 (a roofline estimate until
# `moe-peft bench ops` measures it on a GPU).
DENSE_MAX_R = 256
# Below this many tokens the launches dominate and the torch path is as fast (decode); not yet measured.
TRITON_MIN_TOKENS = 16

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def choose_torch_path(num_experts: int, rank: int, k: int) -> str:
    """Which pure-torch algorithm `backend="torch"` uses for these shapes."""
    if num_experts * rank > GROUPED_MIN_RATIO * k * (rank + GROUPED_OVERHEAD_RANK):
        return "grouped"
    return "dense"


def choose_backend(x: torch.Tensor, lora_A: torch.Tensor, k: int, backend: str = "auto") -> str:
    """Resolve a backend name to the concrete path: dense, grouped, triton_dense or triton_sorted."""
    num_experts, rank, _ = lora_A.shape
    if backend == "auto":
        cdt = compute_dtype(x, lora_A)
        fits = x.is_cuda and _HAS_TRITON and cdt in (torch.float32, torch.bfloat16, torch.float16)
        backend = "triton" if fits and x.shape[0] >= TRITON_MIN_TOKENS else "torch"
    if backend == "triton":
        return "triton_dense" if num_experts * rank <= DENSE_MAX_R else "triton_sorted"
    if backend == "torch":
        return choose_torch_path(num_experts, rank, k)
    return backend


def _impl(path: str):
    if path == "dense":
        return TorchDense
    if path == "grouped":
        return TorchSorted
    if not _HAS_TRITON:
        raise RuntimeError(
            f"apply_lora_experts(backend={path!r}) needs Triton: pip install 'moe-peft[gpu]' (or triton), or use "
            "backend='auto' / 'torch'."
        )
    from .triton_ops import TritonDense, TritonSorted

    return TritonDense if path == "triton_dense" else TritonSorted


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


def _check_indices(expert_idx: torch.Tensor, num_experts: int) -> None:
    """-1 is the only empty slot. Any other index outside [0, E) is a bug upstream, never a null expert: on CPU a
    ValueError; on CUDA an asynchronous device-side assert (no host sync in the forward; it stops the process
    at the next synchronization instead of silently dropping the slot or reading out of bounds)."""
    message = (
        f"apply_lora_experts: expert_idx must hold expert indices in [0, {num_experts}) or -1 for an empty "
        "slot (null expert); other values are not null experts."
    )
    bad = (expert_idx < -1) | (expert_idx >= num_experts)  # [T, k]
    if expert_idx.is_cuda:
        torch._assert_async(~bad.any(), message)
    elif bad.any():
        raise ValueError(f"{message} Got {sorted(set(expert_idx[bad].tolist()))[:8]}.")


@torch.compiler.disable  # one graph break per call under torch.compile: the kernels are launched eagerly
def _apply(path, x, lora_A, lora_B, expert_idx, expert_weights, scaling, out, weight, bias):
    _check_indices(expert_idx, lora_A.shape[0])
    return RoutedLoRAFunction.apply(
        out, x, lora_A, lora_B, expert_weights, expert_idx, float(scaling), weight, bias, _impl(path)
    )


def apply_lora_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_idx: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: float,
    backend: str = "auto",
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Apply routed LoRA experts: return the delta, or add it into `out` in place and return `out`.

    Args:
        x: `[T, in]` token features (already dropped out, if dropout is used).
        lora_A: `[E, r, in]` stacked down-projections.
        lora_B: `[E, out, r]` stacked up-projections.
        expert_idx: `[T, k]` integer in [0, E); -1 marks an empty slot (null expert), which contributes zero. Any
            other value raises (on CUDA: a device-side assert, to keep the forward free of host syncs).
        expert_weights: `[T, k]` routing weights; gradients flow into them (the router trains through this op).
        scaling: the LoRA scaling (`lora_alpha / r` for most methods).
        backend: see the module docstring.
        out: optional `[T, out]` tensor (the base layer's output) that the delta is added into, in place, with
            fp32 accumulation; it must not be a leaf that requires grad or a tensor another op saved.

    Returns:
        `out`, or the `[T, out]` delta in the compute dtype (the autocast dtype under autocast, else x's and
        A's promoted: PEFT's LoRA casts x to the adapter dtype).
    """
    if backend not in BACKENDS:
        raise ValueError(f"apply_lora_experts: backend must be one of {BACKENDS}, got {backend!r}.")
    _check(x, lora_A, lora_B, expert_idx, expert_weights)
    if out is not None and out.shape != (x.shape[0], lora_B.shape[1]):
        raise ValueError(
            f"apply_lora_experts: out must be [T, out]={[x.shape[0], lora_B.shape[1]]}, got {list(out.shape)}."
        )
    if x.shape[0] == 0:
        return out if out is not None else x.new_zeros(0, lora_B.shape[1], dtype=compute_dtype(x, lora_A))
    path = choose_backend(x, lora_A, expert_idx.shape[1], backend)
    return _apply(path, x, lora_A, lora_B, expert_idx, expert_weights, scaling, out, None, None)


def linear_lora_experts(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_idx: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: float,
    backend: str = "auto",
) -> torch.Tensor:
    """`F.linear(x, weight, bias) + apply_lora_experts(x, ...)` as one op: the delta is added into the base
    output in place and, in backward, the LoRA part of dx into the base layer's dx buffer (one pass over dx
    instead of three). Use it when the adapter sees the same x as the base layer (no dropout)."""
    if backend not in BACKENDS:
        raise ValueError(f"linear_lora_experts: backend must be one of {BACKENDS}, got {backend!r}.")
    _check(x, lora_A, lora_B, expert_idx, expert_weights)
    if x.shape[0] == 0:
        return torch.nn.functional.linear(x, weight, bias)
    path = choose_backend(x, lora_A, expert_idx.shape[1], backend)
    return _apply(path, x, lora_A, lora_B, expert_idx, expert_weights, scaling, None, weight, bias)


PER_SAMPLE_BACKENDS = BACKENDS + ("bmm",)
# The batched matmuls gather every sample's adapter weights (B*r*(in+out) elements copied, about 8 MACs' worth
# each on CPU), the dense-gated path computes all N adapters for every token (N times the MACs of one). Per
# token that is 8/S against N-1 extra adapters' MACs: dense while S*(N-1) < PER_SAMPLE_DENSE_BELOW (decode steps
# of a few adapters), bmm beyond (prefill, training). Measured in `moe-peft bench multi`'s layer table.
PER_SAMPLE_DENSE_BELOW = 8


def choose_per_sample_path(x: torch.Tensor, lora_A: torch.Tensor, backend: str = "auto") -> str:
    """The path `apply_lora_per_sample` takes for x [B, S, in]: on the torch path "bmm" (ops/per_sample.py) or, for
    a few adapters and few tokens per sample, "dense"; on CUDA the Triton kernels of the routed op with k = 1; any
    path when forced."""
    if backend not in PER_SAMPLE_BACKENDS:
        raise ValueError(f"apply_lora_per_sample: backend must be one of {PER_SAMPLE_BACKENDS}, got {backend!r}.")
    if backend == "bmm":
        return "bmm"
    path = choose_backend(x.reshape(-1, x.shape[-1]), lora_A, 1, backend)
    if backend in ("auto", "torch") and not path.startswith("triton"):
        return "dense" if x.shape[1] * (lora_A.shape[0] - 1) < PER_SAMPLE_DENSE_BELOW else "bmm"
    return path


def _per_sample_inputs(fn, x, lora_A, lora_B, sample_adapter, scaling):
    """Validate; return the [B] long adapter indices and the [B] float32 per-sample scales."""
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be [B, S, in], got shape {tuple(x.shape)}.")
    batch, _, d_in = x.shape
    # the routed op's checks on the shapes of A, B and x (one token per sample stands for the rest)
    one = torch.zeros(1, 1, dtype=torch.long)
    _check(x.new_empty(1, d_in), lora_A, lora_B, one, one.float())
    if sample_adapter.shape != (batch,) or sample_adapter.dtype.is_floating_point:
        raise ValueError(
            f"{fn}: sample_adapter must be a [B]={[batch]} integer tensor (one adapter index per sample, -1 for "
            f"none), got {list(sample_adapter.shape)} {sample_adapter.dtype}."
        )
    if isinstance(scaling, torch.Tensor):
        if scaling.shape != (batch,):
            raise ValueError(
                f"{fn}: scaling must be a float or a [B]={[batch]} tensor (each sample's adapter scaling), got "
                f"{list(scaling.shape)}."
            )
        if scaling.requires_grad:
            raise ValueError(f"{fn}: scaling is a constant per sample; pass it detached.")
        scale = scaling.to(device=x.device, dtype=torch.float32)
    else:
        scale = torch.full((batch,), float(scaling), device=x.device, dtype=torch.float32)
    return sample_adapter.to(x.device).long(), scale


def _per_sample(path, out, x, lora_A, lora_B, idx, scale, weight, bias):
    if path == "bmm":
        return _apply_bmm(out, x, lora_A, lora_B, idx, scale, weight, bias)
    batch, seq, d_in = x.shape
    tok_idx = idx.view(batch, 1, 1).expand(batch, seq, 1).reshape(batch * seq, 1)  # [B] -> [B*S, 1]
    w = scale.view(batch, 1, 1).expand(batch, seq, 1).reshape(batch * seq, 1)  # the scaling as the routing weight
    flat_out = None if out is None else out.view(batch * seq, -1)  # [B, S, out] -> [B*S, out]
    y = _apply(path, x.reshape(batch * seq, d_in), lora_A, lora_B, tok_idx, w, 1.0, flat_out, weight, bias)
    return out if out is not None else y.view(batch, seq, -1)  # [B*S, out] -> [B, S, out]


@torch.compiler.disable
def _apply_bmm(out, x, lora_A, lora_B, idx, scale, weight, bias):
    return PerSampleLoRAFunction.apply(out, x, lora_A, lora_B, idx, scale, weight, bias)


def apply_lora_per_sample(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    sample_adapter: torch.Tensor,
    scaling: float | torch.Tensor,
    backend: str = "auto",
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Batched multi-adapter LoRA: sample b of `x [B, S, in]` uses adapter `sample_adapter[b]` of the stack
    `lora_A [N, r, in]`, `lora_B [N, out, r]` (-1: no adapter), with `scaling` (a float, or a `[B]` tensor: each
    sample's adapter scaling). Adapters of different ranks are stacked zero-padded to the largest rank.

    backend "auto": the Triton kernels of the routed op (k = 1) on CUDA; elsewhere the batched matmuls of
    ops/per_sample.py ("bmm"), or the dense-gated path for a few adapters and few tokens per sample
    (`choose_per_sample_path`); any routed backend can be forced. Training works too (PEFT's mixed-batch
    `adapter_names` path is inference-only). Returns `[B, S, out]`, or `out` with the delta added in place."""
    idx, scale = _per_sample_inputs("apply_lora_per_sample", x, lora_A, lora_B, sample_adapter, scaling)
    if out is not None and out.shape != (*x.shape[:2], lora_B.shape[1]):
        raise ValueError(
            f"apply_lora_per_sample: out must be [B, S, out]={[*x.shape[:2], lora_B.shape[1]]}, got {list(out.shape)}."
        )
    path = choose_per_sample_path(x, lora_A, backend)
    if x.numel() == 0:
        return out if out is not None else x.new_zeros(*x.shape[:2], lora_B.shape[1], dtype=compute_dtype(x, lora_A))
    return _per_sample(path, out, x, lora_A, lora_B, idx, scale, None, None)


def linear_lora_per_sample(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    sample_adapter: torch.Tensor,
    scaling: float | torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """`F.linear(x, weight, bias) + apply_lora_per_sample(x, ...)` as one op (the delta goes into the base output
    in place, and in backward the adapters' dx into the base dx). x is `[B, S, in]`; returns `[B, S, out]`."""
    idx, scale = _per_sample_inputs("linear_lora_per_sample", x, lora_A, lora_B, sample_adapter, scaling)
    path = choose_per_sample_path(x, lora_A, backend)
    if x.numel() == 0:
        return F.linear(x, weight, bias)
    return _per_sample(path, None, x, lora_A, lora_B, idx, scale, weight, bias)
