"""Sequence-level routing (`routing_level="sequence"` on the token-routed configs; docs/methods.md, "Sequence-level
routing"): each sequence is routed once, from a pooled hidden state of its prompt, and every one of its tokens uses
that choice.

Why: on data whose tasks conflict, the prompt says which task a sample is, while a token-level router at an early
layer sees each token's nearly context-free embedding. Kudugunta et al., "Beyond Distillation: Task-level
Mixture-of-Experts for Efficient Inference" (Findings of EMNLP 2021, arXiv:2110.03742) compare routing by token, by
sentence and by task; only its abstract was re-read here, so no section is cited. Here the sentence is the sample
and its task is read from the prompt's pooled hidden state instead of being given.

What a sequence is and what its prompt is, identical in training and in generation:

* a sequence is a row of the batch, or with packing (TRL's `padding_free` / `packing`, which give `position_ids`
  that restart at 0 for every packed sample) each run of a row whose position ids keep increasing;
* its prompt is its real (non-padding) tokens before the first labelled token (`labels != -100`) that is not the
  sequence's first token (a label there never enters a causal loss, which predicts token t from t - 1): the prompt
  part under completion-only loss, and always at least the first token. Without labels (generation, a forward
  without them), every real token of the forward is prompt. So in generation the prompt is the input of the first
  forward, and later steps reuse the choice stored then (with or without the KV cache);
* the decision reads only prompt tokens, so with causal attention a completion token's routing depends only on the
  tokens before it, in training as at generation.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .base import Routing

ROUTING_LEVELS = ("token", "sequence")
SEQUENCE_POOLINGS = ("mean", "last")
IGNORE_INDEX = -100


class SequenceRouting(NamedTuple):
    """The decisions behind a sequence-routed layer's per-token `Routing` (its `sequences` field).

    decisions:      Routing of the N sequences (idx, weights [N, k]; logits, probs [N, E'])
    token_decision: [T] long, the sequence (row of `decisions`) each token uses
    valid:          [N] bool, sequences with at least one real prompt token: only these count in losses and statistics
    rows:           [N] long, the batch row each sequence sits in
    fresh:          False for a later generation step that reuses the decisions stored at the prompt: no new statistic
    """

    decisions: Routing
    token_decision: torch.Tensor
    valid: torch.Tensor
    rows: torch.Tensor
    fresh: bool = True


class SequencePlan(NamedTuple):
    """How the tokens of a [B, S] forward group into N sequences."""

    segment: torch.Tensor  # [B, S] long, each token's sequence in 0..N-1 (padding: a sequence of its row)
    rows: torch.Tensor  # [N] long, the row of each sequence
    valid: torch.Tensor  # [N] bool, the sequence has a real prompt token
    num: int  # N


def sequence_starts(real: torch.Tensor, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, S] bool: the first real token of each sequence. A row's first real token starts one; with `position_ids`
    (packing) so does every real token whose position id does not exceed the one before it (a restart at 0).

    real [B, S] bool (non-padding); position_ids [B, S] or None."""
    first = real & (real.long().cumsum(dim=1) == 1)  # [B, S]: the first real token of the row
    if position_ids is None or position_ids.shape != real.shape:
        return first
    pos = position_ids.to(real.device)
    restart = torch.zeros_like(real)
    restart[:, 1:] = pos[:, 1:] <= pos[:, :-1]  # [B, S-1]: not increasing -> a new packed sequence
    return first | (restart & real)


def prompt_tokens(real: torch.Tensor, starts: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, S] bool: the real tokens each sequence is routed from (module docstring).

    real, starts [B, S] bool; labels [B, S] long or None."""
    if labels is None:
        return real
    labelled = (labels.to(real.device) != IGNORE_INDEX) & real & ~starts  # [B, S]; a label on a start never counts
    seen = labelled.long().cumsum(dim=1)  # [B, S] labelled tokens up to and including t, over the row
    # the count at each sequence's start (no label there), carried to its tokens: cummax of (start ? seen : 0)
    at_start = torch.where(starts, seen, torch.zeros_like(seen)).cummax(dim=1).values  # [B, S]
    return real & (seen - at_start == 0)  # no labelled token of its own sequence yet


def label_only_sequences(real: torch.Tensor, starts: torch.Tensor, prompt: torch.Tensor) -> int:
    """How many sequences of at least two real tokens have a label on every token after the first, so their prompt
    is their first token only (text rows, language-model loss on every token). One host sync."""
    plan = sequence_plan(starts, prompt)
    seg = plan.segment.reshape(-1)  # [T]
    length = torch.zeros(plan.num, device=seg.device).index_add(0, seg, real.reshape(-1).float())  # [N]
    prompted = torch.zeros(plan.num, device=seg.device).index_add(0, seg, prompt.reshape(-1).float())  # [N]
    return int(((length >= 2) & (prompted == 1)).sum())


def sequence_plan(starts: torch.Tensor, prompt: torch.Tensor) -> SequencePlan:
    """Number the sequences of a [B, S] forward row by row. One host sync (N sizes the decisions)."""
    batch = starts.shape[0]
    per_row = starts.long().sum(dim=1).clamp_min(1)  # [B]; a row without a real token keeps one (invalid) sequence
    local = (starts.long().cumsum(dim=1) - 1).clamp_min(0)  # [B, S]; left padding joins the row's first sequence
    offset = per_row.cumsum(dim=0) - per_row  # [B]
    segment = local + offset.unsqueeze(1)  # [B, S] global sequence index
    num = int(per_row.sum())
    rows = torch.repeat_interleave(torch.arange(batch, device=starts.device), per_row, output_size=num)  # [N]
    counts = torch.zeros(num, device=starts.device).index_add(0, segment.reshape(-1), prompt.reshape(-1).float())
    return SequencePlan(segment=segment, rows=rows, valid=counts > 0, num=num)


def pool(x: torch.Tensor, prompt: torch.Tensor, plan: SequencePlan, mode: str) -> torch.Tensor:
    """[N, d] float32: each sequence's prompt states x [B, S, d] pooled ("mean" over its prompt tokens, or its "last"
    prompt token, which in a causal model has read the whole prompt). An invalid sequence gets zeros. No host sync."""
    batch, seq, dim = x.shape
    flat = x.reshape(batch * seq, dim).float()  # [B, S, d] -> [T, d]
    seg = plan.segment.reshape(-1)  # [T]
    keep = prompt.reshape(-1)  # [T] bool
    if mode == "mean":
        # where, not a product: a fully masked row's states may be NaN, and NaN * 0 would reach its sequence's sum
        sums = torch.zeros(plan.num, dim, device=x.device).index_add(0, seg, torch.where(keep.unsqueeze(1), flat, 0.0))
        counts = torch.zeros(plan.num, device=x.device).index_add(0, seg, keep.float())  # [N]
        return sums / counts.clamp_min(1.0).unsqueeze(1)
    if mode == "last":
        position = torch.where(keep, torch.arange(batch * seq, device=x.device), -1)  # [T], -1 outside the prompt
        last = torch.full((plan.num,), -1, dtype=torch.long, device=x.device)
        # [N]: the flat index of each sequence's last prompt token
        last = last.scatter_reduce(0, seg, position, reduce="amax")
        picked = flat.index_select(0, last.clamp_min(0))  # [T, d] gathered by [N] -> [N, d]
        return torch.where((last >= 0).unsqueeze(1), picked, 0.0)
    raise ValueError(f"sequence_pooling={mode!r} is invalid: use one of {SEQUENCE_POOLINGS}.")


def expand(decisions: Routing, token_decision: torch.Tensor, sequences: SequenceRouting) -> Routing:
    """The per-token Routing [T, ...] in which every token carries its sequence's decision (gathers keep the gradient
    of the decision's weights, so the router learns from every token of the sequence)."""

    def per_token(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.index_select(0, token_decision)  # [N, ...] gathered by [T] -> [T, ...]

    return Routing(
        idx=per_token(decisions.idx),
        weights=per_token(decisions.weights),
        logits=per_token(decisions.logits),
        probs=per_token(decisions.probs),
        choice=per_token(decisions.choice),
        groups=None,
        sequences=sequences,
    )


def detached(routing: Routing) -> Routing:
    """A Routing without graph, to keep for the later steps of a generation."""
    return Routing(*(t.detach() if isinstance(t, torch.Tensor) else t for t in routing))


def rms_normalized(hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / rms(x) in float32, without a learned weight: the residual stream a later layer outputs grows with depth,
    while a router's N(0, 0.02^2) init expects the unit-scale input an MLP block's own norm gives it."""
    h = hidden.float()
    return h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
