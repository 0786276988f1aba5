"""Conversions between MHR adapters and Hugging Face PEFT: import a PEFT Poly/MHR adapter, export one task's LoRA
as a plain PEFT LoRA adapter."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, load_peft_weights
from safetensors.torch import save_file
from torch import nn

from ..._internal.atomic import staged_adapter
from .config import MHRConfig
from .model import _adapter, _tuner, task_lora_weights

_PEFT_PREFIX = "base_model.model."
# PEFT Poly's state-dict suffixes -> (our attribute, what it is); the layouts are the same:
# A [H, S, in/H, r], B [H, S, r, out/H], routing logits [n_tasks, H * S]
_POLY_KEYS = {".poly_lora_A": "A", ".poly_lora_B": "B", ".poly_router.module_logits": "logits"}


def _read_poly(path_or_peft_model: Union[str, os.PathLike, PeftModel]) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    if isinstance(path_or_peft_model, PeftModel):
        adapter = path_or_peft_model.active_adapter
        config = path_or_peft_model.peft_config[adapter]
        weights = get_peft_model_state_dict(path_or_peft_model, adapter_name=adapter)
    else:
        config = PeftConfig.from_pretrained(str(path_or_peft_model))
        weights = load_peft_weights(str(path_or_peft_model), device="cpu")
    if getattr(config.peft_type, "value", config.peft_type) != "POLY":
        raise ValueError(
            f"import_poly_adapter reads PEFT Poly/MHR adapters (peft_type POLY), but {path_or_peft_model!r} holds "
            f"peft_type {config.peft_type}."
        )
    if config.poly_type != "poly" or config.modules_to_save:
        raise ValueError(
            f"poly_type={config.poly_type!r}, modules_to_save={config.modules_to_save!r}: only poly_type='poly' "
            "without modules_to_save is supported by import_poly_adapter."
        )
    return config, weights


def import_poly_adapter(
    base_model: nn.Module, path_or_peft_model: Union[str, os.PathLike, PeftModel], adapter_name: str = "default"
) -> PeftModel:
    """Turn a Hugging Face PEFT Poly (n_splits=1) or MHR (n_splits>1) adapter into an MHR adapter on `base_model`.

    `path_or_peft_model` is a directory saved by PEFT or a live PeftModel (its active adapter). The result routes
    exactly as PEFT's Poly: scaling 1/r, relaxed-Bernoulli routing in training, sigmoid in eval; in eval mode its
    outputs equal PEFT's for the same task_ids (tested against PEFT). `base_model` must be the base the adapter was
    trained on (its own copy: PEFT modifies the model it wraps).
    """
    poly, weights = _read_poly(path_or_peft_model)
    config = MHRConfig(
        r=poly.r,
        n_tasks=poly.n_tasks,
        n_skills=poly.n_skills,
        n_splits=poly.n_splits,
        mode="mhr",
        lora_alpha=1.0,  # PEFT's Poly scales by 1 / r
        relaxed_bernoulli=True,
        target_modules=poly.target_modules,
        exclude_modules=poly.exclude_modules,
        task_type=poly.task_type,
        base_model_name_or_path=poly.base_model_name_or_path,
        inference_mode=poly.inference_mode,
    )
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    tuner = _tuner(model)
    layers = dict(tuner.layers())
    found: dict[str, set[str]] = {}
    with torch.no_grad():
        for key, value in weights.items():
            suffix = next((s for s in _POLY_KEYS if key.endswith(s)), None)
            if suffix is None or not key.startswith(_PEFT_PREFIX):
                raise ValueError(f"Unexpected key {key!r} in the Poly adapter; it is not a Poly weight.")
            name = key[len(_PEFT_PREFIX) : -len(suffix)]
            layer = layers.get(name)
            if layer is None:
                raise ValueError(f"The Poly adapter has weights for {name}, which the MHR adapter did not target.")
            target = {
                "A": layer.mhr_A[adapter_name],
                "B": layer.mhr_B[adapter_name],
                "logits": layer.mhr_router[adapter_name].task_logits,
            }[_POLY_KEYS[suffix]]
            if target.shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} in the Poly adapter, {tuple(target.shape)} here.")
            target.copy_(value)
            found.setdefault(name, set()).add(suffix)
    missing = [name for name in layers if found.get(name) != set(_POLY_KEYS)]
    if missing:
        raise ValueError(f"The Poly adapter lacks weights for {missing}; was it saved from this base model?")
    return model


def export_task_lora(
    model: nn.Module, task_id: Optional[int], path: Union[str, os.PathLike], adapter_name: Optional[str] = None
) -> LoraConfig:
    """Save the LoRA of task `task_id` (eval-mode routing) as a plain PEFT LoRA adapter directory.

    Load it with `PeftModel.from_pretrained(base, path)` (peft's LoraConfig; moe_peft not needed): it gives the same
    outputs as the MHR model run with task_ids=task_id. task_id=None for an adapter in mode "mhr_mu".
    """
    tuner = _tuner(model)
    adapter = _adapter(tuner, adapter_name)
    config: MHRConfig = tuner.peft_config[adapter]
    factors = task_lora_weights(model, task_id, adapter)
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,  # LoRA scales by lora_alpha / r, as MHR does
        target_modules=sorted(factors),
        lora_dropout=0.0,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
    )
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.float().cpu()  # [r, in]
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b.float().cpu()  # [out, r]
    with staged_adapter(path) as tmp:  # the config is published last: no loader sees it beside old or partial weights
        lora.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    return lora
