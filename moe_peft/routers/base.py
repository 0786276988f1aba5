from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class Routing:
    """What a router decided for T tokens.

    idx:     [T, k] long, expert per slot, -1 for an empty slot (null expert, top-p cut-off)
    weights: [T, k] float32, the weight of each slot's expert output (gradient reaches the router)
    logits:  [T, E'] float32 router logits over all E' choices (real + null experts); for the losses
    probs:   [T, E'] float32 softmax (or sigmoid for SMoRA) of the logits
    choice:  [T, k] long, the raw pick over E' choices before null experts were mapped to -1
    """

    idx: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    choice: Optional[torch.Tensor] = None


def float32_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Router math in float32 whatever the model dtype or autocast state."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return nn.functional.linear(
            x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float()
        )


def new_router_linear(in_features: int, out_features: int, bias: bool, std: float = 0.02) -> nn.Linear:
    # small normal init (MixLoRA uses N(0, 0.02^2)): near-uniform routing at the start
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, std=std)
    if bias:
        nn.init.zeros_(linear.bias)
    return linear
