"""The routing summaries, from the running totals of one routed layer (and one group of samples).

Definitions (every one is over the non-padding tokens the totals saw):

* load [E]: each expert's share of the routing. Sparse routers (top-k, top-p, null experts, SMoRA, PHATGOOSE):
  the fraction of the (token, real expert) picks that went to the expert. Dense routers (LoRAMoE, MoLE with
  eval_routing="dense", MHR's per-task skill mix): the mean routing weight of the expert, because every token
  picks every expert there and pick counts would always be uniform.
* load_cv: coefficient of variation of the load over the experts, std / mean (population std); 0 is perfectly
  balanced, sqrt(E - 1) is every token on one expert.
* max_load: the busiest expert's load times E; 1 is balanced, E is every token on one expert.
* entropy: the mean over tokens of the router distribution's entropy divided by log(C) (C choices, null experts
  included), so 1 is a uniform router and 0 a one-hot one. SMoRA's sigmoid scores are normalized to sum to 1
  first. None when the router exposes no distribution (PHATGOOSE).
* experts_per_token: mean number of real experts that process a token (top-p and null experts make it vary;
  LoRAMoE and MHR mix all of them).
* null_fraction: the fraction of (token, slot) picks that went to a null expert (AdaMoE); None without null
  experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Totals:
    """Running sums of one routed layer over G groups of samples (float64; they stay on the model's device until
    read, so accumulating them costs no host synchronization)."""

    counts: torch.Tensor  # [G, E] picks (sparse) or summed routing weights (dense) per expert
    tokens: torch.Tensor  # [G] routed (non-padding) tokens; samples for MHR; sequences for routing_level='sequence'
    picks: torch.Tensor  # [G] (token, real expert) picks
    slots: torch.Tensor  # [G] (token, slot) pairs
    null: torch.Tensor  # [G] slots that went to a null expert
    entropy_sum: torch.Tensor  # [G] sum over tokens of the normalized router entropy
    entropy_rows: torch.Tensor  # [G] tokens that contributed an entropy
    has_null: bool = False
    has_probs: bool = False

    @classmethod
    def zeros(cls, groups: int, num_experts: int, device) -> Totals:
        z = dict(dtype=torch.float64, device=device)
        return cls(
            counts=torch.zeros(groups, num_experts, **z),
            tokens=torch.zeros(groups, **z),
            picks=torch.zeros(groups, **z),
            slots=torch.zeros(groups, **z),
            null=torch.zeros(groups, **z),
            entropy_sum=torch.zeros(groups, **z),
            entropy_rows=torch.zeros(groups, **z),
        )

    def apply(self, fn) -> Totals:
        """A Totals whose every tensor is fn(tensor)."""
        tensors = {name: fn(getattr(self, name)) for name in TENSORS}
        return Totals(**tensors, has_null=self.has_null, has_probs=self.has_probs)

    def grown(self, groups: int) -> Totals:
        """The same sums with room for `groups` groups (new groups start at zero)."""
        extra = groups - self.counts.shape[0]
        if extra <= 0:
            return self
        return self.apply(lambda t: torch.cat([t, t.new_zeros(extra, *t.shape[1:])]))  # [G, ...] -> [G + extra, ...]

    def cpu(self) -> Totals:
        return self.apply(lambda t: t.detach().cpu())

    def total(self) -> Totals:
        """All groups summed into one."""
        return self.apply(lambda t: t.sum(0, keepdim=True))  # [G, ...] -> [1, ...]

    def select(self, index: torch.Tensor) -> Totals:
        """The groups `index` [G'] in that order."""
        return self.apply(lambda t: t[index])


TENSORS = ("counts", "tokens", "picks", "slots", "null", "entropy_sum", "entropy_rows")


def load_cv(load: torch.Tensor) -> float:
    """std / mean of a load vector [E] (population std); 0 for one expert or an empty load."""
    load = load.double()
    mean = load.mean()
    if load.numel() < 2 or float(mean) == 0.0:
        return 0.0
    return float(load.std(unbiased=False) / mean)


def max_load(load: torch.Tensor) -> float:
    """max(load) * E for a load vector [E] that sums to 1."""
    return float(load.max()) * load.numel() if load.numel() else 0.0


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of distributions [N, C] divided by log C -> [N] in [0, 1] (0 for C = 1)."""
    probs = probs.double()
    num_choices = probs.shape[-1]
    if num_choices < 2:
        return probs.new_zeros(probs.shape[0])
    h = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # [N, C] -> [N]
    return h / math.log(num_choices)


def summarize(totals: Totals, group: int = 0) -> dict[str, Optional[float]]:
    """The summaries of one group of a layer's totals (module docstring) plus its load vector and token count."""
    counts = totals.counts[group].double().cpu()  # [E]
    tokens = float(totals.tokens[group])
    mass = float(counts.sum())
    load = counts / mass if mass > 0 else torch.zeros_like(counts)  # [E]
    entropy_rows = float(totals.entropy_rows[group])
    slots = float(totals.slots[group])
    return {
        "load": [round(float(x), 6) for x in load],
        "load_cv": load_cv(load) if mass > 0 else None,
        "max_load": max_load(load) if mass > 0 else None,
        "entropy": float(totals.entropy_sum[group]) / entropy_rows if totals.has_probs and entropy_rows else None,
        "experts_per_token": float(totals.picks[group]) / tokens if tokens else None,
        "null_fraction": float(totals.null[group]) / slots if totals.has_null and slots else None,
        "tokens": int(tokens),
    }
