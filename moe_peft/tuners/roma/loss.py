"""The routing manifold regularizer (paper section 4):

    L_manifold(i) = sum_{j in N(i)} W_ij ||r_i - r_j||^2,      loss = CE + lambda(t) * mean_i L_manifold(i)

r_i is the live routing of sample i (captured in this forward, with gradient), r_j the stored routing
of its successful neighbours, W_ij the kernel weights normalized over the k neighbours.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ...routing.context import router_loss_probe
from .capture import PendingTargets
from .model import roma_tuner


class Neighbours(NamedTuple):
    """The neighbours of a batch: their routing and kernel weights (from RoMAReference.neighbours)."""

    routing: torch.Tensor  # [B, k, L, E] r_j
    weights: torch.Tensor  # [B, k] W_ij (rows sum to 1, or 0 for a sample without neighbours)


def manifold_loss(reps: torch.Tensor, neighbours: Neighbours) -> torch.Tensor:
    """Per-sample L_manifold: reps `[B, L, E]` -> `[B]`. ||r_i - r_j||^2 over the concatenated layers."""
    routing = neighbours.routing.to(reps.device, reps.dtype)
    sq = (reps.unsqueeze(1) - routing).pow(2).sum(dim=(-2, -1))  # [B, 1, L, E] - [B, k, L, E] -> [B, k]
    return (neighbours.weights.to(reps.device, reps.dtype) * sq).sum(-1)  # [B, k] -> [B]


def alignment_loss(
    model: nn.Module, neighbours: Neighbours, step: Optional[int] = None, adapter_name: Optional[str] = None
) -> torch.Tensor:
    """lambda(step) * mean_i L_manifold(i) for the batch of the latest forward; add it to the task loss.

    Call it after the forward (in a plain loop, or in a trainer's compute_loss). `step` is the optimizer
    step for lambda's linear warmup (None: fully warmed up). Its gradient reaches the router weights
    directly, or, under reentrant gradient checkpointing (whose first forward keeps no graph), through the
    router layers when the checkpointed segments are recomputed in backward; there the loss you call
    backward on must include the task loss too, as it does in training.
    """
    tuner = roma_tuner(model)
    config = tuner.peft_config[adapter_name or tuner.active_adapters[0]]
    capture = tuner.capture
    reps = capture.representation_tensor()  # [B, L, E]
    if neighbours.routing.shape[0] != reps.shape[0] or neighbours.routing.shape[2:] != reps.shape[1:]:
        raise ValueError(
            f"neighbours of shape {tuple(neighbours.routing.shape)} do not fit the captured routing "
            f"{tuple(reps.shape)} ([batch, k, L, E] vs [batch, L, E]): build the reference with the same adapter."
        )
    lam = config.lambda_at(step)
    loss = lam * manifold_loss(reps, neighbours).mean()
    if reps.requires_grad or not torch.is_grad_enabled():
        return loss
    anchor = next(
        (p for _, layer in tuner.router_layers() for p in layer.roma_router.values() if p.requires_grad), None
    )
    if anchor is None or not tuner.model.training:
        return loss
    # reentrant checkpointing: the layers attach their terms when recomputed; the probe records the
    # gradient that reaches this loss (gradient accumulation, loss scaling) for them
    capture.pending = PendingTargets(capture.forward_id, neighbours.routing.detach(), neighbours.weights.detach(), lam)
    return loss.detach() + router_loss_probe(anchor, capture.grad_ctx, 1)
