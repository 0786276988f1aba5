"""The PHATGOOSE tuner layer: a frozen base nn.Linear, the stacked LoRA experts of a library, and their gate vectors.

Routing (PHATGOOSE, Muqeeth et al., ICML 2024, fig. 2; mttl's PhatgooseSelector, r-three/phatgoose moe.py), per token and per module:

    x_n = LN(x), v_n = LN(v_e)        (layer norm over the features, no affine: gate norms differ widely
                                       between experts, so unnormalized the large ones would win everywhere)
    logit_e = x_n . v_n / sqrt(in)
    keep the top-k logits, w = softmax over the kept ones
    y = W x + sum_j w_j * s_{e_j} B_{e_j} A_{e_j} x      (s_e: expert e's own LoRA scaling)

The mix goes through the shared op `moe_peft.ops.apply_lora_experts` with s_e folded into the weights (experts
may come with different lora_alpha / r), so no Python loop runs over experts.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...ops import apply_lora_experts
from ...routing.tasks import TaskIds
from ..delta_merge import DeltaMergeMixin
from .config import PhatgooseConfig


class PhatgooseLinear(nn.Module, DeltaMergeMixin, BaseTunerLayer):
    prefix = "phatgoose_"
    adapter_layer_names = ("phatgoose_A", "phatgoose_B", "phatgoose_gate")
    other_param_names = ("phatgoose_scaling", "phatgoose_config")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: PhatgooseConfig, task_state: TaskIds, name: str
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"PHATGOOSE adapts nn.Linear modules only, but {name} is a {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.module_name = name
        self.phatgoose_A = nn.ParameterDict()  # adapter -> [E, r, in]
        self.phatgoose_B = nn.ParameterDict()  # adapter -> [E, out, r]
        self.phatgoose_gate = nn.ParameterDict()  # adapter -> [E, in], the gate vectors v_e (routing keys)
        self.phatgoose_scaling = BufferDict(persistent=True)  # adapter -> [E], each expert's lora_alpha / r
        self.phatgoose_config: dict[str, PhatgooseConfig] = {}
        self.merged_adapters = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self._task_state = task_state
        self.last_load: dict[str, torch.Tensor] = {}  # adapter -> [E], fraction of picks in the latest forward
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: PhatgooseConfig, inference_mode: bool = False) -> None:
        num_experts = config.num_experts
        self.phatgoose_config[adapter_name] = config
        # zeros until assemble() or PeftModel.from_pretrained fills them
        self.phatgoose_A[adapter_name] = nn.Parameter(torch.zeros(num_experts, config.r, self.in_features))
        self.phatgoose_B[adapter_name] = nn.Parameter(torch.zeros(num_experts, self.out_features, config.r))
        self.phatgoose_gate[adapter_name] = nn.Parameter(torch.zeros(num_experts, self.in_features))
        self.phatgoose_scaling[adapter_name] = torch.ones(num_experts)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def has_adapter(self, adapter: str) -> bool:
        return adapter in self.phatgoose_A

    # -- routing --------------------------------------------------------------------------------------------------
    def route(self, adapter: str, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, in] (T = batch * tokens per sample) -> expert indices [T, k] long and weights [T, k] float32."""
        config = self.phatgoose_config[adapter]
        num_tokens, num_experts, device = x.shape[0], config.num_experts, x.device
        if config.routing == "top_k":
            with torch.autocast(device_type=device.type, enabled=False):  # routing math in float32
                eps = config.layer_norm_eps
                x_n = F.layer_norm(x.float(), (self.in_features,), eps=eps)  # [T, in]
                v_n = F.layer_norm(self.phatgoose_gate[adapter].float(), (self.in_features,), eps=eps)  # [E, in]
                logits = x_n @ v_n.T / math.sqrt(self.in_features)  # [T, in] @ [in, E] -> [T, E]
                top, idx = logits.topk(config.top_k, dim=-1)  # [T, k]
                return idx, top.softmax(dim=-1)  # softmax over the kept logits only
        if config.routing == "uniform":
            idx = torch.arange(num_experts, device=device).expand(num_tokens, num_experts)  # [T, E]
            return idx, torch.full((num_tokens, num_experts), 1.0 / num_experts, device=device)
        if config.routing == "single":
            idx = torch.full((num_tokens, 1), config.experts.index(config.expert), device=device)  # [T, 1]
            return idx, torch.ones(num_tokens, 1, device=device)
        # oracle: every token of sample b goes to expert task_ids[b]
        ids = self._task_state.for_batch(batch, f"PHATGOOSE adapter '{adapter}' (routing='oracle')", num_experts)
        idx = ids.to(device).repeat_interleave(num_tokens // batch)[:, None]  # [B] -> [T, 1]
        return idx, torch.ones(num_tokens, 1, device=device)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged or x.numel() == 0:
            return result
        x_flat = x.reshape(-1, self.in_features)  # [..., in] -> [T, in]
        for adapter in self.active_adapters:
            if adapter not in self.phatgoose_A:
                continue
            idx, weights = self.route(adapter, x_flat, x.shape[0] if x.dim() > 1 else 1)  # [T, k], [T, k]
            scaling = self.phatgoose_scaling[adapter].float()  # [E]
            weights = weights * scaling[idx]  # fold each expert's LoRA scaling into its weight: [T, k]
            self._record_load(adapter, idx, x.shape[:-1])
            delta = apply_lora_experts(
                x_flat, self.phatgoose_A[adapter], self.phatgoose_B[adapter], idx, weights, 1.0
            )  # [T, out]
            result = result + delta.reshape(*x.shape[:-1], self.out_features).to(result.dtype)  # -> [..., out]
        return result

    @torch.no_grad()
    def _record_load(self, adapter: str, idx: torch.Tensor, lead_shape: torch.Size) -> None:
        """Fraction of (token, slot) picks per expert in this forward, padding excluded (for expert_load)."""
        mask = self._task_state.padding.token_mask(lead_shape)  # [T] bool or None
        # weights instead of boolean indexing / bincount: no host sync on this per-forward path
        keep = idx.new_ones(idx.shape, dtype=torch.float32) if mask is None else mask[:, None].float().expand(idx.shape)
        counts = keep.new_zeros(self.phatgoose_config[adapter].num_experts)  # [E]
        counts.index_add_(0, idx.reshape(-1), keep.reshape(-1))  # picks per expert over real tokens
        self.last_load[adapter] = counts / keep.sum().clamp_min(1.0)

    # -- merging: only the routings that make the library one fixed LoRA ------------------------------------------
    def merge_key(self, adapter: str) -> Optional[int]:
        config = self.phatgoose_config[adapter]
        if config.routing in ("uniform", "single"):
            return None
        if config.routing == "oracle" and self._task_state.merge_task is not None:
            return self._task_state.merge_task  # one sample's expert
        raise ValueError(
            f"PHATGOOSE adapter '{adapter}' with routing='{config.routing}' picks experts per "
            f"{'token' if config.routing == 'top_k' else 'sample'}, so it is not one fixed weight and cannot be merged "
            "into the base layer. Keep it unmerged, merge a baseline that is one LoRA: "
            "moe_peft.phatgoose.set_routing(model, 'uniform') (merged experts) or 'single', or export an approximation "
            "with a measured error: moe_peft.export(model, strategy='routing_weighted' or 'svd', out=DIR)."
        )

    def get_delta_weight(self, adapter: str, key: Optional[int] = None) -> torch.Tensor:
        config = self.phatgoose_config[adapter]
        num_experts = config.num_experts
        a, b = self.phatgoose_A[adapter], self.phatgoose_B[adapter]  # [E, r, in], [E, out, r]
        coef = torch.zeros(num_experts, device=a.device, dtype=a.dtype)  # [E]
        if config.routing == "uniform":
            coef += 1.0 / num_experts  # the average of the experts' deltas, not of their A and B
        else:
            coef[config.experts.index(config.expert) if key is None else key] = 1.0
        coef = coef * self.phatgoose_scaling[adapter].to(a.dtype)
        return torch.einsum("e,eor,eri->oi", coef, b, a)  # sum_e c_e B_e A_e: [E] x [E, out, r] x [E, r, in]

    def __repr__(self) -> str:
        return "phatgoose." + super().__repr__()
