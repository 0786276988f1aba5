"""The RoMA tuner layer: wraps one router module of a pretrained MoE model and holds a trainable copy
of its weight `[E, hidden]` per adapter (`roma_router`, the only thing PEFT saves).

The router's own forward runs with the copy swapped in (`torch.func.functional_call`), so top-k,
renormalization, dtype handling and any bias buffer (DeepSeek-V3's `e_score_correction_bias`, frozen)
stay exactly those of the model. A fresh adapter is therefore bit-identical to the base model, and
merging is a replacement of the base weight: exact, and unmergeable back to the original.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.func import functional_call

from .capture import RoutingCapture


class RoMARouterLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("roma_router",)
    other_param_names = ("roma_position",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, position: int, capture: RoutingCapture):
        super().__init__()
        self.base_layer = base_layer
        self.roma_router = nn.ParameterDict()
        self.roma_position: dict[str, int] = {}  # adapter -> index of this layer among the adapter's tuned layers
        self.merged_adapters = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self._capture = capture
        self._original_weight: Optional[torch.Tensor] = None  # the base weight while an adapter is merged
        self.update_layer(adapter_name, position)

    def update_layer(self, adapter_name: str, position: int, inference_mode: bool = False) -> None:
        weight = self.base_layer.weight  # [E, hidden]
        # float32 master copy whatever the model dtype (bf16/fp16 -> fp32 is lossless, so a fresh adapter is a no-op)
        self.roma_router[adapter_name] = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.roma_position[adapter_name] = position
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def __getattr__(self, name: str) -> Any:
        # the MoE block may read router attributes (top_k, num_experts, ...): forward them to the router
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def _routing_adapter(self) -> Optional[str]:
        """The adapter whose weight routes this forward, or None for the base router."""
        if self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.roma_router]
        if len(active) > 1:
            raise ValueError(
                f"RoMA adapters {active} are active together, but each replaces the router weight; "
                "activate one of them with set_adapter()."
            )
        return active[0] if active else None

    def _recording_position(self, adapter: Optional[str]) -> Optional[int]:
        # with the adapter disabled or merged, the base routing is recorded at the active adapter's position
        if adapter is None:
            adapter = next((a for a in self.active_adapters if a in self.roma_position), None)
        return None if adapter is None else self.roma_position[adapter]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        adapter = self._routing_adapter()
        if adapter is None:
            out = self.base_layer(hidden_states, *args, **kwargs)
        else:
            master = self.roma_router[adapter]  # [E, hidden] float32
            weight = master.to(self.base_layer.weight.dtype)
            if "weight" in vars(self.base_layer):
                # FSDP1 (use_orig_params) runs the forward with its unsharded view as a plain attribute, which shadows
                # the registered Parameter that functional_call would swap: the router would silently route with
                # the frozen base weight and the copy would get no gradient. Swap the attribute itself.
                shadow = vars(self.base_layer)["weight"]
                vars(self.base_layer)["weight"] = weight
                try:
                    out = self.base_layer(hidden_states, *args, **kwargs)
                finally:
                    vars(self.base_layer)["weight"] = shadow
            else:
                out = functional_call(self.base_layer, {"weight": weight}, (hidden_states, *args), kwargs)
        position = self._recording_position(adapter)
        return out if position is None else self._capture.record(position, out)

    # -- merging: an exact replacement of the router weight ------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.roma_router]
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged:
            raise ValueError(
                f"Cannot merge RoMA adapters {self.merged_adapters + adapter_names} together: each replaces the "
                "router weight. Merge one adapter (merge_and_unload(adapter_names=[name]))."
            )
        adapter = adapter_names[0]
        base = self.base_layer.weight
        merged = self.roma_router[adapter].detach().to(base.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        self._original_weight = base.detach().clone()
        with torch.no_grad():
            base.copy_(merged)
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged_adapters = []

    def __repr__(self) -> str:
        return "roma." + super().__repr__()
