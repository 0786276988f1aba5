"""Per-batch routing inputs shared by a tuner and its layers, and the plumbing that makes router losses
reach the gradient in every training setup.

A forward run with gradients enabled reports each routed layer's weighted loss with its own graph:
`outputs.router_loss` (and `moe_peft.router_loss(model)`) is their mean over the routed layers, and
`router_loss.backward()` on its own reaches the routers.

Under reentrant gradient checkpointing (`use_reentrant=True`, the default of many stacks) the first
forward runs under `no_grad`, so a layer's loss has no graph then; the layer is recomputed in backward,
after the forward has returned. For those layers:

* the layer, recomputed, attaches its weighted loss to a tensor on the forward path with
  `attach_router_loss` (identity forward); in backward it hands the loss a gradient equal to the
  gradient that reached the reported router loss (`loss_grad_scale`);
* the tuner reports `router_loss = value + probe`, where `probe` is a zero-valued scalar whose backward
  records d(total)/d(router_loss) into the context. It runs first in backward (highest sequence
  number), so gradient accumulation's 1/N and fp16 loss scaling apply to these losses as to the others.
  This path needs a total loss whose backward runs through the model (the task loss does).

A loss that does not include `router_loss` gives the routers no auxiliary gradient at all.
"""

from __future__ import annotations

from typing import Optional

import torch


class RoutingContext:
    """What the current batch tells the layers: padding mask, sample types, and the loss gradient scale.

    One object per tuner; the tuner fills it at each forward and keeps it until the next one, because
    reentrant checkpointing recomputes layers during backward, after the forward has returned.
    """

    def __init__(self):
        self.attention_mask: Optional[torch.Tensor] = None  # [B, S_total]
        self.sample_types: Optional[torch.Tensor] = None  # [B]
        self.loss_grad_scale: Optional[torch.Tensor] = None  # 0-d, set in backward by the probe
        self.forward_id: int = 0
        # True between the root model's pre-hook and its forward hook: a layer run then (with grad enabled)
        # reports its loss with its graph; one run outside (a reentrant checkpoint recompute) attaches it
        self.in_forward: bool = False
        self.last_router_loss: Optional[torch.Tensor] = None  # the latest forward run with grad enabled
        self.sticky_sample_types: Optional[torch.Tensor] = None  # held for every step of a generate() call
        # per-sample adapters of a mixed batch (`adapter_names`), set by moe_peft.multi_lora's root pre-hook
        self.adapter_selection = None

    def start_forward(self, attention_mask=None, sample_types=None) -> None:
        self.attention_mask = padding_mask(attention_mask)
        self.sample_types = sample_types
        self.loss_grad_scale = None
        self.forward_id += 1
        self.in_forward = True

    def token_mask(self, lead_shape: torch.Size) -> Optional[torch.Tensor]:
        """Flattened [T] bool mask of non-padding tokens for a layer input with leading dims lead_shape.

        With a KV cache the layers see only the last S positions of the [B, S_total] mask.
        Returns None (all tokens count) when no mask applies to this shape: no mask, or a layer whose input
        is not the text sequence (e.g. a vision tower's [images, patches]).
        """
        mask = self.attention_mask
        if mask is None or len(lead_shape) != 2:
            return None
        batch, seq = lead_shape
        if mask.shape[0] != batch or mask.shape[1] < seq:
            return None
        return mask[:, -seq:].reshape(-1)  # [B, S] -> [T]


def padding_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The [B, S] bool mask of real (non-padding) tokens carried by a forward's `attention_mask`.

    [B, S] (the usual padding mask): nonzero is a real token. [B, Sq, Sk] or [B, H, Sq, Sk] (a custom or packed
    attention mask, as transformers accepts): a query token is real when it attends to itself, its diagonal
    entry (key Sk - Sq + i for query i, so a KV cache works) being True, nonzero for an integer mask, or not
    masked (above half the dtype's minimum) for an additive float mask; padding rows must be fully masked.
    Any other shape raises: silently counting padding in the router statistics is not an option.
    """
    if attention_mask is None:
        return None
    mask = attention_mask
    if mask.dim() == 2:
        return mask.bool()
    if mask.dim() not in (3, 4):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}; moe_peft reads the padding from a [batch, seq] mask "
            "(or a [batch, seq, seq] / [batch, heads, seq, seq] attention mask): pass one of those."
        )
    if mask.dim() == 4:
        mask = mask[:, 0]  # [B, H, Sq, Sk] -> [B, Sq, Sk]: the heads share the padding
    queries, keys = mask.shape[-2], mask.shape[-1]
    diag = torch.diagonal(mask, offset=keys - queries, dim1=-2, dim2=-1)  # [B, Sq]: query i vs its own key
    if diag.dtype == torch.bool:
        return diag
    if diag.dtype.is_floating_point:
        return diag > torch.finfo(diag.dtype).min / 2  # additive: 0 attends, -inf or the minimum masks
    return diag != 0


class _AttachRouterLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, loss, routing_ctx):
        ctx.routing_ctx = routing_ctx
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        scale = ctx.routing_ctx.loss_grad_scale
        return grad, (None if scale is None else scale.to(torch.float32).reshape(())), None


class _RouterLossProbe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, routing_ctx, num_layers):
        ctx.routing_ctx, ctx.num_layers = routing_ctx, num_layers
        return torch.zeros((), dtype=torch.float32, device=anchor.device)

    @staticmethod
    def backward(ctx, grad):
        # router_loss = mean over layers of each layer's weighted loss: each gets 1 / num_layers of it
        ctx.routing_ctx.loss_grad_scale = grad.detach() / ctx.num_layers
        return None, None, None


def attach_router_loss(hidden: torch.Tensor, loss: Optional[torch.Tensor], routing_ctx: RoutingContext) -> torch.Tensor:
    """Identity on `hidden`; in backward, `loss` receives the router-loss gradient scale."""
    if loss is None or not loss.requires_grad or not torch.is_grad_enabled():
        return hidden
    return _AttachRouterLoss.apply(hidden, loss, routing_ctx)


def router_loss_probe(anchor: torch.Tensor, routing_ctx: RoutingContext, num_layers: int) -> torch.Tensor:
    """A zero-valued scalar connected to the graph through `anchor` (any trainable parameter)."""
    return _RouterLossProbe.apply(anchor, routing_ctx, num_layers)
