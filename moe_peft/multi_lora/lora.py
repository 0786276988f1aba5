"""PEFT LoRA layers in a mixed batch: base + every sample's adapter as one call of the op.

    y[b] = W x[b] + bias + scaling_{a_b} * B_{a_b} A_{a_b} dropout_{a_b}(x[b])        (a_b = "__base__": W x + bias)

the same function as PEFT's `lora.Linear._mixed_batch_forward`, which loops over the adapters in Python,
gathers each adapter's rows of x and scatters its rows of y back, and refuses to run in training mode.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .._internal.quantized import dense_linear
from ..ops import apply_lora_per_sample, linear_lora_per_sample
from .bank import layer_bank
from .selection import AdapterSelection, dropout_p, per_sample_dropout


class MixedBatchForward:
    """Instance-level `forward` of a PEFT LoRA module (or a `modules_to_save` wrapper) while multi-LoRA is on.

    Without a selection it is PEFT's own forward. With one, a plain `lora.Linear` runs the op; every other
    module (embedding, conv, DoRA or other variants, LoRA bias, quantized linears, modules_to_save) runs PEFT's
    own mixed-batch forward with the names, in training too. A callable object, not a closure, so that
    copy.deepcopy of the model rebinds it to the copy."""

    def __init__(self, module: nn.Module, state):
        self.module, self.state = module, state

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        module, selection = self.module, self.state.current
        if selection is None or "adapter_names" in kwargs:
            return type(module).forward(module, x, *args, **kwargs)
        batch = x.shape[0]
        if torch.is_grad_enabled():
            plan = _plan(module, selection, batch, x.device, grad=True)
        else:  # inference: once per forward / generate call, then a dict lookup per decoding step
            key = (id(module), batch, x.device, module.training)
            plan = selection.memo(key, lambda: _plan(module, selection, batch, x.device, grad=False))
        if plan is None:
            names = selection.names_for(batch, type(module).__name__)
            return type(module).forward(module, x, *args, adapter_names=names, **kwargs)
        if plan == "base":
            return module.base_layer(x, *args, **kwargs)
        return _linear_forward(module, x, plan, self.state.backend, args, kwargs)


def _runs_on_the_op(module: nn.Module, selection: AdapterSelection) -> bool:
    if type(module) is not LoraLinear or module.disable_adapters or module.merged:
        return False  # PEFT's forward: base output, or its error for adapter_names on merged adapters
    for adapter in selection.adapters:
        if adapter not in module.lora_A:
            continue
        if adapter in module.lora_variant or module.lora_B[adapter].bias is not None:
            return False  # DoRA and other variants, lora_bias: PEFT's loop handles them
    return True


def _plan(module: LoraLinear, selection: AdapterSelection, batch: int, device: torch.device, grad: bool):
    """None: PEFT's own forward; "base": no adapter of the batch is in this layer; else (A, B, idx, scale, p)."""
    if not _runs_on_the_op(module, selection):
        return None
    in_batch = [a for a in selection.adapters if a in module.lora_A]
    if not in_batch:
        return "base"
    trains = grad and any(p.requires_grad for a in in_batch for p in (module.lora_A[a].weight, module.lora_B[a].weight))
    # training: the batch's adapters only, with autograd; inference: all of the layer's, built once (bank.py)
    names = in_batch if trains else list(module.lora_A.keys())
    lora_A, lora_B = layer_bank(
        module, names, lambda a: (module.lora_A[a].weight, module.lora_B[a].weight), trains, single=True
    )  # [N, r_max, in], [N, out, r_max]
    where = f"{type(module).__name__} ({module.in_features} -> {module.out_features})"
    stack = tuple(names)
    idx, scale = selection.local(stack, tuple(float(module.scaling[a]) for a in names), batch, device, where)
    p_drop = None
    if module.training:
        probs = tuple(dropout_p(module.lora_dropout[a]) for a in names)
        if any(probs):
            p_drop = selection.local(stack, probs, batch, device, where)[1]  # [B] each sample's lora_dropout
    return lora_A, lora_B, idx, scale, p_drop


def _linear_forward(module: LoraLinear, x: torch.Tensor, plan, backend: str, args, kwargs):
    lora_A, lora_B, idx, scale, p_drop = plan
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1])  # [B, ..., in] -> [B, S, in]
    base = module.base_layer
    owns_base = dense_linear(base, args, kwargs)  # a quantized base runs its own forward (moe_peft/qlora)
    if owns_base and p_drop is None:  # base + adapters as one op (the adapters' dx goes into the base dx)
        y = linear_lora_per_sample(x3, base.weight, base.bias, lora_A, lora_B, idx, scale, backend)
    else:
        result = base(x, *args, **kwargs)
        x_lora = per_sample_dropout(x3, p_drop)
        if owns_base:  # the base output is ours: add into it in place
            out = result.view(batch, -1, result.shape[-1])  # [B, ..., out] -> [B, S, out]
            y = apply_lora_per_sample(x_lora, lora_A, lora_B, idx, scale, backend, out=out)
        else:
            delta = apply_lora_per_sample(x_lora, lora_A, lora_B, idx, scale, backend)  # [B, S, out]
            y = result + delta.view(result.shape).to(result.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])  # [B, S, out] -> [B, ..., out]
