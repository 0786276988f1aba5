"""What the tuners of MHR and PHATGOOSE share: layer injection, the `task_ids` hooks, clean unload and delete.

A subclass sets `prefix`, `tuner_layer_cls` (a layer built as `cls(base_layer, adapter_name, config, task_state,
module_name)`) and `target_module_mapping`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .._internal.state_dict import AdapterNameKeys, FullStateDictKeys
from .._internal.targets import TargetCheck
from ..routing.tasks import TaskIds


class TaskIdsTuner(AdapterNameKeys, FullStateDictKeys, TargetCheck, BaseTuner):
    @property
    def task_state(self) -> TaskIds:
        state = self.__dict__.get("_task_state")
        if state is None:
            state = self.__dict__["_task_state"] = TaskIds()
        return state

    def _create_and_replace(
        self,
        config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"{current_key} already holds a {type(target).__name__} from another PEFT method.")
        new_module = self.tuner_layer_cls(target, adapter_name, config, self.task_state, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        self.task_state.attach(model)

    def layers(self) -> Iterator[tuple[str, BaseTunerLayer]]:
        """(name relative to the transformers model, layer) of every adapted module."""
        for name, module in self.model.named_modules():
            if isinstance(module, self.tuner_layer_cls):
                yield name, module

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
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


def tuner_of(model: nn.Module, cls: type[TaskIdsTuner], what: str) -> TaskIdsTuner:
    """The tuner of a PeftModel (or the tuner itself), checked to be a `cls`."""
    tuner = model if isinstance(model, cls) else getattr(model, "base_model", None)
    if not isinstance(tuner, cls):
        raise TypeError(f"Expected a PeftModel made from {what}, got {type(model).__name__}.")
    return tuner


def adapter_of(tuner: BaseTuner, adapter_name: Optional[str]) -> str:
    """`adapter_name`, or the first active adapter; an unknown name is a clear error."""
    adapter_name = adapter_name or tuner.active_adapters[0]
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"adapter_name={adapter_name!r} is invalid: this model has {sorted(tuner.peft_config)}.")
    return adapter_name
