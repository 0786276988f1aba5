"""A tiny LLaVA (or LLaVA-NeXT) trained in full on the bundled base tasks: a base that sees and speaks a little,
for the LLaVA example and benchmark (LLaVA-MoLE fine-tunes a pretrained LLaVA; a random one would have a vision
tower whose features mean nothing, and the vision tower stays frozen during fine-tuning)."""

from __future__ import annotations

import os
from collections import defaultdict

import torch

from .collator import LlavaCollator, answers_from
from .data import BASE_TASKS, build_processor, make_image_tasks

TINY = dict(hidden_size=64, num_layers=2, image_size=16, patch_size=4, vision_hidden_size=32, vision_layers=2)


def pretrain_tiny_llava(
    out_dir: str,
    kind: str = "llava",
    steps: int = 1000,
    seed: int = 0,
    tasks=BASE_TASKS,
    batch_size: int = 32,
    lr: float = 1e-3,
) -> str:
    """Train a tiny `kind` model ("llava" or "llava_next", sizes in TINY) in full on `tasks` for `steps` steps,
    save it with its processor under `out_dir`, and return the directory; an existing one is reused (the torch
    thread count is in its name: floating-point sums, and so the trained weights, depend on it)."""
    from ..bases.tiny import tiny_llava, tiny_llava_next

    name = f"base-{kind}-{steps}-{seed}-{lr}-{'-'.join(tasks)}-t{torch.get_num_threads()}"
    path = os.path.join(out_dir, name)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    processor = build_processor(kind, image_size=TINY["image_size"], patch_size=TINY["patch_size"])
    builder = tiny_llava if kind == "llava" else tiny_llava_next
    model = builder(vocab_size=len(processor.tokenizer), seed=seed, **TINY)
    collator = LlavaCollator(processor)
    rows = make_image_tasks(steps * batch_size, tasks, seed=seed + 1000, image_size=TINY["image_size"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))  # warmup, then constant
    model.train()
    for step in range(steps):
        model(**collator(rows[step * batch_size : (step + 1) * batch_size])).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path


@torch.no_grad()
def accuracy_by_task(model, collator: LlavaCollator, rows: list[dict], batch_size: int = 32) -> dict[str, float]:
    """Exact match of the greedy answer, per task (the generation stops at </s>)."""
    model.eval()
    hits = defaultdict(list)
    tokenizer = collator.tokenizer
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collator.generation_batch(chunk).items()}
        generated = model.generate(
            **batch,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, answer in zip(chunk, answers_from(collator, generated, batch["input_ids"].shape[1])):
            hits[row["task"]].append(answer == row["answer"])
    return {task: sum(v) / len(v) for task, v in sorted(hits.items())}
