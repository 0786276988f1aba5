"""bench/experts.py: the memory counters measure what they claim, and one benchmark row runs end to end."""

import torch

from moe_peft.bench.experts import bench_row, peak_bytes, saved_bytes

MIB = 1 << 20


def test_peak_bytes_follows_every_cpu_allocation_and_free():
    def fn():
        a = torch.empty(MIB, dtype=torch.uint8)
        b = torch.empty(2 * MIB, dtype=torch.uint8)  # 3 MiB live
        del a, b
        c = torch.empty(4 * MIB, dtype=torch.uint8)  # 4 MiB live: the peak
        del c
        return torch.empty(MIB, dtype=torch.uint8)

    assert peak_bytes(fn, torch.device("cpu")) == 4 * MIB


def test_saved_bytes_counts_what_autograd_keeps_but_not_parameters():
    w = torch.nn.Parameter(torch.randn(256, 256))
    x = torch.randn(512, 256, requires_grad=True)
    # exp saves its output (512 KiB); mm saves x and the parameter w (w excluded); x is 512 KiB
    assert saved_bytes(lambda: (x @ w).exp(), [w]) == 2 * 512 * 256 * 4


def test_one_row_runs_and_both_adapters_agree():
    row = bench_row(64, 32, 48, 4, 2, 4, torch.device("cpu"), torch.float32, reps=1)
    assert row["max_diff"] < 1e-4 * max(1.0, row["lora_scale"]) and row["lora_scale"] > 1e-3
    assert row["extra"]["ours"] < row["extra"]["peft"]  # PEFT copies every expert's weight; we do not
    assert set(row["times"]) == {"frozen", "peft", "ours"}
