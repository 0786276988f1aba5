"""LoRA on the fused 3-D experts of transformers 5 MoE models (PEFT's `target_parameters`), through the op.

    model = get_peft_model(mixtral, moe_peft.MoLEConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],          # MoE-LoRA on attention, as on any linear
        target_parameters=["experts.gate_up_proj", "experts.down_proj"]))  # one LoRA per base expert

layout.py reads how an experts module stores its weights; grouped.py runs the frozen base GEMMs on (token, slot)
pairs sorted by expert; layer.py is the tuner layer (base + LoRA terms through `apply_lora_experts`, merging);
inject.py matches `target_parameters` as PEFT does; convert.py imports a PEFT LoRA adapter.
"""

from .convert import import_lora_adapter
from .inject import find_expert_parameters, inject_fused_experts
from .layer import EXPERTS_LAYERS, LoRAMoEExperts, MoELoraExperts, MoLEExperts, SMoRAExperts
from .layout import ExpertsLayout, read_layout

__all__ = [
    "import_lora_adapter",
    "find_expert_parameters",
    "inject_fused_experts",
    "EXPERTS_LAYERS",
    "MoELoraExperts",
    "MoLEExperts",
    "LoRAMoEExperts",
    "SMoRAExperts",
    "ExpertsLayout",
    "read_layout",
]
