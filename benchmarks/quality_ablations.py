"""Ablations on the quality suite (docs/quality.md, "What we tried"): one study at a time, each variant sized to the
same budget and run at its own best learning rate from the suite's grid, through `moe_peft.bench.quality`.

    python benchmarks/quality_ablations.py scaling               # expert scaling per method (one seed)
    python benchmarks/quality_ablations.py scaling --seeds 0,1,2 # the same with three seeds
    python benchmarks/quality_ablations.py calibration           # LoRA alone under other suite settings
    python benchmarks/quality_ablations.py --list

Runs are shared between studies in out/quality_ablations/runs.jsonl (a rerun only runs what is missing); each study
writes its table to out/quality_ablations/<study>/summary.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from moe_peft import LoRAMoEConfig, MHRConfig, MoLEConfig, SMoRAConfig
from moe_peft.bench.quality import Suite, bench_quality
from moe_peft.bench.quality_methods import TARGETS, Method

E = 6  # experts: one per fine-tuning task, as in the suite
COMMON = dict(target_modules=TARGETS, task_type="CAUSAL_LM")


def mole(name: str, alpha_factor: float = 1.0, **kw) -> Method:
    return Method(
        name, "moe", lambda r: MoLEConfig(r=r, lora_alpha=2 * r * alpha_factor, num_experts=E, **COMMON, **kw)
    )


def loramoe(name: str, alpha_factor: float = 1.0, sample_types: bool = False, **kw) -> Method:
    return Method(
        name,
        "moe",
        lambda r: LoRAMoEConfig(r=r, lora_alpha=2 * r * alpha_factor, num_experts=E, **COMMON, **kw),
        sample_types=sample_types,
    )


def smora(name: str, top_k: int = 3, alpha=None, **kw) -> Method:
    return Method(
        name, "moe", lambda r: SMoRAConfig(r=r, top_k=top_k, lora_alpha=alpha(r) if alpha else 2 * r, **COMMON, **kw)
    )


def mhr(name: str, alpha_factor: float = 1.0, **kw) -> Method:
    return Method(
        name,
        "mhr",
        lambda r: MHRConfig(r=r, lora_alpha=2 * r * alpha_factor, n_tasks=8, n_skills=E, n_splits=4, **COMMON, **kw),
        task_ids=True,
    )


def study_scaling() -> list[Method]:
    """A softmax gate of weight ~1/E scales each expert's delta by ~1/E: lora_alpha raised by the inverse mean gate
    weight of an active expert at uniform routing (E for LoRAMoE, k for renormalized top-k, ...)."""
    return [
        loramoe("LoRAMoE alpha=2r", blc_weight=0.0),
        loramoe("LoRAMoE alpha=2r*sqrt(E)", alpha_factor=E**0.5, blc_weight=0.0),
        loramoe("LoRAMoE alpha=2r*E", alpha_factor=E, blc_weight=0.0),
        mole("MoLE top-2 alpha=2r", top_k=2),
        mole("MoLE top-2 alpha=2r*2", alpha_factor=2, top_k=2),
        mole("MoLE top-p alpha=2r", top_k=E, top_p=0.4),
        mole("MoLE top-p alpha=2r*E", alpha_factor=E, top_k=E, top_p=0.4),
        mole("MoLE null alpha=2r", top_k=2, num_null_experts=E // 2),
        mole("MoLE null alpha=2r*2", alpha_factor=2, top_k=2, num_null_experts=E // 2),
        smora("SMoRA alpha=2r (scaling 2r/k)"),
        smora("SMoRA alpha=2k (scaling 2)", alpha=lambda r: 2 * 3),
        mhr("MHR alpha=2r"),
        mhr("MHR alpha=2r*E", alpha_factor=E),
    ]


STUDIES = {"scaling": study_scaling}


def calibration(args) -> None:
    """Plain LoRA only, seed 0, lr 3e-3, under other knowledge shares and budgets: how the suite was calibrated."""
    rows = []
    for share, rank in ((0.1, 32), (0.0, 32), (0.02, 32), (0.02, 16), (0.02, 8)):
        suite = dataclasses.replace(Suite(), knowledge_share=share, budget_rank=rank, seeds=(0,), lrs=(3e-3,))
        out = os.path.join(args.out, "calibration", f"share{share}-r{rank}")
        [lora] = bench_quality(out_dir=out, methods=["LoRA"], suite=suite, cache_dir=args.cache, log=lambda *a: None)
        rows.append((share, rank, lora["tasks_mean"], lora["knowledge_mean"]))
    print("| knowledge share | LoRA rank | tasks mean | knowledge |\n|---|---|---|---|")
    for share, rank, tasks, knowledge in rows:
        print(f"| {share:.0%} | {rank} | {tasks:.2f} | {knowledge:.2f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", choices=sorted(STUDIES) + ["calibration"])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (the lr is chosen on the first)")
    parser.add_argument("--out", default="out/quality_ablations")
    parser.add_argument("--runs", default=None, help="the shared runs file (default: OUT/runs.jsonl)")
    parser.add_argument("--cache", default=None, help="where the pre-trained base is cached")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list or not args.study:
        for name, fn in STUDIES.items():
            print(f"{name}: {fn.__doc__.strip().splitlines()[0]}")
        return
    torch.set_num_threads(1)
    if args.study == "calibration":
        return calibration(args)
    suite = dataclasses.replace(Suite(), seeds=tuple(int(s) for s in args.seeds.split(",")))
    methods = STUDIES[args.study]()
    bench_quality(
        out_dir=os.path.join(args.out, args.study),
        methods=methods,
        suite=suite,
        runs_file=args.runs or os.path.join(args.out, "runs.jsonl"),
        cache_dir=args.cache,
    )


if __name__ == "__main__":
    sys.exit(main())
