"""MHRModel, the BaseTuner of MHR / Poly, and the calls that act on a whole MHR adapter (mode switch, task merge,
optimizer groups)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ..routed.config import _bad
from ..task_tuner import TaskIdsTuner, adapter_of, tuner_of
from .config import MODES, MHRConfig
from .layer import MHRLinear


class MHRModel(TaskIdsTuner):
    """Injects MHRLinear layers; carries `task_ids` from forward/generate to them (moe_peft/tasks.py)."""

    prefix: str = "mhr_"
    tuner_layer_cls = MHRLinear
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # q/v projections, like PEFT's Poly


def _tuner(model: nn.Module) -> MHRModel:
    return tuner_of(model, MHRModel, "an MHRConfig")


_adapter = adapter_of


def set_mode(model: nn.Module, mode: str, adapter_name: Optional[str] = None, add_tasks: int = 0) -> None:
    """Switch an MHR adapter between modes, in place; the adapter's config follows, so it saves and reloads as is.

    * "mhr": skills and routing train.
    * "mhr_z": only the routing matrix trains, skills frozen (MHR-z in Caccia et al., NeurIPS 2023). `add_tasks=k` appends k
      fresh routing rows (U(-1e-3, 1e-3)) for new tasks, with ids n_tasks .. n_tasks + k - 1.
    * "mhr_mu": the skills are averaged into one LoRA per layer (per head: A = mean_s A[h, s], B = mean_s B[h, s],
      exactly what uniform routing mixes) and routing is dropped (MHR-mu); task_ids is no longer needed. One way:
      the skills cannot be recovered afterwards.

    Rebuild the optimizer afterwards: the routing and skill parameters are new tensors.
    """
    if mode not in MODES:
        raise _bad("mode", mode, f"use one of {MODES}.")
    if not isinstance(add_tasks, int) or add_tasks < 0:
        raise _bad("add_tasks", add_tasks, "use an integer >= 0.")
    tuner = _tuner(model)
    adapter = _adapter(tuner, adapter_name)
    config: MHRConfig = tuner.peft_config[adapter]
    if config.mode == "mhr_mu" and mode != "mhr_mu":
        raise _bad(
            "mode",
            mode,
            f"adapter '{adapter}' is in mode 'mhr_mu': its skills were averaged into one LoRA and cannot be recovered; "
            "reload the multi-task adapter to route again.",
        )
    if add_tasks and mode != "mhr_z":
        raise _bad("add_tasks", add_tasks, "new task rows are fitted with the skills frozen: use mode='mhr_z'.")
    layers = [layer for _, layer in tuner.layers() if adapter in layer.mhr_A]
    with torch.no_grad():
        for layer in layers:
            if mode == "mhr_mu" and config.mode != "mhr_mu":
                for bank in (layer.mhr_A, layer.mhr_B):
                    averaged = bank[adapter].mean(dim=1, keepdim=True)  # [H, S, ...] -> [H, 1, ...]
                    bank[adapter] = nn.Parameter(averaged, requires_grad=bank[adapter].requires_grad)
                del layer.mhr_router[adapter]
            elif add_tasks:
                layer.mhr_router[adapter].add_tasks(add_tasks)
    config.mode = mode
    config.n_skills = 1 if mode == "mhr_mu" else config.n_skills
    config.n_tasks += add_tasks
    for layer in layers:
        layer.apply_mode(adapter, inference_mode=bool(config.inference_mode))


@contextmanager
def _merging_task(tuner: MHRModel, task_id: Optional[int]):
    previous = tuner.task_state.merge_task
    tuner.task_state.merge_task = None if task_id is None else int(task_id)
    try:
        yield
    finally:
        tuner.task_state.merge_task = previous


def merge_task(
    model: nn.Module, task_id: int, unload: bool = True, safe_merge: bool = False, adapter_name: Optional[str] = None
) -> nn.Module:
    """Merge the LoRA of task `task_id` (eval-mode routing, sigmoid without noise) into the base weights.

    For a fixed task the routed adapter is one rank-r LoRA, so the merged model equals the routed model run with
    task_ids=task_id. unload=True returns the plain transformers model (merge_and_unload); unload=False merges in
    place (`model.unmerge_adapter()` undoes it).
    """
    tuner = _tuner(model)
    adapter = _adapter(tuner, adapter_name)
    with _merging_task(tuner, task_id):
        if unload:
            return tuner.merge_and_unload(safe_merge=safe_merge, adapter_names=[adapter])
        tuner.merge_adapter(adapter_names=[adapter], safe_merge=safe_merge)
        return model


def task_lora_weights(
    model: nn.Module, task_id: Optional[int], adapter_name: Optional[str] = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A_t [r, in], B_t [out, r])} of one task's LoRA, in PEFT LoRA's layout (None: mode mhr_mu)."""
    tuner = _tuner(model)
    adapter = _adapter(tuner, adapter_name)
    out = {}
    with torch.no_grad(), _merging_task(tuner, task_id):
        for name, layer in tuner.layers():
            if adapter in layer.mhr_A:
                a_t, b_t = layer.task_delta_factors(adapter, layer.merge_key(adapter))  # [in, r], [r, out]
                out[name] = (a_t.T.contiguous(), b_t.T.contiguous())  # -> [r, in], [out, r]
    return out


def param_groups(
    model: nn.Module, lr: float, router_lr: Optional[float] = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer groups with a separate learning rate for the routing logits (mttl's recipe: the routing matrix
    trains at a higher rate, e.g. 0.1 vs 1e-3 for the skills, without weight decay)."""
    router, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (router if ".mhr_router." in name else rest).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}] if rest else []
    if router:
        groups.append({"params": router, "lr": lr if router_lr is None else router_lr, "weight_decay": 0.0})
    return groups
