"""`moe-peft demo --base smollm2-135m`: MoLE on a real chat model, in a few minutes on a 2-core CPU.

    moe-peft demo --base smollm2-135m              # converts the GGUF file once (~30 s), then trains 40 steps
    moe-peft demo --base smollm2-135m --steps 20   # a quicker look

It loads SmolLM2-135M-Instruct (moe_peft.bases.real), asks it a few instruction prompts and a set of facts, trains a
MoLE adapter (top-2 of 4 LoRA experts, one per task) on conflicting instruction tasks through the chat template,
with an eighth of the rows being general requests answered by the base itself (so that it keeps its manner), then
shows the same chat answers after training, exact match per task on held-out prompts, which of the facts the base
knew are still answered, and the expert load per task; it saves the adapter, reloads it into a fresh base and checks
the logits are identical.
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Optional

import torch

from ..bases.real import base_path, load
from ..data.bundled import Collator
from ..data.instructions import (
    FACTS,
    exact_match,
    general_prompts,
    generate_chat,
    generate_chat_ids,
    make_instruction_samples,
    mentions,
    tokenize_chat,
)
from ..tuners.routed.config import MoLEConfig
from ..tuners.routed.model import routing_stats

DEMO_TASKS = ("first", "last", "reverse", "initials")
DEMO_FACTS = 24  # the first facts of moe_peft.data.instructions.FACTS: asked before and after


def _autocast(dtype: Optional[torch.dtype]):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def _load_by_task(model, tokenizer, samples: list[dict]) -> dict[str, list[float]]:
    """{task: expert load averaged over the routed layers} from one forward per task (padding excluded)."""
    collate = Collator(tokenizer)
    out = {}
    for task in DEMO_TASKS:
        batch = collate([tokenize_chat(s, tokenizer) for s in samples if s["task"] == task])
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loads = [st["load"] for st in routing_stats(model, "default").values()]
        out[task] = [statistics.mean(col) for col in zip(*loads)]
    return out


def run_real_demo(
    base: str = "smollm2-135m",
    out_dir: str = "out/demo_smollm2-135m",
    steps: int = 40,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    threads: Optional[int] = 1,
    dtype: str = "bfloat16",
    log: Callable = print,
) -> dict:
    """Train, compare before and after, save, reload. dtype: "bfloat16" (CPU autocast, the weights stay float32;
    about twice as fast on a CPU with bf16 instructions) or "float32". threads: torch threads; 1 by default: on a
    shared machine a second thread waits for a core another process holds, and a step took 10x longer (measured:
    46 s against 4.5 s with one thread while another job ran; docs/real-base.md)."""
    from peft import PeftModel, get_peft_model

    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype={dtype!r} is invalid: use 'bfloat16' or 'float32'.")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: use a positive integer.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the weight-loading bars of the two loads
    if threads is not None:
        torch.set_num_threads(threads)
    amp = torch.bfloat16 if dtype == "bfloat16" else None
    t_start = time.perf_counter()
    model, tokenizer = load(base, log=log)
    log(
        f"loaded {base} in {time.perf_counter() - t_start:.1f} s ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M)"
    )

    test = {t: make_instruction_samples(8, [t], 10_000 + i) for i, t in enumerate(DEMO_TASKS)}
    held_out = {s["prompt"] for rows in test.values() for s in rows}
    examples = [rows[0] for rows in test.values()]
    facts = FACTS[:DEMO_FACTS]

    def task_scores(m) -> dict[str, float]:
        scores = {}
        for task, rows in test.items():
            answers = generate_chat(m, tokenizer, [s["prompt"] for s in rows], 16)
            scores[task] = sum(exact_match(a, s["completion"]) for a, s in zip(answers, rows)) / len(rows)
        return scores

    t0 = time.perf_counter()
    with _autocast(amp):
        before = task_scores(model)
        chat_before = generate_chat(model, tokenizer, [s["prompt"] for s in examples], 24)
        fact_before = generate_chat(model, tokenizer, [q for q, _ in facts], 16)
        general = generate_chat_ids(model, tokenizer, general_prompts("train"), 24, keep_eos=True)
    known = [mentions(a, accepted) for a, (_, accepted) in zip(fact_before, facts)]
    log(f"before training ({time.perf_counter() - t0:.0f} s): the base knows {sum(known)} of {len(facts)} facts")

    # the training rows: the tasks in equal numbers (no held-out prompt), and an eighth of general requests answered
    # by the base itself (its own greedy answers, cut at 24 tokens), shuffled
    total = steps * batch_size
    rows = make_instruction_samples(total - total // 8, DEMO_TASKS, seed, exclude=held_out)
    prompts = general_prompts("train")
    rows += [
        {
            "task": "general",
            "sample_type": 1,
            "prompt": prompts[i % len(prompts)],
            "completion_ids": general[i % len(prompts)],
        }
        for i in range(total // 8)
    ]
    random.Random(seed).shuffle(rows)
    collate = Collator(tokenizer)
    batches = [
        collate([tokenize_chat(r, tokenizer) for r in rows[i : i + batch_size]]) for i in range(0, total, batch_size)
    ]

    config = MoLEConfig(
        r=8, lora_alpha=16, num_experts=len(DEMO_TASKS), top_k=2, router_aux_loss_coef=0.01, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    log(
        f"\nMoLE: {config.num_experts} LoRA experts of rank {config.r}, top-{config.top_k}, on the 7 projections of "
        f"every layer; tasks {', '.join(DEMO_TASKS)} + general rows; {steps} steps of {batch_size}, lr {lr:g}, {dtype}"
    )
    peft_model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    peft_model.train()
    losses, t0 = [], time.perf_counter()
    for step, batch in enumerate(batches):
        with _autocast(amp):
            out = peft_model(**batch)
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            log(
                f"step {step:3d}  loss {losses[-1]:.3f}  (router part {out.router_loss.item():.4f})  {time.perf_counter() - t0:.0f} s"
            )
    train_s = time.perf_counter() - t0

    peft_model.eval()
    with _autocast(amp):
        after = task_scores(peft_model)
        chat_after = generate_chat(peft_model, tokenizer, [s["prompt"] for s in examples], 24)
        fact_after = generate_chat(peft_model, tokenizer, [q for q, _ in facts], 16)
        loads = _load_by_task(peft_model, tokenizer, [s for rows in test.values() for s in rows])
    kept = [mentions(a, accepted) for a, (_, accepted) in zip(fact_after, facts)]

    adapter_dir = os.path.join(out_dir, "adapter")
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    fresh, _ = load(base, log=log)
    reloaded = PeftModel.from_pretrained(fresh, adapter_dir).eval()
    probe = collate([tokenize_chat(s, tokenizer) for s in examples])
    with torch.no_grad():
        inputs = {"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}
        same = torch.equal(peft_model(**inputs).logits, reloaded(**inputs).logits)
    wall = time.perf_counter() - t_start

    log(
        f"\nloss: first 5 steps {statistics.mean(losses[:5]):.3f} -> last 5 steps {statistics.mean(losses[-5:]):.3f} ({train_s:.0f} s)"
    )
    log("exact match on 8 held-out prompts per task, before -> after training:")
    for task in DEMO_TASKS:
        log(f"  {task:9s} {before[task]:.2f} -> {after[task]:.2f}")
    log("\nchat answers, before -> after:")
    for s, a, b in zip(examples, chat_before, chat_after):
        log(f"  {s['prompt']}\n    before: {a!r}\n    after:  {b!r}   (expected {s['completion']!r})")
    n_known = sum(known)
    still = sum(k and r for k, r in zip(known, kept))
    log(f"\nfacts the base knew ({n_known} of {len(facts)}): {still} still answered right after training")
    for (q, _), k, r, a in zip(facts, known, kept, fact_after):
        if k:
            log(f"  {'kept' if r else 'LOST'}  {q} -> {a!r}")
    log("\nexpert load per task (mean over the routed layers):")
    for task, load_ in loads.items():
        log(f"  {task:9s} " + " ".join(f"{x:.2f}" for x in load_))
    log(f"\nsaved adapter to {adapter_dir} (base: {base_path(base, log=log)}); reloaded: identical logits = {same}")
    log(f"demo wall time {wall:.0f} s")
    return {
        "losses": losses,
        "before": before,
        "after": after,
        "chat_before": chat_before,
        "chat_after": chat_after,
        "facts_known": n_known,
        "facts_kept": still,
        "reload_identical": same,
        "wall_s": wall,
        "train_s": train_s,
    }
