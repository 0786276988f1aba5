"""Timing shared by every `moe-peft bench ...`: medians over interleaved repetitions, with their spread.

Why interleaved: on a shared machine the load changes over seconds. Timing A 5 times and then B 5 times
puts A and B under different loads, and their ratio then moves run to run (we saw 6x between two runs).
Running one repetition of every candidate per round (A B C, A B C, ...) exposes all of them to the same
load, so the ratios of their medians are stable even when the absolute times are not.

A ratio is printed only when its denominator is clearly larger than its noise (`ratio`); a difference of
two medians (an overhead over a base layer) carries the sum of both spreads as its noise (`difference`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Milliseconds of one candidate over the rounds: median and interquartile range."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range (0 for fewer than two samples): the noise of the median."""
        if len(self.samples) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q3 - q1

    def __str__(self) -> str:
        return f"{self.median:.3f}±{self.spread / 2:.3f}"


@dataclass
class Estimate:
    """A derived time (e.g. a layer's overhead over its base linear) with the noise it inherits."""

    value: float
    noise: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int = 1
) -> dict[str, Timing]:
    """Time every fn `reps` times, one repetition of each per round, after `warmup` untimed rounds.

    On CUDA each call is bracketed by synchronizations (and repeated until it lasts >= 1 ms, to keep
    launch jitter out of small shapes)."""
    names = list(fns)
    inner = {n: 1 for n in names}
    for _ in range(warmup):
        for n in names:
            fns[n]()
    if device.type == "cuda":
        for n in names:  # calls per timed sample, so that one sample lasts about a millisecond or more
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            once = time.perf_counter() - t0
            inner[n] = max(1, min(1000, int(1e-3 / max(once, 1e-7))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(reps):
        for n in names:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner[n]):
                fns[n]()
            _sync(device)
            samples[n].append((time.perf_counter() - t0) * 1e3 / inner[n])
    return {n: Timing(s) for n, s in samples.items()}


def difference(a: Timing, b: Timing) -> Estimate:
    """a - b (medians), with the noise of both."""
    return Estimate(a.median - b.median, a.spread + b.spread)


def ratio(num: Timing | Estimate, den: Timing | Estimate, min_signal: float = 2.0) -> float | None:
    """num / den, or None when the denominator is not at least `min_signal` times its noise (or <= 0)."""
    n = num.median if isinstance(num, Timing) else num.value
    d, noise = (den.median, den.spread) if isinstance(den, Timing) else (den.value, den.noise)
    if d <= 0 or d < min_signal * noise:
        return None
    return n / d


def paired_ratio(num: Timing, den: Timing) -> Timing:
    """num / den round by round (both from the same `interleaved` call, so sample i of each ran under the same load),
    as a Timing of ratios: its median is robust to load that drifts over the rounds, its spread is the ratio's noise.
    """
    if len(num.samples) != len(den.samples):
        raise ValueError("paired_ratio needs the samples of one interleaved run (the same number of rounds).")
    return Timing([n / d for n, d in zip(num.samples, den.samples)])


def fmt(value: float | None, width: int = 6, digits: int = 2) -> str:
    """A ratio for a table: '-' when it is not measurable above the noise."""
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
