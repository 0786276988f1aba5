"""MHR (multi-head adapter routing) and Poly: per-task routing over a bank of LoRA skills.

model = get_peft_model(base, moe_peft.MHRConfig(r=4, n_tasks=6, n_skills=4, n_splits=2, target_modules=[...]))
model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 3]))     # task_ids: [batch], also in generate()
moe_peft.mhr.set_mode(model, "mhr_z", add_tasks=1)                   # fit a new task, skills frozen
moe_peft.mhr.merge_task(model, task_id=3)                            # exact: the task's LoRA merged into W
moe_peft.mhr.export_task_lora(model, 3, "out/task3")                 # a plain PEFT LoRA adapter
moe_peft.import_poly_adapter(base, "peft_poly_dir")                  # from Hugging Face PEFT's Poly
"""

from .config import MODES, MHRConfig
from .convert import export_task_lora, import_poly_adapter
from .layer import MHRLinear
from .model import MHRModel, merge_task, param_groups, set_mode, task_lora_weights
from .router import TaskRouter

__all__ = [
    "MODES",
    "MHRConfig",
    "MHRLinear",
    "MHRModel",
    "TaskRouter",
    "export_task_lora",
    "import_poly_adapter",
    "merge_task",
    "param_groups",
    "set_mode",
    "task_lora_weights",
]
