"""A plain PEFT LoRA adapter from exported factors: what any PEFT-compatible multi-LoRA server loads.

The adapter is built with PEFT itself on the plain base (so PEFT writes its own key names, nested
`target_parameters` wrappers included) and then filled in:

* LoRA on nn.Linear: the module's factor pairs stacked, A [sum r_i, in] and B [out, sum r_i] (the sum of the deltas,
  exactly), every scaling folded into B and lora_alpha = r, so PEFT's scaling is 1;
* LoRA on fused experts (`target_parameters`): PEFT's layout, lora_A [E*r, in] with rows expert-major and lora_B
  [out, r*E] with column j*E + e for rank j of expert e: the inverse of `moe_peft.import_lora_adapter`;
* `modules_to_save`: the trained modules of the source adapter, and the routers retrained by RoMA (their weight is
  not low-rank, so they travel whole).

Ranks differ between modules; every factor is zero-padded to the largest (zero rows and columns add nothing), so
the adapter needs no `rank_pattern`, which some servers do not read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from .parts import FixedExperts, FixedLinear, FixedRouter, Parts

LinearFactors = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]  # module -> [(A [r, in], B [out, r])]


def linear_factors(parts: Parts, approximated: LinearFactors) -> LinearFactors:
    """Every LoRA on a linear: the fixed parts' factors and the approximations of the routed layers."""
    out: LinearFactors = {}
    for part in parts.fixed:
        if isinstance(part, FixedLinear):
            out.setdefault(part.name, []).append(part.factors())
    for name, pairs in approximated.items():
        out.setdefault(name, []).extend(pairs)
    return out


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, missing]  # F.pad lists dims from the last
    return F.pad(t, pad)


def build_lora_model(plain: nn.Module, parts: Parts, linears: LinearFactors, task_type, base_path) -> PeftModel:
    """A PEFT LoRA model on `plain` (which PEFT wraps) holding `linears`, the fixed expert LoRAs, RoMA routers and
    the trained modules_to_save."""
    stacked = {
        name: (torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs], dim=1))  # [R_m, in], [out, R_m]
        for name, pairs in linears.items()
    }
    experts = {
        (p.name, param): (a, b)
        for p in parts.fixed
        if isinstance(p, FixedExperts)
        for param, (_, a, b) in p.params.items()
    }
    routers = {p.name: p.weight for p in parts.fixed if isinstance(p, FixedRouter)}
    ranks = [a.shape[0] for a, _ in stacked.values()] + [a.shape[1] for a, _ in experts.values()]
    if not ranks:
        raise ValueError(
            "export: nothing here is a LoRA (only retrained routers or modules_to_save); export merged weights "
            "instead (merge=True / --merge)."
        )
    rank = max(ranks)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1: every scaling is folded into B
        lora_dropout=0.0,
        target_modules=sorted(stacked),
        target_parameters=sorted(f"{name}.{param}" for name, param in experts) or None,
        modules_to_save=sorted(set(parts.saved) | set(routers)) or None,
        task_type=task_type,
        base_model_name_or_path=base_path,
    )
    model = get_peft_model(plain, config)
    root = model.base_model.model
    with torch.no_grad():
        for name, (a, b) in stacked.items():
            layer = root.get_submodule(name)
            layer.lora_A["default"].weight.copy_(_pad(a, 0, rank))  # [R, in]
            layer.lora_B["default"].weight.copy_(_pad(b, 1, rank))  # [out, R]
        for name, module in root.named_modules():
            if isinstance(module, ParamWrapper):
                a, b = experts[(name.replace(".base_layer", ""), module.parameter_name)]  # [E, r, in], [E, out, r]
                a, b = _pad(a, 1, rank), _pad(b, 2, rank)
                num_experts = a.shape[0]
                module.lora_A["default"].weight.copy_(a.reshape(num_experts * rank, -1))  # [E, R, in] -> [E*R, in]
                # [E, out, R] -> [out, R, E] -> [out, R*E]: column j*E + e is rank j of expert e
                module.lora_B["default"].weight.copy_(b.permute(1, 2, 0).reshape(b.shape[1], -1))
        for name, trained in parts.saved.items():
            root.get_submodule(name).modules_to_save["default"].load_state_dict(trained.state_dict())
        for name, weight in routers.items():
            root.get_submodule(name).modules_to_save["default"].weight.copy_(weight)
    return model.eval()
