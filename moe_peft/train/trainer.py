"""MoESFTTrainer: TRL's SFTTrainer with moe-peft's router losses, routing inputs and routing statistics.

TRL 1.16's SFTTrainer computes its loss itself, from the fused LM head's per-token log-probabilities, and
ignores `outputs.loss`; it adds only the base model's own MoE `aux_loss`. A plain SFTTrainer therefore trains a
moe-peft adapter without its router losses (the router weights end bit-identical for coefficients 0 and 10).
This subclass adds, where TRL computes the loss:

* the router loss of the training forward (`outputs.router_loss` of the forward run with gradients enabled during
  this `compute_loss`, read by a forward hook, so TRL's extra `no_grad` forwards cannot replace it), weighted by
  `moe_peft.accumulation_weight` so that it counts once per optimizer step whatever the gradient-accumulation split;
* RoMA's routing-manifold regularizer, through `RoMALossMixin` (a RoMA adapter: the reference is given or built
  from the training rows);

and carries per-sample routing inputs through TRL's data pipeline: a `sample_types` column (LoRAMoE's localized
balancing) and a `task_ids` column (MHR, PHATGOOSE's oracle) become `[batch]` tensors in every batch. With
packing, samples are packed per (task, sample type) so that every packed row has one value (packing_strategy
"wrapped"; "bfd" flattens a whole batch into one row, where no per-sample value fits).

Its optimizer applies each token-routed adapter's `router_lr_ratio` (routers at learning_rate * ratio, in parameter
groups of `moe_peft.router_param_groups`), with the optimizer class and arguments `optim` and `optim_args` choose.

It also adds `RoutingStatsCallback` (router loss and per-layer routing summaries in the trainer's logs, SMoRA's
bias update once per optimizer step).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.utils import logging
from trl import SFTTrainer

from .._internal.accumulation import accumulation_weight
from ..tuners.roma.config import RoMAConfig
from ..tuners.roma.trainer import RoMALossMixin
from ..tuners.routed.optim import router_param_groups, router_ratios
from .callback import RoutingStatsCallback

SAMPLE_TYPES, TASK_IDS = "sample_types", "task_ids"
logger = logging.get_logger(__name__)


def _config_of(model: nn.Module, peft_config) -> Any:
    if peft_config is not None:
        return peft_config
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and configs:
        active = getattr(model, "active_adapter", None)
        return configs.get(active, next(iter(configs.values())))
    return None


def routing_columns(config) -> tuple[str, ...]:
    """The per-sample routing inputs an adapter reads: `sample_types` (token-routed methods: LoRAMoE's localized
    balancing), `task_ids` (MHR, PHATGOOSE's oracle routing), none (RoMA, PEFT's own methods)."""
    from ..tuners.mhr.config import MHRConfig
    from ..tuners.phatgoose.config import PhatgooseConfig
    from ..tuners.routed.config import MoELoraConfig

    if isinstance(config, MoELoraConfig):
        return (SAMPLE_TYPES,)
    if isinstance(config, (MHRConfig, PhatgooseConfig)):
        return (TASK_IDS,)
    return ()


def _needs_task_ids(config) -> bool:
    from ..tuners.mhr.config import MHRConfig
    from ..tuners.phatgoose.config import PhatgooseConfig

    return (isinstance(config, MHRConfig) and config.routed) or (
        isinstance(config, PhatgooseConfig) and config.routing == "oracle"
    )


class RoutingInputsCollator:
    """Wraps a collator: the routing columns leave the rows before the wrapped collator sees them and come back as
    `[B]` long tensors in the batch."""

    def __init__(self, collate_fn: Callable, columns: tuple[str, ...]):
        self.collate_fn, self.columns = collate_fn, columns

    def __call__(self, rows: list[dict]) -> dict:
        present = [c for c in self.columns if c in rows[0]]
        values = {}
        for column in present:
            missing = [i for i, r in enumerate(rows) if r.get(column) is None]
            if missing:
                raise ValueError(
                    f"column {column!r} has no value in {len(missing)} rows of this batch; give every row one."
                )
            values[column] = torch.tensor([int(r[column]) for r in rows], dtype=torch.long)  # [B]
        batch = self.collate_fn([{k: v for k, v in r.items() if k not in present} for r in rows])
        if values and batch["input_ids"].shape[0] != len(rows):
            raise ValueError(
                f"the collator merged {len(rows)} samples into {batch['input_ids'].shape[0]} rows (padding-free "
                f"batches), so the per-sample {present} cannot follow them: use packing=False, or "
                "packing_strategy='wrapped' with padding_free=False."
            )
        batch.update(values)
        return batch


class _RouterLossOfForward:
    """Collects `outputs.router_loss` of the forwards run with gradients enabled while it is open (a forward hook on
    the transformers model, registered after the tuner's own, which sets the value)."""

    def __init__(self, root: nn.Module):
        self.losses: list[torch.Tensor] = []
        self._handle = root.register_forward_hook(self._hook)

    def _hook(self, module, args, outputs) -> None:
        if torch.is_grad_enabled() and isinstance(outputs, dict) and outputs.get("router_loss") is not None:
            self.losses.append(outputs["router_loss"])

    def close(self) -> None:
        self._handle.remove()


class MoESFTTrainer(RoMALossMixin, SFTTrainer):
    """`trl.SFTTrainer` for moe-peft adapters (module docstring).

        trainer = MoESFTTrainer(model=base, args=SFTConfig(...), train_dataset=ds, processing_class=tokenizer,
                                peft_config=moe_peft.MoLEConfig(...))      # or model=<a moe-peft PeftModel>
        trainer.train()

    Extra keyword arguments:
        roma_reference: a RoMA adapter's reference set (`moe_peft.roma.build_reference`); None builds it from the
            training rows (plain-text prompt/completion rows: success = exact match of the pretrained model's
            greedy answer), cached in `<output_dir>/roma`.
        routing_stats: add `RoutingStatsCallback` (default True); `routing_stats_per_layer=False` logs only the
            means over layers.
    """

    def __init__(
        self,
        *args,
        roma_reference=None,
        routing_stats: bool = True,
        routing_stats_per_layer: bool = True,
        **kwargs,
    ):
        bound = inspect.signature(SFTTrainer.__init__).bind(self, *args, **kwargs).arguments
        model, sft_args = bound.get("model"), bound.get("args")
        train_dataset, peft_config = bound.get("train_dataset"), bound.get("peft_config")
        config = _config_of(model, peft_config) if not isinstance(model, str) else peft_config
        self._routing_columns = routing_columns(config)
        is_roma = isinstance(config, RoMAConfig)
        packing = getattr(sft_args, "packing", False)
        known = getattr(train_dataset, "column_names", None)  # None for an IterableDataset without features
        columns = set(known or [])
        if packing and is_roma:
            raise ValueError(
                "packing=True is invalid with a RoMA adapter: its regularizer pulls each sample's routing (at its last "
                "token) toward its neighbours', which a packed row of several samples does not have; use packing=False."
            )
        if packing and columns & set(self._routing_columns) and self._padding_free(sft_args):
            raise ValueError(
                f"packing with packing_strategy={sft_args.packing_strategy!r} (padding-free) is invalid with the "
                f"per-sample columns {sorted(columns & set(self._routing_columns))}: the whole batch becomes one row. "
                "Use packing_strategy='wrapped' (rows are packed per task / sample type) or packing=False."
            )
        if _needs_task_ids(config) and known is not None and TASK_IDS not in columns:
            raise ValueError(
                f"{type(config).__name__} routes every sample by its task, but train_dataset has no `task_ids` column "
                f"(columns: {sorted(columns)}); add one (int task ids in [0, n_tasks)), e.g. with moe_peft.train.load_data."
            )
        if is_roma and bound.get("compute_loss_func") is not None:
            raise ValueError(
                "compute_loss_func is invalid with a RoMA adapter: TRL then runs a no_grad forward after the training "
                "one, which replaces the routing the regularizer needs; subclass and override compute_loss instead."
            )
        if is_roma and getattr(sft_args, "label_smoothing_factor", 0) > 0:
            raise ValueError(
                "label_smoothing_factor > 0 is invalid with a RoMA adapter: TRL then runs a no_grad forward after the "
                "training one, which replaces the routing the regularizer needs; set it to 0."
            )
        self._raw_train_dataset = train_dataset
        super().__init__(*args, **kwargs)

        self._moe_tuner = self._token_routed_tuner()
        present = [c for c in self._routing_columns if c in (self.train_dataset.column_names or [])]
        if present:
            self.data_collator = RoutingInputsCollator(self.data_collator, tuple(present))
        self._warn_unused_balancing(present)
        if is_roma:
            if roma_reference is None:
                roma_reference = self._build_roma_reference()
            self._roma_setup(roma_reference, self.args.per_device_train_batch_size)
        if routing_stats:
            RoutingStatsCallback.attach(self, per_layer=routing_stats_per_layer)

    # -- setup helpers ---------------------------------------------------------------------------------------------
    @staticmethod
    def _padding_free(args) -> bool:
        return bool(args.padding_free or args.packing_strategy in ("bfd", "bfd_split"))

    def _token_routed_tuner(self):
        from ..tuners.routed.model import MoELoraModel

        tuner = getattr(self.model, "base_model", None)
        return tuner if isinstance(tuner, MoELoraModel) else None

    def _warn_unused_balancing(self, present: list[str]) -> None:
        from ..tuners.routed.config import LoRAMoEConfig

        config = _config_of(self.model, None)
        if isinstance(config, LoRAMoEConfig) and config.blc_weight > 0 and SAMPLE_TYPES not in present:
            warnings.warn(
                f"LoRAMoE's localized balancing constraint (blc_weight={config.blc_weight}) needs a `sample_types` "
                "column (0/1 per sample); train_dataset has none, so the constraint is off in this run. Add the "
                "column (moe_peft.train.load_data fills it from a `sample_type` field) or set blc_weight=0.",
                stacklevel=3,
            )

    def _build_roma_reference(self):
        import os

        from ..tuners.roma import build_reference

        raw, prepared = self._raw_train_dataset, self.train_dataset
        columns = set(getattr(raw, "column_names", None) or [])
        if not {"prompt", "completion"} <= columns or not isinstance(raw[0]["prompt"], str):
            raise ValueError(
                "roma_reference=None builds RoMA's reference from plain-text `prompt`/`completion` rows, which this "
                f"train_dataset does not have (columns: {sorted(columns)}); build it with "
                "moe_peft.roma.build_reference(model, rows, tokenizer, collator) and pass roma_reference=."
            )
        if len(raw) != len(prepared):
            raise ValueError(
                f"TRL kept {len(prepared)} of the {len(raw)} training rows (rows left without a completion token by "
                "max_length are dropped), so RoMA's reference cannot be matched to them; raise max_length or drop "
                "those rows first."
            )
        rows = [
            {
                "input_ids": prepared[i]["input_ids"],
                "labels": prepared[i]["labels"],
                **{k: raw[i][k] for k in ("prompt", "completion")},
            }
            for i in range(len(raw))
        ]
        reference = build_reference(
            self.model,
            rows,
            self.processing_class,
            self.data_collator,
            batch_size=self.args.per_device_train_batch_size,
            cache_dir=os.path.join(self.args.output_dir, "roma"),
        )
        logger.info(
            "RoMA reference: the pretrained model answers %d of %d training samples right",
            int(reference.success.sum()),
            len(reference),
        )
        return reference

    # -- the dataset: routing columns kept, packing per routing value ----------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in self._routing_columns:
            if column not in self._signature_columns:
                self._signature_columns.append(column)  # kept when unused columns are removed

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        keys = [c for c in self._routing_columns if c in (getattr(dataset, "column_names", None) or [])]
        if not packing or not keys:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        from datasets import concatenate_datasets

        # TRL's packing keeps only input_ids and labels: pack each (task, sample type) apart and put the value back
        values = sorted(set(zip(*(dataset[k] for k in keys))))
        parts = []
        for value in values:
            part = dataset.filter(lambda row, value=value: tuple(row[k] for k in keys) == value)
            part = super()._prepare_dataset(part, processing_class, args, packing, formatting_func, dataset_name)
            for key, v in zip(keys, value):
                part = part.add_column(key, [v] * len(part))
            parts.append(part)
        return concatenate_datasets(parts)

    # -- the optimizer: each routed adapter's router_lr_ratio ------------------------------------------------------
    def create_optimizer(self, model=None):
        """Trainer's optimizer, over `router_param_groups` when a routed adapter's router_lr_ratio is neither 1 nor 0 (0,
        MoLE top-1's default, needs no group: those routers have requires_grad=False and are read detached): its routers
        at learning_rate * ratio, the rest at learning_rate, weight decay split as Trainer splits it. The class and
        its arguments are Trainer's for `optim` (or `optimizer_cls_and_kwargs`); the learning-rate scheduler then
        scales every group by the same factor, so the ratio holds through warm-up and decay."""
        from transformers.trainer_optimizer import is_optimizer_factory

        opt_model = self.model if model is None else model
        ratios = router_ratios(opt_model)
        if self.optimizer is not None or all(r in (0, 1) for r in ratios.values()):
            return super().create_optimizer(model)
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        # optimizers that take the model or their own parameter layout (Muon/Dion factories, GaLore, LOMO, layer-wise)
        if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            scaled = {a: r for a, r in ratios.items() if r not in (0, 1)}
            raise ValueError(
                f"optim={self.args.optim!r} builds its own parameter groups, so it cannot apply router_lr_ratio "
                f"{scaled}; use another optim (adamw_torch, sgd, ...), or router_lr_ratio=1 (or 0: frozen routers)."
            )
        groups = router_param_groups(
            opt_model,
            self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            decay_parameter_names=self.get_decay_parameter_names(opt_model),
        )
        # Trainer's own create_optimizer builds the optimizer (with its bitsandbytes and SageMaker steps) from these
        # groups: "params" in the optimizer kwargs replaces its default groups, the way its GaLore path passes its own
        held = self.optimizer_cls_and_kwargs
        self.optimizer_cls_and_kwargs = (optimizer_cls, {**optimizer_kwargs, "params": groups})
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = held

    # -- the loss --------------------------------------------------------------------------------------------------
    def _sequence_parallel_model_loss(self) -> bool:
        # Under DeepSpeed sequence parallelism TRL returns the model's own outputs.loss, which already holds the
        # router loss (weighted by the label share): adding it again would count it twice
        pc = getattr(self.accelerator, "parallelism_config", None)
        return pc is not None and getattr(pc, "sp_backend", None) == "deepspeed" and getattr(pc, "sp_enabled", False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tuner = self._moe_tuner
        if (
            tuner is None
            or not (self.model.training and torch.is_grad_enabled())
            or self._sequence_parallel_model_loss()
        ):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        capture = _RouterLossOfForward(tuner.model)
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            capture.close()
        loss, outputs = result if return_outputs else (result, None)
        if capture.losses:
            # the training forward is the last one run with gradients enabled; TRL's metrics forwards run without
            router_loss = capture.losses[-1]
            loss = loss + router_loss.to(loss.dtype) * accumulation_weight(self, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss
