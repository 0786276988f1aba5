from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import nn


class Routing(NamedTuple):
    """What a router decided for T tokens.

    A NamedTuple, not a dataclass, because engines that hook module outputs (DeepSpeed ZeRO-3 gathers a module's
    partitioned weights again for its backward from hooks on the tensors it returns) see through tuples only.

    idx:     [T, k] long, expert per slot, -1 for an empty slot (null expert, top-p cut-off)
    weights: [T, k] float32, the weight of each slot's expert output (gradient reaches the router)
    logits:  [T, E'] float32 router logits over all E' choices (real + null experts); for the losses
    probs:   [T, E'] float32 softmax (or sigmoid for SMoRA) of the logits
    choice:  [T, k] long, the raw pick over E' choices before null experts were mapped to -1
    groups:  [T] long, each token's modality group (MoMa expert groups), None without groups
    sequences: with routing_level="sequence", the per-sequence decisions every token here carries
             (routing/sequence.py, SequenceRouting); None for token-level routing
    """

    idx: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    choice: Optional[torch.Tensor] = None
    groups: Optional[torch.Tensor] = None
    sequences: Optional[Any] = None  # SequenceRouting (routing/sequence.py imports this module)


class Float32Buffers(nn.Module):
    """A module whose routing buffers (selection biases, running statistics) stay float32 whatever the model's
    dtype: `.to(dtype)`, `.half()`, `.bfloat16()`, PEFT's cast of a new adapter to the base layer's dtype, and
    `load_state_dict` (also with `assign=True`) move them to the new device but never change their dtype.

    A bf16 buffer cannot take small updates: 0.004 + 1e-5 rounds back to 0.004 in bf16, so a SMoRA bias
    stopped moving at about 0.004 instead of reaching 0.02 after 2000 updates of 1e-5.
    """

    float32_buffers: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.register_load_state_dict_post_hook(_buffers_to_float32)

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in self.float32_buffers if self._buffers.get(name) is not None}
        for name in kept:
            self._buffers[name] = None  # nn.Module._apply skips None buffers
        try:
            result = super()._apply(fn, recurse)
        finally:
            for name, buf in kept.items():
                moved = fn(buf)  # the conversion tells the target device (and share_memory_ and the like)
                self._buffers[name] = moved if moved.dtype == torch.float32 else buf.to(moved.device)
        return result


def _buffers_to_float32(module: Float32Buffers, incompatible_keys) -> None:
    for name in module.float32_buffers:
        buf = module._buffers.get(name)
        if buf is not None and buf.dtype != torch.float32:
            module._buffers[name] = buf.float()


def float32_linear(linear: nn.Linear, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
    """Router math in float32 whatever the model dtype or autocast state.

    frozen: read the weights detached, so the router routes as it is but its parameters get no gradient (a router
    frozen at its initialization, router_lr_ratio=0): no optimizer, weight decay or router loss then moves it, while
    the gradient to x still flows. Detached here, at the moment of use, rather than before the router's call, so that
    engines which gather a partitioned weight in the router's forward pre-hook (DeepSpeed ZeRO-3) are read after it.
    """
    weight, bias = linear.weight, linear.bias
    if frozen:
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    with torch.autocast(device_type=x.device.type, enabled=False):
        return nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())


def new_router_linear(in_features: int, out_features: int, bias: bool, std: float = 0.02) -> nn.Linear:
    # small normal init (MixLoRA uses N(0, 0.02^2)): near-uniform routing at the start; std is the config's
    # router_init_std (0: a zero router, uniform until it learns)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, std=std)
    if bias:
        nn.init.zeros_(linear.bias)
    return linear
