"""Approximate strategies: a token-routed layer becomes one LoRA (docs/methods.md, "Export").

For a routed linear with experts (A_e [r, in], B_e [out, r], scale s_e) and routing weights w[t, e] (zero for an
expert token t did not pick), the delta the layer adds to token t is

    delta_t = sum_e w[t, e] s_e B_e A_e x_t

* average (Experts Weights Averaging; for MHR, MHR-mu in parts.py): every expert with the same coefficient
  c_e = W / E, where W is what a token's weights sum to (1 for the softmax-weighted methods, top_k for SMoRA, whose
  gates sum to k); for PHATGOOSE this is its "uniform" baseline.
* routing_weighted: c_e = mean_t w[t, e] over the calibration tokens (padding excluded): the routing-weighted
  expected delta E_t[sum_e w[t, e] s_e B_e A_e].
  Both give the LoRA delta sum_e c_e s_e B_e A_e, which is exactly a LoRA of rank E*r (A_e stacked, B_e scaled
  and stacked); `rank` truncates it by SVD (the best rank-R approximation in Frobenius norm).
* svd: the rank-R matrix M that best reproduces the per-token deltas on the calibration inputs,

      M = argmin_{rank M <= R}  sum_t ||M x_t - delta_t||^2 + lam ||M||_F^2

  (reduced-rank ridge regression). With S = sum_t x_t x_t^T + lam I and C = sum_t delta_t x_t^T, the full-rank
  solution is M0 = C S^-1, and the objective equals ||(M - M0) S^{1/2}||_F^2 + const, so the optimum is
  M = U_R U_R^T M0 with U_R the top-R left singular vectors of M0 S^{1/2} (Eckart-Young). lam = ridge * tr(S)/in
  keeps S invertible when the calibration tokens do not span the input space. Only S [in, in] and C [out, in] are
  accumulated, in float64, so any number of tokens fits.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from ..ops import apply_lora_experts
from .parts import RoutedLinear

STRATEGIES = ("average", "routing_weighted", "svd")


@dataclass
class LayerStats:
    """What one routed linear saw on the calibration tokens."""

    weight_sum: torch.Tensor  # [E] float64, sum over tokens of each expert's routing weight
    tokens: int = 0
    sxx: Optional[torch.Tensor] = None  # [in, in] float64, sum_t x_t x_t^T (svd only)
    cdx: Optional[torch.Tensor] = None  # [out, in] float64, sum_t delta_t x_t^T (svd only)
    dd: float = 0.0  # sum_t ||delta_t||^2 (svd only: the fit's relative residual)


def token_delta(part: RoutedLinear, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """delta_t = sum_j w[t, j] s_{e_j} B_{e_j} A_{e_j} x_t for x [T, in] and the routing (idx, weights) [T, k]."""
    scale = part.scale.to(weights.device)[idx.clamp_min(0)]  # [T, k], each slot's expert scaling
    return apply_lora_experts(
        x.float(), part.lora_A.float(), part.lora_B.float(), idx, weights.float() * scale, 1.0, backend="torch"
    )  # [T, out]


class Collector:
    """Forward hooks on the routed layers that accumulate LayerStats over calibration batches.

    Set `mask` ([B, S] attention mask) before each forward: padding tokens are left out of every statistic.
    """

    def __init__(self, parts: list[RoutedLinear], fit: bool):
        self.parts, self.fit = parts, fit
        self.mask: Optional[torch.Tensor] = None
        self.stats = {id(p): LayerStats(torch.zeros(p.lora_A.shape[0], dtype=torch.float64)) for p in parts}

    def _hook(self, part: RoutedLinear):
        def hook(module, args, output):
            x = args[0]
            lead = x.shape[:-1]
            x = x.detach().reshape(-1, x.shape[-1])  # [..., in] -> [T, in]
            idx, weights = part.route(x, lead)  # [T, k] each
            idx, weights = idx.detach(), weights.detach().double()
            if self.mask is not None and tuple(self.mask.shape) == tuple(lead):
                keep = self.mask.reshape(-1).bool().to(x.device)  # [T]
                x, idx, weights = x[keep], idx[keep], weights[keep]
            stats = self.stats[id(part)]
            valid = idx >= 0  # null experts and top-p cut-offs carry index -1
            stats.weight_sum.index_add_(0, idx[valid].cpu(), weights[valid].cpu())  # [T, k] -> [E]
            stats.tokens += x.shape[0]
            if self.fit:
                delta = token_delta(part, x, idx, weights).double()  # [T, out]
                xd = x.double()
                sxx, cdx = xd.T @ xd, delta.T @ xd  # [in, in], [out, in]
                stats.sxx = sxx if stats.sxx is None else stats.sxx + sxx
                stats.cdx = cdx if stats.cdx is None else stats.cdx + cdx
                stats.dd += float(delta.square().sum())

        return hook

    @contextmanager
    def attached(self):
        handles = [p.layer.register_forward_hook(self._hook(p)) for p in self.parts]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def coefficients(part: RoutedLinear, strategy: str, stats: Optional[LayerStats]) -> torch.Tensor:
    """c [E] float64: each expert's weight in the single LoRA (average or routing_weighted)."""
    num_experts = part.lora_A.shape[0]
    if strategy == "average":
        return torch.full((num_experts,), part.weight_total / num_experts, dtype=torch.float64)
    if stats is None or stats.tokens == 0:
        raise ValueError(f"routing_weighted: no calibration token reached {part.name}; check the calibration data.")
    return stats.weight_sum / stats.tokens


def mixture_factors(part: RoutedLinear, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_e c_e s_e B_e A_e as one LoRA (A [E'r, in], B [out, E'r]) over the experts with c_e != 0."""
    keep = coef != 0
    c = (coef.to(part.scale.device) * part.scale.double())[keep]  # [E']
    a = part.lora_A[keep.to(part.lora_A.device)].float()  # [E', r, in]
    b = part.lora_B[keep.to(part.lora_B.device)].double() * c[:, None, None]  # [E', out, r]
    return a.reshape(-1, a.shape[-1]), b.permute(1, 0, 2).reshape(b.shape[1], -1).float()  # [E'r, in], [out, E'r]


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` approximation of B A (A [K, in], B [out, K]) as factors, through QR of both factors and
    an SVD of the small [K, K] core (Eckart-Young), never forming B A."""
    if rank >= a.shape[0]:
        return a, b
    qb, rb = torch.linalg.qr(b.double())  # [out, K], [K, K]
    qa, ra = torch.linalg.qr(a.double().T)  # [in, K], [K, K]
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # B A = qb (rb ra^T) qa^T
    root = s[:rank].sqrt()
    new_b = (qb @ u[:, :rank]) * root  # [out, R]
    new_a = root[:, None] * (vh[:rank] @ qa.T)  # [R, in]
    return new_a.float(), new_b.float()


def svd_fit(stats: LayerStats, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Reduced-rank ridge regression (module docstring): A [R, in], B [out, R] and the relative residual
    sum_t ||M x_t - delta_t||^2 / sum_t ||delta_t||^2 of the fit on the calibration tokens."""
    if stats.tokens == 0 or stats.sxx is None:
        raise ValueError("svd: no calibration token reached a routed layer; check the calibration data.")
    sxx, cdx = stats.sxx, stats.cdx
    d_in = sxx.shape[0]
    lam = ridge * float(torch.trace(sxx)) / d_in
    s_reg = sxx + lam * torch.eye(d_in, dtype=sxx.dtype, device=sxx.device)  # [in, in]
    chol = torch.linalg.cholesky(s_reg)  # S = L L^T
    full = torch.linalg.solve(s_reg, cdx.T).T  # M0 = C S^-1: [out, in]
    u, _, _ = torch.linalg.svd(full @ chol, full_matrices=False)  # M0 S^{1/2} ~ M0 L (same left singular vectors)
    u = u[:, :rank]  # [out, R]
    a, b = u.T @ full, u  # M = U U^T M0 = B A
    m = b @ a  # [out, in]
    residual = stats.dd - 2 * float((m * cdx).sum()) + float((m @ sxx * m).sum())
    return a.float(), b.float(), residual / max(stats.dd, 1e-30)
