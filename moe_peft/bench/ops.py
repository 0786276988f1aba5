"""`moe-peft bench ops`: the routed-LoRA op against the ways other libraries apply LoRA experts.

    moe-peft bench ops                 # default grid: small on CPU (< 2 min), the issue's grid on CUDA
    moe-peft bench ops --grid full     # T 2k..16k, d 1k..8k, E 4..64, r 8..64, k 1,2
    python -c "from moe_peft.bench import bench_ops; bench_ops()"

Every row times one linear layer (frozen base + adapter) on the same tokens, forward and forward+backward
separately, as medians over interleaved repetitions (bench/timing.py), and prints ratios measured in this
process (never asserted); a ratio whose denominator is within its noise prints as '-':
  ours      the layer as moe-peft runs it (`linear_lora_experts`, backend="auto": Triton on CUDA, torch on CPU)
  base      the bare frozen `F.linear` (overhead = layer - base)
  peft      a PEFT LoRA layer of the same active rank k*r
  loop      the per-expert Python loop of transformers' Mixtral (MoE-PEFT, mergoo, LoRAMoE do this)
  einsum    dense all experts materialized as [E, T, out], mixed by the gate (X-LoRA / Arrow style)
  torch     our torch path (CUDA only: the baseline the Triton kernel must beat by 1.15x)
On CUDA it also prints the op's achieved bandwidth and its fraction of the copy bandwidth measured here
(these shapes are memory-bound: docs/kernel.md). Per-sample adapters (a mixed batch of fine-tunes) are
`moe-peft bench multi` (bench/multi.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import apply_lora_experts, choose_backend, linear_lora_experts
from ..ops.reference import per_expert_loop
from .timing import Timing, difference, fmt, interleaved, ratio

# (T, d, E, r, k)
CPU_GRID = [(2048, 1024, 4, 8, 1), (2048, 1024, 8, 16, 2), (2048, 1024, 16, 16, 1), (2048, 1024, 64, 8, 2)]
GPU_GRID = [
    (8192, 4096, 8, 16, 2),  # the target shape
    (2048, 1024, 4, 8, 1),
    (2048, 4096, 8, 16, 2),
    (8192, 4096, 4, 64, 1),
    (8192, 4096, 16, 16, 2),
    (8192, 4096, 64, 8, 2),
    (16384, 4096, 8, 16, 2),
    (8192, 8192, 8, 16, 2),
    (16384, 8192, 64, 64, 2),
]
FULL_GRID = [
    (t, d, e, r, k)
    for t in (2048, 8192, 16384)
    for d in (1024, 4096, 8192)
    for e in (4, 16, 64)
    for r in (8, 16, 64)
    for k in (1, 2)
]
EINSUM_MAX_BYTES = 4 << 30


@dataclass
class Case:
    T: int
    d: int
    E: int
    r: int
    k: int
    device: torch.device
    dtype: torch.dtype

    def tensors(self):
        g = torch.Generator(self.device).manual_seed(0)
        kw = dict(device=self.device, generator=g)
        x = torch.randn(self.T, self.d, **kw).to(self.dtype).requires_grad_()
        weight = (torch.randn(self.d, self.d, **kw) / self.d**0.5).to(self.dtype)
        a = (torch.randn(self.E, self.r, self.d, **kw) / self.d**0.5).requires_grad_()  # fp32 adapters, as PEFT
        b = (torch.randn(self.E, self.d, self.r, **kw) / self.r**0.5).requires_grad_()
        idx = torch.rand(self.T, self.E, **kw).topk(self.k, dim=1).indices  # [T, k] uniform routing
        w = torch.rand(self.T, self.k, **kw).softmax(-1).requires_grad_()
        return x, weight, a, b, idx, w


def _fwd_and_train(
    layers: dict[str, Callable[[], torch.Tensor]], grads: list[torch.Tensor], device, reps
) -> tuple[dict[str, Timing], dict[str, Timing]]:
    """Forward (no grad) and forward+backward timings of every layer, each interleaved across the layers."""
    dy: dict[tuple, torch.Tensor] = {}

    def fwd(layer):
        def run():
            with torch.no_grad():
                layer()

        return run

    def train(layer):
        def run():
            y = layer()
            g = dy.setdefault(tuple(y.shape), torch.randn_like(y))
            y.backward(g)
            for t in grads:
                t.grad = None

        return run

    fwd_t = interleaved({n: fwd(f) for n, f in layers.items()}, device, reps)
    train_t = interleaved({n: train(f) for n, f in layers.items()}, device, reps)
    return fwd_t, train_t


def _autocast(case: Case):
    enabled = case.device.type == "cuda" and case.dtype != torch.float32
    return torch.autocast(case.device.type, dtype=case.dtype, enabled=enabled)


def layers(case: Case) -> dict[str, Callable[[], torch.Tensor]]:
    """The same routed layer (frozen base + experts) as each implementation computes it."""
    x, weight, a, b, idx, w = case.tensors()
    s = 2.0
    peft_layer = _peft_lora(weight, case.k * case.r)

    def ours(backend="auto"):
        def fn():
            with _autocast(case):
                return linear_lora_experts(x, weight, None, a, b, idx, w, s, backend=backend)

        return fn

    def base():
        with _autocast(case):
            return F.linear(x, weight)

    def peft():
        with _autocast(case):
            return peft_layer(x)

    def loop():
        with _autocast(case):
            return F.linear(x, weight) + per_expert_loop(x.to(a.dtype), a, b, idx, w, s).to(x.dtype)

    def einsum():
        with _autocast(case):
            u = torch.einsum("ti,eri->etr", x.to(a.dtype), a)  # [E, T, r]
            y_all = torch.einsum("etr,eor->eto", u, b)  # [E, T, out]: every expert on every token
            gate = torch.zeros(case.T, case.E, device=x.device).scatter_add(1, idx, w)  # [T, E]
            return F.linear(x, weight) + torch.einsum("eto,te->to", y_all, gate.to(y_all.dtype)) * s

    fns = {"ours": ours(), "base": base, "peft": peft, "loop": loop}
    if case.E * case.T * case.d * 4 <= EINSUM_MAX_BYTES:  # it materializes [E, T, out]
        fns["einsum"] = einsum
    if case.device.type == "cuda":
        fns["torch"] = ours("torch")
    fns["_grads"] = [x, a, b, w] + [p for p in peft_layer.parameters() if p.requires_grad]
    return fns


def _peft_lora(weight: torch.Tensor, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    wrapper = nn.Sequential()
    wrapper.add_module("lin", nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    wrapper.lin.weight.data = weight.detach().clone()
    model = get_peft_model(wrapper, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["lin"]))
    layer = model.base_model.model.lin.to(weight.device)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
    return layer


def op_bytes(case: Case, train: bool) -> float:
    """Bytes the op itself must move (docs/kernel.md section 4): x, A, B once, the output read and written
    (added into the base output); backward adds dy, x, the base dx read and written, and dA, dB."""
    act = torch.finfo(case.dtype).bits // 8
    weights = case.E * case.r * 2 * case.d * 4  # fp32 A and B
    fwd = case.T * case.d * act * 3 + weights
    return fwd + (case.T * case.d * act * 4 + 2 * weights if train else 0)


def copy_bandwidth(device: torch.device) -> float:
    """Achievable memory bandwidth (bytes/s): a 1 GiB device-to-device copy, read + write."""
    src = torch.empty(1 << 28, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = interleaved({"copy": lambda: dst.copy_(src)}, device, 20)["copy"].median
    return 2 * src.numel() * 4 / (ms * 1e-3)


def bench_grid(grid, device: torch.device, dtype: torch.dtype, reps: int, print_fn=print) -> list[dict]:
    rows = []
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    if bandwidth:
        print_fn(f"copy bandwidth measured here: {bandwidth / 1e12:.2f} TB/s")
    head = (
        f"{'T':>6} {'d':>5} {'E':>3} {'r':>3} {'k':>2} {'path':>13} | {'mode':>8} {'ours ms±iqr/2':>14} {'base ms':>14} "
        f"{'/peft':>6} {'ovh/peft-ovh':>12} {'loop/':>6} {'einsum/':>7}"
        + (f" {'torch/':>6} {'op GB/s':>8} {'%roof':>6}" if bandwidth else "")
    )
    print_fn(head)
    for T, d, E, r, k in grid:
        case = Case(T, d, E, r, k, device, dtype)
        fns = layers(case)
        grads = fns.pop("_grads")
        timings = _fwd_and_train(fns, grads, device, reps)
        op_times = _op_alone(case, device, reps) if bandwidth else None
        x = torch.empty(1, d, device=device, dtype=dtype)
        path = choose_backend(x.expand(T, d), torch.empty(E, r, d, device=device), k)
        for i, mode in enumerate(("fwd", "fwd+bwd")):
            t = timings[i]
            ovh_ours, ovh_peft = difference(t["ours"], t["base"]), difference(t["peft"], t["base"])
            row = dict(T=T, d=d, E=E, r=r, k=k, path=path, mode=mode)
            row.update({f"{n}_ms": v.median for n, v in t.items()})
            row.update({f"{n}_spread_ms": v.spread for n, v in t.items()})
            row.update(
                ours_over_peft=ratio(t["ours"], t["peft"]),
                ovh_over_peft_ovh=ratio(ovh_ours, ovh_peft),
                loop_over_ours=ratio(t["loop"], t["ours"]),
                einsum_over_ours=ratio(t["einsum"], t["ours"]) if "einsum" in t else None,
            )
            line = (
                f"{T:>6} {d:>5} {E:>3} {r:>3} {k:>2} {path:>13} | {mode:>8} {str(t['ours']):>14} "
                f"{str(t['base']):>14} {fmt(row['ours_over_peft'])} {fmt(row['ovh_over_peft_ovh'], 12)} "
                f"{fmt(row['loop_over_ours'])} {fmt(row['einsum_over_ours'], 7)}"
            )
            if bandwidth:
                op_ms = op_times[i].median
                gbs = op_bytes(case, mode != "fwd") / (op_ms * 1e-3)
                row.update(torch_ratio=ratio(t["torch"], t["ours"]), op_ms=op_ms, op_gbs=gbs / 1e9)
                line += f" {fmt(row['torch_ratio'])} {gbs / 1e9:>8.0f} {100 * gbs / bandwidth:>5.0f}%"
            print_fn(line)
            rows.append(row)
        del fns, grads
    return rows


def _op_alone(case: Case, device, reps) -> tuple[Timing, Timing]:
    """The op without the base GEMM: added into a preallocated output; backward writes dx, dA, dB, dw."""
    x, _, a, b, idx, w = case.tensors()
    out = torch.zeros(case.T, case.d, device=device, dtype=case.dtype)

    def fwd():
        with torch.no_grad(), _autocast(case):
            apply_lora_experts(x, a, b, idx, w, 2.0, out=out)

    def layer():
        with _autocast(case):
            return apply_lora_experts(x, a, b, idx, w, 2.0)

    _, train = _fwd_and_train({"op": layer}, [x, a, b, w], device, reps)
    return interleaved({"op": fwd}, device, reps)["op"], train["op"]


def bench_ops(grid: str = "default", device: Optional[str] = None, reps: Optional[int] = None, print_fn=print):
    """Run the grid; returns its rows. grid: "default" or "full". (Per-sample adapters: `moe-peft bench multi`.)"""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    reps = reps or (20 if dev.type == "cuda" else 7)
    if grid == "full":
        shapes = FULL_GRID
    else:
        shapes = GPU_GRID if dev.type == "cuda" else CPU_GRID
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print_fn(f"moe-peft bench ops | {name} | {dtype} activations, fp32 adapters | torch {torch.__version__}")
    print_fn("ratios: ours/peft (<1 faster than PEFT LoRA of rank k*r), ovh/peft-ovh (our overhead over the base")
    print_fn("linear / PEFT's), loop/ and einsum/ (x faster than those), torch/ (x faster than our torch path)")
    return bench_grid(shapes, dev, dtype, reps, print_fn)
