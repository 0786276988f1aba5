"""Routers map hidden states to (expert indices, weights). One file per routing family.

A router computes in float32 whatever the model's dtype (autocast is switched off inside), returns a
`Routing`, and holds no loss state: the layer turns a `Routing` into loss terms (moe_peft.routing.losses).
"""

from .base import Routing, float32_linear
from .dense import DenseRouter
from .smora import SMoRARouter
from .topk import TopKRouter

__all__ = ["Routing", "TopKRouter", "DenseRouter", "SMoRARouter", "float32_linear"]
