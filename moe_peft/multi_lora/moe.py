"""Several moe-peft adapters of one method in a mixed batch: each sample routed by its own adapter's router to
its own adapter's experts, all adapters' experts applied by one call of the op.

    bank = [experts of a_1 | experts of a_2 | ...]          A [sum E_a, r_max, in], B [sum E_a, out, r_max]
    idx[t, j] = offset(a) + idx_a[t, j],   w[t, j] = scaling_a * w_a[t, j]      for a token t of a sample of a

So a sample only ever reaches its adapter's slice of the bank; top-k may differ between adapters (slots
beyond an adapter's k are null, -1), and so may E, r (zero-padded, bank.py), alpha, null experts, top-p.

Routers run per adapter on that adapter's samples only (a loop over the adapters in the batch, not over
experts): each adapter's router losses and statistics are then those of training it alone on its samples,
padding excluded (the routing context is cut to those rows). The losses are recorded on the layers and
collected by the tuner like any other. The tuner's `router_loss` is their mean over every routed
(layer, adapter) pair of the forward, while alone an adapter's is the mean over its own routed layers, and
adapters may route different numbers of layers (block vs linear routers, other target modules). So each
adapter's loss passes through `_OwnMeanGradient`, which in backward rescales its gradient by
(pairs in the forward) / (the adapter's pairs): every adapter's routers then get exactly the router-loss
gradient they get when the adapter trains alone.

Called from the routed layer (`MoELoraLinear.route_block` and `forward`) when the routing context carries an
`adapter_selection`, through the hook registered at the end of this module (the layer does not import this one).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .._internal.quantized import dense_linear
from ..ops import apply_lora_experts, linear_lora_experts
from ..routing import Routing
from ..routing.context import MixedBatchHook, attach_router_loss, set_mixed_batch_hook
from ..tuners.routed.methods import plain_routing, route, router_loss_and_stats
from .bank import layer_bank
from .selection import AdapterSelection, dropout_p, per_sample_dropout

_SELECTED = "_multi_lora_block_routing"  # on a block's router owner: {adapter: (rows, Routing)} of this forward


def _as_batch(layer, x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 2:
        raise ValueError(f"adapter_names needs a batch dimension; {type(layer).__name__} got shape {tuple(x.shape)}.")
    return x.reshape(x.shape[0], -1, x.shape[-1])  # [B, ..., in] -> [B, S, in]


def _sub_context(ctx, rows: torch.Tensor, batch: int):
    """The routing context restricted to `rows` of the batch: every per-sample tensor of it (attention mask,
    sample types, ...) cut to those rows, so padding and per-sample terms stay right."""
    sub = copy.copy(ctx)
    for name, value in vars(ctx).items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            setattr(sub, name, value.index_select(0, rows.to(value.device)))  # [B, ...] -> [b_a, ...]
    return sub


class _OwnMeanGradient(torch.autograd.Function):
    """Identity on one adapter's router loss in one layer; in backward, its gradient times P / P_a, P the routed
    (layer, adapter) pairs with a loss in this forward and P_a the adapter's own (known only once the forward
    is over, hence in backward). Checkpoint recomputation adds no pair: the set is keyed by layer and adapter."""

    @staticmethod
    def forward(ctx, loss, selection, adapter):
        ctx.selection, ctx.adapter = selection, adapter
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        pairs = ctx.selection.router_loss_pairs
        own = sum(1 for _, adapter in pairs if adapter == ctx.adapter)
        return grad * (len(pairs) / max(own, 1)), None, None


def _route(
    layer, adapter: str, x3: torch.Tensor, rows: torch.Tensor, selection: AdapterSelection
) -> tuple[Routing, Optional[torch.Tensor]]:
    """Route the samples `rows` of `x3 [B, S, in]` with the adapter's router; record its losses on `layer`."""
    x_a = x3.index_select(0, rows)  # [B, S, in] -> [b_a, S, in]
    lead_shape = x_a.shape[:-1]
    if adapter in layer.plain_adapters:  # one plain LoRA here: weight 1, no router, no loss
        return plain_routing(x_a.shape[0] * x_a.shape[1], x_a.device), None
    ctx = _sub_context(layer._routing_ctx, rows, x3.shape[0])
    x_flat = x_a.reshape(-1, x_a.shape[-1])  # [b_a, S, in] -> [b_a*S, in]
    # the router's hooks (the statistics probe) read which rows of the batch its b_a*S tokens come from
    layer._routing_ctx.router_rows = rows
    try:
        routing = route(layer.configs[adapter], layer.routers[adapter], x_flat, lead_shape, ctx)  # idx, w [b_a*S, k_a]
    finally:
        layer._routing_ctx.router_rows = None
    num_experts = layer.experts_A[adapter].shape[0]
    loss, record = router_loss_and_stats(
        layer.configs[adapter], routing, lead_shape, ctx, num_experts, layer.training, layer.module_name
    )
    if record is not None:  # None: a later generation step reusing its prompt's sequence decisions (keeps that record)
        layer.router_records[adapter] = record
    if loss is None:
        return routing, None
    selection.router_loss_pairs.add((id(layer), adapter))
    return routing, _OwnMeanGradient.apply(loss, selection, adapter)


def _sum(losses: list[torch.Tensor]) -> Optional[torch.Tensor]:
    losses = [loss for loss in losses if loss is not None]
    return None if not losses else torch.stack(losses).sum()


def route_block(layer, hidden: torch.Tensor, selection: AdapterSelection) -> Optional[torch.Tensor]:
    """The block pre-hook's call on a router owner: route each selected adapter whose block router it owns."""
    if layer.disable_adapters or layer.merged:
        return None
    x3 = _as_batch(layer, hidden)
    where = type(layer).__name__
    routed, losses = {}, []
    for adapter in selection.adapters:
        if not layer._owns_block_router(adapter):
            continue
        rows = selection.rows(adapter, x3.shape[0], x3.device, where)
        routing, loss = _route(layer, adapter, x3, rows, selection)
        routed[adapter] = (rows, routing)
        losses.append(loss)
    layer.__dict__[_SELECTED] = routed
    return _sum(losses)


def forward(layer, x: torch.Tensor, selection: AdapterSelection, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`MoELoraLinear.forward` for a mixed batch: base + every sample's adapter's routed experts, one op call."""
    in_batch = [a for a in selection.adapters if a in layer.experts_A]
    if layer.disable_adapters or layer.merged or not in_batch or x.numel() == 0:
        return layer.base_layer(x, *args, **kwargs)
    x3 = _as_batch(layer, x)
    batch, seq = x3.shape[:2]
    where = type(layer).__name__
    routed, losses = {}, []
    for adapter in in_batch:
        if layer.configs[adapter].router_granularity == "linear" or adapter in layer.plain_adapters:
            rows = selection.rows(adapter, batch, x.device, where)
            routing, loss = _route(layer, adapter, x3, rows, selection)
            routed[adapter] = (rows, routing)
            losses.append(loss)
        else:
            owner = layer._router_owner.get(adapter)
            found = None if owner is None else owner.__dict__.get(_SELECTED, {}).get(adapter)
            if found is None or found[1].idx.shape[0] != found[0].numel() * seq:
                raise RuntimeError(
                    f"Adapter '{adapter}' routes per block, but its block router did not route this mixed batch; call "
                    "the model through the PeftModel (not the bare linear), or use router_granularity='linear'."
                )
            routed[adapter] = found

    trains = torch.is_grad_enabled() and any(
        p.requires_grad for a in in_batch for p in (layer.experts_A[a], layer.experts_B[a])
    )
    names = in_batch if trains else list(layer.experts_A.keys())  # bank.py: why only the batch's when training
    lora_A, lora_B = layer_bank(layer, names, lambda a: (layer.experts_A[a], layer.experts_B[a]), trains)
    idx, weights = _combined_routing(layer, names, routed, batch, seq)  # [T, k_max] each

    p_drop = None
    if layer.training:
        probs = tuple(dropout_p(layer.dropouts[a]) for a in names)
        if any(probs):
            p_drop = selection.local(tuple(names), probs, batch, x.device, where)[1]  # [B]
    backend = layer.configs[in_batch[0]].kernel_backend
    x_flat = x3.reshape(batch * seq, -1)  # [B, S, in] -> [T, in]
    base = layer.base_layer
    owns_base = dense_linear(base, args, kwargs)  # a quantized base runs its own forward (moe_peft/qlora)
    if owns_base and p_drop is None:
        result = linear_lora_experts(x_flat, base.weight, base.bias, lora_A, lora_B, idx, weights, 1.0, backend)
    else:
        x_lora = per_sample_dropout(x3, p_drop).reshape(batch * seq, -1)  # [T, in]
        if owns_base:
            result = F.linear(x_flat, base.weight, base.bias)  # [T, out]
            result = apply_lora_experts(x_lora, lora_A, lora_B, idx, weights, 1.0, backend, out=result)
        else:
            result = base(x, *args, **kwargs).reshape(batch * seq, -1)  # [..., out] -> [T, out]
            delta = apply_lora_experts(x_lora, lora_A, lora_B, idx, weights, 1.0, backend)
            result = result + delta.to(result.dtype)
    result = result.view(*x.shape[:-1], result.shape[-1])  # [T, out] -> [..., out]
    return attach_router_loss(result, _sum(losses), layer._routing_ctx)


def _combined_routing(layer, names: list[str], routed: dict, batch: int, seq: int):
    """(idx [T, k_max] into the bank of `names`, weights [T, k_max] times each adapter's scaling); rows of
    samples without an adapter in this layer get -1 / 0 (base output only)."""
    k_max = max(r.idx.shape[1] for _, r in routed.values())
    device = next(iter(routed.values()))[1].idx.device
    idx = torch.full((batch, seq, k_max), -1, dtype=torch.long, device=device)  # [B, S, k]
    weights = torch.zeros(batch, seq, k_max, device=device)  # [B, S, k] float32, as routers return
    offset = 0
    for name in names:
        num_experts = layer.experts_A[name].shape[0]
        if name in routed:
            rows, routing = routed[name]
            k = routing.idx.shape[1]
            idx_a = torch.where(routing.idx >= 0, routing.idx + offset, -1)  # [b_a*S, k_a] into the bank
            idx_a = F.pad(idx_a, (0, k_max - k), value=-1).view(rows.numel(), seq, k_max)  # -> [b_a, S, k_max]
            w_a = F.pad(routing.weights.float() * layer.scalings[name], (0, k_max - k))  # [b_a*S, k_max]
            idx.index_copy_(0, rows, idx_a)
            weights = weights.index_copy(0, rows, w_a.view(rows.numel(), seq, k_max))  # out of place: autograd
        offset += num_experts
    return idx.view(batch * seq, k_max), weights.view(batch * seq, k_max)  # [B, S, k] -> [T, k]


set_mixed_batch_hook(MixedBatchHook(route_block=route_block, forward=forward))
