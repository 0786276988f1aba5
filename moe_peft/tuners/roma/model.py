"""The RoMA BaseTuner: finds the routers (by architecture or by name), wraps them in RoMARouterLayer,
and opens a routing capture at every forward of the root model through a pre-hook (PeftModel without a
task type calls the base model directly, so the tuner's forward is not a reliable place)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..._internal.state_dict import AdapterNameKeys, FullStateDictKeys
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


def _input_requires_grad(module: nn.Module, args: tuple):
    """Forward pre-hook on a DeepSpeed ZeRO-3 leaf module (a sparse MoE block; DeepSpeed makes Mixtral's, Qwen2-MoE's
    and Qwen3-MoE's leaves by default) that holds a trainable RoMA router copy. ZeRO-3 reduces a leaf's gradients in
    the leaf's full backward hook, which fires once the gradient of the leaf's inputs is computed, or, when no input
    requires grad (the lowest tuned block of a frozen model), as soon as the gradient of its outputs arrives: before
    the router copy's own gradient exists, so DeepSpeed stores an empty partition as that gradient (`zeros_like` of
    the partitioned parameter) and accumulating the real one fails with a size-0 error in backward.
    A detached input that requires grad makes the hook wait for the block's backward; the extra work is the gradient
    of that one input (the layers below stay frozen: the new leaf has no history)."""
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
        return None
    hidden = args[0]  # [B, S, H]
    if hidden.requires_grad or not hidden.is_floating_point():
        return None
    return (hidden.detach().requires_grad_(), *args[1:])


class RoMAModel(AdapterNameKeys, FullStateDictKeys, BaseTuner):
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
        self.__dict__["_roma_layers"] = [m for m in model.modules() if isinstance(m, RoMARouterLayer)]

    def _zero3_leaf_hooks(self) -> None:
        """Hook each ZeRO-3 leaf module holding a trainable router copy (DeepSpeed marks a leaf's parameters with
        `ds_z3_leaf_module` when its engine is built, so this runs at every forward of the root model)."""
        hooked = self.__dict__.setdefault("_roma_leaf_hooks", {})
        for layer in self.__dict__.get("_roma_layers", ()):
            for param in layer.roma_router.values():
                leaf = getattr(param, "ds_z3_leaf_module", None)
                if leaf is not None and param.requires_grad and id(leaf) not in hooked:
                    hooked[id(leaf)] = leaf.register_forward_pre_hook(_input_requires_grad)

    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        self._zero3_leaf_hooks()
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
        for leaf_hook in self.__dict__.pop("_roma_leaf_hooks", {}).values():
            leaf_hook.remove()
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
