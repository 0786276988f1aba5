"""`moe-peft merge ADAPTER --strategy ... --out DIR [--base PATH_OR_ID] [--calibration FILE]`."""

from __future__ import annotations

import argparse
import os
import sys

from .api import STRATEGIES


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="export a trained adapter: exact merges, a native sparse-MoE checkpoint, or a measured approximation",
        description="Export a saved moe-peft adapter for deployment (README: Deploy). The exported directory holds "
        "safetensors and moe_peft_export.json (source, strategy, moe-peft version, measured error).",
    )
    p.add_argument("adapter", help="the adapter directory (save_pretrained output)")
    p.add_argument("--strategy", required=True, choices=STRATEGIES)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument(
        "--base", default=None, help="base model path, hub id or smollm2-135m (default: the adapter's recorded base)"
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="JSON Lines calibration rows (prompt/completion, text, or input_ids); default: the bundled tasks",
    )
    form = p.add_mutually_exclusive_group()
    form.add_argument("--merge", action="store_true", default=None, help="approximate strategies: write merged weights")
    form.add_argument("--lora", action="store_true", help="strategy merge: write the exact parts as a plain PEFT LoRA")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank of the approximate strategies")
    p.add_argument("--task-id", type=int, default=None, help="MHR: the task to merge; PHATGOOSE oracle: its expert")
    p.add_argument("--uniform", action="store_true", help="PHATGOOSE: merge the experts uniformly")
    p.add_argument("--expert", default=None, help="PHATGOOSE: merge only this expert")
    p.add_argument("--calibration-rows", type=int, default=512, help="bundled samples when --calibration is not given")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="load the base in this dtype"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (once the new one is complete)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")


def load_tokenizer(*paths: str):
    """moe-peft's CharTokenizer when a directory holds one, else the transformers tokenizer, else None."""
    from ..data.bundled import CharTokenizer

    for path in paths:
        if path and os.path.isfile(os.path.join(path, "char_tokenizer.json")):
            return CharTokenizer.from_pretrained(path)
    from transformers import AutoTokenizer

    for path in paths:
        if not path:
            continue
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            continue
    return None


def run(args: argparse.Namespace) -> int:
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from .api import export

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.expert and args.uniform:
        print("moe-peft merge: error: --expert and --uniform exclude each other", file=sys.stderr)
        return 2
    config = PeftConfig.from_pretrained(args.adapter)
    base = args.base or config.base_model_name_or_path
    from ..bases.real import REAL_BASES, base_path

    if base in REAL_BASES:  # --base smollm2-135m: the converted checkpoint (moe_peft.bases.real)
        base = base_path(base)
    if not base:
        print(
            f"moe-peft merge: error: {args.adapter}/adapter_config.json names no base_model_name_or_path; "
            "pass --base PATH_OR_ID",
            file=sys.stderr,
        )
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), args.adapter)
    tokenizer = load_tokenizer(args.adapter, base)
    merge = False if args.lora else args.merge
    try:
        result = export(
            model,
            args.strategy,
            args.out,
            args.calibration,
            tokenizer=tokenizer,
            merge=merge,
            rank=args.rank,
            task_id=args.task_id,
            phatgoose_routing="uniform" if args.uniform else ("single" if args.expert else None),
            expert=args.expert,
            calibration_rows=args.calibration_rows,
            overwrite=args.overwrite,
            source=os.path.abspath(args.adapter),
            base_model_name_or_path=base,
        )
    except (ValueError, FileExistsError) as err:
        print(f"moe-peft merge: error: {err}", file=sys.stderr)
        return 2
    print(f"  record: {os.path.join(result.path, 'moe_peft_export.json')}")
    return 0
