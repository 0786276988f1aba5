"""Routing capture during the training forward itself: the router layers record each sample's routing
representation r_i (per tuned layer, `[batch, E]`, with gradient) on a shared `RoutingCapture`.

Why not read r_i from a file, as the released script does? Because then the regularizer is a constant
in the router weights and never trains them (methods-reference.md 6.3). Why not a second forward pass?
It would double the cost; the routers see every token anyway.

Reentrant gradient checkpointing runs the first forward under `no_grad`, so the r_i recorded there have
no graph. For that case `alignment_loss` leaves the neighbours' targets here as `pending`, and when the
checkpointed segment is recomputed in backward each router layer attaches its own part of the
regularizer to the forward path (the manifold term is a sum over layers of per-layer terms), through
the same identity-forward mechanism as moe_peft's router losses (moe_peft/context.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...routing.context import RoutingContext, attach_router_loss, padding_mask


@dataclass
class PendingTargets:
    """The neighbours of the current batch, left by alignment_loss for a reentrant recomputation."""

    forward_id: int
    routing: torch.Tensor  # [B, k, L, E] the neighbours' r_j
    weights: torch.Tensor  # [B, k] W_ij, normalized over the k neighbours
    lam: float


def pool_routing(
    logits: torch.Tensor,
    batch_shape: tuple[int, int],
    mask: Optional[torch.Tensor],
    representation: str,
    score: str = "softmax",
) -> torch.Tensor:
    """Routing probabilities of one layer pooled per sample: `[T, E]` logits -> `[B, E]`.

    "last": the probabilities at each sample's last non-padding token (paper section 4, "Last1");
    "mean": their mean over the non-padding tokens. Computed in float32 whatever the model dtype.
    """
    batch, seq = batch_shape
    if score == "sigmoid":  # DeepSeek-V3 scores experts independently; normalize to a distribution
        scores = logits.float().sigmoid()
        probs = scores / scores.sum(-1, keepdim=True)
    else:
        probs = logits.float().softmax(-1)  # [T, E]
    probs = probs.reshape(batch, seq, -1)  # [T, E] -> [B, S, E]
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.bool, device=probs.device)  # [B, S]
    if representation == "mean":
        weights = mask.to(probs.dtype).unsqueeze(-1)  # [B, S, 1]
        return (probs * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # [B, E]
    # index of the last non-padding token (left or right padding); an all-padding row takes the last position
    last = seq - 1 - mask.flip(1).to(torch.int8).argmax(1)  # [B]
    return probs[torch.arange(batch, device=probs.device), last]  # [B, E]


class RoutingCapture:
    """Per-forward state shared by a RoMA tuner and its router layers (one object per tuner)."""

    def __init__(self):
        self.forward_id = 0
        self.batch_shape: Optional[tuple[int, int]] = None  # (B, S) of the tokens of this forward
        self.attention_mask: Optional[torch.Tensor] = None  # [B, S_total]
        self.representation = "last"
        self.score = "softmax"
        self.num_layers = 0  # tuned layers of the active adapter
        self.reps: dict[int, torch.Tensor] = {}  # layer position -> [B, E]
        self.pending: Optional[PendingTargets] = None
        self.grad_ctx = RoutingContext()  # carries the loss gradient scale for the reentrant path

    def __deepcopy__(self, memo) -> RoutingCapture:
        # a copied model starts with an empty capture: the recorded tensors belong to the original's graph
        fresh = RoutingCapture()
        fresh.score = self.score
        return fresh

    def start_forward(self, batch_shape, attention_mask, representation: str, num_layers: int) -> None:
        self.forward_id += 1
        self.batch_shape, self.attention_mask = batch_shape, padding_mask(attention_mask)  # [B, S] bool or None
        self.representation, self.num_layers = representation, num_layers
        self.reps = {}
        self.pending = None
        self.grad_ctx.loss_grad_scale = None

    def _token_mask(self, num_tokens: int) -> Optional[tuple[tuple[int, int], Optional[torch.Tensor]]]:
        if self.batch_shape is None:
            return None
        batch, seq = self.batch_shape
        if batch * seq != num_tokens:
            return None
        mask = self.attention_mask
        if mask is not None and mask.shape[0] == batch and mask.shape[1] >= seq:
            mask = mask[:, -seq:]  # with a KV cache the routers see only the last S positions
        else:
            mask = None
        return (batch, seq), mask

    def record(self, position: int, out):
        """Record the pooled routing of one tuned layer from the router's output; returns the output."""
        logits = out[0] if isinstance(out, tuple) else out
        shape_and_mask = self._token_mask(logits.shape[0])
        if shape_and_mask is None:
            return out
        rep = pool_routing(logits, *shape_and_mask, self.representation, self.score)  # [B, E]
        self.reps[position] = rep
        pending = self.pending
        if pending is None or pending.forward_id != self.forward_id or not rep.requires_grad:
            return out
        # reentrant recomputation: this layer's part of the regularizer,
        # lam * mean_i sum_j W_ij ||r_i^l - r_j^l||^2 (the full term is the sum of these over layers l)
        target = pending.routing[:, :, position].to(rep.device)  # [B, k, L, E] -> [B, k, E]
        sq = (rep.unsqueeze(1) - target).pow(2).sum(-1)  # [B, k]
        term = pending.lam * (pending.weights.to(rep.device) * sq).sum(-1).mean()
        if isinstance(out, tuple):
            # attach to the routing weights the experts consume (element 1), so the term rides the task loss's path
            index = 1 if len(out) > 1 else 0
            return out[:index] + (attach_router_loss(out[index], term, self.grad_ctx),) + out[index + 1 :]
        return attach_router_loss(out, term, self.grad_ctx)

    def representation_tensor(self) -> torch.Tensor:
        """r of the latest forward, `[B, L, E]` (layers in forward order)."""
        if self.num_layers == 0 or len(self.reps) != self.num_layers:
            raise RuntimeError(
                f"RoMA captured the routing of {len(self.reps)} of {self.num_layers} tuned layers in the latest "
                "forward. Run a forward of the adapted model (with input_ids or inputs_embeds of shape [batch, seq]) "
                "with its RoMA adapter active before asking for the routing representation."
            )
        return torch.stack([self.reps[i] for i in range(self.num_layers)], dim=1)  # L x [B, E] -> [B, L, E]
