"""PHATGOOSE: post-hoc gates over independently trained LoRA experts, routed per token and per module.

# 1. each expert: an ordinary PEFT LoRA trained on its own task, saved with save_pretrained(dir)
# 2. its gates: only the sigmoid gate vectors train, the expert is frozen; saved next to the adapter
moe_peft.phatgoose.train_gates(PeftModel.from_pretrained(base, dir), data, steps=100, lr=1e-3, save_to=dir)
# 3. the library: one PEFT model that saves and reloads as one adapter
model = moe_peft.phatgoose.assemble(base, [dir_1, dir_2, dir_3], top_k=2)
moe_peft.phatgoose.add_experts(model, [dir_4])                 # the others are not retrained
moe_peft.phatgoose.set_routing(model, "uniform")              # baselines: "uniform", "single", "oracle"
"""

from .config import ROUTINGS, PhatgooseConfig
from .gates import GATES_FILE, gate_training, gates_from_state_dict, load_gates, save_gates, train_gates
from .layer import PhatgooseLinear
from .library import Expert, add_experts, assemble, check_experts, read_expert
from .model import PhatgooseModel, expert_load, mean_expert_load, set_routing

__all__ = [
    "GATES_FILE",
    "ROUTINGS",
    "Expert",
    "PhatgooseConfig",
    "PhatgooseLinear",
    "PhatgooseModel",
    "add_experts",
    "assemble",
    "check_experts",
    "expert_load",
    "gate_training",
    "gates_from_state_dict",
    "load_gates",
    "mean_expert_load",
    "read_expert",
    "save_gates",
    "set_routing",
    "train_gates",
]
