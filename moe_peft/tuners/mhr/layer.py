"""The MHR / Poly tuner layer: a frozen base nn.Linear, a bank of LoRA skills split into heads, a task router.

Parameters are mixed, not outputs (Poly: Ponti et al., EACL 2023; MHR: Caccia et al., NeurIPS 2023; the
layout of PEFT's poly/layer.py and mttl's poly.py; docs/methods.md): for a sample of task t,

    A_t[h] = sum_s w[t, h, s] A[h, s]    (head h covers input features  h*in/H  .. (h+1)*in/H)
    B_t[h] = sum_s w[t, h, s] B[h, s]    (head h covers output features h*out/H .. (h+1)*out/H)
    y = W x + (lora_alpha / r) * (x A_t) B_t

with A_t [in, r] and B_t [r, out] the heads concatenated. Routing depends on the task, not on the token, so
the op for token-routed experts (moe_peft.ops) does not apply: for a fixed task the adapter is one rank-r LoRA,
which is also why a task merges exactly.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...routing.tasks import TaskIds
from ..delta_merge import DeltaMergeMixin
from .config import MHRConfig
from .router import TaskRouter


class MHRLinear(nn.Module, DeltaMergeMixin, BaseTunerLayer):
    prefix = "mhr_"
    adapter_layer_names = ("mhr_A", "mhr_B", "mhr_router")
    other_param_names = ("mhr_config",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MHRConfig, task_state: TaskIds, name: str):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"MHR adapts nn.Linear modules only, but {name} is a {type(base_layer).__name__}; remove it from "
                "target_modules."
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.module_name = name
        self.mhr_A = nn.ParameterDict()  # adapter -> [H, S, in/H, r]
        self.mhr_B = nn.ParameterDict()  # adapter -> [H, S, r, out/H]
        self.mhr_router = nn.ModuleDict()  # adapter -> TaskRouter (absent in mode "mhr_mu")
        self.mhr_config: dict[str, MHRConfig] = {}
        self.merged_adapters = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self._task_state = task_state
        self.update_layer(adapter_name, config)

    # -- adapter management -------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: MHRConfig, inference_mode: bool = False) -> None:
        heads, skills, rank = config.n_splits, config.n_skills, config.r
        for what, features in (("in", self.in_features), ("out", self.out_features)):
            if features % heads:
                raise ValueError(
                    f"n_splits={heads} is invalid for adapter '{adapter_name}': it must divide the {what} features "
                    f"({features}) of {self.module_name}; pick an n_splits that divides the in and out features of "
                    "every target module, or exclude this module."
                )
        self.mhr_config[adapter_name] = config
        self.mhr_A[adapter_name] = nn.Parameter(torch.empty(heads, skills, self.in_features // heads, rank))
        self.mhr_B[adapter_name] = nn.Parameter(torch.empty(heads, skills, rank, self.out_features // heads))
        if config.routed:
            self.mhr_router[adapter_name] = TaskRouter(config.n_tasks, heads, skills, config.relaxed_bernoulli)
        self.reset_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.apply_mode(adapter_name, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        a, b = self.mhr_A[adapter_name], self.mhr_B[adapter_name]
        heads, skills = a.shape[:2]
        # Kaiming-uniform on each (head, skill) A as a [r, in/H] matrix, the init of nn.Linear (mttl, PEFT Poly)
        for h in range(heads):
            for s in range(skills):
                nn.init.kaiming_uniform_(a[h, s].T, a=math.sqrt(5))  # [in/H, r] viewed as [r, in/H]
                if not init_weights:
                    nn.init.kaiming_uniform_(b[h, s].T, a=math.sqrt(5))  # [r, out/H] viewed as [out/H, r]
        if init_weights:
            nn.init.zeros_(b)  # a new adapter is a no-op

    def apply_mode(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Trainable parts per mode: mhr = skills + routing, mhr_z = routing only, mhr_mu = the one LoRA."""
        frozen = dict(self.frozen_peft_weight_names)  # the class-level default is shared: copy before writing
        frozen.pop(adapter_name, None)
        if self.mhr_config[adapter_name].mode == "mhr_z":
            frozen[adapter_name] = ("mhr_A", "mhr_B")
        self.frozen_peft_weight_names = frozen
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def has_adapter(self, adapter: str) -> bool:
        return adapter in self.mhr_A

    # -- the task LoRA ------------------------------------------------------------------------------------------
    def task_weights(self, adapter: str, batch: int) -> torch.Tensor:
        """Routing weights [B, H, S] of the current task ids ([1, H, 1] of ones in mode mhr_mu)."""
        config = self.mhr_config[adapter]
        if not config.routed:
            return torch.ones(1, config.n_splits, 1, device=self.mhr_A[adapter].device)
        router = self.mhr_router[adapter]
        ids = self._task_state.for_batch(batch, f"MHR adapter '{adapter}'", router.n_tasks)
        return router(ids)

    def task_lora(self, adapter: str, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix the skills with weights [N, H, S]: A_t [N, in, r] and B_t [N, r, out]."""
        a, b = self.mhr_A[adapter], self.mhr_B[adapter]
        n, rank = weights.shape[0], a.shape[-1]
        w = weights.to(a.dtype)
        a_t = torch.einsum("nhs,hsir->nhir", w, a)  # [N, H, S] x [H, S, in/H, r] -> [N, H, in/H, r]
        b_t = torch.einsum("nhs,hsro->nhro", w, b)  # [N, H, S] x [H, S, r, out/H] -> [N, H, r, out/H]
        a_t = a_t.reshape(n, self.in_features, rank)  # heads side by side on the input features -> [N, in, r]
        b_t = b_t.transpose(1, 2).reshape(n, rank, self.out_features)  # [N, r, H, out/H] -> [N, r, out]
        return a_t, b_t

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged or x.numel() == 0:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.mhr_A:
                continue
            batch = x.shape[0]
            a_t, b_t = self.task_lora(adapter, self.task_weights(adapter, batch))  # [B|1, in, r], [B|1, r, out]
            xs = x.reshape(batch, -1, self.in_features).to(a_t.dtype)  # [B, ..., in] -> [B, L, in]
            delta = (xs @ a_t) @ b_t  # [B, L, in] @ [B|1, in, r] @ [B|1, r, out] -> [B, L, out]
            delta = delta * self.mhr_config[adapter].scaling
            result = result + delta.reshape(result.shape).to(result.dtype)  # [B, L, out] -> [B, ..., out]
        return result

    # -- merging (exact for one task; DeltaMergeMixin does the bookkeeping) -------------------------------------
    def merge_key(self, adapter: str) -> Optional[int]:
        config = self.mhr_config[adapter]
        if not config.routed:
            return None
        n_tasks = self.mhr_router[adapter].n_tasks
        task = self._task_state.merge_task
        if task is None and n_tasks == 1:
            task = 0
        if task is None:
            raise ValueError(
                f"MHR adapter '{adapter}' routes per task (n_tasks={n_tasks}), so it is one LoRA only once a task is "
                "chosen: merge a task with moe_peft.mhr.merge_task(model, task_id) or export it as a plain PEFT "
                "LoRA with moe_peft.mhr.export_task_lora(model, task_id, path)."
            )
        if not 0 <= task < n_tasks:
            raise ValueError(f"task_id={task} is out of range for MHR adapter '{adapter}': use [0, {n_tasks}).")
        return task

    def task_delta_factors(self, adapter: str, key: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode task LoRA as (A_t [in, r], B_t [r, out]) for task `key` (None: mode mhr_mu)."""
        config = self.mhr_config[adapter]
        if key is None:
            weights = torch.ones(1, config.n_splits, 1, device=self.mhr_A[adapter].device)  # [1, H, 1]
        else:
            weights = self.mhr_router[adapter].eval_weights(key)[None]  # [1, H, S]
        a_t, b_t = self.task_lora(adapter, weights)
        return a_t[0], b_t[0]

    def get_delta_weight(self, adapter: str, key: Optional[int] = None) -> torch.Tensor:
        a_t, b_t = self.task_delta_factors(adapter, key)
        return (a_t @ b_t).T * self.mhr_config[adapter].scaling  # ([in, r] @ [r, out]).T -> [out, in]

    def __repr__(self) -> str:
        return "mhr." + super().__repr__()
