"""The tuner layer: a frozen base `nn.Linear`, a stacked bank of LoRA experts, and (unless the router
belongs to the parent block) a router.

    y = W x + scaling * sum_j w[t, j] * B_{idx[t, j]} A_{idx[t, j]} dropout(x)      (one call to the op)

Experts are stored stacked per layer, A `[E, r, in]` and B `[E, out, r]`, never one module per expert.
Each method gets a subclass that only renames the adapter attributes after its PEFT prefix
(`mole_A`, `loramoe_router`, ...), because PEFT finds adapter weights by attribute name.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..._internal.quantized import dense_linear, refuse_quantized_merge
from ...ops import apply_lora_experts, linear_lora_experts
from ...routing import Routing
from ...routing.context import RoutingContext, attach_router_loss, mixed_batch_hook
from .config import MoELoraConfig, SMoRAConfig
from .merge_hint import merge_hint
from .methods import (
    RouterRecord,
    build_router,
    expert_bank_shape,
    is_mergeable,
    plain_routing,
    route,
    router_frozen,
    router_loss_and_stats,
)


class MoELoraLinear(nn.Module, BaseTunerLayer):
    prefix = "moe_"
    adapter_layer_names = ("moe_A", "moe_B", "moe_router")
    other_param_names = ("moe_dropout", "moe_config", "scaling")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: MoELoraConfig,
        routing_ctx: RoutingContext,
        plain: bool = False,
        router_features: Optional[int] = None,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):  # bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear subclasses
            raise TypeError(
                f"{type(self).__name__} wraps nn.Linear only, got {type(base_layer).__name__}; remove this module "
                "from target_modules (name fused 3-D expert parameters in target_parameters)."
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        name_a, name_b, name_router = self.adapter_layer_names
        setattr(self, name_a, nn.ParameterDict())
        setattr(self, name_b, nn.ParameterDict())
        setattr(self, name_router, nn.ModuleDict())
        setattr(self, self.other_param_names[0], nn.ModuleDict())
        setattr(self, self.other_param_names[1], {})
        setattr(self, self.other_param_names[2], {})
        self.merged_adapters = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self._routing_ctx = routing_ctx
        # router_granularity="block": the layer of this block that owns each adapter's router
        self._router_owner: dict[str, MoELoraLinear] = {}
        self._block_routing: dict[str, Routing] = {}  # set by the parent block's pre-hook
        self.router_records: dict[str, RouterRecord] = {}
        # adapters that hold one plain LoRA here (MoLEConfig.plain_lora_modules): one expert, no router, weight 1
        self.plain_adapters: set[str] = set()
        self.module_name = type(self).__name__  # the tuner sets the module's path in the model
        self.update_layer(adapter_name, config, plain=plain, router_features=router_features)

    # -- named views of the prefixed attributes ------------------------------------------------------
    @property
    def experts_A(self) -> nn.ParameterDict:
        return getattr(self, self.adapter_layer_names[0])

    @property
    def experts_B(self) -> nn.ParameterDict:
        return getattr(self, self.adapter_layer_names[1])

    @property
    def routers(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_layer_names[2])

    @property
    def dropouts(self) -> nn.ModuleDict:
        return getattr(self, self.other_param_names[0])

    @property
    def scalings(self) -> dict[str, float]:
        return getattr(self, self.other_param_names[2])

    @property
    def configs(self) -> dict[str, MoELoraConfig]:
        return getattr(self, self.other_param_names[1])

    # -- adapter management --------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        config: MoELoraConfig,
        inference_mode: bool = False,
        plain: bool = False,
        router_features: Optional[int] = None,
    ) -> None:
        """router_features: what the router reads when not this layer's input: the model's hidden size for
        router_input_layer (a later decoder layer's output; the tuner passes it)."""
        num_experts, rank = expert_bank_shape(config, plain)
        if plain:
            self.plain_adapters.add(adapter_name)
        else:
            self.plain_adapters.discard(adapter_name)
        self.configs[adapter_name] = config
        self.scalings[adapter_name] = config.scaling
        self.dropouts[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.experts_A[adapter_name] = nn.Parameter(torch.empty(num_experts, rank, self.in_features))  # [E, r, in]
        self.experts_B[adapter_name] = nn.Parameter(torch.empty(num_experts, self.out_features, rank))  # [E, out, r]
        if config.router_granularity == "linear" and not plain:
            self.routers[adapter_name] = build_router(config, router_features or self.in_features)
        self.reset_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._declare_frozen_router(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def add_block_router(self, adapter_name: str, config: MoELoraConfig, router_features: Optional[int] = None) -> None:
        """Make this layer the router owner of its block (router_granularity="block")."""
        if adapter_name not in self.routers:
            self.routers[adapter_name] = build_router(config, router_features or self.in_features)
            self._move_adapter_to_device_of_base_layer(adapter_name)
            self.set_adapter(self.active_adapters)  # re-applies update_layer's frozen-router declaration

    def _declare_frozen_router(self, adapter_name: str) -> None:
        """router_lr_ratio=0: the adapter's router keeps requires_grad=False. PEFT re-applies
        `frozen_peft_weight_names` on every path that marks an adapter trainable (set_adapter, set_requires_grad,
        _mark_only_adapters_as_trainable, a reload with is_trainable=True), so PEFT's trainable count leaves the router
        out, and DDP / FSDP / DeepSpeed do not wait for a gradient it never gets (its weights are also read detached
        in the forward: methods.router_frozen)."""
        frozen = dict(self.frozen_peft_weight_names)  # a copy: the class attribute's default dict is shared
        if router_frozen(self.configs[adapter_name]):
            frozen[adapter_name] = (self.adapter_layer_names[2],)  # moe_router
        else:
            frozen.pop(adapter_name, None)
        self.frozen_peft_weight_names = frozen

    def _owns_block_router(self, adapter: str) -> bool:
        # a block router exists only on the block's owner layer
        return adapter in self.routers and self.configs[adapter].router_granularity == "block"

    def owns_block_router(self) -> bool:
        return any(self._owns_block_router(a) for a in self.routers.keys())

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_lora_weights: bool = True) -> None:
        a, b = self.experts_A[adapter_name], self.experts_B[adapter_name]
        num_experts, rank, _ = a.shape
        # Kaiming-uniform per expert, as PEFT's LoRA A (bound depends on fan_in = in only)
        nn.init.kaiming_uniform_(a.view(num_experts * rank, self.in_features), a=math.sqrt(5))
        if init_lora_weights:
            nn.init.zeros_(b)  # a new adapter is a no-op
        else:
            nn.init.normal_(b, std=0.02)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for d in (self._router_owner, self._block_routing, self.router_records):
            d.pop(adapter_name, None)
        self.plain_adapters.discard(adapter_name)

    # -- forward -------------------------------------------------------------------------------------
    def route_block(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Called by the parent block's pre-hook: route the block input once for every adapter whose router
        this layer owns, keep the decision for the block's layers, and return the loss to attach."""
        if self.disable_adapters or self.merged:
            return None
        if self._routing_ctx.adapter_selection is not None:  # a mixed batch (adapter_names): moe_peft.multi_lora
            return mixed_batch_hook().route_block(self, hidden, self._routing_ctx.adapter_selection)
        lead_shape, x = hidden.shape[:-1], hidden.reshape(-1, hidden.shape[-1])  # [..., in] -> [T, in]
        total = None
        for adapter in self.active_adapters:
            if not self._owns_block_router(adapter):
                continue
            reads_block = getattr(self.configs[adapter], "router_input_layer", None) is None
            if reads_block and x.shape[-1] != self.in_features:
                raise ValueError(
                    f"router_granularity='block': the block input has {x.shape[-1]} features but the router of "
                    f"adapter '{adapter}' reads {self.in_features} (it sits on the block's first adapted linear); "
                    "put a linear that reads the block input first in target_modules, or use "
                    "router_granularity='linear'."
                )
            routing = route(self.configs[adapter], self.routers[adapter], x, lead_shape, self._routing_ctx)
            self._block_routing[adapter] = routing
            loss = self._record(adapter, routing, lead_shape)
            if loss is not None:
                total = loss if total is None else total + loss
        return total

    def _record(self, adapter: str, routing: Routing, lead_shape: torch.Size) -> Optional[torch.Tensor]:
        """Record this layer's routing; return the loss to attach to the forward path, or None."""
        num_experts = self.experts_A[adapter].shape[0]
        loss, record = router_loss_and_stats(
            self.configs[adapter], routing, lead_shape, self._routing_ctx, num_experts, self.training, self.module_name
        )
        if record is None:  # a later generation step reusing its prompt's sequence decisions: keep that record
            return None
        if loss is not None and loss.requires_grad and self._routing_ctx.in_forward:
            record.graph_loss, loss = loss, None  # the tuner reports it with its graph: nothing to attach
        self.router_records[adapter] = record
        return loss

    def _routing(self, adapter: str, x: torch.Tensor, lead_shape: torch.Size) -> tuple[Routing, Optional[torch.Tensor]]:
        if adapter in self.plain_adapters:
            return plain_routing(x.shape[0], x.device), None
        if self.configs[adapter].router_granularity == "linear":
            routing = route(self.configs[adapter], self.routers[adapter], x, lead_shape, self._routing_ctx)
            return routing, self._record(adapter, routing, lead_shape)
        owner = self._router_owner.get(adapter)
        routing = owner._block_routing.get(adapter) if owner is not None else None
        if routing is None or routing.idx.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"Adapter '{adapter}' routes per block, but no routing for these {x.shape[0]} tokens was computed by "
                "the parent block; call the model through the PeftModel (not the bare linear), or use "
                "router_granularity='linear'."
            )
        return routing, None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._routing_ctx.adapter_selection is not None:  # a mixed batch (adapter_names): moe_peft.multi_lora
            return mixed_batch_hook().forward(self, x, self._routing_ctx.adapter_selection, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in self.experts_A]
        if self.disable_adapters or self.merged or not adapters or x.numel() == 0:
            return self.base_layer(x, *args, **kwargs)
        lead_shape = x.shape[:-1]
        x_flat = x.reshape(-1, self.in_features)  # [..., in] -> [T, in]
        routed = [(adapter, *self._routing(adapter, x_flat, lead_shape)) for adapter in adapters]
        base = self.base_layer
        # the base linear is computed here only when it is a plain dense nn.Linear: a quantized one (bitsandbytes'
        # Linear4bit / Linear8bitLt subclass nn.Linear but hold packed weights) runs its own forward (qlora/base.py)
        owns_base = dense_linear(base, args, kwargs)
        if owns_base and len(routed) == 1 and not self._dropout_active(adapters[0]):
            # one op for base + experts: the delta goes into the base output and, in backward, the experts'
            # dx into the base layer's dx buffer (docs/kernel.md, "Fusing with the base layer")
            adapter, routing, _ = routed[0]
            result = linear_lora_experts(
                x_flat, base.weight, base.bias, self.experts_A[adapter], self.experts_B[adapter],
                routing.idx, routing.weights, self.scalings[adapter], self.configs[adapter].kernel_backend,
            )  # fmt: skip
        else:
            # the base output is ours when base is a plain nn.Linear: add each adapter into it in place
            if owns_base:
                result = F.linear(x_flat, base.weight, base.bias)  # [T, out], not a view: in-place adds are cheap
            else:
                result = base(x, *args, **kwargs).reshape(-1, self.out_features)  # [..., out] -> [T, out]
            for adapter, routing, _ in routed:
                delta_or_result = apply_lora_experts(
                    self.dropouts[adapter](x_flat), self.experts_A[adapter], self.experts_B[adapter],
                    routing.idx, routing.weights, self.scalings[adapter], self.configs[adapter].kernel_backend,
                    out=result if owns_base else None,
                )  # fmt: skip
                result = delta_or_result if owns_base else result + delta_or_result.to(result.dtype)
        result = result.view(*lead_shape, self.out_features)  # [T, out] -> [..., out]
        for _, _, loss in routed:
            result = attach_router_loss(result, loss, self._routing_ctx)
        return result

    def _dropout_active(self, adapter: str) -> bool:
        dropout = self.dropouts[adapter]
        return isinstance(dropout, nn.Dropout) and dropout.p > 0 and self.training

    # -- merging -------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        config = self.configs[adapter]
        if not is_mergeable(config) and adapter not in self.plain_adapters:  # a plain LoRA merges exactly
            if isinstance(config, SMoRAConfig):
                what = (
                    f"is a SMoRA adapter: every token activates its own top_k={config.top_k} of the r={config.r} "
                    "ranks of its LoRA"
                )
                only = "A plain PEFT LoRA (LoraConfig) merges"
            else:
                what = f"routes every token to its own experts (num_experts={config.num_experts})"
                only = "Only a single-expert adapter (num_experts=1, no null experts) merges exactly"
            raise ValueError(
                f"Adapter '{adapter}' {what}, so it is not one fixed weight and cannot be merged into the base "
                f"layer; nothing was changed. {merge_hint(config)} {only}."
            )
        a, b = self.experts_A[adapter], self.experts_B[adapter]
        return (b[0] @ a[0]) * self.scalings[adapter]  # [out, r] @ [r, in] -> [out, in]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for adapter in adapter_names:
            if adapter not in self.experts_A:
                continue
            base = self.get_base_layer()
            refuse_quantized_merge(base, adapter, f"a {type(self).__name__}")
            delta = self.get_delta_weight(adapter).to(base.weight.dtype)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            base = self.get_base_layer()
            base.weight.data -= self.get_delta_weight(adapter).to(base.weight.dtype)

    def __repr__(self) -> str:
        return f"{self.prefix.rstrip('_')}." + super().__repr__()


def _method_layer(class_name: str, prefix: str) -> type[MoELoraLinear]:
    names = dict(
        prefix=prefix,
        adapter_layer_names=(f"{prefix}A", f"{prefix}B", f"{prefix}router"),
        other_param_names=(f"{prefix}dropout", f"{prefix}config", f"{prefix}scaling"),
        __module__=__name__,
    )
    return type(class_name, (MoELoraLinear,), names)


MoLELinear = _method_layer("MoLELinear", "mole_")
LoRAMoELinear = _method_layer("LoRAMoELinear", "loramoe_")
SMoRALinear = _method_layer("SMoRALinear", "smora_")
