"""Compare the two pure-torch paths of apply_lora_experts with the per-expert loop, forward+backward, on CPU.

    python benchmarks/cpu_paths.py

Prints the time of each path and its ratio to the per-expert loop measured in the same process. This is
what set GROUPED_MIN_RATIO / GROUPED_MIN_DENSE_RANK in moe_peft/ops/__init__.py.
"""

import time

import torch

from moe_peft.ops.reference import dense_gated, grouped, per_expert_loop


def fwd_bwd(fn, x, a, b, idx, w, reps=5):
    def once():
        y = fn(x, a, b, idx, w, 2.0)
        y.sum().backward()

    once()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"{'T':>5} {'d':>5} {'E':>3} {'r':>3} {'k':>2} | {'dense ms':>9} {'grouped ms':>10} {'loop ms':>8} | dense/loop grouped/loop"
    )
    for T, d in [(2048, 512), (2048, 1024)]:
        for E, r, k in [
            (4, 8, 1),
            (8, 16, 2),
            (8, 8, 1),
            (16, 16, 2),
            (16, 16, 1),
            (32, 8, 2),
            (32, 16, 1),
            (64, 8, 2),
            (64, 1, 8),
        ]:
            x = torch.randn(T, d, requires_grad=True)
            a = (torch.randn(E, r, d) * 0.02).requires_grad_()
            b = (torch.randn(E, d, r) * 0.02).requires_grad_()
            logits = torch.randn(T, E)
            wv, idx = logits.softmax(-1).topk(k, dim=-1)
            w = wv.clone().requires_grad_()
            td = fwd_bwd(dense_gated, x, a, b, idx, w)
            tg = fwd_bwd(grouped, x, a, b, idx, w)
            tl = fwd_bwd(per_expert_loop, x, a, b, idx, w)
            print(
                f"{T:>5} {d:>5} {E:>3} {r:>3} {k:>2} | {td:9.2f} {tg:10.2f} {tl:8.2f} | {td / tl:10.2f} {tg / tl:12.2f}"
            )


if __name__ == "__main__":
    main()
