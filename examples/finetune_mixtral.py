"""Fine-tune a Mixtral-style MoE model: MoE-LoRA (MoLE) on attention plus one LoRA per base expert on the fused
experts, routed by the model's own routers; optionally RoMA on those routers.

    python examples/finetune_mixtral.py                          # tiny Mixtral + bundled data, one CPU thread
    python examples/finetune_mixtral.py --roma                   # also tune the base routers with RoMA
    python examples/finetune_mixtral.py --load-in-4bit --gradient-checkpointing
    python examples/finetune_mixtral.py --model mistralai/Mixtral-8x7B-v0.1 --load-in-4bit --threads 16
                                                                  # a hub id or local path (bundled tasks as text)

Steps: (1) the base: by default a tiny Mixtral built from a config and trained here in full on the bundled tasks
cpy/dup/rev (cached in --out), or --model; (2) the adapter: `MoLEConfig(target_modules=attention,
target_parameters=[experts.gate_up_proj, experts.down_proj])`; with --roma a RoMA adapter on the base routers
comes first (two adapters on one model, see docs/methods.md); (3) a plain training loop on rev (which the base knows)
and srt/sft/alt (which it never saw): loss = task loss + MoLE's router losses (+ the RoMA regularizer); (4) exact match before and
after, the routing statistics (MoLE's attention routers and the base routers' expert load per task), and a
save/reload check.

--load-in-4bit quantizes the nn.Linear layers with bitsandbytes (NF4; attention, shared experts). transformers 5
keeps a MoE layer's experts as 3-D nn.Parameters, which bitsandbytes does not quantize: they stay in the load
dtype (bf16 with --dtype bfloat16), and for Mixtral they are ~96% of the weights, so 4-bit saves far less than on
a dense model. We do not call peft.prepare_model_for_kbit_training: it would upcast those experts to fp32.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections import defaultdict

import torch
from moe_peft.experts import MoELoraExperts
from moe_peft.roma import RoMAConfig, alignment_loss, build_reference, exact_match_success
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import moe_peft
from moe_peft.bases import pretrain_tiny_moe
from moe_peft.data import CharTokenizer, Collator, make_samples, tokenize_rows

BASE_TASKS = ("cpy", "dup", "rev")  # what the tiny base learns in full
TASKS = ("rev", "srt", "sft", "alt")  # fine-tuning: one task the base knows (RoMA's successful samples), three new
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def load_base(args, tokenizer, base_path: str):
    kwargs = {"dtype": getattr(torch, args.dtype)}
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig  # needs `pip install bitsandbytes`

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, args.dtype)
        )
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def accuracy_by_task(model, tokenizer, samples: list[dict]) -> dict[str, float]:
    model.eval()
    hits = exact_match_success(model, tokenizer, [s["prompt"] for s in samples], [s["completion"] for s in samples])
    by_task = defaultdict(list)
    for s, hit in zip(samples, hits):
        by_task[s["task"]].append(hit)
    return {t: sum(v) / len(v) for t, v in sorted(by_task.items())}


@torch.no_grad()
def routing_tables(model, rows: list[dict], collator) -> tuple[dict, dict]:
    """Per task: MoLE's expert load per adapted attention layer (moe_peft.routing_stats), and the base routers'
    expert load per MoE layer, read from the top-k indices the experts receive (padding excluded)."""
    picks: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: picks.__setitem__(name, args[1]))
        for name, module in model.named_modules()
        if isinstance(module, MoELoraExperts)
    ]
    mole, base = defaultdict(dict), defaultdict(dict)
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    model.eval()
    try:
        for task, task_rows in sorted(by_task.items()):
            batch = collator(task_rows)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for layer, stats in moe_peft.routing_stats(model, "experts").items():
                mole[layer][task] = stats["load"]
            real = batch["attention_mask"].reshape(-1).bool()  # [B, S] -> [T]
            for layer, idx in picks.items():
                num_experts = model.get_submodule(layer).layout.num_experts
                counts = torch.bincount(idx[real].reshape(-1), minlength=num_experts).float()  # [T', k] -> [E]
                base[layer][task] = (counts / counts.sum()).tolist()
    finally:
        for h in hooks:
            h.remove()
    return mole, base


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="hub id or local path of an MoE model; default: tiny Mixtral")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="full training of the tiny base model")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--r", type=int, default=8, help="rank of every LoRA (attention experts and base experts)")
    parser.add_argument("--num-experts", type=int, default=4, help="MoLE experts per attention block")
    parser.add_argument("--roma", action="store_true", help="tune the base routers with RoMA (a second adapter)")
    parser.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 on the nn.Linear layers")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="load dtype of the base")
    parser.add_argument("--eval-samples", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for the tiny model)")
    parser.add_argument("--out", default="out/finetune_mixtral")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    if args.model is None:
        tokenizer = CharTokenizer()
        base_path = pretrain_tiny_moe("mixtral", tokenizer, args.pretrain_steps, args.out, args.seed, BASE_TASKS)
        print(f"base: tiny Mixtral trained in full on {'/'.join(BASE_TASKS)} for {args.pretrain_steps} steps")
    else:
        from transformers import AutoTokenizer

        tokenizer, base_path = AutoTokenizer.from_pretrained(args.model), args.model
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    collator = Collator(tokenizer)
    train = tokenize_rows(make_samples(args.train_samples, TASKS, seed=args.seed + 1), tokenizer)
    test = make_samples(args.eval_samples, TASKS, seed=args.seed + 2)
    base = load_base(args, tokenizer, base_path)

    roma = None
    if args.roma:  # the routers first: RoMA wraps them, the expert LoRA then wraps the experts around them
        roma = get_peft_model(base, RoMAConfig(num_last_layers=2, lambda_warmup_steps=max(1, args.steps // 6)))
        base = roma.base_model.model
        # PEFT warns about a second get_peft_model on one model: intended here (two adapter types, docs/methods.md)
        warnings.filterwarnings("ignore", message=".*modify a model with PEFT for a second time.*")
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
    config = moe_peft.MoLEConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        num_experts=args.num_experts,
        top_k=1,
        target_modules=ATTENTION,
        target_parameters=EXPERTS,  # a LoRA of rank r on every base expert's gate_up_proj and down_proj
        router_aux_loss_coef=0.01,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config, adapter_name="experts")
    model.print_trainable_parameters()
    reference = None
    if roma is not None:
        reference = build_reference(roma, train, tokenizer, collator, cache_dir=os.path.join(args.out, "roma"))
        print(f"RoMA reference: {int(reference.success.sum())}/{len(reference)} training samples answered right")
    acc_before = accuracy_by_task(model, tokenizer, test)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    warmup = max(1, args.steps // 10)  # linear warmup, then linear decay
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (1 - s / args.steps))
    g = torch.Generator().manual_seed(args.seed)
    epochs = -(-args.steps * args.batch_size // len(train))
    order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(epochs)])  # shuffled epochs
    losses, t_train = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        index = order[step * args.batch_size : (step + 1) * args.batch_size]  # row ids: RoMA's neighbours use them
        batch = collator([train[i] for i in index])
        out = model(**batch)
        loss = out.loss  # task loss + MoLE's router losses
        if reference is not None:
            loss = loss + alignment_loss(roma, reference.neighbours(index), step=step)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  (router part {out.router_loss.item():.4f})")
    train_s = time.perf_counter() - t_train

    acc_after = accuracy_by_task(model, tokenizer, test)
    mole_load, base_load = routing_tables(model, tokenize_rows(test, tokenizer), collator)
    model.save_pretrained(os.path.join(args.out, "adapter"), selected_adapters=["experts"])
    if roma is not None:
        roma.save_pretrained(os.path.join(args.out, "roma_adapter"), selected_adapters=["default"])
    same = reload_matches(args, tokenizer, base_path, model, collator, test)

    n = max(1, min(10, len(losses) // 2))
    print(f"\nloss: first {n} steps {sum(losses[:n]) / n:.3f} -> last {n} steps {sum(losses[-n:]) / n:.3f}")
    print("exact match on held-out prompts, before -> after fine-tuning:")
    for task in acc_after:
        print(f"  {task}: {acc_before[task]:.2f} -> {acc_after[task]:.2f}")
    for title, table in (
        ("MoLE's routers on attention (one per block): expert load per task", mole_load),
        ("the base model's routers: expert load (share of top-k picks) per task", base_load),
    ):
        print(f"\n{title}")
        for layer, per_task in table.items():
            print(f"  {layer.removeprefix('base_model.model.')}")
            for task, load in per_task.items():
                print(f"    {task}: " + " ".join(f"{x:.2f}" for x in load))
    print(f"\nsaved the adapter to {args.out}/adapter; reloaded onto a fresh base: identical logits = {same}")
    wall = time.perf_counter() - t_start
    print(f"training {train_s:.1f}s ({train_s / args.steps:.2f}s/step); wall time {wall:.1f}s")
    return {"acc_before": acc_before, "acc_after": acc_after, "losses": losses, "reload_identical": same,
            "mole_load": mole_load, "base_load": base_load, "wall_s": wall}  # fmt: skip


@torch.no_grad()
def reload_matches(args, tokenizer, base_path, model, collator, samples) -> bool:
    """The saved adapter(s) on a freshly loaded base give the trained model's logits."""
    fresh = load_base(args, tokenizer, base_path)
    if args.roma:
        fresh = PeftModel.from_pretrained(fresh, os.path.join(args.out, "roma_adapter")).base_model.model
    reloaded = PeftModel.from_pretrained(fresh, os.path.join(args.out, "adapter", "experts"), adapter_name="experts")
    batch = collator(tokenize_rows(samples[:8], tokenizer))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    return torch.equal(model(**inputs).logits, reloaded.eval()(**inputs).logits)


if __name__ == "__main__":
    main()
