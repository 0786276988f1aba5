"""Router losses. Every function takes the statistics of the T non-padding tokens of one routed layer
(padding never enters a router statistic) and returns a float32 scalar. Equations: docs/methods.md."""

from __future__ import annotations

import torch


def switch_balance(probs: torch.Tensor, choice: torch.Tensor, num_null: int = 0) -> torch.Tensor:
    """Switch / Mixtral load balance: L = E' * sum_e f_e * P_e (equals k at perfect balance).

    probs [T, E'] softmax over all choices; choice [T, k] picks over E' (-1 = no pick).
    f_e = fraction of tokens whose picks contain e, P_e = mean probability of e.
    With AdaMoE null experts (the last `num_null` columns) their f and P are replaced by the null mean,
    so the null pool counts as one load and the router may use nulls freely.
    """
    num_tokens, num_choices = probs.shape
    valid = choice >= 0  # [T, k]
    counts = torch.zeros(num_choices, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(0, choice[valid], torch.ones_like(choice[valid], dtype=probs.dtype))  # [E']
    f = counts / num_tokens  # [E'], no gradient (argmax)
    p = probs.mean(dim=0)  # [E']
    if num_null:
        n = num_choices - num_null
        f = torch.cat([f[:n], f[n:].mean().expand(num_null)])
        p = torch.cat([p[:n], p[n:].mean().expand(num_null)])
    return num_choices * (f * p).sum()


def grouped_switch_balance(
    probs: torch.Tensor, choice: torch.Tensor, groups: torch.Tensor, group_sizes: tuple[int, ...]
) -> torch.Tensor:
    """The Switch balance within each modality group, over that group's tokens, averaged over the groups that
    have tokens (so it equals k at perfect balance, as without groups, and the coefficient means the same).

    probs [T, n] softmax within each token's group (0 outside it); choice [T, k] global picks (-1 = none);
    groups [T] long, the token's group; group_sizes: experts per group in bank order.
    L_g = n_g * sum_{e in g} f_e P_e, with f_e = (picks of e) / T_g and P_e = (sum of p_e over g's tokens) / T_g.
    Sync-free: every group is computed at once, an empty group weighs 0.
    """
    num_groups = len(group_sizes)
    sizes = torch.tensor(group_sizes, device=probs.device)  # [G]
    group_of_expert = torch.repeat_interleave(torch.arange(num_groups, device=probs.device), sizes)  # [n]
    tokens = torch.bincount(groups, minlength=num_groups).to(probs.dtype)  # [G]
    per_expert_tokens = tokens[group_of_expert].clamp_min(1.0)  # [n]
    valid = choice >= 0  # [T, k]
    picks = torch.zeros(probs.shape[1], device=probs.device, dtype=probs.dtype)
    picks.scatter_add_(0, choice[valid], torch.ones_like(choice[valid], dtype=probs.dtype))  # [n]
    f = picks / per_expert_tokens  # [n], no gradient (argmax)
    p = probs.sum(dim=0) / per_expert_tokens  # [n]; a token's probability is 0 outside its group
    per_group = torch.zeros(num_groups, device=probs.device, dtype=probs.dtype)
    per_group = per_group.index_add(0, group_of_expert, f * p) * sizes.to(probs.dtype)  # [n] -> [G]
    present = (tokens > 0).to(probs.dtype)  # [G]
    return (per_group * present).sum() / present.sum().clamp_min(1.0)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, eq. 5): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean routing entropy -sum_i p_i log p_i (Dynamic MoE's L_entropy: pushes toward confident routing)."""
    return -(probs * probs.clamp_min(1e-9).log()).sum(dim=-1).mean()


LBC_FORMS = ("intended", "released")


def localized_balance(
    weights: torch.Tensor,
    token_mask: torch.Tensor,
    sample_types: torch.Tensor,
    delta: float,
    form: str = "intended",
) -> torch.Tensor:
    """LoRAMoE's localized balancing constraint (LBC; docs/methods.md, LoRAMoE).

    weights [B, S, N] dense routing weights, token_mask [B, S] (padding excluded, unlike the released code),
    sample_types [B] (1: world knowledge -> first half of the experts; 0: task -> second half).
    Q[b, i] = sum_t w_i (importance); I[b, i] = 1 + delta in the sample's own half, else 1 - delta.
    L = Var(Z) / (Mean(Z)^2 + 1e-10) over the B*N entries of Z, torch's unbiased variance (the released
    code's squared coefficient of variation), with

    * form="intended" (default): Z = Q / I. L is 0 when Q is proportional to I, so a sample's own half gets
      (1 + delta) / (1 - delta) times the importance of the other half: what LoRAMoE means the constraint for.
    * form="released": Z = I * Q, the released code (Ablustrund/LoRAMoE, peft/tuners/lora.py). L is 0 when
      I * Q is flat, which gives the sample's own half the SMALLER share, (1 - delta) / (1 + delta).
    """
    num_experts = weights.shape[-1]
    importance = (weights * token_mask.unsqueeze(-1)).sum(dim=1)  # [B, S, N] -> [B, N]
    first_half = torch.arange(num_experts, device=weights.device) < num_experts // 2  # [N]
    in_group = torch.where(sample_types.unsqueeze(-1) == 1, first_half, ~first_half)  # [B, N]
    coef = torch.where(in_group, 1.0 + delta, 1.0 - delta)  # [B, N]
    z = (importance / coef if form == "intended" else coef * importance).flatten()  # [B*N]
    if z.numel() < 2:
        return z.sum() * 0.0
    return z.var() / (z.mean().pow(2) + 1e-10)
