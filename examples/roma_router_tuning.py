"""RoMA router tuning against plain router fine-tuning (the paper's ablation), measured.

    python examples/roma_router_tuning.py                          # tiny Mixtral + bundled data, one torch thread
    python examples/roma_router_tuning.py --arch olmoe             # tiny OLMoE instead
    python examples/roma_router_tuning.py --model /path/to/OLMoE-1B-7B-0125-Instruct --data train.jsonl \
        --test-data test.jsonl                                      # a real checkpoint (jsonl rows: prompt, completion)

Steps: (1) a base MoE model: by default a tiny one built from a config and pretrained here in full on the
bundled synthetic tasks (cached in --out), or --model; (2) RoMA's reference set on the router-tuning
training data: which samples the pretrained model answers right (exact match of the greedy answer),
their routing, each sample's k successful neighbours in task-embedding space; (3) router-only tuning
with RoMATrainer twice: with the manifold regularizer (configs/roma.yaml) and with lambda_reg=0 (plain
router fine-tuning); (4) the routing distance to the neighbours and the exact-match accuracy, before and
after, for both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings

import torch
from moe_peft.roma import (
    RoMAConfig,
    RoMATrainer,
    build_reference,
    exact_match_success,
    task_embeddings,
)
from peft import get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments

import moe_peft  # noqa: F401  (registers the methods with PEFT)
from moe_peft.bases import pretrain_tiny_moe
from moe_peft.data import CharTokenizer, Collator, make_samples, tokenize_rows

HERE = os.path.dirname(os.path.abspath(__file__))


# set by this example itself, whatever the YAML says
_OWN_ARGUMENTS = {"output_dir", "report_to", "save_strategy", "use_cpu", "remove_unused_columns", "disable_tqdm"}


def load_config(path: str) -> tuple[dict, dict]:
    """The YAML's `adapter:` block (RoMAConfig fields) and the keys of its `training:` block (trl.SFTConfig fields, as
    `moe-peft train` reads them) that transformers.TrainingArguments has. The YAML is checked as `moe-peft train`
    checks it: an unknown key is an error that names the closest valid one."""
    from moe_peft.train.config import load_config as load_training_config

    config = load_training_config(path)
    if config.method != "roma":
        raise ValueError(f"{path}: method={config.method!r}; this example needs a RoMA config (method: roma).")
    names = {f.name for f in dataclasses.fields(TrainingArguments)} - _OWN_ARGUMENTS
    return dict(config.adapter), {k: v for k, v in config.training.items() if k in names}


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def measure(model, reference, train_rows, test_rows, test_neighbours, tokenizer, collator) -> dict:
    model.eval()
    test_ok = exact_match_success(
        model, tokenizer, [r["prompt"] for r in test_rows], [r["completion"] for r in test_rows]
    )
    train_ok = exact_match_success(
        model, tokenizer, [r["prompt"] for r in train_rows], [r["completion"] for r in train_rows]
    )
    return {
        "dist_train": reference.distance(model, train_rows, collator),
        "dist_test": reference.distance(model, test_rows, collator, neighbours=test_neighbours),
        "acc_train": sum(train_ok) / len(train_ok),
        "acc_test": sum(test_ok) / len(test_ok),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(HERE, "..", "configs", "roma.yaml"))
    parser.add_argument("--model", default=None, help="a real MoE checkpoint (path); default: a tiny built-in model")
    parser.add_argument("--arch", default="mixtral", choices=["mixtral", "olmoe", "qwen3_moe"], help="tiny model")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="full training of the tiny base model")
    parser.add_argument("--data", default=None, help="jsonl with prompt/completion rows (default: bundled tasks)")
    parser.add_argument("--test-data", default=None, help="held-out jsonl (default: bundled tasks, other seed)")
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--test-samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="override training.max_steps")
    parser.add_argument("--out", default="out/roma")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: fastest for tiny models; the README's numbers)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t_start = time.perf_counter()
    roma_fields, training_fields = load_config(args.config)
    if args.steps is not None:
        training_fields["max_steps"] = args.steps
    seed = training_fields.get("seed", 0)

    if args.model is None:
        tokenizer = CharTokenizer()
        base_path = pretrain_tiny_moe(args.arch, tokenizer, args.pretrain_steps, args.out, seed)
        print(f"base: tiny {args.arch} pretrained for {args.pretrain_steps} steps ({base_path})")
    else:
        from transformers import AutoTokenizer

        tokenizer, base_path = AutoTokenizer.from_pretrained(args.model), args.model
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # right padding for training, left padding for generation
    train_samples = read_jsonl(args.data) if args.data else make_samples(args.train_samples, seed=seed + 1)
    test_samples = read_jsonl(args.test_data) if args.test_data else make_samples(args.test_samples, seed=seed + 2)
    train_rows, test_rows = tokenize_rows(train_samples, tokenizer), tokenize_rows(test_samples, tokenizer)
    collator = Collator(tokenizer)
    cache = os.path.join(args.out, "cache")

    results = {}
    variants = [("RoMA", roma_fields.get("lambda_reg", 0.8)), ("plain router FT", 0.0)]
    for name, lam in variants:
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(base_path)
        config = RoMAConfig(**{**roma_fields, "lambda_reg": lam})
        model = get_peft_model(base, config)
        frozen = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "roma_router" not in k}
        reference = build_reference(model, train_rows, tokenizer, collator, cache_dir=cache)
        test_emb = task_embeddings([r["prompt"] for r in test_rows], model, tokenizer, config.embedding_model, cache)
        test_neighbours = reference.neighbours_of(test_emb, config)
        before = measure(model, reference, train_rows, test_rows, test_neighbours, tokenizer, collator)
        training = TrainingArguments(
            output_dir=os.path.join(args.out, "runs", name.replace(" ", "_")),
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            remove_unused_columns=False,
            disable_tqdm=True,
            **training_fields,
        )
        t0 = time.perf_counter()
        RoMATrainer(
            model=model, args=training, train_dataset=train_rows, data_collator=collator, reference=reference
        ).train()
        train_s = time.perf_counter() - t0
        after = measure(model, reference, train_rows, test_rows, test_neighbours, tokenizer, collator)
        unchanged = all(torch.equal(v, model.get_base_model().state_dict()[k]) for k, v in frozen.items())
        results[name] = (before, after, train_s, unchanged)
        print(
            f"{name}: {int(reference.success.sum())}/{len(reference)} training samples successful before tuning; "
            f"trained {train_s:.1f}s; non-router weights bit-identical: {unchanged}"
        )

    print(f"\n{'variant':<18}{'routing dist train':>22}{'routing dist test':>22}{'acc train':>16}{'acc test':>16}")
    for name, (before, after, _, _) in results.items():
        cells = [f"{before[k]:.4f} -> {after[k]:.4f}" for k in ("dist_train", "dist_test")]
        cells += [f"{before[k]:.3f} -> {after[k]:.3f}" for k in ("acc_train", "acc_test")]
        print(f"{name:<18}" + "".join(f"{c:>22}" if i < 2 else f"{c:>16}" for i, c in enumerate(cells)))
    print(
        f"\nrouting distance = mean_i sum_j W_ij ||r_i - r_j||^2 to the pretrained successful neighbours; "
        f"wall time {time.perf_counter() - t_start:.1f}s"
    )


if __name__ == "__main__":
    main()
