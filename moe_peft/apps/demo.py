"""The README demo: train MoLE on a built-in tiny Llama and the bundled synthetic multi-task data.

    moe-peft demo             # about 35 s on an idle 2-core CPU
    moe-peft demo --steps 200 # a quick look

It trains with a plain PyTorch loop (router losses arrive through outputs.loss), prints the loss falling,
the expert load per layer and per task, saves the adapter, reloads it into a fresh base model with
PeftModel.from_pretrained, checks the outputs are identical, and generates.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import defaultdict
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..bases.tiny import tiny_llama
from ..data import (
    DEFAULT_TASKS,
    CharTokenizer,
    Collator,
    exact_match_by_task,
    generate_answers,
    make_dataset,
    make_samples,
    tokenize_sample,
)
from ..tuners.routed.config import MoLEConfig
from ..tuners.routed.model import routing_stats


@torch.no_grad()
def expert_load_by_task(model, tokenizer, samples: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{layer: {task: load [E]}} from one forward per task (padding excluded)."""
    collate = Collator(tokenizer)
    by_task = defaultdict(list)
    for s in samples:
        by_task[s["task"]].append(s)
    table: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for task, rows in sorted(by_task.items()):
        batch = collate([tokenize_sample(r, tokenizer) for r in rows])
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for layer, st in routing_stats(model, "default").items():
            table[layer][task] = st["load"]
    return table


def run_demo(
    out_dir: str = "out/demo",
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    threads: Optional[int] = 1,
) -> dict:
    """Train, save, reload, generate. threads: torch threads (1 by default: a tiny model gains nothing from
    more, and one thread gives the same numbers on any machine); None leaves torch's setting."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices between peft and transformers
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    tokenizer = CharTokenizer()
    base = tiny_llama(vocab_size=tokenizer.vocab_size, seed=seed)
    base.save_pretrained(os.path.join(out_dir, "base"))  # the reload below needs the same base weights
    tokenizer.save_pretrained(os.path.join(out_dir, "base"))

    train = make_dataset(steps * batch_size, tasks=DEFAULT_TASKS, seed=seed, tokenizer=tokenizer)
    test = make_samples(96, tasks=DEFAULT_TASKS, seed=seed + 1000)

    config = MoLEConfig(
        r=8,
        lora_alpha=16,
        num_experts=4,
        top_k=1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        router_aux_loss_coef=0.01,
        # the character vocabulary is new to the base model: train its embeddings and head in full, as PEFT
        # recommends for new tokens, so the experts can spend their capacity on the tasks
        modules_to_save=["embed_tokens", "lm_head"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    print(
        f"moe-peft demo: MoLE, {config.num_experts} LoRA experts of rank {config.r}, top-{config.top_k}"
        f"{' (routers frozen at init, the top-1 default)' if config.router_lr_ratio == 0 else ''}, "
        f"tasks {', '.join(DEFAULT_TASKS)}"
    )
    model.print_trainable_parameters()

    model.eval()
    acc_before = exact_match_by_task(model, tokenizer, test)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=Collator(tokenizer))
    losses = []
    bar = tqdm(total=steps, desc="training", unit="step", mininterval=1.0)
    for step, batch in enumerate(loader):
        if step == steps:
            break
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", router=f"{out.router_loss.item():.4f}")
        if step % max(1, steps // 8) == 0 or step == steps - 1:
            tqdm.write(f"step {step:4d}  loss {losses[-1]:.4f}  (router part {out.router_loss.item():.4f})")
    bar.close()

    model.eval()
    acc_after = exact_match_by_task(model, tokenizer, test)
    loads = expert_load_by_task(model, tokenizer, test)
    adapter_dir = os.path.join(out_dir, "adapter")
    model.save_pretrained(adapter_dir)

    # reload as a user would in a new session: base from disk + adapter from disk
    fresh = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "base"))
    reloaded = PeftModel.from_pretrained(fresh, adapter_dir).eval()
    probe = Collator(tokenizer)([{"input_ids": tokenizer.encode(s["prompt"], True), "labels": [0]} for s in test[:8]])
    with torch.no_grad():
        same = torch.equal(
            model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits,
            reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits,
        )
    examples = test[:6]
    answers = generate_answers(reloaded, tokenizer, [s["prompt"] for s in examples])
    wall = time.perf_counter() - t_start

    first, last = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    print(f"\nloss: first 10 steps {first:.3f} -> last 10 steps {last:.3f}")
    print("exact match on held-out prompts, before -> after training:")
    for task in acc_after:
        print(f"  {task}: {acc_before[task]:.2f} -> {acc_after[task]:.2f}")
    print("\nexpert load per layer (fraction of tokens per expert) for each task:")
    for layer, per_task in loads.items():
        print(f"  {layer}")
        for task, load in per_task.items():
            print(f"    {task}: " + " ".join(f"{x:.2f}" for x in load))
    print(f"\nsaved adapter to {adapter_dir}; reloaded with PeftModel.from_pretrained: identical logits = {same}")
    for s, a in zip(examples, answers):
        print(f"  {s['prompt']}{a:<10} (expected {s['completion']})")
    print(f"demo wall time {wall:.1f}s")
    return {
        "losses": losses,
        "loss_first": first,
        "loss_last": last,
        "acc_before": acc_before,
        "acc_after": acc_after,
        "reload_identical": same,
        "wall_s": wall,
    }
