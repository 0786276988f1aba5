"""Which adapter each sample of the current batch uses: `adapter_names` (PEFT's keyword) as tensors.

A layer holds its own subset of the adapters (PEFT lets adapters target different modules), stacked in its
own order, so every layer asks the selection for the sample -> local index map of its stack (`local`);
the maps are built once per forward and device, and shared by every layer with the same stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class AdapterSelection:
    """`adapter_names` of one forward (or one generate call): a name per sample, `"__base__"` for none."""

    def __init__(self, names: Sequence[str], expandable: bool = False):
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(
                f"adapter_names must be a list with one adapter name (str) per sample, got {names!r}; use "
                f"'{BASE}' for a sample that should use no adapter."
            )
        self.names = tuple(names)
        self.adapters = tuple(dict.fromkeys(n for n in self.names if n != BASE))  # distinct, first-seen order
        position = {a: i for i, a in enumerate(self.adapters)}
        self.index = torch.tensor([position.get(n, -1) for n in self.names], dtype=torch.long)  # [B], -1: base
        self.expandable = expandable  # generate(): the batch may be repeated for beams / return sequences
        self._cache: dict = {}
        self.router_loss_pairs: set[tuple[int, str]] = set()  # (id(layer), adapter) that recorded a router loss

    def memo(self, key, build):
        """What a layer derived from this selection (its bank, index map...), built once per call: one forward, or
        every decoding step of one generate(). Only for inference: weights do not change within a call."""
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = build()
        return hit

    def __len__(self) -> int:
        return len(self.names)

    def factor(self, batch: int, where: str) -> int:
        """How many times each sample is repeated in a layer input of `batch` rows (1 outside generate)."""
        n = len(self.names)
        if batch == n:
            return 1
        if self.expandable and n and batch % n == 0:
            return batch // n  # generate() repeats every sample in place (repeat_interleave) for beams
        raise ValueError(
            f"adapter_names has {n} entries but the input of {where} has batch size {batch}: pass one adapter "
            "name per sample."
        )

    def names_for(self, batch: int, where: str) -> list[str]:
        factor = self.factor(batch, where)
        return [n for n in self.names for _ in range(factor)]

    def local(
        self, stack: tuple[str, ...], scalings: tuple[float, ...], batch: int, device: torch.device, where: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] long index of each sample's adapter in `stack`, -1 where it uses none or the layer lacks it;
        [B] float32 scaling of that adapter, 0 where none), on `device`."""
        factor = self.factor(batch, where)
        key = (stack, scalings, factor, device)
        hit = self._cache.get(key)
        if hit is None:
            where_in = {a: i for i, a in enumerate(stack)}
            lut = [where_in.get(a, -1) for a in self.adapters] + [-1]  # the last entry serves index -1 (base)
            scale = [scalings[i] if i >= 0 else 0.0 for i in lut]
            index = self.index.repeat_interleave(factor) if factor > 1 else self.index  # [B * factor]
            idx = torch.tensor(lut, dtype=torch.long)[index]  # [B]
            hit = (idx.to(device), torch.tensor(scale, dtype=torch.float32)[index].to(device))
            self._cache[key] = hit
        return hit

    def rows(self, adapter: str, batch: int, device: torch.device, where: str) -> torch.Tensor:
        """[b_a] long: the rows of a layer input of `batch` rows that use `adapter`."""
        factor = self.factor(batch, where)
        key = ("rows", adapter, factor, device)
        hit = self._cache.get(key)
        if hit is None:
            names = self.names_for(batch, where)
            hit = torch.tensor([i for i, n in enumerate(names) if n == adapter], dtype=torch.long).to(device)
            self._cache[key] = hit
        return hit


def dropout_p(dropout: torch.nn.Module) -> float:
    """The drop probability of an adapter's dropout module (nn.Identity: 0)."""
    return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0


def per_sample_dropout(x: torch.Tensor, p: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverted dropout of `x [B, S, in]` with probability `p[b]` for sample b (each sample's adapter's own
    lora_dropout; 0 for no dropout). One mask for the whole batch: no loop over adapters."""
    if p is None:
        return x
    p = p.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)  # [B, 1, 1]
    keep = torch.rand_like(x) >= p  # [B, S, in]
    scale = torch.where(p < 1, 1.0 / (1.0 - p).clamp_min(1e-12), 0.0)  # p = 1 drops everything, as nn.Dropout
    return x * keep * scale
