"""Which torch path is faster on CPU: dense-gated vs grouped (sorted) vs the per-expert loop, fwd+bwd.

    python benchmarks/cpu_paths.py

Prints the median time of each path and its ratio to the per-expert loop measured in the same process.
This is what sets `choose_torch_path` in moe_peft/ops/__init__.py.
"""

import statistics
import time

import torch

from moe_peft.ops import apply_lora_experts, choose_torch_path
from moe_peft.ops.reference import per_expert_loop


def fwd_bwd(fn, x, a, b, idx, w, reps=7):
    def once():
        fn(x, a, b, idx, w).sum().backward()

    once()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    torch.manual_seed(0)
    print(f"{'T':>5} {'d':>5} {'E':>3} {'r':>3} {'k':>2} | {'dense':>7} {'grouped':>7} {'loop':>7} ms | "
          f"dense/loop grouped/loop | chosen")  # fmt: skip
    T, d = 2048, 1024
    for E, r, k in [(4, 8, 1), (8, 8, 1), (8, 16, 2), (16, 4, 1), (16, 8, 1), (16, 16, 1), (16, 16, 2), (32, 4, 2),
                    (32, 8, 2), (32, 16, 1), (64, 8, 2), (64, 16, 2), (64, 1, 8), (4, 64, 1), (8, 64, 2)]:  # fmt: skip
        x = torch.randn(T, d, requires_grad=True)
        a = (torch.randn(E, r, d) * 0.02).requires_grad_()
        b = (torch.randn(E, d, r) * 0.02).requires_grad_()
        wv, idx = torch.randn(T, E).softmax(-1).topk(k, dim=-1)
        w = wv.clone().requires_grad_()
        t = {
            path: fwd_bwd(lambda *z, p=path: apply_lora_experts(*z, 2.0, backend=p), x, a, b, idx, w)
            for path in ("dense", "grouped")
        }
        t["loop"] = fwd_bwd(lambda *z: per_expert_loop(*z, 2.0), x, a, b, idx, w)
        print(
            f"{T:>5} {d:>5} {E:>3} {r:>3} {k:>2} | {t['dense']:>7.1f} {t['grouped']:>7.1f} {t['loop']:>7.1f}    | "
            f"{t['dense'] / t['loop']:>10.2f} {t['grouped'] / t['loop']:>12.2f} | {choose_torch_path(E, r, k)}"
        )


if __name__ == "__main__":
    main()
