"""Fine-tune LLaVA-MoLE: MoLE on a LLaVA model's language-model MLPs (top-1 of K=3 LoRA experts, r=32, alpha=64,
one router per MLP block), plain LoRA on attention, the projector trained in full, the vision tower frozen; with
--modality-groups the experts are split into text and image groups (MoMa): image tokens route among the image
experts only, text tokens among the text experts.

    python examples/finetune_llava.py                        # tiny LLaVA + bundled image tasks, one CPU thread
    python examples/finetune_llava.py --modality-groups      # 3 text + 3 image experts (--num-experts per group)
    python examples/finetune_llava.py --arch llava_next      # tiny LLaVA-NeXT (anyres tiles)
    python examples/finetune_llava.py --config configs/mole_llava.yaml
    python examples/finetune_llava.py --model llava-hf/llava-1.5-7b-hf --load-in-4bit --threads 8
                                                              # a hub id or local path (its own processor)

Steps: (1) the base: by default a tiny LLaVA built from a config and trained here in full on the bundled base tasks
(caption an image, add two numbers; cached in --out), or --model; (2) the adapter: `moe_peft.llava.mole_llava_config`
(or the `adapter:` block of --config); (3) training with moe_peft.MoESFTTrainer (TRL's SFTTrainer plus the router
loss, weighted for gradient accumulation) on the bundled image+text tasks (colour, shape, position, count; add,
compare), batched by moe_peft.llava.LlavaCollator, progress bar on; (4) accuracy per task before and after, the
expert load per modality group; (5) save, reload in a fresh process (this script with --reload), generate an answer
for an image there, compare the logits.

--load-in-4bit quantizes the language model's linears with bitsandbytes (NF4, QLoRA); the vision tower, the projector
and the head stay in the load dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch
import yaml
from peft import PeftModel, get_peft_model
from transformers import AutoProcessor
from trl import SFTConfig

import moe_peft
from moe_peft.llava import TASKS, LlavaCollator, answers_from, make_image_tasks, modality_load, mole_llava_config
from moe_peft.llava.pretrain import TINY, accuracy_by_task, pretrain_tiny_llava
from moe_peft.train import MoESFTTrainer


def load_base(args, path: str):
    from transformers import AutoModelForImageTextToText

    kwargs = {"dtype": getattr(torch, args.dtype)}
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig  # needs `pip install bitsandbytes`

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=getattr(torch, args.dtype),
            # kept unquantized; both spellings, as transformers matches them from the start of the name (5.x) or
            # anywhere in it (4.x)
            llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"]
            + ["model.vision_tower", "model.multi_modal_projector"],
        )
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def adapter_config(args, base):
    groups = {"text": args.num_experts, "image": args.num_experts} if args.modality_groups else None
    if args.config:
        with open(args.config) as f:
            fields = (yaml.safe_load(f) or {}).get("adapter", {})
        if groups:
            fields = {**fields, "modality_experts": groups, "num_experts": None}
        return moe_peft.MoLEConfig(**fields)
    return mole_llava_config(
        base,
        num_experts=None if groups else args.num_experts,
        modality_experts=groups,
        r=args.r,
        lora_alpha=2 * args.r,
        attention=args.attention,
    )


def training_arguments(args) -> dict:
    """SFTConfig's fields: the flags, or the YAML's `training:` block (its output_dir aside: --out decides)."""
    values = dict(
        output_dir=os.path.join(args.out, "trainer"),
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,  # the collator reads `messages` and `images`
        dataloader_num_workers=0,
        disable_tqdm=False,  # the progress bar
        use_cpu=not torch.cuda.is_available(),
        bf16=False,  # --dtype sets the weights' dtype; no autocast on top (TRL's default is bf16 autocast)
        gradient_checkpointing=False,  # --gradient-checkpointing enables it in load_base (TRL's default is on)
        learning_rate=args.lr,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        warmup_steps=max(1, args.steps // 10),
        lr_scheduler_type="linear",
        logging_steps=max(1, args.steps // 6),
        seed=args.seed,
    )
    if args.config:
        with open(args.config) as f:
            given = (yaml.safe_load(f) or {}).get("training", {})
        values.update({k: v for k, v in given.items() if k not in ("output_dir", "gradient_checkpointing")})
        if args.steps_given is not None:
            values["max_steps"] = args.steps_given
    return values


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="hub id or local path of a LLaVA / LLaVA-NeXT model")
    parser.add_argument("--arch", default="llava", choices=["llava", "llava_next"], help="the tiny default base")
    parser.add_argument(
        "--config",
        default=None,
        help="a moe-peft train YAML: its adapter: (MoLEConfig) and training: (SFTConfig) blocks",
    )
    parser.add_argument("--modality-groups", action="store_true", help="text and image expert groups (MoMa)")
    parser.add_argument("--num-experts", type=int, default=3, help="K (per group with --modality-groups)")
    parser.add_argument("--r", type=int, default=32, help="rank of every expert (alpha = 2 r)")
    parser.add_argument("--attention", default="lora", choices=["lora", "none"], help="plain LoRA on attention")
    parser.add_argument("--pretrain-steps", type=int, default=1000, help="full training of the tiny base")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    parser.add_argument("--train-samples", type=int, default=4800)
    parser.add_argument("--eval-samples", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 on the language model (QLoRA)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="load dtype of the base")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for the tiny model)")
    parser.add_argument("--out", default="out/finetune_llava")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reload", action="store_true", help=argparse.SUPPRESS)  # the fresh process of step 5
    args = parser.parse_args(argv)
    args.steps_given, args.steps = args.steps, args.steps or 300
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    if args.reload:
        return reload_and_answer(args)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    if args.model is None:
        base_path = pretrain_tiny_llava(args.out, args.arch, steps=args.pretrain_steps, seed=args.seed)
        print(f"base: tiny {args.arch} trained in full on caption/add for {args.pretrain_steps} steps ({base_path})")
    else:
        base_path = args.model
    processor = AutoProcessor.from_pretrained(base_path)
    collator = LlavaCollator(processor)
    image_size = (
        TINY["image_size"] if args.model is None else 64
    )  # the processor resizes: drawn larger for a real model
    train = make_image_tasks(args.train_samples, TASKS, seed=args.seed + 1, image_size=image_size)
    test = make_image_tasks(args.eval_samples, TASKS, seed=args.seed + 2, image_size=image_size)
    base = load_base(args, base_path)
    # bitsandbytes' CPU backend repacks 4-bit weights at the first inference call, and the repacked layout then runs
    # without autograd in training: on CPU in 4-bit the "before" accuracy is skipped so that training sees none
    quantized_on_cpu = args.load_in_4bit and not torch.cuda.is_available()
    acc_before = {} if quantized_on_cpu else accuracy_by_task(base, collator, test)

    torch.manual_seed(args.seed)  # the adapter's initialization, whether the base was just trained or cached
    model = get_peft_model(base, adapter_config(args, base))
    model.print_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    from datasets import Dataset

    # TRL's SFTTrainer sees a vision dataset (an `images` column): it leaves the rows as they are and our collator
    # builds the batches; MoESFTTrainer adds the router loss to TRL's own loss (which ignores outputs.loss)
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    trainer = MoESFTTrainer(
        model=model,
        args=SFTConfig(**training_arguments(args)),
        train_dataset=Dataset.from_list(train),
        data_collator=collator,
        processing_class=processor,
    )
    # TRL casts every trainable parameter of a quantized model to bf16 (QLoRA's recipe); the projector, trained in
    # full, then meets the vision tower's --dtype features: keep the load dtype (--dtype bfloat16 for bf16 adapters)
    for name, p in model.named_parameters():
        if name in dtypes and p.dtype != dtypes[name]:
            p.data = p.data.to(dtypes[name])
    t_train = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t_train
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]

    acc_after = accuracy_by_task(model, collator, test)
    load = modality_load_on(model, collator, test)
    check_batch, check_logits = reference_logits(model, collator, test)  # before saving (see reference_logits)
    adapter_dir = os.path.join(args.out, "adapter")
    model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    with open(os.path.join(adapter_dir, "base.json"), "w") as f:
        json.dump({"base": base_path}, f)
    reload = fresh_process_check(args, check_batch, check_logits, test)

    print(f"\ntraining loss: {result.training_loss:.4f} (logged: {' '.join(f'{x:.3f}' for x in losses)})")
    print("exact match on held-out samples, before -> after fine-tuning:")
    for task in acc_after:
        before = f"{acc_before[task]:.2f}" if task in acc_before else " n/a"
        print(f"  {task:8s} {before} -> {acc_after[task]:.2f}")
    print_load(load)
    print(
        f"\nsaved to {adapter_dir}; reloaded in a fresh process: identical logits = {reload['identical']} "
        f"(max abs difference {reload['max_abs_diff']:.2g})"
    )
    print(
        f"  the fresh process answers {reload['question']!r} about its image with {reload['answer']!r} "
        f"(expected {reload['expected']!r})"
    )
    wall = time.perf_counter() - t_start
    print(
        f"trainable parameters {trainable:,}; training {train_s:.1f}s ({train_s / args.steps:.2f}s/step); wall {wall:.1f}s"
    )
    return {"acc_before": acc_before, "acc_after": acc_after, "losses": losses, "load": load, "reload": reload,
            "trainable": trainable, "steps": trainer.state.global_step, "wall_s": wall}  # fmt: skip


@torch.no_grad()
def modality_load_on(model, collator, rows: list[dict]) -> dict:
    """The expert load per modality group (averaged over the MLP blocks) on held-out samples."""
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collator(rows[:64]).items()}
    model(**batch)
    return modality_load(model)


def print_load(load: dict) -> None:
    print("\nexpert load per modality group (share of the group's picks, mean over the MLP blocks):")
    for group, stats in load.items():
        print(f"  {group:5s} ({stats['tokens']} tokens): " + " ".join(f"{x:.2f}" for x in stats["load"]))


@torch.no_grad()
def reference_logits(model, collator, rows: list[dict]) -> tuple[dict, torch.Tensor]:
    """The trained model's logits on 8 held-out samples, computed before saving: saving a 4-bit model on CPU undoes
    bitsandbytes' inference repacking of its weights, and repacking them again is not bit-exact."""
    batch = collator(rows[:8])
    model.eval()
    device = next(model.parameters()).device
    return batch, model(**{k: v.to(device) for k, v in batch.items()}).logits.cpu()


def fresh_process_check(args, batch: dict, logits: torch.Tensor, rows: list[dict]) -> dict:
    """Run this script with --reload in a new process; it loads the base and the saved adapter, writes the logits of
    `batch` and the answer to one image question. The logits must equal the trained model's."""
    sample = next(r for r in rows if r["images"])
    torch.save({"batch": batch, "sample": sample}, os.path.join(args.out, "reload_inputs.pt"))
    command = [sys.executable, os.path.abspath(__file__), "--reload", "--out", args.out, "--threads", str(args.threads)]
    command += ["--dtype", args.dtype] + (["--load-in-4bit"] if args.load_in_4bit else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"the fresh process failed:\n{done.stderr[-3000:]}")
    fresh = torch.load(os.path.join(args.out, "reload_outputs.pt"))
    return {
        "identical": torch.equal(logits, fresh["logits"]),
        "max_abs_diff": float((logits - fresh["logits"]).abs().max()),
        "question": sample["messages"][0]["content"][-1]["text"],
        "answer": fresh["answer"],
        "expected": sample["answer"],
    }


@torch.no_grad()
def reload_and_answer(args) -> dict:
    """The fresh process: base + saved adapter (PeftModel.from_pretrained), then the logits and one answer."""
    adapter_dir = os.path.join(args.out, "adapter")
    with open(os.path.join(adapter_dir, "base.json")) as f:
        base_path = json.load(f)["base"]
    processor = AutoProcessor.from_pretrained(adapter_dir)
    collator = LlavaCollator(processor)
    model = PeftModel.from_pretrained(load_base(args, base_path), adapter_dir).eval()
    inputs = torch.load(os.path.join(args.out, "reload_inputs.pt"), weights_only=False)
    device = next(model.parameters()).device
    prompt = {k: v.to(device) for k, v in collator.generation_batch([inputs["sample"]]).items()}
    tokenizer = collator.tokenizer
    generated = model.generate(
        **prompt, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    answer = answers_from(collator, generated, prompt["input_ids"].shape[1])[0]
    # after an inference call, as in the training process: bitsandbytes' CPU backend repacks 4-bit weights at the
    # first one (another block size), which changes the numbers of the calls after it
    logits = model(**{k: v.to(device) for k, v in inputs["batch"].items()}).logits.cpu()
    torch.save({"logits": logits, "answer": answer}, os.path.join(args.out, "reload_outputs.pt"))
    print(f"fresh process: {inputs['sample']['messages'][0]['content'][-1]['text']!r} -> {answer!r}")
    print_load(modality_load(model))
    return {"answer": answer}


if __name__ == "__main__":
    main()
