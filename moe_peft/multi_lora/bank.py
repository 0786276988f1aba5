"""One expert bank per layer from several adapters: `A [sum E_a, r_max, in]`, `B [sum E_a, out, r_max]`.

Adapters of different ranks are zero-padded to the largest rank rather than grouped by rank: one op call per
layer whatever the mix (Punica's BGMV and S-LoRA pad too), exact (the padded rows of A and columns of B are
zero, so they add exactly nothing), and its cost, r_max instead of r_a columns for a sample of a smaller
adapter, is small beside the base layer's `in` or `out` columns. Grouping by rank would cost one call per
distinct rank and a gather/scatter of the activations per group.

A plain LoRA adapter is a bank of one expert (`[1, r, in]`); a moe-peft adapter brings its E experts.

Inference (no gradient) reuses a bank built once for all of the layer's adapters until a weight changes
(checked by storage and version counter: optimizer steps, `load_state_dict`, `.to()` all change one).
Training builds it each forward from the batch's adapters only, with autograd, so that an adapter without a
sample in the batch gets no gradient at all (`None`, as when it trains alone: AdamW then skips it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_CACHE = "_multi_lora_bank"


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, r, in], [E, out, r] -> [E, rank, in], [E, out, rank] with zeros beyond r."""
    extra = rank - a.shape[1]
    if extra == 0:
        return a, b
    return F.pad(a, (0, 0, 0, extra)), F.pad(b, (0, extra))


def build_bank(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (A [E_a, r_a, in], B [E_a, out, r_a]) along the experts, ranks padded to the largest."""
    rank = max(a.shape[1] for a, _ in parts)
    dtype = parts[0][0].dtype
    padded = [_pad_rank(a.to(dtype), b.to(dtype), rank) for a, b in parts]
    if len(padded) == 1:
        return padded[0]
    return torch.cat([a for a, _ in padded]), torch.cat([b for _, b in padded])  # [sum E_a, r, in], [sum E_a, out, r]


def layer_bank(
    module: nn.Module,
    names: Sequence[str],
    params_of: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
    differentiable: bool,
    single: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank of `names` on `module`. params_of(name) gives that adapter's (A [E, r, in], B [E, out, r]), or, with
    `single`, a plain LoRA's (A [r, in], B [out, r]) that becomes a bank of one expert."""
    params = [params_of(n) for n in names]

    def parts():
        if single:
            return [
                (a.unsqueeze(0), b.unsqueeze(0)) for a, b in params
            ]  # [r, in] -> [1, r, in], [out, r] -> [1, out, r]
        return params

    if differentiable:
        return build_bank(parts())
    # a new dtype, device or shape means a new storage; an in-place update bumps the version counter
    key = tuple((n, a.data_ptr(), a._version, b.data_ptr(), b._version) for n, (a, b) in zip(names, params))
    cached = module.__dict__.get(_CACHE)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, *build_bank(parts()))
        module.__dict__[_CACHE] = cached
    return cached[1], cached[2]


def clear_cache(module: nn.Module) -> None:
    module.__dict__.pop(_CACHE, None)
