from __future__ import annotations

import torch
from torch import nn

from .base import Routing, float32_linear, new_router_linear


class DenseRouter(nn.Module):
    """LoRAMoE: w = softmax(R x) over every expert (R [E, in], no bias); all experts are active."""

    def __init__(self, in_features: int, num_experts: int, init_std: float = 0.02):
        super().__init__()
        self.num_experts = num_experts
        self.linear = new_router_linear(in_features, num_experts, bias=False, std=init_std)

    def forward(self, x: torch.Tensor, frozen: bool = False) -> Routing:
        """x [T, in]; frozen: no gradient to the router's weight (`float32_linear`)."""
        logits = float32_linear(self.linear, x, frozen)  # [T, E]
        probs = logits.softmax(dim=-1)  # [T, E]
        idx = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)  # [T, E]
        return Routing(idx=idx, weights=probs, logits=logits, probs=probs, choice=idx)
