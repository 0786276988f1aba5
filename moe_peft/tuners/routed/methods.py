"""What differs between methods: the expert bank's shape, the router, and the loss terms.

A method is a router plus a loss, not a new layer: the layer (layer.py) and the op (ops/) are shared.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...routing import DenseRouter, Routing, SMoRARouter, TopKRouter, losses, sequence
from ...routing.context import RoutingContext
from .config import LoRAMoEConfig, MoELoraConfig, MoLEConfig, SMoRAConfig


def expert_bank_shape(config: MoELoraConfig, plain: bool = False) -> tuple[int, int]:
    """(number of experts E, rank of each expert r) of the stacked A [E, r, in] / B [E, out, r]; a plain LoRA
    module (MoLEConfig.plain_lora_modules) holds one expert."""
    if plain:
        return 1, config.r
    if isinstance(config, SMoRAConfig):
        return config.r, 1  # every rank is a rank-1 expert
    return config.num_experts, config.r


def build_router(config: MoELoraConfig, in_features: int) -> nn.Module:
    if isinstance(config, MoLEConfig):
        return TopKRouter(
            in_features,
            config.num_experts,
            config.top_k,
            bias=config.router_bias,
            num_null_experts=config.num_null_experts,
            top_p=config.top_p,
            top1_weight=config.top1_weight,
            eval_routing=config.eval_routing,
            group_sizes=config.group_sizes,
            init_std=config.router_init_std,
        )
    if isinstance(config, LoRAMoEConfig):
        return DenseRouter(in_features, config.num_experts, init_std=config.router_init_std)
    if isinstance(config, SMoRAConfig):
        return SMoRARouter(in_features, config.r, config.top_k, init_std=config.router_init_std)
    raise TypeError(f"No router for config type {type(config).__name__}.")


def router_frozen(config: MoELoraConfig) -> bool:
    """router_lr_ratio=0: the adapter's routers stay at their initialization. Enforced in the forward (the routers
    read their weights detached), so that it holds under any optimizer, with weight decay and the router losses."""
    return getattr(config, "router_lr_ratio", 1.0) == 0


def route(config: MoELoraConfig, router: nn.Module, x: torch.Tensor, lead_shape: torch.Size, ctx: RoutingContext):
    """Route the tokens x [T, in] (leading dims lead_shape) with `router`; with modality groups (MoLEConfig.
    modality_experts) each token's group comes from the routing context (docs/methods.md); with
    routing_level="sequence" each sequence is routed once and its tokens carry the decision (`route_sequences`).
    Every router call of the token-routed methods goes through here (block routers, mixed batches, export), so
    that a frozen router (`router_frozen`) is frozen on every path."""
    if getattr(config, "routing_level", "token") == "sequence":
        return route_sequences(config, router, x, lead_shape, ctx)
    frozen = router_frozen(config)
    groups = getattr(config, "modality_experts", None)
    if not groups:
        return router(x, frozen=frozen)
    return router(x, ctx.token_groups(tuple(groups), lead_shape).to(x.device), frozen=frozen)  # groups: [T] long


def route_sequences(
    config: MoELoraConfig, router: nn.Module, x: torch.Tensor, lead_shape: torch.Size, ctx: RoutingContext
) -> Routing:
    """routing_level="sequence" (routing/sequence.py, docs/methods.md): pool each sequence's prompt states (the
    router's own input x [T, in], or with router_input_layer the frozen base's layer output held on the context),
    route the N pooled states once, and give every token its sequence's decision. A later generation step reuses
    the decision stored at the prompt."""
    if len(lead_shape) != 2:
        raise ValueError(
            f"routing_level='sequence' routes each sample of a [batch, seq] input, but a routed layer got tokens of "
            f"shape {tuple(lead_shape)}; adapt only the language model's layers (never a vision tower)."
        )
    batch, seq = lead_shape
    if ctx.sequence_continues:
        stored = ctx.sequence_decisions.get(router)
        if stored is None or stored.idx.shape[0] != batch:
            have = None if stored is None else stored.idx.shape[0]
            raise ValueError(
                f"routing_level='sequence': this forward continues a KV cache (or is a later step of generate()), so "
                f"its {batch} rows must reuse the routing chosen at their prompt, but the router holds "
                f"{'none' if have is None else f'{have} rows'}. Call model.generate(...), or run the prompt through "
                "the model (without a cache) before the steps that continue it, with the same batch."
            )
        rows = torch.arange(batch, device=x.device)  # [B]: one sequence per row in generation
        token_decision = rows.repeat_interleave(seq)  # [T]
        valid = torch.ones(batch, dtype=torch.bool, device=x.device)
        return sequence.expand(
            stored, token_decision, sequence.SequenceRouting(stored, token_decision, valid, rows, False)
        )
    prompt = ctx.sequence_prompt
    if prompt is None or prompt.shape[0] != batch or prompt.shape[1] != seq:
        raise ValueError(
            f"routing_level='sequence' needs each token's sequence and prompt for the layer's [batch, seq] = "
            f"{tuple(lead_shape)} tokens, but the forward gave {None if prompt is None else tuple(prompt.shape)}; call "
            "the model through the PeftModel (its root pre-hook finds them) and adapt only the language model."
        )
    prompt = prompt.to(x.device)
    plan = _cached(
        ctx, ("plan", id(prompt)), prompt, lambda: sequence.sequence_plan(ctx.sequence_starts.to(x.device), prompt)
    )
    layer = getattr(config, "router_input_layer", None)
    if layer is None:
        pooled = sequence.pool(x.reshape(batch, seq, -1), prompt, plan, config.sequence_pooling)  # [T, in] -> [N, in]
    else:
        held = ctx.router_states
        if held is None or layer not in ctx.router_state_layers or held.shape[:2] != (batch, seq):
            raise RuntimeError(
                f"router_input_layer={layer}: the hidden states of decoder layer {layer} were not computed for this "
                "forward; call the model through the PeftModel (its root pre-hook runs the pre-pass)."
            )
        states = held[:, :, ctx.router_state_layers.index(layer)].to(x.device)  # [B, S, L, d] -> [B, S, d]
        # every router of the adapter pools the same states: once per forward (and per mixed-batch view)
        key = ("pooled", id(held), id(prompt), layer, config.sequence_pooling)
        pooled = _cached(ctx, key, (held, prompt), lambda: sequence.pool(states, prompt, plan, config.sequence_pooling))
    ctx.router_call.update(rows=plan.rows, valid=plan.valid)  # for hooks on the router (the statistics probe)
    try:
        decisions = router(pooled.to(x.device), frozen=router_frozen(config))  # the N sequences: idx, weights [N, k]
    finally:
        ctx.router_call.clear()
    if plan.num == batch:  # one sequence per row (no packing): what a later generation step reuses
        ctx.sequence_decisions[router] = sequence.detached(decisions)
    token_decision = plan.segment.reshape(-1)  # [B, S] -> [T]
    seqs = sequence.SequenceRouting(decisions, token_decision, plan.valid, plan.rows, True)
    return sequence.expand(decisions, token_decision, seqs)


def _cached(ctx: RoutingContext, key, keep, compute):
    """A value computed once per forward and shared by the routers (the sequence plan, pooled layer states); the
    entry holds `keep` so that the ids in its key stay those of live tensors."""
    found = ctx.sequence_cache.get(key)
    if found is None:
        found = ctx.sequence_cache[key] = (keep, compute())
    return found[1]


def plain_routing(num_tokens: int, device: torch.device) -> Routing:
    """A plain LoRA module's routing: its one expert with weight 1 for every token (no router, no loss)."""
    idx = torch.zeros(num_tokens, 1, dtype=torch.long, device=device)  # [T, 1]
    ones = torch.ones(num_tokens, 1, device=device)  # [T, 1] float32
    return Routing(idx=idx, weights=ones, logits=ones, probs=ones, choice=idx)


def is_mergeable(config: MoELoraConfig) -> bool:
    """A routed adapter is one fixed LoRA only when a single expert always gets weight exactly 1."""
    if isinstance(config, SMoRAConfig):
        return False
    return config.num_experts == 1 and getattr(config, "num_null_experts", 0) == 0


@dataclass
class RouterRecord:
    """One routed layer's statistics from the latest forward (detached, for logging)."""

    forward_id: int
    loss: Optional[torch.Tensor]  # weighted sum of this layer's router losses (0-d), None in eval
    load: torch.Tensor  # [E] fraction of (token, slot) picks per real expert
    null_fraction: float  # fraction of (token, slot) pairs that hit a null expert (FLOPs saved)
    counts: torch.Tensor  # [E] picks per real expert (SMoRA's bias update reads these)
    num_tokens: int
    experts_per_token: torch.Tensor  # 0-d, mean number of real experts per routed (non-padding) token
    # modality groups (MoMa): name -> (load [n_g], the fraction of the group's (token, slot) picks per expert of
    # the group; tokens, 0-d, the group's non-padding tokens); None without groups
    groups: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None
    # the loss with its graph, from a forward run with grad enabled; the tuner takes it (and clears it)
    graph_loss: Optional[torch.Tensor] = None
    # routing_level="sequence": the rows counted above are sequences (one decision each), num_tokens their number
    sequences: bool = False


def _masked(routing: Routing, mask: Optional[torch.Tensor]) -> Routing:
    if mask is None:
        return routing
    return Routing(
        idx=routing.idx[mask],
        weights=routing.weights[mask],
        logits=routing.logits[mask],
        probs=routing.probs[mask],
        choice=None if routing.choice is None else routing.choice[mask],
        groups=None if routing.groups is None else routing.groups[mask],
    )


def router_loss_and_stats(
    config: MoELoraConfig,
    routing: Routing,
    lead_shape: torch.Size,
    ctx: RoutingContext,
    num_experts: int,
    training: bool,
    where: str = "a routed layer",
) -> tuple[Optional[torch.Tensor], Optional[RouterRecord]]:
    """Weighted router losses of one layer (padding excluded) and its statistics.

    Tokens whose router logits are not finite (NaN or inf hidden states: an fp16 overflow, a NaN in the input) are
    left out of both, with a warning that names the layer: a NaN would otherwise poison the balance loss, and SMoRA's
    counts would count whatever expert top-k picked among NaNs. (Routers compute in float32, so fp16 activations
    alone do not overflow the logits.)

    With routing_level="sequence" the rows are the forward's sequences, each counted once (its decision), not its
    tokens: the losses and statistics below act on the N decisions of the sequences that have a prompt token
    (docs/methods.md, "Sequence-level routing"). A later generation step that reuses the decisions of its prompt
    makes none: (None, None), and the layer keeps the prompt's record.
    """
    seqs = routing.sequences
    if seqs is not None:
        if not seqs.fresh:
            return None, None
        routing, mask = seqs.decisions, seqs.valid  # [N, ...] decisions, [N] bool
        lead_shape = torch.Size((mask.shape[0], 1))  # [N, 1]: a decision is a one-token "sample" for the LBC below
    else:
        mask = ctx.token_mask(lead_shape)  # [T] or None
    finite = torch.isfinite(routing.logits)  # [T, E]
    group_sizes = getattr(config, "group_sizes", None)
    if group_sizes is not None and routing.groups is not None:
        # modality groups: the router set the logits of the experts outside each token's group to -inf on purpose;
        # only the token's own group's logits tell a non-finite input
        expert_group = torch.repeat_interleave(
            torch.arange(len(group_sizes), device=finite.device), torch.tensor(group_sizes, device=finite.device)
        )  # [E]
        finite = finite | (expert_group.unsqueeze(0) != routing.groups.unsqueeze(1))  # [1, E] vs [T, 1] -> [T, E]
    finite = finite.all(dim=-1)  # [T]
    counted = finite if mask is None else finite | ~mask  # padding may be anything: it is excluded anyway
    if not bool(counted.all()):  # one host sync; the statistics below sync anyway
        bad = int((~counted).sum())
        warnings.warn(
            f"{where}: {bad} token(s) reach the router with NaN or inf logits (non-finite hidden states or input); "
            "they are left out of this forward's routing statistics and router losses.",
            stacklevel=3,
        )
        mask = finite if mask is None else mask & finite
    r = _masked(routing, mask)
    num_tokens = r.idx.shape[0]
    valid = r.idx >= 0
    counts = torch.bincount(r.idx[valid], minlength=num_experts)[:num_experts]  # [E]
    picks = max(r.idx.numel(), 1)
    record = RouterRecord(
        forward_id=ctx.forward_id,
        loss=None,
        load=(counts.float() / picks).detach(),
        null_fraction=float((~valid).sum()) / picks if getattr(config, "num_null_experts", 0) else 0.0,
        counts=counts.detach(),
        num_tokens=num_tokens,
        experts_per_token=valid.sum() / max(num_tokens, 1),  # top-p and null experts make it vary
        sequences=seqs is not None,
    )
    if group_sizes is not None and r.groups is not None:
        record.groups = _group_stats(config.modality_experts, counts, r.groups, r.idx.shape[1])
    if not training or num_tokens == 0:
        return None, record

    terms = []
    if config.router_aux_loss_coef > 0:
        if group_sizes is not None:  # within each group, over its tokens (docs/methods.md, modality groups)
            balance = losses.grouped_switch_balance(r.probs, r.choice, r.groups, group_sizes)
        else:
            balance = losses.switch_balance(r.probs, r.choice, getattr(config, "num_null_experts", 0))
        terms.append(config.router_aux_loss_coef * balance)
    if config.router_z_loss_coef > 0:
        terms.append(config.router_z_loss_coef * losses.z_loss(r.logits))
    if isinstance(config, MoLEConfig) and config.router_entropy_loss_coef > 0:
        terms.append(config.router_entropy_loss_coef * losses.entropy(r.probs[:, : config.num_experts]))
    if isinstance(config, LoRAMoEConfig) and config.blc_weight > 0 and ctx.sample_types is not None:
        if seqs is not None and seqs.rows.shape[0] != ctx.sample_types.shape[0]:
            raise ValueError(
                f"LoRAMoE's localized balancing reads one sample_types entry per row, but routing_level='sequence' "
                f"found {seqs.rows.shape[0]} packed sequences in {ctx.sample_types.shape[0]} rows, so a row's type "
                "does not tell each sequence's; train without packing, or with blc_weight=0."
            )
        if len(lead_shape) == 2 and ctx.sample_types.shape[0] == lead_shape[0]:
            token_mask = (
                mask.view(lead_shape)
                if mask is not None
                else torch.ones(lead_shape, dtype=torch.bool, device=routing.weights.device)
            )
            weights = routing.weights.view(*lead_shape, -1)  # [T, N] -> [B, S, N]
            weights = torch.where(token_mask.unsqueeze(-1), weights, 0.0)  # a NaN times a 0 mask would stay NaN
            types = ctx.sample_types.to(weights.device)
            lbc = losses.localized_balance(weights, token_mask, types, config.blc_alpha, config.blc_form)
            terms.append(config.blc_weight * lbc)
    if not terms:
        return None, record
    loss = torch.stack(terms).sum()
    record.loss = loss.detach()
    return loss, record


def _group_stats(
    modality_experts: dict[str, int], counts: torch.Tensor, groups: torch.Tensor, slots: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per modality group: (load [n_g] over the group's (token, slot) picks, number of tokens) from the layer's
    expert counts [E] and the non-padding tokens' groups [T]."""
    tokens = torch.bincount(groups, minlength=len(modality_experts))  # [G]
    stats, offset = {}, 0
    for g, (name, size) in enumerate(modality_experts.items()):  # a loop over groups (2-3), not experts
        load = counts[offset : offset + size].float() / (tokens[g] * slots).clamp_min(1)  # [n_g]
        stats[name] = (load.detach(), tokens[g].detach())
        offset += size
    return stats
