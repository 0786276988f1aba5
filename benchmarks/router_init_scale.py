"""How sharp routing is at step 0 for each router_init_std (issue 23: the routers' initialisation), on the quality
suites' bases: one training batch through MoLE top-1 block routers (6 experts, learned), no training.

    python benchmarks/router_init_scale.py                        # the tiny suite's pre-trained base (hidden 128)
    python benchmarks/router_init_scale.py --suite smollm2-135m   # SmolLM2-135M-Instruct (hidden 576, 30 layers)

Per std: the router logits' std over the experts (mean over real tokens and routers, and its range by router), the
mean top probability, and the mean routing entropy / log E (1: uniform). A router's logit std is std * |x|, so the
same std routes more sharply on a base whose router inputs have a larger norm.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os

import torch
from peft import get_peft_model

from moe_peft.bench.quality_methods import _mole
from moe_peft.tuners.routed.layer import MoELoraLinear

E = 6


def tiny_batch_and_base():
    from moe_peft.bench.quality import Suite, load_base, make_batches, pretrained_base, training_mixture
    from moe_peft.data.bundled import CharTokenizer

    suite, tokenizer = Suite(), CharTokenizer()
    base_dir = pretrained_base(suite, os.path.expanduser("~/.cache/moe_peft/bench_quality"), tokenizer)
    batch = make_batches(suite, training_mixture(suite, 0, set()), tokenizer)[0]
    return batch, lambda: load_base(base_dir), suite.budget_rank // E  # the expert rank is irrelevant here


def real_batch_and_base():
    from moe_peft.bench import quality_real as qr

    suite = dataclasses.replace(qr.RealSuite(), general_share=0.0)  # task rows only: no reference answers needed
    tokenizer = qr.load_tokenizer(suite.base_dir)
    batch = qr.make_batches(suite, qr.training_mixture(suite, 0, [])[: suite.batch_size], tokenizer)[0]
    return batch, lambda: qr.load_base(suite.base_dir, suite), 7


def measure(model, batch) -> list[tuple[float, float, float]]:
    """(logit std over experts, top probability, entropy / log E) per router, each a mean over real tokens."""
    real = batch["attention_mask"].flatten().bool()  # [B*S]
    stats = []

    def hook(module, args, routing):
        logits = routing.logits[real]  # [T, E]
        p = logits.softmax(-1)  # [T, E]
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(E)  # [T]
        stats.append((logits.std(-1).mean().item(), p.max(-1).values.mean().item(), entropy.mean().item()))

    hooks = [
        layer.routers["default"].register_forward_hook(hook)
        for layer in model.modules()
        if isinstance(layer, MoELoraLinear) and "default" in layer.routers
    ]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    return stats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("tiny", "smollm2-135m"), default="tiny")
    parser.add_argument("--stds", default="0.002,0.02,0.2")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    batch, load, rank = tiny_batch_and_base() if args.suite == "tiny" else real_batch_and_base()
    print("| router_init_std | routers | logit std (by router) | mean top probability | entropy / log E |")
    print("|---|---|---|---|---|")
    for std in (float(s) for s in args.stds.split(",")):
        torch.manual_seed(0)
        config = _mole(E, top_k=1, router_lr_ratio=1.0, router_init_std=std)(rank)
        stats = measure(get_peft_model(load(), config), batch)
        n = len(stats)
        lo, hi = min(s[0] for s in stats), max(s[0] for s in stats)
        print(f"| {std:g} | {n} | {sum(s[0] for s in stats) / n:.3f} ({lo:.3f}-{hi:.3f}) "
              f"| {sum(s[1] for s in stats) / n:.2f} | {sum(s[2] for s in stats) / n:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
