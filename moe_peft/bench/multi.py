"""`moe-peft bench multi`: many LoRA adapters in one batch (moe_peft.multi_lora) against the ways PEFT does it.

    moe-peft bench multi --threads 1             # CPU: the model table + the layer table (5-7 min on 2 cores)
    moe-peft bench multi --adapters 8 --reps 3   # one adapter count
    python -c "from moe_peft.bench.multi import bench_multi; bench_multi()"

Model table: a Llama (CPU: hidden 512, 2 layers; CUDA: hidden 2048, 4 layers, bf16) with N adapters of rank 16 on
all seven projections, a batch whose samples each name one adapter (interleaved, every adapter used), timed per
batch as interleaved medians (bench/timing.py), in three modes:
  fwd        one forward of the batch (serving prefill, no cache)
  generate   generate() with the KV cache, GEN_TOKENS new tokens per sample (serving)
  fwd+bwd    forward, the per-adapter loss (multi_lora.per_adapter_loss) and backward (training several adapters)
Candidates, all on the same weights and tokens:
  ours       multi_lora.enable(model): model(..., adapter_names=names), one op call per adapted linear
  peft       PEFT's own mixed batch (`adapter_names`: a Python loop over the adapters in every LoRA layer). PEFT
             refuses it in training mode, so for fwd+bwd it runs in eval mode with gradients (dropout is 0 here)
  separate   each adapter's sub-batch on its own: set_adapter(a), then forward / generate / forward+backward
  base       the bare model without adapters (fwd and generate): the floor
Ratios (peft/ours, separate/ours: how many times faster ours is; '-' when the denominator is within noise) come
from the same process. `max|d|` is the largest logit difference between ours and PEFT's mixed batch.

Layer table: one linear layer (frozen base + N adapters) against PEFT's `_mixed_batch_forward` on the same LoRA
layer, inference, for a prefill (32 tokens per sample) and a decode step (1 token per sample): the path "auto"
takes and every torch path forced (where `choose_per_sample_path`'s rule comes from).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import linear_lora_per_sample
from .timing import difference, fmt, interleaved, ratio

RANK = 16
ADAPTER_COUNTS = (2, 8, 32)
GEN_TOKENS = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    samples: int
    seq: int


MODEL_CPU = ModelShape(hidden=512, intermediate=1024, layers=2, heads=8, vocab=512, samples=64, seq=32)
MODEL_GPU = ModelShape(hidden=2048, intermediate=5632, layers=4, heads=16, vocab=32000, samples=64, seq=256)
# (samples, tokens each, d, adapters, r): a prefill and a decode step (one token per sample)
LAYER_CPU = [(64, s, 1024, n, RANK) for s in (32, 1) for n in ADAPTER_COUNTS]
LAYER_GPU = [(64, s, 4096, n, RANK) for s in (256, 1) for n in ADAPTER_COUNTS]


def _lora_config(**kw):
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False, **kw)


def build_models(shape: ModelShape, n_adapters: int, device, dtype, seed: int = 0):
    """(ours, peft, separate, base): the same weights four times (ours with multi_lora enabled)."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from .. import multi_lora

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.seq + GEN_TOKENS + 8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    bare = copy.deepcopy(base)
    ours = get_peft_model(base, _lora_config(), adapter_name="a0")  # random B (init_lora_weights=False)
    for i in range(1, n_adapters):
        ours.add_adapter(f"a{i}", _lora_config())
    ours.eval()
    peft, separate = copy.deepcopy(ours), copy.deepcopy(ours)
    multi_lora.enable(ours, training=True)
    peft.base_model.set_requires_grad([f"a{i}" for i in range(n_adapters)], requires_grad=True)
    return ours, peft, separate, bare


def make_batch(shape: ModelShape, n_adapters: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    samples = max(shape.samples, n_adapters)
    ids = torch.randint(3, shape.vocab, (samples, shape.seq), generator=g)
    order = torch.randperm(samples, generator=g)
    names = [f"a{int(order[i]) % n_adapters}" for i in range(samples)]  # interleaved, every adapter used
    groups = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    groups = {a: torch.tensor(rows, device=device) for a, rows in groups.items()}
    ids = ids.to(device)
    return ids, torch.ones_like(ids), names, groups


def model_candidates(ours, peft, separate, bare, ids, mask, names, groups):
    """{mode: {candidate: fn}} for the model table."""
    from .. import multi_lora

    gen = dict(max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=0)

    def forward(model, **kw):
        def run():
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits

        return run

    def forward_separate():
        with torch.no_grad():
            for adapter, rows in groups.items():
                separate.base_model.set_adapter(adapter)
                separate(input_ids=ids[rows], attention_mask=mask[rows], use_cache=False)

    def generate(model, **kw):
        return lambda: model.generate(input_ids=ids, attention_mask=mask, **gen, **kw)

    def generate_separate():
        for adapter, rows in groups.items():
            separate.base_model.set_adapter(adapter)
            separate.generate(input_ids=ids[rows], attention_mask=mask[rows], **gen)

    def train(model, training: bool):
        def run():
            model.train(training)  # PEFT's mixed batch refuses train mode: eval mode with gradients
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, adapter_names=names)
            loss, _ = multi_lora.per_adapter_loss(out, ids, names)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    def train_separate():
        separate.train()
        for adapter, rows in groups.items():
            separate.base_model.set_adapter(adapter)  # makes it the trainable one
            out = separate(input_ids=ids[rows], attention_mask=mask[rows], use_cache=False, labels=ids[rows])
            out.loss.backward()
        separate.zero_grad(set_to_none=True)

    return {
        "fwd": {
            "ours": forward(ours, adapter_names=names),
            "peft": forward(peft, adapter_names=names),
            "separate": forward_separate,
            "base": forward(bare),
        },
        "generate": {
            "ours": generate(ours, adapter_names=names),
            "peft": generate(peft, adapter_names=names),
            "separate": generate_separate,
            "base": generate(bare),
        },
        "fwd+bwd": {"ours": train(ours, True), "peft": train(peft, False), "separate": train_separate},
    }


def bench_model(
    shape: ModelShape, counts, device, dtype, reps: int, modes=("fwd", "generate", "fwd+bwd"), print_fn=print
) -> list[dict]:
    print_fn(
        f"{'adapters':>8} {'mode':>8} | {'ours ms±iqr/2':>16} {'peft ms':>10} {'separate ms':>11} {'base ms':>10} | "
        f"{'peft/ours':>9} {'separate/ours':>13} {'ovh/peft-ovh':>12} {'max|d|':>8}"
    )
    rows = []
    for n in counts:
        models = build_models(shape, n, device, dtype)
        ids, mask, names, groups = make_batch(shape, n, device)
        fns = model_candidates(*models, ids, mask, names, groups)
        with torch.no_grad():  # ours equals PEFT's mixed batch on these weights and tokens
            diff = (fns["fwd"]["ours"]().float() - fns["fwd"]["peft"]().float()).abs().max().item()
        for mode in modes:
            t = interleaved(fns[mode], device, reps)
            row = dict(adapters=n, mode=mode, **{f"{k}_ms": v.median for k, v in t.items()}, max_diff=diff)
            row.update(peft_over_ours=ratio(t["peft"], t["ours"]), separate_over_ours=ratio(t["separate"], t["ours"]))
            ovh = None
            if "base" in t:  # what the adapters add over the bare model, ours against PEFT's loop
                ovh = ratio(difference(t["ours"], t["base"]), difference(t["peft"], t["base"]))
            row["ovh_over_peft_ovh"] = ovh
            base_ms = f"{t['base'].median:>10.1f}" if "base" in t else f"{'-':>10}"
            print_fn(
                f"{n:>8} {mode:>8} | {str(t['ours']):>16} {t['peft'].median:>10.1f} {t['separate'].median:>11.1f} "
                f"{base_ms} | {fmt(row['peft_over_ours'], 9)} {fmt(row['separate_over_ours'], 13)} {fmt(ovh, 12)} "
                f"{diff:>8.1e}"
            )
            rows.append(row)
        del models, fns
    return rows


# -- the layer table (the op alone; moved here from bench/ops.py) -------------------------------------------------


def bench_multi_adapter(shapes, device, dtype, reps, print_fn=print) -> list[dict]:
    """Per-sample adapter selection (inference) in one linear layer: ours (`linear_lora_per_sample`, backend "auto",
    and each torch path forced) vs PEFT's mixed-batch `adapter_names` forward on a LoRA layer with the same adapters."""
    paths = ["bmm", "dense", "grouped"] if device.type != "cuda" else ["torch"]
    print_fn(
        f"{'samples':>7} {'tokens':>6} {'d':>5} {'adapters':>8} {'r':>3} | {'auto':>7} {'ours ms':>8} {'peft ms':>8} "
        + " ".join(f"{p + ' ms':>10}" for p in paths)
        + f" | {'peft/ours':>9}"
    )
    rows = []
    for shape in shapes:
        row_reps = reps if shape[1] > 1 else 4 * reps  # a decode step lasts milliseconds: more samples of its noise
        t, diff, scale, chosen = _layer_row(*shape, device, dtype, row_reps, paths)
        speedup = ratio(t["peft"], t["ours"])
        print_fn(
            " ".join(f"{v:>{w}}" for v, w in zip(shape, (7, 6, 5, 8, 3)))
            + f" | {chosen:>7} {t['ours'].median:>8.3f} {t['peft'].median:>8.3f} "
            + " ".join(f"{t[p].median:>10.3f}" for p in paths)
            + f" | {fmt(speedup, 9)}   (max |ours - peft| = {diff:.1e}, max |delta| = {scale:.1e})"
        )
        rows.append(
            dict(zip(("samples", "seq", "d", "adapters", "r"), shape), path=chosen, peft_over_ours=speedup,
                 **{f"{k}_ms": v.median for k, v in t.items()})
        )  # fmt: skip
    return rows


def _layer_row(n_samples, seq, d, n_adapters, r, device, dtype, reps, paths=()):
    from peft import LoraConfig, get_peft_model

    from ..ops import choose_per_sample_path

    g = torch.Generator(device).manual_seed(0)
    wrapper = nn.Sequential()
    wrapper.add_module("lin", nn.Linear(d, d, bias=False))
    model = get_peft_model(wrapper, LoraConfig(r=r, lora_alpha=r, target_modules=["lin"]), adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", LoraConfig(r=r, lora_alpha=r, target_modules=["lin"]))
    layer = model.base_model.model.lin.to(device=device, dtype=dtype)
    names = [f"a{i}" for i in range(n_adapters)]
    for name in names:
        nn.init.normal_(layer.lora_B[name].weight, std=0.01)
    a = torch.stack([layer.lora_A[n].weight for n in names]).detach()  # [N, r, d]
    b = torch.stack([layer.lora_B[n].weight for n in names]).detach()  # [N, d, r]
    x = torch.randn(n_samples, seq, d, device=device, generator=g).to(dtype)
    choice = torch.randint(0, n_adapters, (n_samples,), device=device, generator=g)
    adapter_names = [names[i] for i in choice.tolist()]
    weight = layer.base_layer.weight

    def ours(backend="auto"):
        def run():
            with torch.no_grad():
                return linear_lora_per_sample(x, weight, None, a, b, choice, 1.0, backend)

        return run

    def peft():
        with torch.no_grad():
            return layer._mixed_batch_forward(x, adapter_names=adapter_names)

    with torch.no_grad():
        scale = (peft() - F.linear(x, weight)).abs().max().item()  # the adapters' share
    diff = (ours()().float() - peft().float()).abs().max().item()
    fns = {"ours": ours(), "peft": peft, **{p: ours(p) for p in paths}}
    return interleaved(fns, device, reps), diff, scale, choose_per_sample_path(x, a)


def bench_multi(
    device: Optional[str] = None,
    reps: Optional[int] = None,
    adapters: Optional[list[int]] = None,
    modes=("fwd", "generate", "fwd+bwd"),
    layer_table: bool = True,
    print_fn=print,
) -> dict[str, list[dict]]:
    """Both tables; returns their rows: {"model": [...], "layer": [...]}."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    reps = reps or (10 if dev.type == "cuda" else 5)
    counts = adapters or list(ADAPTER_COUNTS)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    shape = MODEL_GPU if dev.type == "cuda" else MODEL_CPU
    print_fn(f"moe-peft bench multi | {name} | {dtype} base, fp32 adapters of rank {RANK} | torch {torch.__version__}")
    print_fn(
        f"model: Llama hidden {shape.hidden}, {shape.layers} layers, adapters on all 7 projections; batch "
        f"{shape.samples} samples x {shape.seq} tokens (generate: +{GEN_TOKENS} tokens); ms per batch, medians"
    )
    print_fn("ratios: peft/ours and separate/ours (x faster than PEFT's mixed batch / than sub-batches one adapter")
    print_fn("at a time), ovh/peft-ovh (what the adapters add over the bare model, ours / PEFT's)")
    result = {"model": bench_model(shape, counts, dev, dtype, reps, modes, print_fn)}
    if layer_table:
        print_fn(
            "\none linear layer (base + adapters), inference, ms; auto: the path ours takes; bmm/dense/grouped forced:"
        )
        shapes = [s for s in (LAYER_GPU if dev.type == "cuda" else LAYER_CPU) if s[3] in counts]
        result["layer"] = bench_multi_adapter(shapes, dev, dtype, reps, print_fn)
    return result
