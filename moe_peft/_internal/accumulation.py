"""How much of a per-micro-batch loss (a router loss, a regularizer) goes into the loss that is backpropagated,
so that it counts once per optimizer step whatever the split into micro-batches.

A router loss is a mean over one micro-batch's tokens. Over an optimizer step of N accumulated micro-batches
it must enter the gradient with weight 1/N, as a per-batch-mean task loss does. Who divides by N depends on
how the task loss was normalized (transformers.Trainer.training_step, transformers 5):

* the task loss is a per-batch mean (no `num_items_in_batch`): Trainer (or the user of a plain loop) divides
  the whole loss by N; the router loss goes in with weight 1.
* the task loss is normalized over the whole accumulated batch (`num_items_in_batch`, the label-token count
  of all N micro-batches, passed to the model forward when the model accepts loss kwargs, as Llama and most
  decoders do): Trainer does not divide by N, so the router loss must be divided here. With
  `average_tokens_across_devices` (the default) `num_items_in_batch` counts every rank's tokens and Trainer
  multiplies the loss by the number of processes before DDP averages the gradients; the router loss must
  not get that factor.

Two places apply the rule:

* the model itself, for `outputs.loss` (`label_share`): with `num_items_in_batch` in the forward, the router
  loss is weighted by this micro-batch's share of the label tokens, n_local / num_items_in_batch, the weight
  the task loss gives its tokens. For equal micro-batches that is 1/N (1/(N*P) before Trainer multiplies by
  the P processes), and for unequal ones a token-weighted mean over the step, like the task loss.
* a trainer that computes its own loss (TRL's SFTTrainer builds it from fused log-probs and ignores
  `outputs.loss`) adds `router_loss * accumulation_weight(trainer, num_items_in_batch)` to the loss its
  parent's `compute_loss` returned, i.e. after the multiplication by the number of processes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


def _loss_shifts_labels(model: nn.Module) -> bool:
    """Whether the model's own loss shifts the labels (a causal LM), decided as transformers.Trainer does for
    its `num_items_in_batch` count: position 0 of each row is then never a target."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # pragma: no cover - transformers always has it in the tested range
        return True
    config = getattr(model, "config", None)
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not getattr(
        config, "is_encoder_decoder", False
    )


def label_share(model: nn.Module, kwargs: dict[str, Any]) -> Optional[torch.Tensor]:
    """This forward's share of the accumulated batch's label tokens, n_local / num_items_in_batch (a 0-d tensor),
    or None when the forward got no `num_items_in_batch` (the task loss is then a per-batch mean).

    n_local is counted as Trainer counts num_items_in_batch: `shift_labels` if given, else `labels[..., 1:]`
    for a causal LM, else `labels`; positions equal to -100 are not targets.
    """
    total = kwargs.get("num_items_in_batch")
    if total is None:
        return None
    labels = kwargs.get("shift_labels")
    if labels is None:
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and _loss_shifts_labels(model):
            labels = labels[..., 1:]
    if not isinstance(labels, torch.Tensor):
        return None
    local = labels.ne(-100).sum()  # 0-d, stays on the device (no host sync)
    total = torch.as_tensor(total, device=local.device).reshape(-1)[0]  # DataParallel hands each replica [1]
    return local.float() / total.float().clamp_min(1)


def trainer_reads_scaled_flag() -> bool:
    """Whether the installed transformers.Trainer reads `loss_is_scaled_for_ga` (a class attribute added after
    transformers 5.17; before it, training_step divides the loss by the accumulation steps unless the model
    accepts loss kwargs and got `num_items_in_batch`, or a `compute_loss_func` is set)."""
    from transformers import Trainer

    return hasattr(Trainer, "loss_is_scaled_for_ga")


def loss_is_scaled_for_ga(trainer: Any, num_items_in_batch: Any = None) -> bool:
    """Whether Trainer.training_step will leave the loss `compute_loss` returned undivided by the accumulation
    steps: the installed transformers' rule, so that it holds from 5.17 on."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None) if trainer_reads_scaled_flag() else None
    if scaled is None:
        scaled = (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
            getattr(trainer, "compute_loss_func", None) is not None
        )
    return bool(scaled)


def accumulation_steps(trainer: Any) -> int:
    """The accumulation steps of the current optimizer step (fewer for a short last window)."""
    return getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps


def accumulation_weight(trainer: Any, num_items_in_batch: Any = None) -> float:
    """The weight of a per-micro-batch loss added to what `compute_loss` returns in a transformers Trainer
    (or a subclass such as TRL's SFTTrainer): 1 / current_gradient_accumulation_steps when the trainer treats
    the loss as already scaled for gradient accumulation, else 1 (the trainer divides by the steps itself).

    The decision is Trainer.training_step's (`loss_is_scaled_for_ga` above): its `loss_is_scaled_for_ga` if set
    (and read by the installed transformers), else whether the task loss was normalized by `num_items_in_batch`
    (the model accepts loss kwargs) or by a `compute_loss_func`. Add the weighted term after the parent's
    compute_loss, which has already applied the average_tokens_across_devices multiplication.
    """
    return 1.0 / accumulation_steps(trainer) if loss_is_scaled_for_ga(trainer, num_items_in_batch) else 1.0
