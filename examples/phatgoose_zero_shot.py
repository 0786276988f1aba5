"""PHATGOOSE on CPU: independently trained LoRA experts, post-hoc gates, per-token routing, against the baselines.

    python examples/phatgoose_zero_shot.py             # the README table; a few minutes on a 2-core CPU
    python examples/phatgoose_zero_shot.py --quick     # a smoke run of the whole pipeline (seconds, meaningless numbers)

Scenario (one): a tiny Llama is first trained in full on two "pretraining" tasks of the bundled synthetic data
(cpy, dup over the letters a-x: it learns the characters and the prompt format). Then, as in PHATGOOSE, separate
contributors each train an ordinary PEFT LoRA expert on their own task and their own data (rev on strings of a-f,
srt on g-l, sft on m-r, alt on s-x: each contributor's data has its own input distribution, the premise of routing
by the input), each without seeing the others, and each trains the sigmoid gates of their expert for 100 steps
(moe_peft.phatgoose.train_gates). The experts are assembled into one PEFT model that routes every token of every
adapted module to its top-2 experts (moe_peft.phatgoose.assemble).

Evaluation, greedy decoding with the KV cache, exact match on held-out prompts (strings never seen in training):
  * the experts' tasks, without telling the model which task a prompt is (the router must infer it per token);
  * the base's own tasks (cpy, dup), held out from every expert: how much the library damages what the base knew.
Rows: the base model; the paper's baselines in the same API: the uniform merge of the experts' deltas, the best
single expert (chosen on a validation split), the oracle expert (each prompt routed to its own task's expert, which
needs the task label); and PHATGOOSE top-2 (and top-1).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import moe_peft
from moe_peft.bases import tiny_llama
from moe_peft.data import CharTokenizer, Collator, generate_answers, make_dataset, make_samples, tokenize_sample

BASE_TASKS = ("cpy", "dup")
BASE_ALPHABET = "abcdefghijklmnopqrstuvwx"
EXPERT_TASKS = ("rev", "srt", "sft", "alt")
DOMAINS = {"rev": "abcdef", "srt": "ghijkl", "sft": "mnopqr", "alt": "stuvwx"}  # each contributor's letters
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train(model, data, tokenizer, steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    """A plain loop: AdamW, one-cycle schedule, cross-entropy on the answers."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, collate_fn=Collator(tokenizer), generator=generator
    )
    model.train()
    losses = []
    while len(losses) < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if len(losses) == steps:
                break
    model.eval()
    return losses


def exact_match(model, tokenizer, samples: list[dict], **generate_kwargs) -> float:
    """Fraction of prompts answered exactly (greedy, left-padded batch, KV cache)."""
    answers = generate_answers(model, tokenizer, [s["prompt"] for s in samples], **generate_kwargs)
    return sum(a == s["completion"] for a, s in zip(answers, samples)) / len(samples)


@torch.no_grad()
def token_accuracy(model, tokenizer, samples: list[dict], **forward_kwargs) -> float:
    """Fraction of answer tokens predicted right with the true prefix given (teacher forcing): a graded score."""
    batch = Collator(tokenizer)([tokenize_sample(s, tokenizer) for s in samples])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **forward_kwargs).logits
    predicted, labels = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]  # position t predicts token t + 1
    answer = labels != -100
    return float((predicted[answer] == labels[answer]).float().mean())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/phatgoose")
    parser.add_argument("--base-steps", type=int, default=1200)
    parser.add_argument("--expert-steps", type=int, default=800)
    parser.add_argument("--gate-steps", type=int, default=100)
    parser.add_argument("--gate-lr", type=float, default=1e-3)
    parser.add_argument("--eval-per-task", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny matrices: 1 is fastest)")
    parser.add_argument("--quick", action="store_true", help="tiny step counts: checks the pipeline runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.base_steps, args.expert_steps, args.gate_steps, args.eval_per_task = 30, 20, 5, 8
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    timings = {}
    tokenizer = CharTokenizer()
    alphabet = {**DOMAINS, **{t: BASE_ALPHABET for t in BASE_TASKS}}

    def samples(task: str, n: int, seed: int) -> list[dict]:
        return make_samples(n, [task], seed, alphabet=alphabet[task])

    # 1. the base model: trained in full on its own tasks
    base = tiny_llama(vocab_size=tokenizer.vocab_size, seed=args.seed)
    data = make_dataset(
        args.base_steps * 32, tasks=BASE_TASKS, seed=args.seed, tokenizer=tokenizer, alphabet=BASE_ALPHABET
    )
    losses = train(base, data, tokenizer, args.base_steps, lr=3e-3, batch_size=32, seed=args.seed)
    base_dir = os.path.join(args.out, "base")
    base.save_pretrained(base_dir)
    print(f"base model on {', '.join(BASE_TASKS)}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    timings["base"] = time.perf_counter() - t0

    # 2. experts: one ordinary PEFT LoRA per task, trained alone, then its gates (only the gates train)
    expert_dirs = []
    for i, task in enumerate(EXPERT_TASKS):
        t = time.perf_counter()
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
        expert = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
        data = make_dataset(
            args.expert_steps * 32, [task], args.seed + 10 + i, tokenizer=tokenizer, alphabet=alphabet[task]
        )
        losses = train(expert, data, tokenizer, args.expert_steps, lr=3e-3, batch_size=32, seed=args.seed + i)
        path = os.path.join(args.out, "experts", task)
        expert.save_pretrained(path)
        gate_data = make_dataset(
            8 * args.gate_steps, [task], args.seed + 20 + i, tokenizer=tokenizer, alphabet=alphabet[task]
        )
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), path)
        moe_peft.phatgoose.train_gates(
            reloaded, gate_data, steps=args.gate_steps, lr=args.gate_lr, collator=Collator(tokenizer), save_to=path
        )
        expert_dirs.append(path)
        took = time.perf_counter() - t
        print(
            f"expert {task}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, then {args.gate_steps} gate steps ({took:.1f}s)"
        )
    timings["experts + gates"] = time.perf_counter() - t0 - timings["base"]

    # 3. the library: one PEFT model, and the baselines by switching its routing
    t = time.perf_counter()
    library = moe_peft.phatgoose.assemble(AutoModelForCausalLM.from_pretrained(base_dir), expert_dirs, top_k=2)
    library.eval()
    library_dir = os.path.join(args.out, "library")
    library.save_pretrained(library_dir)
    config = library.peft_config["default"]  # expert e is EXPERT_TASKS[e]
    test = {task: samples(task, args.eval_per_task, args.seed + 1000 + i) for i, task in enumerate(alphabet)}
    valid = [s for i, task in enumerate(EXPERT_TASKS) for s in samples(task, args.eval_per_task, args.seed + 2000 + i)]
    rows = {}

    def evaluate(row: str, adapted: bool = True) -> None:
        oracle = adapted and config.routing == "oracle"
        slots = {"top_k": config.top_k, "uniform": config.num_experts}.get(config.routing, 1)
        cells, accuracy, own = {}, [], []
        for task, group in test.items():
            if oracle and task not in EXPERT_TASKS:
                continue  # no expert was trained on the base's own tasks: the oracle has none to pick
            extra = {"task_ids": torch.full((len(group),), EXPERT_TASKS.index(task))} if oracle else {}
            cells[task] = exact_match(library, tokenizer, group, **extra)
            if task in EXPERT_TASKS:
                accuracy.append(token_accuracy(library, tokenizer, group, **extra))
                if adapted:  # share of real tokens whose picks include the task's own expert, over all modules
                    own.append(float(moe_peft.phatgoose.mean_expert_load(library)[EXPERT_TASKS.index(task)]) * slots)
        cells["EM mean"] = sum(cells[t] for t in EXPERT_TASKS) / len(EXPERT_TASKS)
        cells["token acc"] = sum(accuracy) / len(accuracy)
        if own:
            cells["own expert"] = sum(own) / len(own)
        rows[row] = cells

    with library.disable_adapter():
        evaluate("base model (no expert)", adapted=False)
    moe_peft.phatgoose.set_routing(library, "uniform")
    evaluate("uniform merge of the experts")
    best = None
    for name in config.experts:  # the best single expert, chosen on a validation split
        moe_peft.phatgoose.set_routing(library, "single", expert=name)
        score = exact_match(library, tokenizer, valid)
        best = (score, name) if best is None or score > best[0] else best
    moe_peft.phatgoose.set_routing(library, "single", expert=best[1])
    evaluate(f"best single expert ({best[1]})")
    for k in (1, 2):
        moe_peft.phatgoose.set_routing(library, "top_k", top_k=k)
        evaluate(f"PHATGOOSE top-{k}")
    moe_peft.phatgoose.set_routing(library, "oracle")
    evaluate("oracle expert per task")
    timings["assemble + evaluate"] = time.perf_counter() - t

    # 4. the table
    columns = list(EXPERT_TASKS) + ["EM mean", "token acc", "own expert"] + list(BASE_TASKS)
    width = max(len(r) for r in rows)
    print(f"\nheld-out prompts, {args.eval_per_task} per task. rev..alt: exact match, the model is not told the task;")
    print("EM mean: their mean; token acc: answer tokens right under teacher forcing (mean over rev..alt); own expert:")
    print("share of tokens whose picks include the task's own expert (all modules); cpy, dup: exact match on the")
    print("base's own tasks, which no expert was trained on.")
    widths = [max(len(c), 4) for c in columns]
    print(f"| {'routing'.ljust(width)} | " + " | ".join(c.rjust(w) for c, w in zip(columns, widths)) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row, cells in rows.items():
        values = [(f"{cells[c]:.2f}" if c in cells else "-").rjust(w) for c, w in zip(columns, widths)]
        print(f"| {row.ljust(width)} | " + " | ".join(values) + " |")
    total = time.perf_counter() - t0
    print("\ntime: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f", total {total:.0f}s")
    print(f"library saved as one adapter to {library_dir} (PeftModel.from_pretrained reloads it)")
    return {"rows": rows, "best_single": best[1], "wall_s": total}


if __name__ == "__main__":
    main()
