"""How a transformers 5 fused-experts module stores its experts, read from the module itself.

transformers 5 keeps a sparse-MoE layer's experts as 3-D parameters in one module (`MixtralExperts`,
`OlmoeExperts`, `Qwen2MoeExperts`, `Qwen3MoeExperts`, `DeepseekV2Experts`, `DeepseekV3Experts`,
`GptOssExperts`, ...) whose forward is `(hidden [T, d], top_k_index [T, k], top_k_weights [T, k]) -> [T, d]`.
The decorator `transformers.integrations.moe.use_experts_implementation` that lets `config._experts_implementation`
swap that forward also records the storage on the instance: `has_gate` (a fused `gate_up_proj`, else `up_proj`),
`is_transposed` (`[E, in, out]` instead of `[E, out, in]`), `has_bias` (`*_proj_bias [E, out]`),
`has_post_expert_norm`, and the gate function `_apply_gate` (concatenated or interleaved gate/up halves).
Every transformers implementation reads these flags; so do we, which makes every decorated class work without
a table of class names, and any other module an error that names it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_FLAGS = ("has_gate", "has_bias", "is_transposed")


@dataclass(frozen=True)
class ExpertsLayout:
    """The storage of one fused-experts module (see the module docstring)."""

    num_experts: int
    up_name: str  # "gate_up_proj" (gated experts) or "up_proj"
    transposed: bool  # weights stored [E, in, out] (GPT-OSS) instead of [E, out, in]
    has_gate: bool
    has_bias: bool
    post_norm: bool

    @property
    def param_names(self) -> tuple[str, str]:
        return (self.up_name, "down_proj")

    def in_out(self, weight: torch.Tensor) -> tuple[int, int]:
        """(in_features, out_features) of one expert of a stacked weight."""
        _, a, b = weight.shape
        return (a, b) if self.transposed else (b, a)  # [E, in, out] or [E, out, in]


def unsupported(module_name: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"target_parameters: {module_name} ({type(module).__name__}) {why}. moe_peft adapts the fused experts of "
        "transformers 5 MoE models (modules decorated with transformers.integrations.moe.use_experts_implementation: "
        "Mixtral, OLMoE, Qwen2/3-MoE, DeepSeek-V2/V3, GPT-OSS, ...); remove this parameter from target_parameters, "
        "or target the model's nn.Linear modules with target_modules."
    )


def read_layout(module: nn.Module, module_name: str) -> ExpertsLayout:
    """The layout of a fused-experts module, or a ValueError naming it when it is not one we can adapt."""
    if not all(hasattr(module, flag) for flag in _FLAGS):
        raise unsupported(module_name, module, "is not a transformers fused-experts module")
    if getattr(module, "_is_expert_parallel", False):
        raise unsupported(module_name, module, "is sharded for expert parallelism, which is not supported yet")
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    up, down = getattr(module, up_name, None), getattr(module, "down_proj", None)
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or up.dim() != 3 or down.dim() != 3:
        raise unsupported(module_name, module, f"has no 3-D `{up_name}` and `down_proj` parameters")
    if getattr(module, "has_post_expert_norm", False) and not isinstance(
        getattr(module, "post_expert_norm", None), nn.Module
    ):
        raise unsupported(module_name, module, "declares a post-expert norm but holds no `post_expert_norm` module")
    return ExpertsLayout(
        num_experts=up.shape[0],
        up_name=up_name,
        transposed=bool(module.is_transposed),
        has_gate=bool(module.has_gate),
        has_bias=bool(module.has_bias),
        post_norm=bool(getattr(module, "has_post_expert_norm", False)),
    )
