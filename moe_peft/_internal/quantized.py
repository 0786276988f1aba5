"""What a moe-peft layer may do with its base linear when that linear is quantized (docs/methods.md, "Quantized
bases").

bitsandbytes' `Linear4bit` and `Linear8bitLt` subclass `nn.Linear`, so they pass every `isinstance(..., nn.Linear)`
check, but their `weight` is not the [out, in] matrix: `Params4bit` is uint8 `[(out*in + 1) // 2, 1]` (two 4-bit
codes a byte, plus a quantization state of block scales), `Int8Params` is int8 `[out, in]` with per-row scales kept
apart (`SCB`). Reading either as a dense weight (`F.linear(x, base.weight)`, `base.weight += delta`) gives garbage
or a dtype error. Hence:

* forward: the fused op that computes the base linear itself runs only when `dense_linear(base)` (a plain
  `nn.Linear`, by exact type, with a floating-point weight and no hooks or extra arguments); anything else runs its
  own forward, the quantized kernel included, and the experts are added to its output;
* merge: refused for a quantized base (`refuse_quantized_merge`), before anything changes; `dequantize_base(model)`
  swaps the quantized base layers of moe-peft layers for dense `nn.Linear` copies first, after which merging is exact.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# the weight classes of bitsandbytes' quantized linears (compared by name: bitsandbytes is optional)
_PACKED_WEIGHTS = {"Params4bit": "4-bit", "Int8Params": "8-bit"}


def is_quantized(module: nn.Module) -> bool:
    """Whether the module's `weight` is packed (bitsandbytes Params4bit / Int8Params, or any non-floating dtype) and
    therefore not the dense [out, in] matrix."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    return type(weight).__name__ in _PACKED_WEIGHTS or not weight.dtype.is_floating_point


def dense_linear(base: nn.Module, args: tuple = (), kwargs: Optional[dict] = None) -> bool:
    """Whether a layer may compute `F.linear(x, base.weight, base.bias)` itself instead of calling `base(x)`: only a
    plain `nn.Linear` (its exact type: a subclass such as bitsandbytes' Linear4bit has its own forward and may hold
    packed weights) with a dense floating-point weight, called with x alone and without hooks."""
    return (
        type(base) is nn.Linear
        and base.weight.dtype.is_floating_point
        and not (args or kwargs or base._forward_hooks or base._forward_pre_hooks)
    )


def _describe(module: nn.Module) -> str:
    bits = _PACKED_WEIGHTS.get(type(getattr(module, "weight", None)).__name__)
    what = f"bitsandbytes {type(module).__name__} ({bits})" if bits else f"{type(module).__name__} (packed weight)"
    return what


def refuse_quantized_merge(base: nn.Module, adapter: str, where: str) -> None:
    """Raise a ValueError naming the module when `base` is quantized: a delta cannot be added to packed weights."""
    if is_quantized(base):
        raise ValueError(
            f"Cannot merge adapter '{adapter}' into {where}: its base layer is a {_describe(base)}, whose weight is "
            "packed, not a dense matrix the adapter's delta can be added to. Keep the adapter unmerged (it runs on the "
            "quantized base as it is), or dequantize first: moe_peft.dequantize_base(model) replaces the "
            "quantized base layers by dense nn.Linear copies, after which merge_and_unload() is exact."
        )


def _restore_bnb_layout(module: nn.Module) -> None:
    """bitsandbytes >= 0.49 repacks a Linear4bit's weight for its CPU kernel on the first inference forward
    (`packing_format_for_cpu`); its dequantization expects the original layout. Convert back as bitsandbytes' own
    state-dict save does."""
    state = getattr(module.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The dense [out, in] weight a linear computes with: bitsandbytes 4-bit codes times their block scales, 8-bit
    rows times their row scales (`peft.utils.integrations.dequantize_bnb_weight`), or the weight itself."""
    if not is_quantized(module):
        return module.weight
    if type(module.weight).__name__ not in _PACKED_WEIGHTS:
        raise ValueError(f"{_describe(module)}: moe_peft dequantizes bitsandbytes weights only.")
    from peft.utils.integrations import dequantize_bnb_weight

    _restore_bnb_layout(module)
    weight = dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))
    return weight.reshape(module.out_features, module.in_features)  # 4-bit: [out*in] codes -> [out, in]


def _dense_dtype(module: nn.Module, model: nn.Module) -> torch.dtype:
    """The dtype of a dense copy: the dtype the weight was quantized from (a 4-bit quantization state records it),
    else the model's load dtype (`config.dtype`), else float32. Not the compute dtype: the rest of the model (and so
    the layer's input) keeps the load dtype, and a bitsandbytes layer casts its input to the compute dtype and its
    output back, which a plain nn.Linear does not."""
    state = getattr(module.weight, "quant_state", None)
    if isinstance(getattr(state, "dtype", None), torch.dtype):
        return state.dtype
    for holder in (
        model,
        getattr(model, "base_model", None),
        getattr(getattr(model, "base_model", None), "model", None),
    ):
        dtype = getattr(getattr(holder, "config", None), "dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return torch.float32


@torch.no_grad()
def dequantize_base(model: nn.Module, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Replace the quantized base layer of every moe-peft tuner layer in `model` by a dense, frozen `nn.Linear`
    holding its dequantized weight (in `dtype`, default the dtype it was quantized from), so that `merge_and_unload()`
    can fold the adapters in exactly. Returns the names of the layers changed. The model then takes the memory of a
    dense one at those layers; its outputs change only by the quantized kernel's rounding (4-bit: none in
    training mode; 8-bit: bitsandbytes also quantizes the input rows, the dense copy does not)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    changed = []
    for name, layer in model.named_modules():
        if not isinstance(layer, BaseTunerLayer) or not type(layer).__module__.startswith("moe_peft"):
            continue
        holder = layer
        while isinstance(getattr(holder.base_layer, "base_layer", None), nn.Module):
            holder = holder.base_layer  # the innermost wrapper holds the real base
        base = holder.base_layer
        if not is_quantized(base):
            continue
        weight = dequantized_weight(base)
        dense = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=weight.device,
            dtype=dtype or _dense_dtype(base, model),
        )
        dense.weight.copy_(weight.to(dense.weight.dtype))
        if base.bias is not None:
            dense.bias.copy_(base.bias.to(dense.bias.dtype))
        dense.requires_grad_(False)
        holder.base_layer = dense
        changed.append(name)
    return changed
