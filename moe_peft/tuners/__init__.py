"""The tuners, one subpackage per family, each in PEFT's split (config.py, layer.py, model.py):

* routed/: MoLE, LoRAMoE and SMoRA, one layer for all three: a method is a router plus a loss (methods.py); its
  experts/ holds the same methods on the fused 3-D expert parameters of transformers' MoE models
  (`target_parameters`), the routed tuner's second kind of layer;
* mhr/: multi-head adapter routing by task (MHR, MHR-z, MHR-mu; PEFT's Poly imports);
* phatgoose/: post-hoc gates over a library of LoRA experts trained apart;
* roma/: router-only tuning of a pretrained MoE model's own routers.

task_tuner.py and delta_merge.py are what the task-routed tuners (MHR, PHATGOOSE) share. Tuners import the ops and
the routing layer below them, never a capability above (export, stats, multi_lora, train ...).
"""

from .mhr import MHRConfig, MHRModel
from .phatgoose import PhatgooseConfig, PhatgooseModel
from .roma import RoMAConfig, RoMAModel
from .routed import (
    LoRAMoEConfig,
    LoRAMoEModel,
    MoELoraConfig,
    MoELoraModel,
    MoLEConfig,
    MoLEModel,
    SMoRAConfig,
    SMoRAModel,
    create_router_optimizer,
    router_param_groups,
)

# PEFT type -> (config class, tuner class): what `moe_peft` registers with PEFT on import
METHODS = {
    "MOLE": (MoLEConfig, MoLEModel),
    "LORAMOE": (LoRAMoEConfig, LoRAMoEModel),
    "SMORA": (SMoRAConfig, SMoRAModel),
    "MHR": (MHRConfig, MHRModel),
    "PHATGOOSE": (PhatgooseConfig, PhatgooseModel),
    "ROMA": (RoMAConfig, RoMAModel),
}

__all__ = [
    "METHODS",
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
    "RoMAModel",
    "router_param_groups",
    "create_router_optimizer",
]
