"""Plain LoRA vs LLaVA-MoLE vs LLaVA-MoLE with modality groups on the bundled image+text tasks, at equal trainable
parameters, same steps and data order, 3 seeds; prints exact-match accuracy per task type.

    nice -n 10 python benchmarks/llava_mole.py                  # ~15 min on one CPU thread (shared 2-core machine)
    python benchmarks/llava_mole.py --seeds 0 --steps 50        # a quick look

The base is the tiny LLaVA of examples/finetune_llava.py (trained in full on caption/add, cached in --out), the
same for every run. Every method adapts the language model's MLP projections only (LLaVA-MoLE's MoE part; the
attention would get the same plain LoRA in all three) and trains the projector in full:
  * LoRA:          PEFT LoraConfig, rank 4r on gate/up/down
  * MoLE:          4 experts of rank r, top-1, one router per MLP block (moe_peft.llava.mole_llava_config)
  * MoLE + groups: modality_experts {"text": 2, "image": 2} of rank r, top-1 within the group
so the expert weights are the same size (4r per linear); MoLE adds its routers. A fourth row, LoRA of rank r, has
MoLE's per-token rank and cost (a quarter of the parameters): the paper's comparison is at equal cost. A seed fixes
the adapter's initialization and the order of the training samples, the same for every method.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoProcessor, LlavaForConditionalGeneration

from moe_peft.llava import (
    IMAGE_TASKS,
    MLP_REGEX,
    TASKS,
    TEXT_TASKS,
    LlavaCollator,
    make_image_tasks,
    modality_load,
    mole_llava_config,
)
from moe_peft.llava.pretrain import accuracy_by_task, pretrain_tiny_llava

METHODS = ("LoRA", "MoLE", "MoLE + groups", "LoRA, rank r")


def make_adapter(method: str, base, r: int):
    if method.startswith("LoRA"):
        rank = r if method == "LoRA, rank r" else 4 * r
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=MLP_REGEX,
            modules_to_save=["multi_modal_projector"],
        )  # fmt: skip
    elif method == "MoLE":
        config = mole_llava_config(base, num_experts=4, r=r, lora_alpha=2 * r, attention="none")
    else:
        config = mole_llava_config(
            base, modality_experts={"text": 2, "image": 2}, r=r, lora_alpha=2 * r, attention="none"
        )
    return get_peft_model(base, config)


def train(model, collator, rows: list[dict], steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """AdamW, linear warmup (10%) then linear decay; samples in a seeded shuffled order. outputs.loss holds the
    router losses of MoLE."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, (steps - s) / (steps - warmup))
    )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    losses = []
    model.train()
    for step in range(steps):
        index = order[(step * batch_size) % len(rows) :][:batch_size]
        loss = model(**collator([rows[i] for i in index])).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--r", type=int, default=8, help="rank of a MoLE expert; LoRA gets 4r")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--train-samples", type=int, default=4800)
    parser.add_argument("--eval-samples", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="out/finetune_llava")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    base_path = pretrain_tiny_llava(args.out, "llava", steps=args.pretrain_steps, seed=0)
    collator = LlavaCollator(AutoProcessor.from_pretrained(base_path))
    train_rows = make_image_tasks(args.train_samples, TASKS, seed=1)
    test_rows = make_image_tasks(args.eval_samples, TASKS, seed=2)
    base_acc = accuracy_by_task(LlavaForConditionalGeneration.from_pretrained(base_path), collator, test_rows)

    acc = defaultdict(lambda: defaultdict(list))  # method -> task -> [accuracy per seed]
    params, loads = {}, {}
    for seed in args.seeds:
        for method in METHODS:
            torch.manual_seed(seed)
            model = make_adapter(method, LlavaForConditionalGeneration.from_pretrained(base_path), args.r)
            params[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            t = time.perf_counter()
            losses = train(model, collator, train_rows, args.steps, args.batch_size, args.lr, seed)
            result = accuracy_by_task(model, collator, test_rows)
            for task, value in result.items():
                acc[method][task].append(value)
            if method.startswith("MoLE"):
                with torch.no_grad():
                    model(**collator(test_rows[:64]))
                loads[method] = modality_load(model)
            print(
                f"seed {seed} {method:13s} loss {sum(losses[-20:]) / 20:.3f}  "
                + " ".join(f"{k} {v:.2f}" for k, v in result.items())
                + f"  ({time.perf_counter() - t:.0f}s)",
                flush=True,
            )

    def cell(values: list[float]) -> str:
        mean = statistics.mean(values)
        return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"

    def group_mean(method: str, tasks) -> list[float]:
        return [statistics.mean(acc[method][t][i] for t in tasks) for i in range(len(args.seeds))]

    columns = list(TASKS) + ["image tasks", "text tasks"]
    print(f"\nexact match on {args.eval_samples} held-out samples ({args.eval_samples // len(TASKS)} per task), "
          f"mean ± std over seeds {args.seeds}; {args.steps} steps of {args.batch_size}")  # fmt: skip
    print("| method | trainable params | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    base_cells = [f"{base_acc[t]:.2f}" for t in TASKS]
    base_cells += [f"{statistics.mean(base_acc[t] for t in IMAGE_TASKS):.2f}"]
    base_cells += [f"{statistics.mean(base_acc[t] for t in TEXT_TASKS):.2f}"]
    print("| base (no adapter) | 0 | " + " | ".join(base_cells) + " |")
    for method in METHODS:
        cells = [cell(acc[method][t]) for t in TASKS]
        cells += [cell(group_mean(method, IMAGE_TASKS)), cell(group_mean(method, TEXT_TASKS))]
        print(f"| {method} | {params[method]:,} | " + " | ".join(cells) + " |")
    print("\nexpert load per modality group (last seed, share of the group's picks, mean over the MLP blocks):")
    for method, load in loads.items():
        print(f"  {method}: " + "; ".join(f"{g} " + " ".join(f"{x:.2f}" for x in s["load"]) for g, s in load.items()))
    print(f"\nwall time {time.perf_counter() - t0:.0f}s")
    return {"acc": {m: dict(v) for m, v in acc.items()}, "params": params, "base": base_acc}


if __name__ == "__main__":
    main()
