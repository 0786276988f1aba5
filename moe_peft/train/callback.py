"""RoutingStatsCallback: the router loss and per-layer routing summaries in the trainer's logs, and SMoRA's bias
update once per optimizer step, for any transformers Trainer (MoESFTTrainer adds it by itself).

    trainer = transformers.Trainer(model=peft_model, args=args, train_dataset=ds)
    moe_peft.RoutingStatsCallback.attach(trainer)     # before the reporting callbacks (TensorBoard, W&B, ...)
    trainer.train()

Every training log (every `logging_steps`) gains, over the training forwards since the previous log:

    router_loss                     mean outputs.router_loss (token-routed methods)
    routing/<layer>/load_cv         coefficient of variation of the expert load (0 = balanced)
    routing/<layer>/max_load        busiest expert's load x E (1 = balanced)
    routing/<layer>/entropy         mean normalized router entropy (1 = uniform router)
    routing/<layer>/experts_per_token
    routing/<layer>/null_fraction   (null experts only)
    routing/mean/<stat>             the mean of each over the layers

(definitions: moe_peft/stats/summary.py). The values are added to the `logs` of the trainer's own `log` call, so
they reach `report_to` and `trainer.state.log_history` like the loss. `attach` puts the callback first, because
the Trainer calls its callbacks in order and the reporting callbacks come before the ones passed in `callbacks=`.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

from transformers import TrainerCallback

from ..stats.plots import short_name
from ..stats.probe import RoutingProbe, routed_modules
from ..stats.summary import summarize

STATS = ("load_cv", "max_load", "entropy", "experts_per_token", "null_fraction")


def _unwrap(model):
    return getattr(model, "module", model)


def _smora_tuner(model):
    from ..tuners.routed.config import SMoRAConfig
    from ..tuners.routed.model import MoELoraModel

    tuner = getattr(_unwrap(model), "base_model", None)
    if isinstance(tuner, MoELoraModel) and any(isinstance(c, SMoRAConfig) for c in tuner.peft_config.values()):
        return tuner
    return None


class RoutingStatsCallback(TrainerCallback):
    """See the module docstring. per_layer=False logs only the means over layers (a model with many routed layers
    otherwise logs 5 numbers per layer)."""

    def __init__(self, per_layer: bool = True, prefix: str = "routing"):
        self.per_layer = per_layer
        self.prefix = prefix
        self.probe: Optional[RoutingProbe] = None
        self.attached = False
        self.bias_updates = 0  # optimizer steps at which this callback's update_router_biases call moved a bias

    @classmethod
    def attach(cls, trainer: Any, **kwargs: Any) -> RoutingStatsCallback:
        """Create the callback and put it first in `trainer`'s callbacks, so that the reporting callbacks see its
        values in the same log call."""
        callback = cls(**kwargs)
        callback.attached = True
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    # -- events ----------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not routed_modules(_unwrap(model)):
            return
        if not self.attached:
            warnings.warn(
                "RoutingStatsCallback was passed in callbacks=, so it runs after the reporting callbacks (TensorBoard, "
                "W&B, ...), which then do not see its values (trainer.state.log_history does). Add it with "
                "moe_peft.RoutingStatsCallback.attach(trainer) instead.",
                stacklevel=2,
            )
        self.probe = RoutingProbe(_unwrap(model), train_only=True)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        # SMoRA's loss-free balancing, once per optimizer step. moe-peft applies it by itself after every torch.optim
        # step (a step post-hook) and consumes the counts, so this call is a no-op then; it applies them for
        # optimizers outside torch.optim. A step that was skipped (fp16 overflow) updates nothing, as with the hook.
        tuner = _smora_tuner(model) if model is not None else None
        if tuner is None or getattr(optimizer, "step_was_skipped", False):
            return
        from ..tuners.routed.model import update_router_biases

        if update_router_biases(tuner):
            self.bias_updates += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.probe is None or logs is None or "loss" not in logs:  # training logs only (not eval, not the summary)
            return
        values = self.window()
        logs.update(values)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step:
            last.update(values)  # Trainer.log appended its copy of the logs before calling the callbacks

    def on_train_end(self, args, state, control, **kwargs):
        if self.probe is not None:
            self.probe.remove()
            self.probe = None

    # -- the values ------------------------------------------------------------------------------------------------
    def window(self) -> dict[str, float]:
        """The values of the window since the previous call (the module docstring's keys), and a new window."""
        totals, router_loss, forwards = self.probe.take(all_reduce=True)  # over data-parallel ranks
        values: dict[str, float] = {}
        if not forwards:
            return values
        if router_loss is not None:
            values["router_loss"] = router_loss
        sums: dict[str, list[float]] = {s: [] for s in STATS}
        for layer in self.probe.layers:
            if layer not in totals:
                continue
            summary = summarize(totals[layer])
            for stat in STATS:
                if summary[stat] is None:
                    continue
                sums[stat].append(summary[stat])
                if self.per_layer:
                    values[f"{self.prefix}/{short_name(layer)}/{stat}"] = summary[stat]
        for stat, items in sums.items():
            if items:
                values[f"{self.prefix}/mean/{stat}"] = sum(items) / len(items)
        return values
