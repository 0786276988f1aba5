"""The tuner layer for fused experts: a frozen transformers experts module plus, per adapter and per targeted
3-D parameter, one rank-r LoRA per base expert, applied where the base router sends the tokens.

For each (token t, slot j) pair the model routes to expert e = top_k_index[t, j] with weight w = top_k_weights[t, j]:

    h   = W_up[e] x_t + s B_up[e] A_up[e] drop(x_t)                        [2*ff]  (gate_up_proj or up_proj)
    a   = gate(h)                                                           [ff]    (the module's own _apply_gate)
    y_t = sum_j w * (W_down[e] a + s B_down[e] A_down[e] drop(a))            [d]

which is PEFT's `target_parameters` LoRA (W_e + s B_e A_e on every expert) computed without ever forming
W_e + s B_e A_e: the pairs are sorted by expert once, the base GEMMs run grouped (grouped.py), and each LoRA term
is one call of `moe_peft.ops.apply_lora_experts` on the sorted pairs (x = the pair's token for the up projection,
the pair's intermediate activation for the down projection; idx = its expert, weight 1), added in place into the
base GEMM's output. The router's weights then multiply base and LoRA together, as in the base model.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ....ops import apply_lora_experts
from ..layer import MoELoraLinear
from .grouped import SortedPairs, grouped_linear, sort_pairs
from .layout import ExpertsLayout, unsupported


class MoELoraExperts(nn.Module, BaseTunerLayer):
    prefix = "moe_"
    # A [adapter][param] is [E, r, in] and B [adapter][param] is [E, out, r]: keys `<experts>.mole_A.gate_up_proj`
    adapter_layer_names = ("moe_A", "moe_B")
    other_param_names = ("moe_dropout", "moe_config", "moe_scaling")  # the linear layer's order: its views fit

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, param_names: list[str], layout: ExpertsLayout):
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        name_a, name_b = self.adapter_layer_names
        setattr(self, name_a, nn.ModuleDict())
        setattr(self, name_b, nn.ModuleDict())
        setattr(self, self.other_param_names[0], nn.ModuleDict())
        setattr(self, self.other_param_names[1], {})
        setattr(self, self.other_param_names[2], {})
        self.merged_adapters = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        # where the base forward takes top_k_index and top_k_weights when they come as keywords
        names = list(inspect.signature(base_layer.forward).parameters)
        self._routing_names = tuple(names[1:3])
        self.update_layer(adapter_name, config, param_names)

    # named views of the prefixed attributes, shared with the linear layer (same attribute order); here A and B
    # hold one ParameterDict per adapter, keyed by the expert parameter
    experts_A, experts_B = MoELoraLinear.experts_A, MoELoraLinear.experts_B
    dropouts, configs, scalings = MoELoraLinear.dropouts, MoELoraLinear.configs, MoELoraLinear.scalings

    def __getattr__(self, name: str) -> Any:
        # the MoE block or transformers may read expert attributes (num_experts, act_fn, ...): forward them
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # -- adapter management --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config, param_names: list[str], inference_mode: bool = False) -> None:
        base, layout = self.base_layer, self.layout
        bank_a, bank_b = nn.ParameterDict(), nn.ParameterDict()
        for name in param_names:
            if name not in layout.param_names:
                raise unsupported(
                    f"parameter {name!r} of this module", base, f"is not one of its expert weights {layout.param_names}"
                )
            d_in, d_out = layout.in_out(getattr(base, name))
            bank_a[name] = nn.Parameter(torch.empty(layout.num_experts, config.r, d_in))  # [E, r, in]
            bank_b[name] = nn.Parameter(torch.empty(layout.num_experts, d_out, config.r))  # [E, out, r]
        self.experts_A[adapter_name], self.experts_B[adapter_name] = bank_a, bank_b
        # PEFT's LoRA scaling on every expert, whatever the method: the routing here is the base model's
        self.scalings[adapter_name] = config.lora_alpha / config.r
        self.configs[adapter_name] = config
        self.dropouts[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.reset_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_lora_weights: bool = True) -> None:
        for name, a in self.experts_A[adapter_name].items():
            num_experts, rank, d_in = a.shape
            # Kaiming-uniform with fan_in = in, as PEFT's lora_A (its [r*E, in] Linear draws from the same bound)
            nn.init.kaiming_uniform_(a.view(num_experts * rank, d_in), a=math.sqrt(5))
            b = self.experts_B[adapter_name][name]
            if init_lora_weights:
                nn.init.zeros_(b)  # a new adapter is a no-op
            else:
                nn.init.normal_(b, std=0.02)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        weight = getattr(self.base_layer, self.layout.up_name)
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        for bank in (self.experts_A, self.experts_B):
            if adapter_name in bank and not any(p.is_meta for p in bank[adapter_name].parameters()):
                bank[adapter_name] = bank[adapter_name].to(device or weight.device, dtype=dtype)

    # -- forward -------------------------------------------------------------------------------------
    def _routing_args(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        values = list(args) + [kwargs[n] for n in self._routing_names if n in kwargs]
        if len(values) != 2 or len(kwargs) != sum(n in kwargs for n in self._routing_names) or hidden_states.dim() != 2:
            raise TypeError(
                f"{type(self).__name__} around {type(self.base_layer).__name__} applies LoRA to a call "
                f"(hidden_states [T, d], {', '.join(self._routing_names)}), but got hidden_states of shape "
                f"{tuple(hidden_states.shape)}, {len(args)} more positional and keywords {sorted(kwargs)}; this "
                "model calls its experts differently: remove them from target_parameters."
            )
        return values[0], values[1]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapters = [a for a in self.active_adapters if a in self.experts_A]
        if self.disable_adapters or self.merged or not adapters or hidden_states.numel() == 0:
            return self.base_layer(hidden_states, *args, **kwargs)
        top_k_index, top_k_weights = self._routing_args(hidden_states, args, kwargs)
        base, layout = self.base_layer, self.layout
        num_tokens, k = top_k_index.shape
        pairs = sort_pairs(top_k_index, layout.num_experts, like=getattr(base, layout.up_name))
        x = hidden_states.index_select(0, pairs.token)  # [T, d] -> [P, d], P = T*k, grouped by expert
        h = self._project(layout.up_name, x, pairs, adapters)  # [P, 2*ff] (or [P, ff] without a gate)
        act = base._apply_gate(h) if layout.has_gate else base.act_fn(h)  # [P, ff]
        y = self._project("down_proj", act, pairs, adapters)  # [P, d]
        if layout.post_norm:
            y = base.post_expert_norm(y)
        w = top_k_weights.reshape(-1).index_select(0, pairs.order)  # [T, k] -> [P], in pair order
        y = y * w.unsqueeze(1).to(y.dtype)  # [P, d]
        # back to (token, slot) order and summed over the slots: a permutation and a reshape, no atomics
        inverse = torch.empty_like(pairs.order)
        inverse[pairs.order] = torch.arange(pairs.order.numel(), device=inverse.device)  # [P]
        out = y.index_select(0, inverse).view(num_tokens, k, -1).sum(1)  # [P, d] -> [T, k, d] -> [T, d]
        return out.to(hidden_states.dtype)

    def _project(self, name: str, x: torch.Tensor, pairs: SortedPairs, adapters: list[str]) -> torch.Tensor:
        """One expert weight on the sorted pairs: base GEMM, bias, and each active adapter's LoRA added in place."""
        base = self.base_layer
        y = grouped_linear(x, getattr(base, name), pairs, self.layout.transposed)  # [P, in] -> [P, out]
        if self.layout.has_bias:
            y.add_(getattr(base, f"{name}_bias").index_select(0, pairs.expert.squeeze(1)))  # [E, out] -> [P, out]
        ones = None
        for adapter in adapters:
            if name not in self.experts_A[adapter]:
                continue
            if ones is None:
                ones = torch.ones(x.shape[0], 1, device=x.device, dtype=torch.float32)  # [P, 1]: weights act later
            y = apply_lora_experts(
                self.dropouts[adapter](x), self.experts_A[adapter][name], self.experts_B[adapter][name],
                pairs.expert, ones, self.scalings[adapter], self.configs[adapter].kernel_backend, out=y,
            )  # fmt: skip
        return y

    # -- merging: each expert's LoRA into its own expert, exact because the routing is the base model's --
    def get_delta_weight(self, adapter: str, name: str) -> torch.Tensor:
        a, b = self.experts_A[adapter][name], self.experts_B[adapter][name]
        delta = torch.bmm(b, a) * self.scalings[adapter]  # [E, out, r] @ [E, r, in] -> [E, out, in]
        return delta.transpose(1, 2) if self.layout.transposed else delta  # stored [E, in, out] when transposed

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.experts_A:
                continue
            for name in self.experts_A[adapter]:
                weight = getattr(self.base_layer, name)
                merged = weight.data + self.get_delta_weight(adapter, name).to(weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            for name in self.experts_A[adapter]:
                weight = getattr(self.base_layer, name)
                weight.data -= self.get_delta_weight(adapter, name).to(weight.dtype)

    def __repr__(self) -> str:
        return f"{self.prefix.rstrip('_')}." + super().__repr__()


def _method_layer(class_name: str, prefix: str) -> type[MoELoraExperts]:
    names = dict(
        prefix=prefix,
        adapter_layer_names=(f"{prefix}A", f"{prefix}B"),
        other_param_names=(f"{prefix}dropout", f"{prefix}config", f"{prefix}scaling"),
        __module__=__name__,
    )
    return type(class_name, (MoELoraExperts,), names)


# one class per method, because PEFT finds a method's weights by attribute names that contain its prefix
MoLEExperts = _method_layer("MoLEExperts", "mole_")
LoRAMoEExperts = _method_layer("LoRAMoEExperts", "loramoe_")
SMoRAExperts = _method_layer("SMoRAExperts", "smora_")
EXPERTS_LAYERS = {cls.prefix: cls for cls in (MoELoraExperts, MoLEExperts, LoRAMoEExperts, SMoRAExperts)}
