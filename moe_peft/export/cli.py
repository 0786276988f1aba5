"""`moe-peft merge ADAPTER --strategy ... --out DIR [--base PATH_OR_ID] [--calibration FILE]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from ..data.bundled import DEFAULT_TASKS
from ..data.bundled import TASKS as BUNDLED_TASKS
from .api import EXACT, STRATEGIES
from .calibration import HOLDOUT_EVERY, load_calibration

TASKS_FILE = "tasks.json"  # the task names `moe-peft train` writes next to an adapter, in task id order


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
        help="JSON Lines calibration rows (prompt/completion, text, or input_ids [+ token_types]); default: bundled "
        "tasks (the adapter's own when its tasks.json names bundled tasks)",
    )
    form = p.add_mutually_exclusive_group()
    form.add_argument("--merge", action="store_true", default=None, help="approximate strategies: write merged weights")
    form.add_argument("--lora", action="store_true", help="strategy merge: write the exact parts as a plain PEFT LoRA")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank of the approximate strategies")
    p.add_argument("--task-id", type=int, default=None, help="MHR: the task to merge; PHATGOOSE oracle: its expert")
    p.add_argument("--uniform", action="store_true", help="PHATGOOSE: merge the experts uniformly")
    p.add_argument("--expert", default=None, help="PHATGOOSE: merge only this expert")
    p.add_argument(
        "--calibration-rows",
        type=int,
        default=None,
        help="bundled samples drawn when --calibration is not given (default 512)",
    )
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


def _fail(message: str) -> int:
    print(f"moe-peft merge: error: {message}", file=sys.stderr)
    return 2


def _flag_problem(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the flags alone (nothing read yet): a bad value, or a flag that the strategy would not use
    (every such flag used to be ignored without a word)."""
    exact = args.strategy in EXACT
    approximate = "'average', 'routing_weighted' and 'svd'"
    if args.threads is not None and args.threads < 1:
        return f"--threads {args.threads} is invalid: use a positive number of torch threads."
    if args.expert and args.uniform:
        return "--expert and --uniform exclude each other: --uniform merges every expert, --expert NAME only one."
    if args.rank is not None and args.rank < 1:
        return f"--rank {args.rank} is invalid: use a positive integer."
    if args.rank is not None and exact:
        return f"--rank applies to {approximate}; --strategy {args.strategy} is exact and writes every rank."
    if args.merge and exact:
        writes = "merged weights" if args.strategy == "merge" else "a full sparse-MoE checkpoint"
        return f"--merge applies to {approximate} (which write a LoRA without it); --strategy {args.strategy} always writes {writes}."
    if args.lora and args.strategy != "merge":
        why = (
            "native_moe writes a full sparse-MoE checkpoint, which no LoRA can hold"
            if args.strategy == "native_moe"
            else f"--strategy {args.strategy} writes a LoRA anyway (--merge: merged weights)"
        )
        return f"--lora applies to --strategy merge (its exact parts as a plain LoRA); {why}."
    if args.calibration_rows is not None and args.calibration is not None:
        return (
            f"--calibration-rows {args.calibration_rows} sets how many bundled samples are drawn, but --calibration "
            f"{args.calibration} gives the rows (all of them are used): drop one of the two."
        )
    if args.calibration_rows is not None and args.calibration_rows < HOLDOUT_EVERY:
        return (
            f"--calibration-rows {args.calibration_rows} is invalid: use at least {HOLDOUT_EVERY} (every "
            f"{HOLDOUT_EVERY}th row is held out for the measurement)."
        )
    if args.task_id is not None and args.task_id < 0:
        return f"--task-id {args.task_id} is invalid: use a task index >= 0."
    if args.calibration is not None and not os.path.isfile(args.calibration):
        return f"--calibration {args.calibration} is not a file; give a JSON Lines file of calibration rows."
    if os.path.exists(args.out) and not args.overwrite:
        return (
            f"--out {os.path.abspath(args.out)} exists; choose another directory, or pass --overwrite (the old one "
            "is replaced only once the new export is complete)."
        )
    return None


def _adapter_tasks(adapter: str) -> Optional[list[str]]:
    """The task names `moe-peft train` recorded next to the adapter (TASKS_FILE, in task id order), or None."""
    path = os.path.join(adapter, TASKS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tasks = json.load(f)
    return [str(t) for t in tasks] if isinstance(tasks, list) and tasks else None


def _calibration_tasks(args: argparse.Namespace, tokenizer) -> Optional[list[str]]:
    """Without --calibration the error is measured on bundled tasks: the adapter's own (its tasks.json) when it was
    trained on bundled tasks (only the exported task's with --task-id), else the default ones, saying so."""
    tasks = _adapter_tasks(args.adapter)
    if args.calibration is not None or tasks is None or tokenizer is None:
        return None
    foreign = [t for t in tasks if t not in BUNDLED_TASKS]
    if foreign:
        print(
            f"moe-peft merge: note: {os.path.join(args.adapter, TASKS_FILE)} lists tasks {foreign} that moe-peft does "
            f"not bundle, so the error is measured on the bundled tasks {list(DEFAULT_TASKS)}, not on the adapter's "
            "own data; pass --calibration FILE with rows of that data to measure on it.",
            file=sys.stderr,
        )
        return None
    if args.task_id is not None and args.task_id < len(tasks):
        return [tasks[args.task_id]]  # the exported task's rows (tasks.json is in task id order)
    return tasks


def run(args: argparse.Namespace) -> int:
    problem = _flag_problem(args)  # every check that needs no file comes first, then the adapter's config
    if problem is not None:
        return _fail(problem)
    from peft import PeftConfig

    from .api import check_applicable

    try:
        config = PeftConfig.from_pretrained(args.adapter)
    except (OSError, ValueError) as err:
        return _fail(f"{args.adapter} holds no loadable adapter ({err}); give the directory save_pretrained wrote.")
    base = args.base or config.base_model_name_or_path
    from ..bases.real import REAL_BASES, base_path

    if base in REAL_BASES:  # --base smollm2-135m: the converted checkpoint (moe_peft.bases.real)
        base = base_path(base)
    if not base:
        return _fail(f"{args.adapter}/adapter_config.json names no base_model_name_or_path; pass --base PATH_OR_ID")
    phatgoose_routing = "uniform" if args.uniform else ("single" if args.expert else None)
    shown = {
        "task_id": f"--task-id {args.task_id}",
        "phatgoose_routing": "--uniform" if args.uniform else f"--expert {args.expert}",
        "expert": f"--expert {args.expert}",
        "task_id_flag": "--task-id T",
    }
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    try:  # the merge always measures its error: a per-task adapter needs --task-id
        check_applicable([config], args.task_id, phatgoose_routing, args.expert, f"{args.adapter} (a {kind} adapter)",
                         shown, require_task=True)  # fmt: skip
    except ValueError as err:
        return _fail(str(err))
    tokenizer = load_tokenizer(args.adapter, base)
    if tokenizer is None and args.calibration is None and args.strategy not in EXACT:
        return _fail(
            f"--strategy {args.strategy} fits on calibration data, and neither {args.adapter} nor {base} holds a "
            "tokenizer for the bundled tasks (text): pass --calibration FILE with input_ids rows, or save the "
            "tokenizer next to the adapter."
        )
    if args.calibration is not None:
        try:  # read and tokenize the rows now, so that a bad file fails before the model is loaded
            load_calibration(args.calibration, tokenizer, pad_id=0)
        except (ValueError, json.JSONDecodeError) as err:
            return _fail(f"--calibration {args.calibration}: {err}")
    calibration_tasks = _calibration_tasks(args, tokenizer)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .api import export

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), args.adapter)
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
            phatgoose_routing=phatgoose_routing,
            expert=args.expert,
            calibration_rows=512 if args.calibration_rows is None else args.calibration_rows,
            calibration_tasks=calibration_tasks,
            overwrite=args.overwrite,
            source=os.path.abspath(args.adapter),
            base_model_name_or_path=base,
        )
    except FileExistsError:  # --out appeared while the export ran
        return _fail(f"--out {os.path.abspath(args.out)} exists; choose another directory, or pass --overwrite.")
    except ValueError as err:
        return _fail(str(err))
    print(f"  record: {os.path.join(result.path, 'moe_peft_export.json')}")
    return 0
