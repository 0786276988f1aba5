"""bench/timing.py: interleaved medians, spreads, and ratios that are not printed when their denominator is noise."""

import torch

from moe_peft.bench.timing import Estimate, Timing, difference, fmt, interleaved, paired_ratio, ratio


def test_median_spread_and_difference():
    a, b = Timing([1.0, 2.0, 3.0, 4.0, 100.0]), Timing([1.0, 1.0, 1.0, 1.0, 1.0])
    assert a.median == 3.0 and a.spread == 2.0  # q3 - q1 = 4 - 2; the outlier does not move either
    assert b.spread == 0.0
    d = difference(a, b)
    assert (d.value, d.noise) == (2.0, 2.0)


def test_ratio_is_withheld_when_the_denominator_is_within_noise():
    assert ratio(Timing([10.0] * 3), Timing([5.0] * 3)) == 2.0
    # an overhead of 0.01 ms measured with 1 ms of noise: the old bench printed 9e10 here
    assert ratio(Estimate(3.0, 0.1), Estimate(0.01, 1.0)) is None
    assert ratio(Estimate(3.0, 0.1), Estimate(-0.5, 0.1)) is None
    assert ratio(Estimate(3.0, 0.1), Estimate(1.5, 0.5)) == 2.0
    assert fmt(None).strip() == "-" and fmt(1.234).strip() == "1.23"


def test_interleaved_runs_one_repetition_of_each_per_round():
    order = []
    fns = {n: (lambda n=n: order.append(n)) for n in "abc"}
    out = interleaved(fns, torch.device("cpu"), reps=3, warmup=1)
    assert order == list("abc") * 4  # warm-up round, then 3 timed rounds, never aaa bbb ccc
    assert all(len(t.samples) == 3 for t in out.values())


def test_paired_ratio_cancels_load_that_changes_between_rounds():
    # the machine got 3x slower in the last rounds: each candidate's own spread is large, the pairwise ratio is exact
    lora, mix = Timing([10.0, 10.0, 30.0, 30.0]), Timing([15.0, 15.0, 45.0, 45.0])
    assert ratio(mix, lora) is None  # the unpaired ratio is withheld: its denominator is within noise
    paired = paired_ratio(mix, lora)
    assert paired.median == 1.5 and paired.spread == 0.0
