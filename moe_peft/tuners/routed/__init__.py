"""The token-routed tuner: MoLE, LoRAMoE and SMoRA share one layer (a frozen base linear, a stacked bank of LoRA
experts, a router) and one tuner; a method is a router plus a loss (methods.py).

config.py (the three configs), layer.py (the tuner layer, one op call per forward), methods.py (router and loss
per method), model.py (the BaseTuner: injection, block routing hooks, router-loss reporting, SMoRA's bias update),
merge_hint.py (what merge_and_unload's refusal says about the export strategies), optim.py (optimizer parameter
groups applying router_lr_ratio), experts/ (the same methods on
the fused 3-D experts of transformers' MoE models: a second kind of layer of this tuner, `target_parameters`).
"""

from .config import LoRAMoEConfig, MoELoraConfig, MoLEConfig, SMoRAConfig
from .model import (
    LoRAMoEModel,
    MoELoraModel,
    MoLEModel,
    SMoRAModel,
    router_loss,
    routing_stats,
    update_router_biases,
)
from .optim import create_router_optimizer, router_param_groups

__all__ = [
    "MoELoraConfig",
    "MoLEConfig",
    "LoRAMoEConfig",
    "SMoRAConfig",
    "MoELoraModel",
    "MoLEModel",
    "LoRAMoEModel",
    "SMoRAModel",
    "router_loss",
    "routing_stats",
    "update_router_biases",
    "router_param_groups",
    "create_router_optimizer",
]
