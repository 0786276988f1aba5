"""RoMA training with transformers.Trainer (or any Trainer subclass, TRL's SFTTrainer included, through
`RoMALossMixin`): the regularizer is added in `compute_loss`, after the task loss, because trainers such
as TRL 1.16's SFTTrainer build their loss from the fused head's log-probs and ignore `outputs.loss`.

Each batch carries `roma_index` `[B]` (the samples' positions in the training set, i.e. in the reference);
RoMATrainer adds that column to the dataset and wraps the collator so it survives batching.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from transformers import Trainer

from ..._internal.accumulation import accumulation_weight
from .loss import alignment_loss
from .model import roma_tuner
from .reference import RoMAReference

INDEX_COLUMN = "roma_index"


class RoMACollator:
    """Wraps a collator: passes `roma_index` through as a `[B]` long tensor, collates the rest as before."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, rows: list[dict]) -> dict:
        index = torch.tensor([r[INDEX_COLUMN] for r in rows], dtype=torch.long)  # [B]
        batch = self.collate_fn([{k: v for k, v in r.items() if k != INDEX_COLUMN} for r in rows])
        batch[INDEX_COLUMN] = index
        return batch


def with_roma_index(dataset):
    """The dataset with a `roma_index` column 0..N-1 (a datasets.Dataset, or a list of dicts)."""
    if hasattr(dataset, "column_names"):
        return (
            dataset if INDEX_COLUMN in dataset.column_names else dataset.add_column(INDEX_COLUMN, range(len(dataset)))
        )
    return [{**row, INDEX_COLUMN: i} for i, row in enumerate(dataset)]


class RoMALossMixin:
    """Adds lambda(t) * mean_i sum_j W_ij ||r_i - r_j||^2 to the loss of the Trainer it is mixed into."""

    def _roma_setup(self, reference: RoMAReference, refresh_batch_size: int) -> None:
        self.roma_reference = reference
        self.roma_refresh_batch_size = refresh_batch_size
        self._roma_sum, self._roma_count, self._roma_refreshed_at = 0.0, 0, 0
        if self.train_dataset is not None:
            if len(self.train_dataset) != len(reference):
                raise ValueError(
                    f"the reference holds {len(reference)} samples but train_dataset has {len(self.train_dataset)}; "
                    "build the reference on the training set itself (same rows, same order)."
                )
            self.train_dataset = with_roma_index(self.train_dataset)
        if not isinstance(self.data_collator, RoMACollator):
            self.data_collator = RoMACollator(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if INDEX_COLUMN not in self._signature_columns:
            self._signature_columns.append(INDEX_COLUMN)  # keep the column when unused ones are removed

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop(INDEX_COLUMN, None)
        # return_outputs passed on as asked: TRL's SFTTrainer runs an extra no_grad forward for the outputs, which
        # would replace the routing captured in the training forward
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss, outputs = result if return_outputs else (result, None)
        if index is not None and model.training and getattr(self, "roma_reference", None) is not None:
            self._maybe_refresh(model)
            reg = alignment_loss(model, self.roma_reference.neighbours(index), step=self.state.global_step)
            # a per-micro-batch mean: 1/steps here when Trainer leaves accumulation to the loss (moe_peft/accumulation.py)
            loss = loss + reg * accumulation_weight(self, num_items_in_batch)
            self._roma_sum += float(reg.detach())
            self._roma_count += 1
        return (loss, outputs) if return_outputs else loss

    def _maybe_refresh(self, model) -> None:
        every = roma_tuner(model).peft_config[roma_tuner(model).active_adapters[0]].reference_refresh_steps
        step = self.state.global_step
        if every and step > 0 and step % every == 0 and step != self._roma_refreshed_at:
            self._roma_refreshed_at = step
            collate = self.data_collator.collate_fn
            self.roma_reference.refresh(model, self.train_dataset, collate, self.roma_refresh_batch_size)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if getattr(self, "_roma_count", 0) and "loss" in logs:
            logs["roma_alignment"] = round(self._roma_sum / self._roma_count, 6)
            self._roma_sum, self._roma_count = 0.0, 0
        super().log(logs, *args, **kwargs)


class RoMATrainer(RoMALossMixin, Trainer):
    """transformers.Trainer plus the RoMA regularizer.

        RoMATrainer(model=peft_model, args=TrainingArguments(learning_rate=7e-5, ...), train_dataset=ds,
                    data_collator=collator, reference=build_reference(peft_model, ds, tokenizer, collator))

    For TRL: `moe_peft.MoESFTTrainer` (RoMALossMixin + trl.SFTTrainer) takes a RoMA adapter and its reference.
    """

    def __init__(self, *args, reference: RoMAReference, refresh_batch_size: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._roma_setup(reference, refresh_batch_size or self.args.per_device_train_batch_size)
