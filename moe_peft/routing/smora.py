from __future__ import annotations

import torch

from .base import Float32Buffers, Routing, float32_linear, new_router_linear


class SMoRARouter(Float32Buffers):
    """SMoRA: every rank of one LoRA is an expert (methods.md, SMoRA).

    s = sigmoid(W_g x); the top-k of (s + b) are selected, b being a per-rank bias buffer used for selection
    only (loss-free balancing); gate g_i = k * s_i / sum_selected s_j. b stays float32 in a bf16/fp16 model.
    """

    float32_buffers = ("selection_bias",)

    def __init__(self, in_features: int, num_ranks: int, top_k: int, init_std: float = 0.02):
        super().__init__()
        self.top_k = top_k
        self.linear = new_router_linear(in_features, num_ranks, bias=False, std=init_std)
        # saved with the adapter: selection depends on it
        self.register_buffer("selection_bias", torch.zeros(num_ranks))

    def forward(self, x: torch.Tensor, frozen: bool = False) -> Routing:
        """x [T, in]; frozen: no gradient to W_g (`float32_linear`); the selection bias updates as ever."""
        logits = float32_linear(self.linear, x, frozen)  # [T, R]
        scores = torch.sigmoid(logits)  # [T, R]
        idx = (scores.detach() + self.selection_bias).topk(self.top_k, dim=-1).indices  # [T, k]
        picked = scores.gather(1, idx)  # [T, k]
        weights = self.top_k * picked / picked.sum(dim=-1, keepdim=True).clamp_min(1e-9)  # [T, k]
        return Routing(idx=idx, weights=weights, logits=logits, probs=scores, choice=idx)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, rate: float) -> None:
        """b_i += u * sign(mean_count - count_i) from one optimizer step's (all-reduced) counts [R]."""
        counts = counts.float()
        self.selection_bias += rate * torch.sign(counts.mean() - counts)
