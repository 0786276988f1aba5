"""`moe-peft bench experts`: LoRA on the fused experts of one MoE block, ours against PEFT's `target_parameters`.

    moe-peft bench experts             # CPU: a small and a Mixtral-like block (fp32); CUDA: adds the Mixtral shape (bf16)
    python -c "from moe_peft.bench import bench_experts; bench_experts()"

Every row is one Mixtral sparse-MoE block (router + E fused experts, top-k, transformers' default experts
implementation) at the given shape, forward + backward (dL/dx, as inside a model), three ways on the same weights:
  frozen  the block alone (the baseline both adapters add to)
  peft    PEFT LoRA with target_parameters=[gate_up_proj, down_proj]: each forward folds W + s B A into a new copy
          of every expert's weight (`baddbmm`), which autograd keeps for the backward
  ours    a moe-peft adapter on the same parameters: the base GEMMs on (token, slot) pairs sorted by expert and the
          LoRA terms through `apply_lora_experts`, no per-expert weight copy
Time: medians over interleaved repetitions (bench/timing.py); ratios measured in this process, never asserted.
Peak memory: the highest total of live tensor allocations during one forward + backward, above what was allocated
before it, for each candidate; "extra" is that peak minus the frozen block's. On CUDA it is
`torch.cuda.max_memory_allocated`. On CPU torch's allocator keeps no statistics (and tracemalloc does not see
torch's buffers), so we read every allocation and free from the profiler (`profile_memory=True`, the `[memory]`
events with their byte counts, in order) and take the maximum of the running sum (`peak_bytes`). A second column
counts only the bytes autograd saved for the backward (`saved_bytes`, through `saved_tensors_hooks`; parameters
excluded), which is where PEFT's per-forward weight copies live.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import tempfile
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from .timing import fmt, interleaved, ratio

# (T, d, ff, E, k, r)
CPU_SHAPES = [(512, 256, 512, 8, 2, 16), (2048, 1024, 2048, 8, 2, 16)]
GPU_SHAPES = [(2048, 1024, 2048, 8, 2, 16), (8192, 4096, 14336, 8, 2, 16)]
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of live tensor bytes allocated by `fn` above those allocated before it (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    deltas = [e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    deltas.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    live = peak = 0
    for event in deltas:  # an allocation is +bytes, a free -bytes
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    return peak


def saved_bytes(fn: Callable[[], object], params: list[torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for the backward during `fn()`."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _block(d: int, ff: int, num_experts: int, k: int, device, dtype) -> nn.Module:
    """One Mixtral sparse-MoE block, its experts implementation set as the model would set it."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=32,
        hidden_size=d,
        intermediate_size=ff,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_local_experts=num_experts,
        num_experts_per_tok=k,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)  # only for the config it resolves; no weights allocated
    block = type(model.model.layers[0].mlp)(model.config)
    with torch.no_grad():
        block.gate.weight.normal_(std=d**-0.5)
        block.experts.gate_up_proj.normal_(std=d**-0.5)
        block.experts.down_proj.normal_(std=ff**-0.5)
    return block.to(device=device, dtype=dtype).requires_grad_(False)


class _Holder(nn.Module):
    """PEFT needs a parent module to wrap the block's experts in."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def _adapters(block: nn.Module, rank: int):
    """(peft, ours): two copies of the block with the same random LoRA on both expert weights (B != 0)."""
    from peft import LoraConfig, inject_adapter_in_model

    from ..tuners.routed.config import MoLEConfig

    peft_model = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[], target_parameters=TARGETS, init_lora_weights=False),
        _Holder(copy.deepcopy(block)),
    )
    ours = inject_adapter_in_model(
        MoLEConfig(r=rank, lora_alpha=2 * rank, target_modules=[], target_parameters=TARGETS),
        _Holder(copy.deepcopy(block)),
    )
    wrappers = {m.parameter_name: m for m in peft_model.modules() if hasattr(m, "parameter_name")}
    layer = ours.block.experts
    with torch.no_grad():
        for name, wrapper in wrappers.items():
            num_experts = wrapper.num_experts
            a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
            layer.experts_A["default"][name].copy_(a.reshape(num_experts, -1, a.shape[-1]))  # [r*E, in] -> [E, r, in]
            layer.experts_B["default"][name].copy_(
                b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1)
            )  # [E, out, r]
    return peft_model, ours


def bench_row(T: int, d: int, ff: int, E: int, k: int, r: int, device, dtype, reps: int) -> dict:
    block = _block(d, ff, E, k, device, dtype)
    peft_model, ours = _adapters(block, r)
    frozen = _Holder(block)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(1, T, d, generator=g, device=device).to(dtype).requires_grad_()
    dy = torch.randn(1, T, d, generator=g, device=device).to(dtype)
    models = {"frozen": frozen, "peft": peft_model, "ours": ours}

    def clear(model):
        x.grad = None
        for p in model.parameters():
            p.grad = None

    def step(model, clear_first=True):
        def run():
            if clear_first:
                clear(model)
            model(x).backward(dy)

        return run

    with torch.no_grad():
        diff = (ours(x) - peft_model(x)).abs().max().item()
        scale = (peft_model(x) - frozen(x)).abs().max().item()  # the adapters' share of the output
    fns = {name: step(m) for name, m in models.items()}
    times = interleaved(fns, device, reps)
    peaks, saved = {}, {}
    for name, model in models.items():  # gradients from the last run are freed before measuring, not during
        clear(model)
        peaks[name] = peak_bytes(step(model, clear_first=False), device)
        clear(model)
        saved[name] = saved_bytes(step(model, clear_first=False), list(model.parameters()))
    extra = {name: peaks[name] - peaks["frozen"] for name in ("peft", "ours")}
    saved_extra = {name: saved[name] - saved["frozen"] for name in ("peft", "ours")}
    return dict(
        T=T, d=d, ff=ff, E=E, k=k, r=r, times=times, peaks=peaks, extra=extra, saved=saved, saved_extra=saved_extra,
        time_ratio=ratio(times["ours"], times["peft"]),
        extra_ratio=extra["ours"] / extra["peft"] if extra["peft"] > 0 else None,
        saved_ratio=saved_extra["ours"] / saved_extra["peft"] if saved_extra["peft"] > 0 else None,
        max_diff=diff, lora_scale=scale,
    )  # fmt: skip


def _mb(n: int) -> str:
    return f"{n / 2**20:7.1f}"


def bench_experts(device: Optional[str] = None, reps: Optional[int] = None, print_fn=print) -> list[dict]:
    """Run the table; returns its rows."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    reps = reps or (20 if dev.type == "cuda" else 7)
    shapes = GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print_fn(f"moe-peft bench experts | {name} | {dtype} block, fp32 adapters | torch {torch.__version__}")
    print_fn("one Mixtral MoE block, forward+backward; ms: median over interleaved reps; peak MB above the start;")
    print_fn("extra = peak - frozen peak; saved = bytes autograd keeps for backward (parameters excluded)")
    head = (
        "| T | d | ff | E | k | r | frozen ms | peft ms | ours ms | ours/peft time | frozen peak MB | peft extra MB "
        "| ours extra MB | ours/peft extra | peft saved extra MB | ours saved extra MB | max |ours-peft| |"
    )
    print_fn(head)
    print_fn("|" + "---|" * (head.count("|") - 1))
    rows = []
    for shape in shapes:
        row = bench_row(*shape, dev, dtype, reps)
        t = row["times"]
        print_fn(
            f"| {row['T']} | {row['d']} | {row['ff']} | {row['E']} | {row['k']} | {row['r']} "
            f"| {t['frozen'].median:.1f} | {t['peft'].median:.1f} | {t['ours'].median:.1f} | {fmt(row['time_ratio'])} "
            f"| {_mb(row['peaks']['frozen'])} | {_mb(row['extra']['peft'])} | {_mb(row['extra']['ours'])} "
            f"| {fmt(row['extra_ratio'], digits=3)} | {_mb(row['saved_extra']['peft'])} "
            f"| {_mb(row['saved_extra']['ours'])} | {row['max_diff']:.1e} (LoRA part {row['lora_scale']:.1e}) |"
        )
        rows.append(row)
    return rows
