"""Serving several LoRA fine-tunes of one base in one batch: every request names its adapter.

    python examples/multi_adapter_serving.py             # trains (about 2 min on 2 CPU cores, cached in out/), then serves
    python examples/multi_adapter_serving.py --quick     # a smoke run (seconds, meaningless answers)

Scenario (one): a tiny Llama is first trained in full on the bundled tasks cpy and dup (it learns the characters
and the prompt format). Three fine-tunes are then trained on top of it, one ordinary PEFT LoRA per task (rev, srt,
sft), all three at once on one frozen base with `moe_peft.multi_lora.Trainer` (each sample trains only its own
adapter), and each is saved to its own directory. Both steps are cached: a second run skips them.

Serving: the base and the three adapters are loaded with plain PEFT (`PeftModel.from_pretrained`, `load_adapter`),
`multi_lora.enable(model)` is called once, and one mixed batch of requests, each naming its adapter (or
`"__base__"` for the bare model), is answered by one `generate(..., adapter_names=...)` with the KV cache: every
adapted linear applies all the requests' adapters in one op call. The script prints each request's adapter and
answer, checks them against PEFT's own mixed-batch generate (its per-adapter loop) and times both (interleaved
medians; on this tiny model per-call overheads, not the matrix work, decide them: `moe-peft bench multi` measures
realistic sizes).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments

from moe_peft import multi_lora
from moe_peft.bases import tiny_llama
from moe_peft.bench.timing import interleaved
from moe_peft.data import CharTokenizer, Collator, generate_answers, make_dataset, make_samples

BASE_TASKS = ("cpy", "dup")
ADAPTERS = ("rev", "srt", "sft")  # one fine-tune per task; the adapter is named after its task
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_base(out: str, tokenizer: CharTokenizer, steps: int, seed: int) -> None:
    """Full training of the tiny base on cpy and dup: a plain loop, AdamW, one-cycle schedule."""
    base = tiny_llama(vocab_size=tokenizer.vocab_size, seed=seed)
    data = make_dataset(steps * 32, tasks=BASE_TASKS, seed=seed, tokenizer=tokenizer)
    optimizer = torch.optim.AdamW(base.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, collate_fn=Collator(tokenizer))
    base.train()
    for step, batch in enumerate(loader):
        if step == steps:
            break
        loss = base(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"base trained in full on {', '.join(BASE_TASKS)}: last loss {loss.item():.3f}")
    base.save_pretrained(os.path.join(out, "base"))


def train_adapters(out: str, tokenizer: CharTokenizer, steps: int, seed: int) -> None:
    """One LoRA per task, all trained at once in mixed batches (each sample trains only its own adapter)."""
    model = None
    for task in ADAPTERS:
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
        if model is None:
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(os.path.join(out, "base")), config, task)
        else:
            model.add_adapter(task, config)
    data = make_dataset(steps * 48, tasks=ADAPTERS, seed=seed + 1, tokenizer=tokenizer)
    data = data.add_column("adapter", data["task"])  # each sample names its adapter
    args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        max_steps=steps,
        per_device_train_batch_size=48,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0,
        logging_steps=max(1, steps // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    trainer = multi_lora.Trainer(model=model, args=args, train_dataset=data, data_collator=Collator(tokenizer))
    trainer.train()
    last = [e for e in trainer.state.log_history if "loss" in e][-1]
    print(
        "adapters trained together, last logged loss per adapter: "
        + ", ".join(f"{a} {last[f'loss/{a}']:.3f}" for a in ADAPTERS)
    )
    trainer.save_model(os.path.join(out, "adapters"))  # adapters/<task>/, each loadable by plain PEFT


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/multi_adapter")
    parser.add_argument("--base-steps", type=int, default=800)
    parser.add_argument("--adapter-steps", type=int, default=600)
    parser.add_argument("--requests", type=int, default=12, help="size of the mixed batch served")
    parser.add_argument("--reps", type=int, default=5, help="timed generate() calls of each path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny matrices: 1 is fastest)")
    parser.add_argument("--retrain", action="store_true", help="ignore the cached base and adapters")
    parser.add_argument("--quick", action="store_true", help="tiny step counts: checks the pipeline runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.base_steps, args.adapter_steps, args.requests, args.reps = 20, 10, 8, 1
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    tokenizer = CharTokenizer()
    t0 = time.perf_counter()
    if args.retrain or not os.path.exists(os.path.join(args.out, "base", "config.json")):
        train_base(args.out, tokenizer, args.base_steps, args.seed)
    adapter_dirs = {a: os.path.join(args.out, "adapters", a) for a in ADAPTERS}
    if args.retrain or not all(os.path.exists(os.path.join(d, "adapter_config.json")) for d in adapter_dirs.values()):
        train_adapters(args.out, tokenizer, args.adapter_steps, args.seed)
    trained_s = time.perf_counter() - t0

    # serving: plain PEFT loading, then one call to enable the mixed batches through the op
    base = AutoModelForCausalLM.from_pretrained(os.path.join(args.out, "base"))
    model = PeftModel.from_pretrained(base, adapter_dirs[ADAPTERS[0]], adapter_name=ADAPTERS[0])
    for adapter in ADAPTERS[1:]:
        model.load_adapter(adapter_dirs[adapter], adapter_name=adapter)
    model.eval()
    peft_model = copy.deepcopy(model)  # the same adapters left to PEFT's own mixed-batch path, for comparison
    multi_lora.enable(model)

    tasks = list(ADAPTERS) + ["cpy"]  # the last kind of request uses the bare base model (it was trained on cpy)
    requests = make_samples(args.requests, tasks, seed=args.seed + 7, alphabet="abcdefghij")
    names = [r["task"] if r["task"] in ADAPTERS else "__base__" for r in requests]
    prompts = [r["prompt"] for r in requests]
    answers = generate_answers(model, tokenizer, prompts, adapter_names=names)
    peft_answers = generate_answers(peft_model, tokenizer, prompts, adapter_names=names)  # PEFT's per-adapter loop
    times = interleaved(
        {
            "ours": lambda: generate_answers(model, tokenizer, prompts, adapter_names=names),
            "peft": lambda: generate_answers(peft_model, tokenizer, prompts, adapter_names=names),
        },
        torch.device("cpu"),
        reps=args.reps,
    )

    print(f"\none mixed batch of {len(requests)} requests, greedy, KV cache:")
    print(f"{'#':>2}  {'adapter':<9} {'prompt':<12} {'answer':<12} {'expected':<12} ok")
    for i, (r, name, answer) in enumerate(zip(requests, names, answers)):
        ok = "yes" if answer == r["completion"] else "no"
        print(f"{i:>2}  {name:<9} {r['prompt']:<12} {answer:<12} {r['completion']:<12} {ok}")
    correct = sum(a == r["completion"] for a, r in zip(answers, requests))
    same = answers == peft_answers
    print(f"\nexact match {correct}/{len(requests)}; identical to PEFT's own mixed-batch generate: {same}")
    print(
        f"generate, median of {args.reps}: {times['ours'].median:.0f} ms through the op, {times['peft'].median:.0f} ms "
        "with PEFT's loop (tiny model: per-call overheads, not the matrix work, decide these)"
    )
    print(f"training (or loading the cache) took {trained_s:.0f}s")
    return {"answers": answers, "names": names, "requests": requests, "same_as_peft": same, "correct": correct}


if __name__ == "__main__":
    main()
