"""moe-peft: mixture-of-LoRA-experts methods as PEFT plugins.

    import moe_peft
    from peft import get_peft_model
    model = get_peft_model(base, moe_peft.MoLEConfig(r=8, num_experts=4, target_modules=[...]))

Importing this package registers the methods with PEFT (once; see _registration.py).
"""

from . import experts, mhr, multi_lora, phatgoose, stats
from ._atomic_save import atomic_saves
from ._registration import forward_task_ids, register_methods
from .accumulation import accumulation_weight
from .config import LoRAMoEConfig, MoELoraConfig, MoLEConfig, SMoRAConfig
from .experts import import_lora_adapter
from .export import STRATEGIES as EXPORT_STRATEGIES
from .export import ExportResult, NativeMoEError, export
from .mhr import MHRConfig, MHRModel, import_poly_adapter
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
from .phatgoose import PhatgooseConfig, PhatgooseModel
from .roma import RoMAConfig, RoMAModel

__version__ = "0.1.0"

register_methods(
    {
        "MOLE": (MoLEConfig, MoLEModel),
        "LORAMOE": (LoRAMoEConfig, LoRAMoEModel),
        "SMORA": (SMoRAConfig, SMoRAModel),
        "MHR": (MHRConfig, MHRModel),
        "PHATGOOSE": (PhatgooseConfig, PhatgooseModel),
        "ROMA": (RoMAConfig, RoMAModel),
    }
)
atomic_saves({"MOLE", "LORAMOE", "SMORA", "MHR", "PHATGOOSE", "ROMA"})  # save_pretrained never leaves half an adapter
forward_task_ids({"MHR", "PHATGOOSE"})  # PEFT's task-specific models pass task_ids on only for its own Poly otherwise


def __getattr__(name: str):
    # the trainer imports TRL (slow to import): load it on first use only
    if name in ("MoESFTTrainer", "RoutingStatsCallback"):
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MoESFTTrainer",
    "RoutingStatsCallback",
    "stats",
    "MoELoraConfig",
    "MoLEConfig",
    "LoRAMoEConfig",
    "SMoRAConfig",
    "MHRConfig",
    "PhatgooseConfig",
    "RoMAConfig",
    "MoELoraModel",
    "MoLEModel",
    "LoRAMoEModel",
    "SMoRAModel",
    "MHRModel",
    "PhatgooseModel",
    "import_poly_adapter",
    "import_lora_adapter",
    "export",
    "EXPORT_STRATEGIES",
    "ExportResult",
    "NativeMoEError",
    "experts",
    "mhr",
    "multi_lora",
    "phatgoose",
    "RoMAModel",
    "apply_lora_experts",
    "router_loss",
    "accumulation_weight",
    "routing_stats",
    "update_router_biases",
]
