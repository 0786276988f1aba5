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

import weakref
from collections.abc import Callable
from typing import NamedTuple, Optional

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
        # per-sample adapters of a mixed batch (`adapter_names`), set by moe_peft.multi_lora's root pre-hook; while
        # it is set, the routed layers hand their forward to the mixed-batch hook (`mixed_batch_hook`)
        self.adapter_selection = None
        # while a mixed batch runs one adapter's router on that adapter's samples only: those rows of the batch [b_a]
        # (long), so that what reads the router's [b_a * S] decisions (moe_peft.stats' probe) finds their padding and
        # their samples; None: the router sees every row of the batch
        self.router_rows: Optional[torch.Tensor] = None
        # token modality for modality expert groups (MoLEConfig.modality_experts), for this forward's input
        # positions: user-given group indices (`token_types`, -1 = a token generate() added: text), or the image
        # tokens of a LLaVA-family model's input_ids
        self.token_types: Optional[torch.Tensor] = None  # [B, S] long
        self.image_tokens: Optional[torch.Tensor] = None  # [B, S] bool
        self.sticky_token_types: Optional[torch.Tensor] = None  # [B, P] the prompt's, held for a generate() call
        # sequence-level routing (routing_level="sequence", routing/sequence.py), for this forward's positions. Per-row
        # tensors are plain attributes, so a mixed batch's per-adapter view (moe_peft.multi_lora) cuts them to its rows
        self.sequence_prompt: Optional[torch.Tensor] = None  # [B, S] bool, the tokens a sequence is routed from
        self.sequence_starts: Optional[torch.Tensor] = None  # [B, S] bool, the first token of each sequence
        self.sequence_continues: bool = False  # a later step of a generation: reuse the decisions of its prompt
        # router module -> its Routing of the prompt's [B] sequences (detached), reused by the later steps; weak keys,
        # so that a deleted adapter's router is not kept alive
        self.sequence_decisions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # router_input_layer: the frozen base's rms-normalized output of decoder layer router_state_layers[i], for
        # this forward's positions [B, S, L, d] float32 (a pre-pass under no_grad; tuners/routed/model.py)
        self.router_states: Optional[torch.Tensor] = None
        self.router_state_layers: tuple[int, ...] = ()
        self.sequence_cache: dict = {}  # per forward: sequence plans and pooled states shared by the routers
        # while a router routes pooled sequences: {"rows": [N] batch row, "valid": [N] bool} of its input rows, for
        # hooks that read the router's output (moe_peft.stats' probe); a dict, so a mixed batch's view shares it
        self.router_call: dict = {}
        self.generate_forwards: Optional[int] = None  # inside generate(): the forwards run so far; None outside

    def start_forward(
        self,
        attention_mask=None,
        sample_types=None,
        token_types=None,
        image_tokens=None,
        sequence_prompt=None,
        sequence_starts=None,
        sequence_continues: bool = False,
    ) -> None:
        self.attention_mask = padding_mask(attention_mask)
        self.sample_types = sample_types
        self.token_types, self.image_tokens = token_types, image_tokens
        self.sequence_prompt, self.sequence_starts = sequence_prompt, sequence_starts
        self.sequence_continues = sequence_continues
        self.router_states, self.router_state_layers = None, ()
        self.sequence_cache = {}
        self.loss_grad_scale = None
        self.forward_id += 1
        self.in_forward = True

    def token_groups(self, names: tuple[str, ...], lead_shape: torch.Size) -> torch.Tensor:
        """Each token's modality group [T] (an index into `names`, the adapter's modality_experts) for a layer
        input with leading dims lead_shape [B, S]; clear errors when the forward carries no modality or it does
        not line up with the layer's tokens."""
        if self.token_types is not None:
            types, source = self.token_types, "token_types"
        elif self.image_tokens is not None:
            if "text" not in names or "image" not in names:
                raise ValueError(
                    f"modality_experts names the groups {list(names)}; on a LLaVA-family model the token modality "
                    'comes from its image tokens, into the groups "text" and "image": name the groups so, or pass '
                    "token_types=<[batch, seq] group indices> to forward/generate."
                )
            text, image = names.index("text"), names.index("image")
            types, source = torch.where(self.image_tokens, image, text), "the image tokens of input_ids"
        else:
            raise ValueError(
                f"modality_experts={list(names)} routes every token within its modality group, but this forward "
                "carries no token modality: pass token_types=<LongTensor [batch, seq]> (indices into "
                "modality_experts, in its order) to forward() or generate(), or call a LLaVA-family model with "
                "input_ids (its image tokens are the image group)."
            )
        if len(lead_shape) != 2 or types.shape[0] != lead_shape[0] or types.shape[1] < lead_shape[1]:
            raise ValueError(
                f"the token modality ({source}) has shape {tuple(types.shape)}, which does not line up with the "
                f"tokens [batch, seq] = {tuple(lead_shape)} of a layer with modality groups. Adapt only the language "
                "model's layers (never a vision tower), and give one modality per input position."
            )
        types = types[:, -lead_shape[1] :]  # [B, S_given] -> [B, S]: the positions this layer sees
        text = names.index("text") if "text" in names else 0
        return torch.where(types < 0, text, types).reshape(-1)  # generated tokens (-1) are text; [B, S] -> [T]

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


class MixedBatchHook(NamedTuple):
    """How a routed layer runs a mixed batch, whose samples use different adapters (`adapter_names`).

    The routed layer (tuners/routed/layer.py) is below the capability that builds mixed batches (moe_peft.multi_lora)
    and must not import it; multi_lora registers these two functions when it is imported, and the layer calls them
    whenever its routing context carries an `adapter_selection` (which only multi_lora sets)."""

    route_block: Callable[..., Optional[torch.Tensor]]  # (layer, hidden [..., in], selection) -> loss or None
    forward: Callable[..., torch.Tensor]  # (layer, x [..., in], selection, *args, **kwargs) -> [..., out]


_mixed_batch_hook: Optional[MixedBatchHook] = None


def set_mixed_batch_hook(hook: MixedBatchHook) -> None:
    global _mixed_batch_hook
    _mixed_batch_hook = hook


def mixed_batch_hook() -> MixedBatchHook:
    if _mixed_batch_hook is None:  # a selection without multi_lora: someone set the attribute by hand
        raise RuntimeError(
            "the routing context carries an adapter_selection but moe_peft.multi_lora was never imported; enable "
            "mixed batches with moe_peft.multi_lora.enable(model)."
        )
    return _mixed_batch_hook


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
