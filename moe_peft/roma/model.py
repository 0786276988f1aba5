"""The RoMA BaseTuner: finds the routers (by architecture or by name), wraps them in RoMARouterLayer,
and opens a routing capture at every forward of the root model through a pre-hook (PeftModel without a
task type calls the base model directly, so the tuner's forward is not a reliable place)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .._state_dict import FullStateDictKeys
from .capture import RoutingCapture
from .config import RoMAConfig
from .layer import RoMARouterLayer
from .targets import SUPPORTED_ARCHITECTURES, find_routers, score_function


def _batch_shape(args: tuple, kwargs: dict) -> Optional[tuple[int, int]]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return tuple(ids.shape)  # [B, S]
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        return tuple(embeds.shape[:2])  # [B, S, H] -> (B, S)
    return None


class RoMAModel(FullStateDictKeys, BaseTuner):
    prefix = "roma_"
    tuner_layer_cls = RoMARouterLayer
    target_module_mapping = {k: [v[0]] for k, v in SUPPORTED_ARCHITECTURES.items()}  # informative; see targets.py

    @property
    def capture(self) -> RoutingCapture:
        # kept out of the module tree: PEFT saves every module attribute of a tuner
        capture = self.__dict__.get("_roma_capture")
        if capture is None:
            capture = self.__dict__["_roma_capture"] = RoutingCapture()
        return capture

    # -- injection -----------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: RoMAConfig, model_config: dict) -> RoMAConfig:
        return peft_config  # targets are resolved from the model itself in inject_adapter

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        names = find_routers(model, self.peft_config[adapter_name])
        self.__dict__["_roma_targets"] = {name: position for position, name in enumerate(names)}
        self.__dict__.setdefault("_roma_num_layers", {})[adapter_name] = len(names)
        self.capture.score = score_function(model)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self.__dict__.pop("_roma_targets", None)

    def _check_target_module_exists(self, peft_config: RoMAConfig, key: str) -> bool:
        return key in self.__dict__.get("_roma_targets", {})

    def _create_and_replace(
        self,
        config: RoMAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        position = self.__dict__["_roma_targets"][current_key]
        if isinstance(target, RoMARouterLayer):
            target.update_layer(adapter_name, position)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"{current_key} already holds a {type(target).__name__} from another PEFT method.")
        new_module = RoMARouterLayer(target, adapter_name, position, self.capture)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def router_layers(self, adapter_name: Optional[str] = None) -> list[tuple[str, RoMARouterLayer]]:
        """(name, layer) of the tuned routers of `adapter_name` (default: the active adapter), in forward order."""
        adapter_name = adapter_name or self.active_adapters[0]
        layers = [
            (n, m)
            for n, m in self.model.named_modules()
            if isinstance(m, RoMARouterLayer) and adapter_name in m.roma_router
        ]
        return sorted(layers, key=lambda item: item[1].roma_position[adapter_name])

    # -- forward hooks -------------------------------------------------------------------------------
    def _post_injection_hook(self, model: nn.Module, config: RoMAConfig, adapter_name: str) -> None:
        if "_roma_root_hook" not in self.__dict__:
            self.__dict__["_roma_root_hook"] = model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True)

    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        adapter = self.active_adapters[0] if self.active_adapters else None
        config = self.peft_config.get(adapter)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.capture.start_forward(
            _batch_shape(args, kwargs),
            mask if isinstance(mask, torch.Tensor) else None,
            config.representation if config is not None else "last",
            self.__dict__.get("_roma_num_layers", {}).get(adapter, 0),
        )
        return None

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        hook = self.__dict__.pop("_roma_root_hook", None)
        if hook is not None:
            hook.remove()
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )


def roma_tuner(model: nn.Module) -> RoMAModel:
    tuner = model if isinstance(model, RoMAModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, RoMAModel):
        raise TypeError(f"Expected a PeftModel made from moe_peft.RoMAConfig, got {type(model).__name__}.")
    return tuner


def routing_representation(model: nn.Module) -> torch.Tensor:
    """The routing representation r of the latest forward, `[batch, L, E]` (with gradient in training)."""
    return roma_tuner(model).capture.representation_tensor()
