"""The plain transformers model behind an adapted one, built without copying its weights, and merges into it.

`new_plain_model` builds the same class from the same config on the meta device and points every parameter and
buffer at the adapted model's tensors (new Parameter objects on the same storage, so nothing done to the export,
not even `requires_grad_`, reaches the user's model). Merges then assign new tensors `W + delta`; they never write
into a shared one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .parts import FixedExperts, FixedLinear, FixedRouter, Parts, Plain


def check_not_quantized(model: nn.Module) -> None:
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            "export: the base model is quantized (bitsandbytes or another quantizer); merged or exported weights "
            "would have to be dequantized. Load the base in float32/bfloat16 (without quantization_config), load the "
            "adapter onto it, and export that."
        )


def new_plain_model(model: nn.Module, plain: Plain) -> nn.Module:
    """A `type(model)` with `model`'s config whose tensors are those of `plain` (shared storage)."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    fresh.generation_config = copy.deepcopy(getattr(model, "generation_config", None))
    params: dict[int, nn.Parameter] = {}  # one new Parameter per source Parameter: tied weights stay tied
    for module_name, module in fresh.named_modules():
        dot = f"{module_name}." if module_name else ""
        for name in list(module._parameters):
            if module._parameters[name] is None:
                continue
            source = plain.params.get(dot + name)
            if source is None:
                raise ValueError(f"export: the plain model has a parameter {dot + name} that the adapted model lacks.")
            if id(source) not in params:
                params[id(source)] = nn.Parameter(source.detach(), requires_grad=False)
            module._parameters[name] = params[id(source)]
        for name in list(module._buffers):
            if module._buffers[name] is None:
                continue
            source = plain.buffers.get(dot + name)
            if source is None:
                raise ValueError(f"export: the plain model has a buffer {dot + name} that the adapted model lacks.")
            module._buffers[name] = source
    return fresh.eval()


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Point parameter `name` (e.g. "model.layers.0.mlp.up_proj.weight") at a new tensor."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(value.detach(), requires_grad=False)


def get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


def merge_fixed(model: nn.Module, parts: Parts) -> None:
    """Fold every fixed part into the plain model: W + delta, with the delta each layer's merge adds."""
    for part in parts.fixed:
        if isinstance(part, FixedLinear):
            weight = get_tensor(model, f"{part.name}.weight")
            set_tensor(model, f"{part.name}.weight", weight + part.delta().to(weight.dtype))
        elif isinstance(part, FixedExperts):
            for param, (delta, _, _) in part.params.items():
                weight = get_tensor(model, f"{part.name}.{param}")
                set_tensor(model, f"{part.name}.{param}", weight + delta.to(weight.dtype))
        elif isinstance(part, FixedRouter):
            weight = get_tensor(model, f"{part.name}.weight")
            set_tensor(model, f"{part.name}.weight", part.weight.to(weight.dtype))  # RoMA replaces the router weight


def merge_factors(model: nn.Module, factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """W + sum_i B_i A_i for each module (approximated routed layers: A [R, in], B [out, R], scaling folded in)."""
    for name, pairs in factors.items():
        weight = get_tensor(model, f"{name}.weight")
        delta = sum(b.float() @ a.float() for a, b in pairs)  # [out, R] @ [R, in] -> [out, in]
        set_tensor(model, f"{name}.weight", weight + delta.to(weight.dtype))


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.dtype, t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
