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
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_null_experts = num_null_experts
        self.top_p = top_p
        self.top1_weight = top1_weight
        self.eval_routing = eval_routing
        self.linear = new_router_linear(in_features, num_experts, bias=bias)
        self.null = new_router_linear(in_features, num_null_experts, bias=False) if num_null_experts else None

    def forward(self, x: torch.Tensor) -> Routing:
        logits = float32_linear(self.linear, x)  # [T, n]
        if self.null is not None:
            logits = torch.cat([logits, float32_linear(self.null, x)], dim=-1)  # [T, n + m]
        probs = logits.softmax(dim=-1)  # [T, n + m]
        n = self.num_experts

        if not self.training and self.eval_routing == "dense":
            idx = torch.arange(n, device=x.device).expand(x.shape[0], -1)  # [T, n]
            weights = probs[:, :n]  # [T, n]
            if self.null is not None:  # the softmax also covers the m null slots: renormalize over the real ones
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return Routing(idx=idx, weights=weights, logits=logits, probs=probs, choice=idx)

        if self.top_p is not None:
            return self._top_p(logits, probs)

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
        return Routing(idx=idx, weights=weights, logits=logits, probs=probs, choice=choice)

    def _top_p(self, logits: torch.Tensor, probs: torch.Tensor) -> Routing:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [T, n]
        sorted_p, order = sorted_p[:, : self.top_k], order[:, : self.top_k]  # cap at max_k = top_k
        before = sorted_p.cumsum(dim=-1) - sorted_p  # [T, k], mass of the experts ranked above
        keep = before < self.top_p  # keeps up to and including the first that crosses top_p
        idx = torch.where(keep, order, torch.full_like(order, -1))  # [T, k]
        weights = sorted_p * keep  # raw p, not renormalized
        return Routing(idx=idx, weights=weights, logits=logits, probs=probs, choice=torch.where(keep, order, -1))
