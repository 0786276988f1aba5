"""moe-peft: mixture-of-LoRA-experts methods as PEFT plugins.

    import moe_peft
    from peft import get_peft_model
    model = get_peft_model(base, moe_peft.MoLEConfig(r=8, num_experts=4, target_modules=[...]))

Importing this package registers the methods with PEFT (once; see _internal/registration.py). This module is the
public API only: every name a user imports, re-exported from the layer that defines it (docs/architecture.md).
"""

import sys as _sys

from . import llava, multi_lora, stats
from ._internal import compat as _compat
from ._internal.accumulation import accumulation_weight
from ._internal.atomic import atomic_saves
from ._internal.quantized import dequantize_base
from ._internal.registration import forward_task_ids, register_methods
from ._internal.version import __version__ as __version__
from .export import STRATEGIES as EXPORT_STRATEGIES
from .export import ExportResult, NativeMoEError, export
from .ops import apply_lora_experts
from .tuners import (
    METHODS,
    LoRAMoEConfig,
    LoRAMoEModel,
    MHRConfig,
    MHRModel,
    MoELoraConfig,
    MoELoraModel,
    MoLEConfig,
    MoLEModel,
    PhatgooseConfig,
    PhatgooseModel,
    RoMAConfig,
    RoMAModel,
    SMoRAConfig,
    SMoRAModel,
    create_router_optimizer,
    mhr,
    phatgoose,
    roma,
    router_param_groups,
)
from .tuners.mhr import import_poly_adapter
from .tuners.routed import experts, router_loss, routing_stats, update_router_biases
from .tuners.routed.experts import import_lora_adapter

register_methods(METHODS)
atomic_saves(set(METHODS))  # save_pretrained never leaves half an adapter
forward_task_ids({"MHR", "PHATGOOSE"})  # PEFT's task-specific models pass task_ids on only for its own Poly otherwise
_compat.install(_sys.modules[__name__])  # the 0.1 module paths (moe_peft.config, moe_peft.layer, ...), deprecated


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
    "llava",
    "mhr",
    "multi_lora",
    "phatgoose",
    "RoMAModel",
    "apply_lora_experts",
    "router_loss",
    "accumulation_weight",
    "routing_stats",
    "update_router_biases",
    "router_param_groups",
    "create_router_optimizer",
    "dequantize_base",
    "roma",
]
