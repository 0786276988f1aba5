"""PhatgooseModel, the BaseTuner of an assembled PHATGOOSE library, and the calls that act on it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..config import _bad
from ..tasks import TaskIds
from .config import ROUTINGS, PhatgooseConfig
from .layer import PhatgooseLinear


class PhatgooseModel(BaseTuner):
    """Injects PhatgooseLinear layers; carries `task_ids` (routing='oracle') to them (moe_peft/tasks.py)."""

    prefix: str = "phatgoose_"
    tuner_layer_cls = PhatgooseLinear
    target_module_mapping: dict[str, list[str]] = {}  # the experts decide the targets

    @property
    def task_state(self) -> TaskIds:
        state = self.__dict__.get("_phatgoose_task_state")
        if state is None:
            state = self.__dict__["_phatgoose_task_state"] = TaskIds()
        return state

    def _create_and_replace(
        self,
        config: PhatgooseConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, PhatgooseLinear):
            target.update_layer(adapter_name, config)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"{current_key} already holds a {type(target).__name__} from another PEFT method.")
        new_module = PhatgooseLinear(target, adapter_name, config, self.task_state, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: PhatgooseConfig, adapter_name: str) -> None:
        self.task_state.attach(model)

    def layers(self) -> Iterator[tuple[str, PhatgooseLinear]]:
        for name, module in self.model.named_modules():
            if isinstance(module, PhatgooseLinear):
                yield name, module

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for _, layer in self.layers():
            layer.last_load.pop(adapter_name, None)
        if not self.peft_config:
            self.task_state.detach(self.model)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            for _, layer in self.layers():
                layer.check_mergeable(adapter_names)  # a clear error before any layer is changed
        self.task_state.detach(self.model)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )


def _tuner(model: nn.Module) -> PhatgooseModel:
    tuner = model if isinstance(model, PhatgooseModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, PhatgooseModel):
        raise TypeError(f"Expected a PeftModel made by moe_peft.phatgoose.assemble, got {type(model).__name__}.")
    return tuner


def _adapter(tuner: PhatgooseModel, adapter_name: Optional[str]) -> str:
    adapter_name = adapter_name or tuner.active_adapters[0]
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"adapter_name={adapter_name!r} is invalid: this model has {sorted(tuner.peft_config)}.")
    return adapter_name


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
