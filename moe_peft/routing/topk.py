from __future__ import annotations

import torch
from torch import nn

from .base import Routing, float32_linear, new_router_linear


class TopKRouter(nn.Module):
    """Token-choice routing over LoRA experts: MoLE (top-1), MixLoRA-style top-k, null experts, top-p.

    p = softmax(R x + b) in float32 over n real experts (+ m null experts, AdaMoE: their logits come
    from a bias-free Linear(in, m) concatenated to the real ones).

    * top-1 (LLaVA-MoLE): weight = onehot(e*) - sg(p) + p ("straight_through": value 1, the gradient
      reaches the router) or p ("prob", Switch Transformer).
    * top-k, k > 1 (Mixtral, MixLoRA): weights = p renormalized over the chosen experts.
    * null experts: picks of a null expert become index -1 (zero output, zero FLOPs); weights are
      renormalized over the chosen REAL experts; a token whose picks are all null gets no expert output.
      With top_k=1 the renormalized weight is p / p = 1, so the top-1 rule above applies instead (same
      value with straight_through, and a gradient to the router).
    * top-p (Dynamic MoE, "Harder Tasks Need More Experts"): sort p, keep experts up to and including the
      first whose cumulative probability exceeds top_p, at most k of them; weights are the raw p.
    * eval_routing="dense": in eval mode every real expert is mixed with weight p (renormalized over the
      real experts when there are null experts).
    * modality groups (MoMa; `group_sizes`, the experts per group in bank order): a token of group g sees
      only its group's logits (the others are set to -inf before the softmax), so the softmax, top-k,
      top-p and dense mixing all run within the group, and the indices are global into the one bank. The
      router of group g is rows [offset_g, offset_g + n_g) of the router linear: the same parameters as one
      router per group (a masked logit passes no gradient to its row).
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        top_k: int,
        bias: bool = True,
        num_null_experts: int = 0,
        top_p: float | None = None,
        top1_weight: str = "straight_through",
        eval_routing: str = "topk",
        group_sizes: tuple[int, ...] | None = None,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_null_experts = num_null_experts
        self.top_p = top_p
        self.top1_weight = top1_weight
        self.eval_routing = eval_routing
        self.linear = new_router_linear(in_features, num_experts, bias=bias, std=init_std)
        self.null = (
            new_router_linear(in_features, num_null_experts, bias=False, std=init_std) if num_null_experts else None
        )
        self.group_sizes = tuple(group_sizes) if group_sizes else None
        if self.group_sizes is not None:
            if sum(self.group_sizes) != num_experts or num_null_experts:
                raise ValueError(f"group_sizes={group_sizes} must sum to num_experts={num_experts}, without nulls.")
            group_of_expert = torch.repeat_interleave(torch.arange(len(self.group_sizes)), torch.tensor(group_sizes))
            # [G, n] membership; not saved: it follows from the config
            self.register_buffer(
                "membership", group_of_expert.unsqueeze(0) == torch.arange(len(self.group_sizes)).unsqueeze(1),
                persistent=False,
            )  # fmt: skip

    def forward(self, x: torch.Tensor, groups: torch.Tensor | None = None, frozen: bool = False) -> Routing:
        """x [T, in]; groups [T] long, each token's modality group (required with group_sizes); frozen: no gradient
        to the router's parameters (`float32_linear`)."""
        logits = float32_linear(self.linear, x, frozen)  # [T, n]
        allowed = None
        if self.group_sizes is not None:
            if groups is None or groups.shape != x.shape[:1]:
                raise ValueError(
                    f"this router has modality groups {self.group_sizes} and needs each token's group ([{x.shape[0]}]), "
                    f"got {None if groups is None else tuple(groups.shape)}."
                )
            allowed = self.membership.to(x.device)[groups]  # [G, n] gathered by [T] -> [T, n]
            logits = logits.masked_fill(~allowed, float("-inf"))  # out-of-group experts: probability 0, no gradient
        if self.null is not None:
            logits = torch.cat([logits, float32_linear(self.null, x, frozen)], dim=-1)  # [T, n + m]
        probs = logits.softmax(dim=-1)  # [T, n + m]
        n = self.num_experts

        if not self.training and self.eval_routing == "dense":
            idx = torch.arange(n, device=x.device).expand(x.shape[0], -1)  # [T, n]
            weights = probs[:, :n]  # [T, n]
            if self.null is not None:  # the softmax also covers the m null slots: renormalize over the real ones
                weights = weights / weights.sum(dim=-1, keepdim=True)
            if allowed is not None:  # another group's expert is an empty slot, not a zero-weight pick
                idx = torch.where(allowed, idx, -1)  # [T, n]
            return Routing(idx=idx, weights=weights, logits=logits, probs=probs, choice=idx, groups=groups)

        if self.top_p is not None:
            return _within_groups(self._top_p(logits, probs), allowed, groups)

        top_p, choice = probs.topk(self.top_k, dim=-1)  # [T, k]
        real = choice < n  # [T, k]
        idx = torch.where(real, choice, torch.full_like(choice, -1))  # [T, k], null picks -> -1
        if self.top_k == 1:
            weights = (1.0 + top_p - top_p.detach()) if self.top1_weight == "straight_through" else top_p
            if self.null is not None:
                # AdaMoE's renormalized weight is p / p = 1 here, constant: the router would get no task
                # gradient. straight_through has the same value with the gradient; a null pick weighs 0.
                weights = weights * real  # [T, 1]
        elif self.null is not None:
            kept = top_p * real  # [T, k]
            weights = kept / kept.sum(dim=-1, keepdim=True).clamp_min(1e-9)  # all-null rows stay 0
        else:
            weights = top_p / top_p.sum(dim=-1, keepdim=True)
        return _within_groups(Routing(idx, weights, logits, probs, choice), allowed, groups)

    def _top_p(self, logits: torch.Tensor, probs: torch.Tensor) -> Routing:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [T, n]
        sorted_p, order = sorted_p[:, : self.top_k], order[:, : self.top_k]  # cap at max_k = top_k
        before = sorted_p.cumsum(dim=-1) - sorted_p  # [T, k], mass of the experts ranked above
        keep = before < self.top_p  # keeps up to and including the first that crosses top_p
        idx = torch.where(keep, order, torch.full_like(order, -1))  # [T, k]
        weights = sorted_p * keep  # raw p, not renormalized
        return Routing(idx=idx, weights=weights, logits=logits, probs=probs, choice=torch.where(keep, order, -1))


def _within_groups(routing: Routing, allowed: torch.Tensor | None, groups: torch.Tensor | None) -> Routing:
    """Drop any pick outside the token's group (index -1, weight 0). top_k never exceeds the smallest group, so
    this only acts when a group expert's probability underflows to exactly 0 and ties with the masked ones."""
    if allowed is None:
        return routing
    safe = routing.idx.clamp_min(0)  # [T, k]
    inside = allowed.gather(1, safe) & (routing.idx >= 0)  # [T, n] gathered by [T, k] -> [T, k]
    choice = routing.choice if routing.choice is None else torch.where(inside, routing.choice, -1)
    return routing._replace(  # Routing is a NamedTuple (immutable)
        idx=torch.where(inside, routing.idx, -1), weights=routing.weights * inside, choice=choice, groups=groups
    )
