"""Training several adapters in one batch on one frozen base: the loss, clipping and saving per adapter.

The loss is the sum over the batch's adapters of each adapter's own mean token loss,

    L = sum_a L_a,     L_a = (1 / n_a) sum_{label tokens t of samples of a} CE_t

so that dL/d(adapter a) = dL_a/d(adapter a): exactly the gradient of training a alone on its samples (the
mean over the whole batch would weight each adapter by its share of the batch's tokens). Adam-family
optimizers work per parameter, so one optimizer over all adapters steps each as its own would (an adapter
without a sample in the batch gets no gradient, so it is not stepped); gradient clipping must be per
adapter too, or one adapter's large gradient would shrink the others' (`clip_grad_norm_per_adapter`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .._internal.atomic import staged_adapter
from .enable import _tuner
from .selection import BASE, AdapterSelection


def per_adapter_loss(
    outputs: Any,
    labels: torch.Tensor,
    adapter_names: Sequence[str],
    shift: bool = True,
    num_items: Optional[Mapping[str, float]] = None,
    router_loss_weight: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum over the batch's adapters of their mean token cross-entropy, {adapter: its mean, detached}).

    Args:
        outputs: the model output (with `.logits [B, S, V]`, and `.router_loss` for moe-peft adapters) or logits.
        labels: `[B, S]`, -100 where no loss is taken (prompt, padding).
        adapter_names: the batch's `adapter_names`. `"__base__"` samples are reported but train nothing.
        shift: causal LM (position t predicts token t + 1), as transformers' loss.
        num_items: per adapter, the label tokens of the whole accumulated batch (gradient accumulation): each
            adapter's summed loss is divided by it instead of by this batch's count, so that accumulated
            micro-batches give each adapter the gradient of one big batch (as transformers' `num_items_in_batch`
            does for one model). The reported means stay this batch's.
        router_loss_weight: the weight of `outputs.router_loss` (moe-peft adapters), a per-micro-batch mean. Without
            `num_items` it defaults to 1 (the caller divides the whole loss by the accumulation steps). With
            `num_items` the task loss is already normalized over the window, so the router loss must be divided by
            the number N of accumulated micro-batches here, else it counts N times (docs/methods.md, "Router
            losses"): pass `1 / N` (in a Trainer subclass, `moe_peft.accumulation_weight(trainer)`); leaving it
            unset with `num_items` raises.

    With moe-peft adapters `outputs.router_loss` is added with that weight: in a mixed batch each adapter's part of
    it back-propagates as that adapter's own router loss (multi_lora/moe.py), the gradient it gets alone.
    """
    if isinstance(outputs, torch.Tensor):
        logits, router_loss = outputs, None
    elif isinstance(outputs, dict):  # transformers' ModelOutput
        logits, router_loss = outputs["logits"], outputs.get("router_loss")
    else:  # return_dict=False: the tuple's first tensor (no labels were passed)
        logits, router_loss = outputs[0], None
    selection = AdapterSelection(adapter_names)
    if len(selection) != logits.shape[0]:
        raise ValueError(
            f"per_adapter_loss: adapter_names has {len(selection)} entries for a batch of {logits.shape[0]} samples."
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]  # [B, S-1, V], [B, S-1]
    labels = labels.to(logits.device)
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)  # [B, S-1]
    num_slots = len(selection.adapters) + 1  # the last slot collects "__base__" samples
    slot = torch.where(selection.index >= 0, selection.index, num_slots - 1).to(logits.device)  # [B]
    sums = token_loss.new_zeros(num_slots).index_add(0, slot, token_loss.sum(1))  # [N + 1]
    counts = token_loss.new_zeros(num_slots).index_add(0, slot, (labels != -100).sum(1).to(token_loss.dtype))
    means = sums / counts.clamp_min(1)  # an adapter whose samples have no label token contributes 0
    if num_items is None:
        total = means[:-1].sum()
    else:
        window = torch.tensor([float(num_items.get(a, 0)) for a in selection.adapters], device=sums.device)
        total = (sums[:-1] / window.clamp_min(1)).sum()
    if router_loss is not None:
        if router_loss_weight is None:
            if num_items is not None:
                raise ValueError(
                    "per_adapter_loss: with num_items (a loss normalized over the accumulation window), pass "
                    "router_loss_weight=1/N for N accumulated micro-batches (moe_peft.accumulation_weight(trainer) in "
                    "a Trainer), or the router loss would count N times."
                )
            router_loss_weight = 1.0
        total = total + router_loss.to(total.dtype) * router_loss_weight
    report = {a: means[i].detach() for i, a in enumerate(selection.adapters)}
    if counts[-1] > 0:
        report[BASE] = means[-1].detach()
    return total, report


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """Every parameter that belongs to `adapter` (LoRA A/B, moe-peft experts and routers, modules_to_save)."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    params: dict[int, nn.Parameter] = {}
    for module in _tuner(model).model.modules():
        if isinstance(module, BaseTunerLayer):
            containers = [getattr(module, n, None) for n in module.adapter_layer_names]
        elif isinstance(module, AuxiliaryTrainingWrapper):
            containers = [getattr(module, "modules_to_save", None)]
        else:
            continue
        for container in containers:
            if container is None or adapter not in container:
                continue
            item = container[adapter]
            for p in item.parameters() if isinstance(item, nn.Module) else [item]:
                params[id(p)] = p
    return list(params.values())


@torch.no_grad()
def clip_grad_norm_per_adapter(
    model: nn.Module, max_norm: float, adapters: Optional[Sequence[str]] = None
) -> dict[str, torch.Tensor]:
    """Clip each adapter's gradient to `max_norm` on its own (as `clip_grad_norm_` when it trains alone).
    Returns the pre-clip norm of each adapter that has a gradient."""
    tuner = _tuner(model)
    norms = {}
    for adapter in adapters if adapters is not None else list(tuner.peft_config):
        params = [p for p in adapter_parameters(model, adapter) if p.grad is not None]
        if params:
            norms[adapter] = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norms


def save_adapters(
    model: nn.Module, output_dir: str, adapters: Optional[Sequence[str]] = None, **save_kwargs: Any
) -> dict[str, str]:
    """Save each adapter to `output_dir/<adapter>/` (adapter_config.json + adapter_model.safetensors), each
    loadable alone with `PeftModel.from_pretrained(base, output_dir/<adapter>)`. Returns {adapter: directory}."""
    tuner = _tuner(model)
    names = list(tuner.peft_config) if adapters is None else list(adapters)
    unknown = sorted(set(names) - set(tuner.peft_config))
    if unknown:
        raise ValueError(f"save_adapters(adapters=...): {unknown} not loaded; loaded: {sorted(tuner.peft_config)}.")
    saved = {}
    for name in names:
        # PeftModel.save_pretrained writes a non-default adapter to <dir>/<name>, "default" to <dir> itself
        root = os.path.join(output_dir, name) if name == "default" else output_dir
        with staged_adapter(root) as tmp:  # PEFT's LoRA saves in place: publish it whole, its config last
            model.save_pretrained(tmp, selected_adapters=[name], **save_kwargs)
        saved[name] = os.path.join(output_dir, name)
    return saved
