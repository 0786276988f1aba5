"""merge/unmerge for tuner layers whose adapter is one fixed weight delta once a merge key is chosen.

An MHR adapter is one LoRA per task (the key is the task id); a PHATGOOSE library under uniform or single-expert
routing is one LoRA (no key). The layer says how to get the key and the delta; this mixin does the PEFT
bookkeeping (`merged_adapters`, idempotence, safe merge) and remembers the key so that unmerge subtracts exactly
what merge added.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge

from .._internal.quantized import refuse_quantized_merge


class DeltaMergeMixin:
    def merge_key(self, adapter: str) -> Any:
        """What the delta of `adapter` depends on (e.g. the task id); raises if it cannot be merged now."""
        raise NotImplementedError

    def get_delta_weight(self, adapter: str, key: Any = None) -> torch.Tensor:  # [out, in]
        raise NotImplementedError

    def has_adapter(self, adapter: str) -> bool:
        raise NotImplementedError

    def check_mergeable(self, adapter_names: Optional[list[str]] = None) -> None:
        """Raise the layer's clear error before anything is merged (merge_and_unload changes layers one by one)."""
        for adapter in adapter_names or self.active_adapters:
            if self.has_adapter(adapter):
                self.merge_key(adapter)
                refuse_quantized_merge(
                    self.get_base_layer(), adapter, getattr(self, "module_name", type(self).__name__)
                )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        keys = self.__dict__.setdefault("_merge_keys", {})
        for adapter in adapter_names:
            if not self.has_adapter(adapter):
                continue
            key = self.merge_key(adapter)
            base = self.get_base_layer()
            refuse_quantized_merge(base, adapter, getattr(self, "module_name", type(self).__name__))
            merged = base.weight.data + self.get_delta_weight(adapter, key).to(base.weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            base.weight.data = merged
            keys[adapter] = key
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        keys = self.__dict__.setdefault("_merge_keys", {})
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            base = self.get_base_layer()
            base.weight.data -= self.get_delta_weight(adapter, keys.pop(adapter, None)).to(base.weight.dtype)
