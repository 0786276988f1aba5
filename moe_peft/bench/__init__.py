"""Benchmarks that print ratios against baselines run in the same process (never timed assertions).

    moe-peft bench ops        # the routed-LoRA op (bench/ops.py)
    moe-peft bench experts    # LoRA on the fused experts of an MoE block, against PEFT (bench/experts.py)
    moe-peft bench multi      # many adapters in one batch (bench/multi.py)

Each benchmark lives in its own module; bench/timing.py holds the interleaved-median timing they share.
"""

from .experts import bench_experts
from .multi import bench_multi, bench_multi_adapter
from .ops import bench_grid, bench_ops
from .timing import Timing, interleaved, ratio

__all__ = [
    "bench_experts",
    "bench_ops",
    "bench_grid",
    "bench_multi",
    "bench_multi_adapter",
    "Timing",
    "interleaved",
    "ratio",
]
