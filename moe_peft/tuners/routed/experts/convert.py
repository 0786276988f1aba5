"""Import a Hugging Face PEFT LoRA adapter (plain `target_modules`, and `target_parameters` on fused experts) as a
moe-peft adapter with the same outputs.

A LoRA on a linear becomes a one-expert MoLE layer (`num_experts=1`: the router's softmax over one expert is
exactly 1, so the weight is exactly 1 and the layer is the LoRA); a LoRA on a fused 3-D expert parameter is the
same per-expert LoRA in our layout. PEFT stores the latter as `lora_A [r*E, in]` (rows expert-major) and
`lora_B [out, r*E]` (columns rank-major: column j*E + e), read here exactly as PEFT's `ParamWrapper` reads them.
"""

from __future__ import annotations

import math
import os
from typing import Union

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..config import MoLEConfig
from ..layer import MoELoraLinear
from .layer import MoELoraExperts

# LoRA options whose layers are not a plain `s B A x` with one rank and one alpha; an adapter that sets any of them
# is refused, naming the field (variants such as DoRA or aLoRA are caught on the live layers, see _read)
_UNSUPPORTED = (
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "trainable_token_indices",
    "layer_replication",
    "lora_bias",
)


def _check(config: LoraConfig) -> None:
    if getattr(config.peft_type, "value", config.peft_type) != "LORA":
        raise ValueError(f"import_lora_adapter reads PEFT LoRA adapters, got peft_type {config.peft_type}.")
    for name in _UNSUPPORTED:
        value = getattr(config, name, None)
        if value not in (None, False) and value != {} and value != []:
            raise ValueError(
                f"import_lora_adapter: the LoRA adapter sets {name}={value!r}, which has no moe-peft equivalent yet; "
                "only plain LoRA (one rank, one alpha, no bias, no extra trained modules) converts exactly."
            )
    if config.bias != "none":
        raise ValueError(
            f"import_lora_adapter: bias={config.bias!r} is not supported; use LoRA adapters with bias='none'."
        )


def _read(peft_model: PeftModel, adapter: str) -> tuple[dict, dict]:
    """({linear name: (A [r, in], B [out, r])}, {experts name: {param: (A [E, r, in], B [E, out, r])}})."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    linears, experts = {}, {}
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        variant = getattr(module, "lora_variant", {}).get(adapter)
        if variant is not None:
            raise ValueError(
                f"import_lora_adapter: {name} uses the LoRA variant {type(variant).__name__} (use_dora, "
                "alora_invocation_tokens, arrow_config, ...); only plain LoRA converts exactly."
            )
        a, b = module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach()
        if isinstance(module, ParamWrapper):
            num_experts = module.num_experts
            a = a.reshape(num_experts, -1, a.shape[-1])  # [r*E, in] -> [E, r, in], rows expert-major
            b = b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1)  # [out, r*E] -> [out, r, E] -> [E, out, r]
            owner = name.replace(".base_layer", "")  # nested wrappers: one per parameter of the same module
            experts.setdefault(owner, {})[module.parameter_name] = (a.clone(), b.clone())
        elif isinstance(module.get_base_layer(), nn.Linear):
            linears[name] = (a.clone(), b.clone())
        else:
            raise ValueError(
                f"import_lora_adapter: {name} is a LoRA on a {type(module.get_base_layer()).__name__}; only LoRA on "
                "nn.Linear modules and on fused expert parameters converts."
            )
    return linears, experts


def import_lora_adapter(
    base_model: nn.Module, path_or_peft_model: Union[str, os.PathLike, PeftModel], adapter_name: str = "default"
) -> PeftModel:
    """Turn a PEFT LoRA adapter into a moe-peft MoLE adapter on `base_model` with the same outputs and gradients.

    `path_or_peft_model`: a directory saved by PEFT (it is loaded onto `base_model` by PEFT itself, read, and
    unloaded again, so PEFT resolves its own target matching and parameter nesting), or a live PeftModel (its
    active adapter; `base_model` must then be another copy of its base: PEFT modifies the model it wraps).
    LoRA on nn.Linear becomes a one-expert MoLE layer; LoRA on fused expert parameters (`target_parameters`)
    becomes our fused-experts layer. Options without an exact equivalent (DoRA, LoRA bias, rank patterns,
    modules_to_save, ...) raise a ValueError naming the field.
    """
    if isinstance(path_or_peft_model, PeftModel):
        source, adapter = path_or_peft_model, path_or_peft_model.active_adapter
        lora = source.peft_config[adapter]
        _check(lora)
        linears, experts = _read(source, adapter)
    else:
        from peft import PeftConfig

        lora = PeftConfig.from_pretrained(str(path_or_peft_model))
        _check(lora)
        source = PeftModel.from_pretrained(base_model, str(path_or_peft_model))
        try:
            linears, experts = _read(source, "default")
        finally:
            base_model = source.unload()  # the same base model, without PEFT's layers
    rank = lora.r
    # rsLoRA scales by alpha / sqrt(r); ours by alpha / r: the same scaling with alpha' = alpha * sqrt(r)
    alpha = lora.lora_alpha * math.sqrt(rank) if lora.use_rslora else lora.lora_alpha
    config = MoLEConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=lora.lora_dropout,
        num_experts=1,
        top_k=1,
        router_granularity="linear",  # one expert: any router gives weight exactly 1; no block hooks needed
        router_aux_loss_coef=0.0,
        router_z_loss_coef=0.0,
        target_modules=sorted(linears),  # full names: exactly the modules PEFT adapted
        target_parameters=sorted(f"{m}.{p}" for m, params in experts.items() for p in params) or None,
        task_type=lora.task_type,
        base_model_name_or_path=lora.base_model_name_or_path,
    )
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, MoELoraLinear) and adapter_name in module.experts_A:
                a, b = linears.pop(name)
                module.experts_A[adapter_name].copy_(a[None])  # [r, in] -> [1, r, in]
                module.experts_B[adapter_name].copy_(b[None])  # [out, r] -> [1, out, r]
            elif isinstance(module, MoELoraExperts) and adapter_name in module.experts_A:
                for param, (a, b) in experts.pop(name).items():
                    module.experts_A[adapter_name][param].copy_(a)
                    module.experts_B[adapter_name][param].copy_(b)
    if linears or experts:
        raise ValueError(
            f"import_lora_adapter: the moe-peft adapter did not target {sorted(linears) + sorted(experts)}; "
            "was the LoRA adapter made for this base model?"
        )
    return model
