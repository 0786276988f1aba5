"""moe-peft: mixture-of-LoRA-experts methods as PEFT plugins.

    import moe_peft
    from peft import get_peft_model
    model = get_peft_model(base, moe_peft.MoLEConfig(r=8, num_experts=4, target_modules=[...]))

Importing this package registers the methods with PEFT (once; see _registration.py).
"""

from ._registration import register_methods
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
from .ops import apply_lora_experts
from .roma import RoMAConfig, RoMAModel

__version__ = "0.1.0"

register_methods(
    {
        "MOLE": (MoLEConfig, MoLEModel),
        "LORAMOE": (LoRAMoEConfig, LoRAMoEModel),
        "SMORA": (SMoRAConfig, SMoRAModel),
        "ROMA": (RoMAConfig, RoMAModel),
    }
)

__all__ = [
    "MoELoraConfig",
    "MoLEConfig",
    "LoRAMoEConfig",
    "SMoRAConfig",
    "RoMAConfig",
    "MoELoraModel",
    "MoLEModel",
    "LoRAMoEModel",
    "SMoRAModel",
    "RoMAModel",
    "apply_lora_experts",
    "router_loss",
    "routing_stats",
    "update_router_biases",
]
