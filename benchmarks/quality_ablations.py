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
from moe_peft.bench.quality_methods import TARGETS, Method, _loramoe, method_table

E = 6  # experts: one per fine-tuning task, as in the suite
COMMON = dict(target_modules=TARGETS, task_type="CAUSAL_LM")


def mole(name: str, alpha_factor: float = 1.0, **kw) -> Method:
    # the studies ran with routers at the experts' lr, MoLE top-1's default before issue 23 (now 0, frozen): kept
    # explicit so that each study trains what its table reports (and its recorded runs still count)
    kw.setdefault("router_lr_ratio", 1.0)
    return Method(
        name, "moe", lambda r: MoLEConfig(r=r, lora_alpha=2 * r * alpha_factor, num_experts=E, **COMMON, **kw)
    )


def loramoe(name: str, alpha_factor: float = 1.0, sample_types: bool = False, **kw) -> Method:
    # the studies vary lora_alpha itself: plain alpha / r scaling (LoRAMoE's default, sqrt_gate, would apply sqrt(E)
    # on top; 2r * sqrt(E) with "lora" trains exactly what the default trains at 2r)
    kw.setdefault("expert_scaling", "lora")
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


def study_top1() -> list[Method]:
    """Top-1 MoLE learns slowly and unstably: its balance loss, router learning rate, weighting and granularity."""
    return [
        mole("top-1 block, learned router (default before issue 23)", top_k=1),
        mole("top-1 block, no balance loss", top_k=1, router_aux_loss_coef=0.0),
        mole("top-1 block, balance 0.1", top_k=1, router_aux_loss_coef=0.1),
        mole("top-1 block, router lr x10", top_k=1, router_lr_ratio=10.0),
        mole("top-1 block, weight p, alpha x E", alpha_factor=E, top_k=1, top1_weight="prob"),
        mole("top-1 block, dense at eval", top_k=1, eval_routing="dense"),
    ]


def study_experts() -> list[Method]:
    """Rank against number of experts at the same budget (each rank fitted to the budget)."""
    # the counts whose fitted rank lands within 5% of the budget (LoRAMoE's router per linear rules out 4 and 8)
    out = [_with_experts(mole(f"MoLE top-2 block, E={e}", top_k=2), e) for e in (2, 4, 8)]
    return out + [_with_experts(loramoe("LoRAMoE, E=2", blc_weight=0.0), 2)]


def _with_experts(method: Method, num_experts: int) -> Method:
    make = method.config

    def config(r):
        c = make(r)
        c.num_experts = num_experts
        if isinstance(c, LoRAMoEConfig):
            c.top_k = num_experts
        c._validate()
        return c

    return dataclasses.replace(method, config=config)


def study_balance() -> list[Method]:
    """The balance-loss weight of top-2 MoLE (balance can fight specialization)."""
    return [
        mole("MoLE top-2, balance 0", top_k=2, router_aux_loss_coef=0.0),
        mole("MoLE top-2, balance 0.01 (default)", top_k=2),
        mole("MoLE top-2, balance 0.1", top_k=2, router_aux_loss_coef=0.1),
    ]


def study_smora() -> list[Method]:
    """SMoRA's k and its selection-bias update rate."""
    return [
        smora("SMoRA k=1", top_k=1),
        smora("SMoRA k=3 (default)", top_k=3),
        smora("SMoRA k=7", top_k=7),
        smora("SMoRA k=3, no bias update", top_k=3, bias_update_rate=0.0),
        smora("SMoRA k=3, update 1e-3", top_k=3, bias_update_rate=1e-3),
    ]


def study_loramoe() -> list[Method]:
    """LoRAMoE's localized balancing: form, delta and weight (forgetting is what it is for), at alpha = 2r and at the
    gate-aware alpha = 2r * sqrt(E)."""
    out = []
    for factor, tag in ((1.0, ""), (E**0.5, ", alpha x sqrt(E)")):
        out += [
            loramoe(f"no LBC{tag}", alpha_factor=factor, blc_weight=0.0),
            loramoe(f"LBC intended (0.1, 0.1){tag}", alpha_factor=factor, sample_types=True),
            loramoe(f"LBC released (0.1, 0.1){tag}", alpha_factor=factor, sample_types=True, blc_form="released"),
            loramoe(f"LBC intended, delta 0.5, weight 1{tag}", factor, True, blc_alpha=0.5, blc_weight=1.0),
            loramoe(f"LBC intended, delta 0.9, weight 1{tag}", factor, True, blc_alpha=0.9, blc_weight=1.0),
        ]
    return out


def study_routing() -> list[Method]:
    """Issue 23: top-1 MoLE routed per sequence (mean / last pooling, from a later layer) and with slow or frozen
    routers; top-2 with the same router rates."""

    seq = dict(top_k=1, routing_level="sequence")
    return [
        mole("top-1 block, learned router (default before issue 23)", top_k=1),
        mole("top-1 block, sequence (mean)", **seq),
        mole("top-1 block, sequence (last)", **seq, sequence_pooling="last"),
        mole("top-1 block, sequence, router reads layer 1 (the last)", **seq, router_input_layer=1),
        mole("top-1 block, router lr x0.1", top_k=1, router_lr_ratio=0.1),
        mole("top-1 block, frozen router", top_k=1, router_lr_ratio=0.0),
        mole("top-1 block, sequence, router lr x0.1", **seq, router_lr_ratio=0.1),
        mole("top-2 block, router lr x0.1", top_k=2, router_lr_ratio=0.1),
        mole("top-2 block, frozen router", top_k=2, router_lr_ratio=0.0),
    ]


def study_defaults() -> list[Method]:
    """Issue 23, item 6: MoLE top-1's new default (routers frozen at init) in the rows of the main table it changes,
    next to the learned routers it replaces (the suite's own rows, by name)."""
    suite = Suite()
    table = method_table(len(suite.tasks), len(suite.all_tasks), suite.budget_rank)
    return [
        table[name]
        for name in (
            "MoLE top-1 block",
            "MoLE top-1 block, learned router",
            "MoLE top-1 linear",
            "MoLE top-1 linear, learned router",
            "MoLE top-1 block, equal active",
            "MoLE top-1 block, equal active, learned router",
        )
    ]


def study_init() -> list[Method]:
    """Issue 23, items 3 and 5: the routers' initialisation (router_init_std; default 0.02) for learned routers: MoLE
    top-1 at 10x / 0.1x / zero, top-2 and LoRAMoE's dense router at 10x (the suite's rows are by name)."""
    suite = Suite()
    table = method_table(len(suite.tasks), len(suite.all_tasks), suite.budget_rank)
    return [table[name] for name in (
        "MoLE top-1 block, learned router",
        "MoLE top-1 block, learned router, init x10",
        "MoLE top-1 block, learned router, init x0.1",
    )] + [
        mole("top-1 block, learned router, zero init", top_k=1, router_init_std=0.0),
        table["MoLE top-2 block"],
        table["MoLE top-2 block, init x10"],
        table["LoRAMoE"],
        Method("LoRAMoE, router init x10", "moe", _loramoe(E, blc_weight=0.0, router_init_std=0.2)),
    ]  # fmt: skip


STUDIES = {
    "defaults": study_defaults,
    "init": study_init,
    "routing": study_routing,
    "scaling": study_scaling,
    "top1": study_top1,
    "experts": study_experts,
    "balance": study_balance,
    "smora": study_smora,
    "loramoe": study_loramoe,
}


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
    parser.add_argument("--only", default=None, help="comma-separated substrings: run only the variants they name")
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
    if args.only:
        methods = [m for m in methods if any(k.strip() in m.name for k in args.only.split(","))]
    bench_quality(
        out_dir=os.path.join(
            args.out, args.study + (f"-seeds{args.seeds.replace(',', '')}" if args.seeds != "0" else "")
        ),
        methods=methods,
        suite=suite,
        runs_file=args.runs or os.path.join(args.out, "runs.jsonl"),
        cache_dir=args.cache,
    )


if __name__ == "__main__":
    sys.exit(main())
