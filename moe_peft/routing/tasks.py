"""Per-sample task ids (`task_ids`, `[batch]` long) carried from forward/generate to the adapted layers.

MHR routes every sample by its task; PHATGOOSE's oracle baseline picks each sample's own expert. Both take
the task ids as the forward/generate keyword `task_ids`, whatever PEFT wrapper calls the model:

* `PeftModel` (no task type) and the tuner itself pass unknown keywords on to the root transformers model,
  where a forward pre-hook (registered once per tuner) takes `task_ids` out before transformers sees it;
* PEFT's task-specific models (`PeftModelForCausalLM`, ...) would drop it: `_registration.forward_task_ids`
  re-routes it under a private keyword that the same pre-hook takes out;
* `generate()` rejects keywords its forward does not declare, so an instance-level `generate` holds the ids
  for every decoding step (and repeats them for beams / `num_return_sequences`).

The ids stay on `TaskIds` until the next forward, because reentrant gradient checkpointing recomputes the
layers during backward, after the forward has returned.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .._internal.registration import TASK_IDS_KWARG
from .context import RoutingContext


def as_task_ids(task_ids: Any) -> torch.Tensor:
    """Validate the shape and dtype of user-given task ids: a `[batch]` integer tensor (or list)."""
    ids = torch.as_tensor(task_ids)
    if ids.dim() == 0:
        ids = ids.reshape(1)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(
            f"task_ids={task_ids!r} is invalid: pass one integer task id per sample, a [batch] LongTensor such as "
            "torch.tensor([0, 2, 1])."
        )
    return ids.long()


class TaskIds:
    """The task ids of the current forward, shared by a tuner and its layers."""

    def __init__(self):
        self.current: Optional[torch.Tensor] = None  # [B] long, set by the root pre-hook
        self.sticky: Optional[torch.Tensor] = None  # [B] long, held for every step of a generate() call
        self.merge_task: Optional[int] = None  # the task whose adapter merge()/get_delta_weight() use
        self.padding = RoutingContext()  # the attention mask of the current forward, for padding-free statistics
        self._handles: tuple = ()

    def for_batch(self, batch: int, what: str, n_tasks: int) -> torch.Tensor:
        """The current ids for a layer input with `batch` rows; clear errors for missing or out-of-range ids."""
        ids = self.current
        if ids is None:
            raise ValueError(
                f"task_ids is missing: {what} routes every sample by its task, so pass task_ids=<LongTensor [batch]> "
                f"with values in [0, {n_tasks}) to forward() or generate()."
            )
        if ids.shape[0] != batch and self.from_generate and batch % ids.shape[0] == 0:
            ids = ids.repeat_interleave(batch // ids.shape[0])  # [B] -> [B * beams], the order generate() expands in
        if ids.shape[0] != batch:
            raise ValueError(
                f"task_ids has {ids.shape[0]} entries but the input of {what} has batch size {batch}: pass one task "
                "id per sample."
            )
        if int(ids.min()) < 0 or int(ids.max()) >= n_tasks:
            raise ValueError(
                f"task_ids={ids.tolist()} is out of range for {what}, which knows n_tasks={n_tasks}: use ids in "
                f"[0, {n_tasks}) (to add tasks to an MHR adapter: moe_peft.mhr.set_mode(model, 'mhr_z', add_tasks=k))."
            )
        return ids

    @property
    def from_generate(self) -> bool:
        return self.sticky is not None and self.current is self.sticky

    # -- hooks on the root transformers model ---------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        if self._handles:
            return
        self._handles = (model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),)
        if hasattr(model, "generate") and "generate" not in model.__dict__:
            model.generate = _GenerateWithTaskIds(model, self)

    def detach(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = ()
        if isinstance(model.__dict__.get("generate"), _GenerateWithTaskIds):
            del model.__dict__["generate"]
        self.current = self.sticky = None

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        given = kwargs.pop("task_ids", None)
        rerouted = kwargs.pop(TASK_IDS_KWARG, None)
        given = rerouted if given is None else given
        self.current = as_task_ids(given).to(_device_of(args, kwargs)) if given is not None else self.sticky
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.padding.start_forward(mask if isinstance(mask, torch.Tensor) else None)
        return args, kwargs


def _device_of(args: tuple, kwargs: dict) -> Optional[torch.device]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


class _GenerateWithTaskIds:
    """Instance-level `generate` of the adapted model that holds `task_ids` for every decoding step.
    A callable object rather than a closure, so that copy.deepcopy of the model rebinds it to the copy."""

    def __init__(self, model: nn.Module, task_ids: TaskIds):
        self.model, self.task_ids = model, task_ids

    def __call__(self, *args: Any, task_ids: Any = None, **kwargs: Any):
        self.task_ids.sticky = None if task_ids is None else as_task_ids(task_ids)
        try:
            return type(self.model).generate(self.model, *args, **kwargs)
        finally:
            self.task_ids.sticky = None
