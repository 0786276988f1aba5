"""Optimizer parameter groups that apply each token-routed adapter's `router_lr_ratio` (MoELoraConfig).

A learning rate per parameter is a property of the optimizer, not of the model, so a ratio other than 1 takes effect
only in an optimizer built from these groups (as PEFT's LoRA+ builds its groups with
`peft.optimizers.create_loraplus_optimizer`):

    optimizer = moe_peft.create_router_optimizer(model, torch.optim.AdamW, lr=1e-4, weight_decay=0.01)
    trainer = transformers.Trainer(model=model, ..., optimizers=(optimizer, None))

MoESFTTrainer and `moe-peft train` build theirs so. A ratio of 0 needs no optimizer: the routers then read their
weights detached in the forward (methods.router_frozen), so they get no gradient at all; here they are left out of
the groups. A model whose ratio (other than 0 and 1) is trained by an optimizer that was not built here warns once
(model.py, `_warn_unapplied_router_lr`): the groups mark the adapters whose ratio they applied.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, Optional

import torch
from torch import nn

from .layer import MoELoraLinear
from .model import ROUTER_LR_APPLIED, MoELoraModel


def router_ratios(model: nn.Module) -> dict[str, float]:
    """adapter -> router_lr_ratio, for every adapter of `model` that has routers (token-routed methods)."""
    ratios: dict[str, float] = {}
    for layer in model.modules():
        if isinstance(layer, MoELoraLinear):
            for adapter in layer.routers.keys():
                ratios[adapter] = float(getattr(layer.configs[adapter], "router_lr_ratio", 1.0))
    return ratios


def router_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    decay_parameter_names: Optional[Collection[str]] = None,
) -> list[dict[str, Any]]:
    """The trainable parameters of `model` (a PeftModel, or the tuner model) as optimizer parameter groups: the
    routers of each token-routed adapter at `lr * router_lr_ratio` of that adapter, every other trainable parameter
    (the experts, modules_to_save, other adapters' weights) at `lr`. Routers with ratio 0 are left out (they are
    frozen in the forward). Every trainable parameter is in exactly one group.

    Weight decay: with `weight_decay > 0` each group is split into the parameters that decay and those that do not.
    `decay_parameter_names` (names as `model.named_parameters()` gives them) says which decay, as
    `transformers.Trainer.get_decay_parameter_names(model)` returns them; unset, the parameters of 2 or more
    dimensions decay and biases and norm weights (1-D) do not, which is the Trainer's split for an adapter's
    parameters (expert banks and router weights decay, router biases do not).

    Each group has "params", "lr", "weight_decay" and a "name" ("params", "routers.<adapter>", with ".no_decay"
    for the non-decaying half). Building the groups marks the model as trained with its routers' ratios (no
    warning at its training forwards, `create_router_optimizer`).
    """
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr={lr!r} is invalid: use a finite learning rate >= 0.")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay={weight_decay!r} is invalid: use a finite number >= 0 (0: no decay).")
    # the routers found by walking the routed layers (each layer's `routers` ModuleDict holds adapter -> router, its
    # `configs` the adapter's config), never by parameter names
    router_of: dict[int, tuple[str, float]] = {}  # id(parameter) -> (adapter, router_lr_ratio)
    for layer in model.modules():
        if isinstance(layer, MoELoraLinear):
            for adapter, router in layer.routers.items():
                ratio = float(getattr(layer.configs[adapter], "router_lr_ratio", 1.0))
                for p in router.parameters():
                    router_of[id(p)] = (adapter, ratio)
    decays = set(decay_parameter_names) if decay_parameter_names is not None else None
    groups: dict[tuple[str, bool], dict[str, Any]] = {}  # (adapter of the router or "", decays) -> group
    for name, p in model.named_parameters():  # each parameter once, even one registered twice
        if not p.requires_grad:
            continue
        adapter, ratio = router_of.get(id(p), ("", 1.0))
        if ratio == 0:
            continue  # frozen (read detached in the forward) even if a caller set requires_grad: nothing to hold
        decay = weight_decay > 0 and (name in decays if decays is not None else p.dim() >= 2)
        group = groups.get((adapter, decay))
        if group is None:
            stem = f"routers.{adapter}" if adapter else "params"
            group = groups[(adapter, decay)] = {
                "params": [],
                "lr": lr * ratio,
                "weight_decay": weight_decay if decay else 0.0,
                "name": stem if decay or weight_decay == 0 else f"{stem}.no_decay",
            }
        group["params"].append(p)
    _mark_applied(model, set(router_ratios(model)))
    return list(groups.values())


def create_router_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """`optimizer_cls` over `router_param_groups(model, lr, weight_decay)`: each token-routed adapter's routers at
    `lr * router_lr_ratio`, every other trainable parameter at `lr`; `optimizer_kwargs` go to the optimizer (betas,
    eps, momentum, ...). A learning-rate scheduler scales every group by the same factor (LambdaLR multiplies each
    group's initial lr), so the ratio holds through warm-up and decay."""
    groups = router_param_groups(model, lr, weight_decay=weight_decay)
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)


def _mark_applied(model: nn.Module, adapters: set[str]) -> None:
    for module in model.modules():  # the tuner: the model itself, or a PeftModel's base_model
        if isinstance(module, MoELoraModel):
            module.__dict__[ROUTER_LR_APPLIED] = module.__dict__.get(ROUTER_LR_APPLIED, set()) | adapters
