"""PhatgooseModel, the BaseTuner of an assembled PHATGOOSE library, and the calls that act on it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..routed.config import _bad
from ..task_tuner import TaskIdsTuner, adapter_of, tuner_of
from .config import ROUTINGS, PhatgooseConfig
from .layer import PhatgooseLinear


class PhatgooseModel(TaskIdsTuner):
    """Injects PhatgooseLinear layers; carries `task_ids` (routing='oracle') to them (moe_peft/tasks.py)."""

    prefix: str = "phatgoose_"
    tuner_layer_cls = PhatgooseLinear
    target_module_mapping: dict[str, list[str]] = {}  # the experts decide the targets

    def delete_adapter(self, adapter_name: str) -> None:
        for _, layer in self.layers():
            layer.last_load.pop(adapter_name, None)
        super().delete_adapter(adapter_name)


def _tuner(model: nn.Module) -> PhatgooseModel:
    return tuner_of(model, PhatgooseModel, "moe_peft.phatgoose.assemble")


_adapter = adapter_of


def set_routing(
    model: nn.Module,
    routing: str,
    expert: Optional[str] = None,
    top_k: Optional[int] = None,
    adapter_name: Optional[str] = None,
) -> None:
    """Switch the routing of an assembled library in place: "top_k" (PHATGOOSE) or a baseline ("uniform",
    "single" with `expert`, "oracle"). The config follows, so the model saves and reloads with it."""
    if routing not in ROUTINGS:
        raise _bad("routing", routing, f"use one of {ROUTINGS}.")
    tuner = _tuner(model)
    config: PhatgooseConfig = tuner.peft_config[_adapter(tuner, adapter_name)]
    new = dict(routing=routing, expert=expert if routing == "single" else None, top_k=top_k or config.top_k)
    old = {k: getattr(config, k) for k in new}
    for k, v in new.items():
        setattr(config, k, v)
    try:
        config._validate()
    except ValueError:
        for k, v in old.items():
            setattr(config, k, v)
        raise


def expert_load(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, list[float]]:
    """Per adapted module, the fraction of (token, slot) picks each expert got in the latest forward."""
    tuner = _tuner(model)
    adapter = _adapter(tuner, adapter_name)
    return {name: layer.last_load[adapter].tolist() for name, layer in tuner.layers() if adapter in layer.last_load}


def mean_expert_load(model: nn.Module, adapter_name: Optional[str] = None) -> torch.Tensor:
    """The expert load of the latest forward averaged over the adapted modules, [E]."""
    loads = list(expert_load(model, adapter_name).values())
    return torch.tensor(loads).mean(dim=0) if loads else torch.zeros(0)
