"""`moe_peft.multi_lora.Trainer`: transformers.Trainer for several adapters trained in one batch on one base.

    model = get_peft_model(base, LoraConfig(...), adapter_name="support")
    model.add_adapter("legal", LoraConfig(...))
    trainer = multi_lora.Trainer(model=model, args=TrainingArguments(...), train_dataset=rows,  # an "adapter" column
                                 data_collator=collator)
    trainer.train()          # logs loss/<adapter> and grad_norm/<adapter>; saves output_dir/<adapter>/ per adapter

What it changes on transformers.Trainer, and why:
  * the dataset's `adapter` column survives column removal and the collator, and becomes `adapter_names`;
  * the loss is `per_adapter_loss` (each adapter's own mean: its gradient equals training it alone), normalized by
    each adapter's label tokens over the whole gradient-accumulation window (as transformers does for one model);
  * `max_grad_norm` clips each adapter's gradient on its own (`clip_grad_norm_per_adapter`), not their joint norm;
  * checkpoints and `save_model` write every adapter to its own directory, loadable by plain PEFT; resuming
    from such a checkpoint reloads them all and keeps them trainable.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from transformers import Trainer as HFTrainer
from transformers import default_data_collator
from transformers.trainer import TRAINING_ARGS_NAME

from .._internal.accumulation import accumulation_steps, trainer_reads_scaled_flag
from .enable import _tuner, enable
from .selection import BASE
from .training import clip_grad_norm_per_adapter, per_adapter_loss, save_adapters


class AdapterCollator:
    """Wraps a collator: the rows' adapter column becomes the batch's `adapter_names` list, the rest is
    collated as before."""

    def __init__(self, collate_fn: Callable, column: str = "adapter"):
        self.collate_fn, self.column = collate_fn, column

    def __call__(self, rows: list[dict]) -> dict:
        missing = [i for i, r in enumerate(rows) if self.column not in r]
        if missing:
            raise ValueError(
                f"multi_lora: rows {missing[:5]} of the batch have no '{self.column}' value; every sample names its "
                f"adapter in that column ('{BASE}' for none), or pass adapter_column=<your column>."
            )
        names = [str(r[self.column]) for r in rows]
        batch = self.collate_fn([{k: v for k, v in r.items() if k != self.column} for r in rows])
        batch["adapter_names"] = names
        return batch


class Trainer(HFTrainer):
    """transformers.Trainer that trains every adapter of a PeftModel at once, each sample its own adapter.

    Args (beyond transformers.Trainer's):
        adapter_column: the dataset column naming each sample's adapter (default "adapter").
        adapters: the adapters to train (default: all loaded); the dataset may name only these and "__base__".
    """

    # in training the loss is normalized by each adapter's label tokens over the whole accumulation window
    # (get_batch_samples below), so the Trainer must not divide it by the accumulation steps again
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model=None,
        args=None,
        data_collator: Optional[Callable] = None,
        train_dataset=None,
        eval_dataset=None,
        adapter_column: str = "adapter",
        adapters: Optional[Sequence[str]] = None,
        **kwargs: Any,
    ):
        if model is None:
            raise ValueError("multi_lora.Trainer needs model=<a PeftModel with the adapters to train>.")
        tuner = _tuner(model)
        self.trained_adapters = list(tuner.peft_config) if adapters is None else list(adapters)
        enable(model, training=True, adapters=self.trained_adapters)
        self.adapter_column = adapter_column
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            self._check_dataset(name, dataset)
        collator = AdapterCollator(data_collator or default_data_collator, adapter_column)
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = False  # the loss is ours: no num_items_in_batch to the model
        self._adapter_logs: dict[str, list[float]] = defaultdict(list)
        self._window_items: Optional[dict[str, float]] = None

    def _check_dataset(self, name: str, dataset) -> None:
        if dataset is None or isinstance(dataset, dict):
            return
        columns = getattr(dataset, "column_names", None)
        if columns is None:
            return  # a torch Dataset or an iterable: the collator checks each row
        if self.adapter_column not in columns:
            raise ValueError(
                f"multi_lora.Trainer: {name} has no '{self.adapter_column}' column (columns: {columns}); add one naming "
                "each sample's adapter, or pass adapter_column=<your column>."
            )
        unknown = sorted(set(map(str, dataset.unique(self.adapter_column))) - set(self.trained_adapters) - {BASE})
        if unknown:
            raise ValueError(
                f"multi_lora.Trainer: {name}['{self.adapter_column}'] names {unknown}, which are not among the trained "
                f"adapters {self.trained_adapters} (or '{BASE}')."
            )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.adapter_column not in self._signature_columns:
            self._signature_columns.append(self.adapter_column)  # keep it through remove_unused_columns

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The accumulation window's micro-batches, and each adapter's label tokens over all of them."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        names = [*self.trained_adapters, BASE]
        counts = torch.zeros(len(names), device=device)
        for batch in batches:
            valid = (batch["labels"][:, 1:] != -100).sum(1).tolist()  # [B] label tokens after the causal shift
            for name, n in zip(batch["adapter_names"], valid):
                counts[names.index(name)] += n
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")  # every rank normalizes by the global count
        self._window_items = dict(zip(names, counts.tolist()))
        return batches, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        names = inputs.pop("adapter_names")
        labels = inputs.pop("labels")
        outputs = model(**inputs, adapter_names=names)
        if model.training and self._window_items is not None:
            # the router loss is a per-micro-batch mean: 1/N of it per micro-batch (the task loss is window-normalized)
            steps = accumulation_steps(self)
            loss, report = per_adapter_loss(
                outputs, labels, names, num_items=self._window_items, router_loss_weight=1.0 / steps
            )
            if not trainer_reads_scaled_flag():
                loss = loss * steps  # transformers 5.17 ignores loss_is_scaled_for_ga and divides by the steps
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages the ranks' gradients; the counts are global
            for adapter, value in report.items():
                self._adapter_logs[f"loss/{adapter}"].append(float(value))
        else:  # evaluation: this batch's means
            loss, _ = per_adapter_loss(outputs, labels, names)
        return (loss, outputs) if return_outputs else loss

    def _clip_grad_norm(self, model):
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._clip_grad_norm(model)  # sharded gradients: the engine clips their joint norm
        self.accelerator.unscale_gradients()  # fp16 loss scaling: clip true gradients (a no-op otherwise)
        norms = clip_grad_norm_per_adapter(
            self.accelerator.unwrap_model(model), self.args.max_grad_norm, self.trained_adapters
        )
        for adapter, norm in norms.items():
            self._adapter_logs[f"grad_norm/{adapter}"].append(float(norm))
        if not norms:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([n.float() for n in norms.values()]))  # the joint pre-clip norm

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._adapter_logs:  # a training log: the per-adapter means since the last one
            for key, values in sorted(self._adapter_logs.items()):
                logs[key] = round(sum(values) / len(values), 4)
            self._adapter_logs.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_adapters(model, output_dir, self.trained_adapters)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # transformers loads every adapter sub-directory but leaves only the active adapter trainable
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        enable(model if model is not None else self.model, training=True, adapters=self.trained_adapters)
