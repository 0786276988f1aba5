"""The methods of `moe-peft bench quality`, each sized to one LoRA's trainable-parameter budget.

Every method adapts the same seven Llama projections. The reference is plain PEFT LoRA of rank `budget_rank`;
each mixture takes `num_experts` experts (one per fine-tuning task) and the expert rank whose trainable count,
routers and gates included, is closest to LoRA's; the benchmark refuses to run a method more than 5% off. The
usual LoRA setting `lora_alpha = 2 * r` is used for every method (r: the rank the config asks for), as a user
coming from LoRA would set it; everything else is the library default. Rows marked `equal active` size the
mixture instead so that the parameters taking part in one token's output equal LoRA's.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from ..tuners import LoRAMoEConfig, MHRConfig, MoLEConfig, SMoRAConfig
from ..tuners.routed.layer import MoELoraLinear

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUDGET_TOLERANCE = 0.05


@dataclass(frozen=True)
class Method:
    """One row of the benchmark.

    kind: "lora" (PEFT LoRA), "moe" (a token-routed moe-peft config), "mhr" (task-routed, `task_ids` given in
    training and evaluation), "phatgoose" (one LoRA expert per task trained apart, gates, assembled library).
    config(rank): the PEFT config at expert rank `rank`; `rank=None` for the fixed shapes of the equal-active rows.
    """

    name: str
    kind: str
    config: Callable[[int], Any]
    sample_types: bool = False  # pass LoRAMoE's sample_types in training
    task_ids: bool = False  # pass task ids in training and evaluation (MHR)
    fixed_rank: Optional[int] = None  # the equal-active rows: no fitting to the budget
    equal_active: bool = False
    note: str = ""


def _lora(r: int) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM")


def _mole(num_experts: int, alpha_factor: float = 1.0, **kwargs) -> Callable[[int], MoLEConfig]:
    return lambda r: MoLEConfig(
        r=r,
        lora_alpha=2 * r * alpha_factor,
        num_experts=num_experts,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def _loramoe(num_experts: int, **kwargs) -> Callable[[int], LoRAMoEConfig]:
    return lambda r: LoRAMoEConfig(
        r=r, lora_alpha=2 * r, num_experts=num_experts, target_modules=TARGETS, task_type="CAUSAL_LM", **kwargs
    )


def _smora(top_k: Optional[int], k_share: float = 1 / 8, **kwargs) -> Callable[[int], SMoRAConfig]:
    # SMoRA's rank is its number of rank-1 experts; the released r=64, k=8 activates 1/8 of them (k_share)
    return lambda r: SMoRAConfig(
        r=r,
        lora_alpha=2 * r,
        top_k=top_k or math.ceil(r * k_share),
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def _smora_dense(r: int) -> SMoRAConfig:
    return SMoRAConfig(r=r, lora_alpha=2 * r, top_k=r, target_modules=TARGETS, task_type="CAUSAL_LM")


def _mhr(num_skills: int, num_tasks: int, n_splits: int) -> Callable[[int], MHRConfig]:
    return lambda r: MHRConfig(
        r=r,
        lora_alpha=2 * r,
        n_tasks=num_tasks,
        n_skills=num_skills,
        n_splits=n_splits,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
    )


def method_table(num_experts: int, num_tasks: int, budget_rank: int) -> dict[str, Method]:
    """Every method of the suite, by name. num_experts: experts per mixture (the number of fine-tuning tasks);
    num_tasks: task ids MHR needs (fine-tuning and knowledge tasks)."""
    e = num_experts
    rows = [
        Method("LoRA", "lora", _lora, note=f"PEFT LoRA r={budget_rank}: the budget"),
        Method("MoLE top-1 block", "moe", _mole(e, top_k=1), note="routers frozen at init (the default)"),
        Method("MoLE top-2 block", "moe", _mole(e, top_k=2)),
        Method(
            "MoLE top-1 linear", "moe", _mole(e, top_k=1, router_granularity="linear"), note="routers frozen at init"
        ),
        Method("MoLE top-2 linear", "moe", _mole(e, top_k=2, router_granularity="linear")),
        Method("MoLE null experts", "moe", _mole(e, top_k=2, num_null_experts=e // 2), note=f"{e // 2} null, top-2"),
        Method("MoLE top-p", "moe", _mole(e, top_k=e, top_p=0.4), note="p=0.4, at most all experts"),
        Method("LoRAMoE", "moe", _loramoe(e, blc_weight=0.0), note="no localized balancing"),
        Method("LoRAMoE + LBC", "moe", _loramoe(e), sample_types=True, note="localized balancing (intended form)"),
        Method(
            "LoRAMoE + LBC released",
            "moe",
            _loramoe(e, blc_form="released"),
            sample_types=True,
            note="localized balancing as the released code computes it",
        ),
        Method("SMoRA", "moe", _smora(None), note="k = ceil(r / 8)"),
        Method("MHR", "mhr", _mhr(e, num_tasks, 4), task_ids=True, note="task ids given, 4 heads"),
        Method("PHATGOOSE", "phatgoose", _lora, note="one LoRA per task + knowledge, top-2, zero-shot"),
        Method(
            "MoLE top-1 block, equal active",
            "moe",
            _mole(e, top_k=1),
            fixed_rank=budget_rank,
            equal_active=True,
        ),
        Method(
            "MoLE top-2 block, equal active",
            "moe",
            _mole(e, top_k=2),
            fixed_rank=max(1, budget_rank // 2),
            equal_active=True,
        ),
        Method("SMoRA k=r", "moe", _smora_dense, equal_active=True, note="every rank active: LoRA + sigmoid gates"),
        # issue 23's options for top-1 MoLE (docs/quality.md, "Routing studies")
        Method(
            "MoLE top-1 block, sequence",
            "moe",
            _mole(e, top_k=1, routing_level="sequence"),
            note="each sample routed once from its prompt (mean-pooled hidden state)",
        ),
        # MoLE top-1 as it was before issue 23 made frozen routers its default: routers at the experts' lr
        Method(
            "MoLE top-1 block, learned router",
            "moe",
            _mole(e, top_k=1, router_lr_ratio=1.0),
            note="routers at the experts' lr (the default before issue 23)",
        ),
        Method("MoLE top-1 block, router lr x0.1", "moe", _mole(e, top_k=1, router_lr_ratio=0.1)),
        Method(
            "MoLE top-1 linear, learned router",
            "moe",
            _mole(e, top_k=1, router_granularity="linear", router_lr_ratio=1.0),
            note="routers at the experts' lr",
        ),
        Method(
            "MoLE top-1 block, equal active, learned router",
            "moe",
            _mole(e, top_k=1, router_lr_ratio=1.0),
            fixed_rank=budget_rank,
            equal_active=True,
        ),
        # issue 23, item 5 on both suites (the tiny suite's studies in benchmarks/quality_ablations.py train the same
        # configs, so their runs are shared); each sets router_lr_ratio itself, so no row changes with a default
        Method(
            "MoLE top-1 block, weight p, alpha x E",
            "moe",
            _mole(e, alpha_factor=e, top_k=1, top1_weight="prob", router_lr_ratio=1.0),
            note="expert output x its router probability; alpha x E undoes the ~1/E weight",
        ),
        Method(
            "MoLE top-1 block, balance 0.1", "moe", _mole(e, top_k=1, router_aux_loss_coef=0.1, router_lr_ratio=1.0)
        ),
        Method("MoLE top-2 block, frozen router", "moe", _mole(e, top_k=2, router_lr_ratio=0.0)),
        Method("MoLE top-2 block, balance 0", "moe", _mole(e, top_k=2, router_aux_loss_coef=0.0, router_lr_ratio=1.0)),
        Method(
            "MoLE top-2 block, E=2", "moe", _mole(2, top_k=2, router_lr_ratio=1.0), note="2 experts of a larger rank"
        ),
        Method("SMoRA k=1", "moe", _smora(1), note="one rank active"),
        Method("SMoRA, no bias update", "moe", _smora(None, bias_update_rate=0.0), note="k = ceil(r / 8)"),
        Method("SMoRA k=r/3", "moe", _smora(None, k_share=1 / 3), note="k = ceil(r / 3): 7 of 21 on the tiny suite"),
        Method(
            "MoLE top-2 block, balance 0.1",
            "moe",
            _mole(e, top_k=2, router_aux_loss_coef=0.1, router_lr_ratio=1.0),
            note="10x the default balance weight",
        ),
        # issue 23, items 3 and 5: the routers' initialisation (router_init_std, default 0.02). A frozen top-1 router
        # (the default) routes by argmax, which the scale does not change, so these rows train learned routers
        Method(
            "MoLE top-1 block, learned router, init x10",
            "moe",
            _mole(e, top_k=1, router_lr_ratio=1.0, router_init_std=0.2),
            note="router weights N(0, 0.2^2)",
        ),
        Method(
            "MoLE top-1 block, learned router, init x0.1",
            "moe",
            _mole(e, top_k=1, router_lr_ratio=1.0, router_init_std=0.002),
            note="router weights N(0, 0.002^2)",
        ),
        Method(
            "MoLE top-2 block, init x10",
            "moe",
            _mole(e, top_k=2, router_lr_ratio=1.0, router_init_std=0.2),
            note="router weights N(0, 0.2^2)",
        ),
        # issue 23, item 5: experts against rank (E=4 between the E=2 row and the default E=6) and routers at 10x lr
        Method(
            "MoLE top-2 block, E=4", "moe", _mole(4, top_k=2, router_lr_ratio=1.0), note="4 experts of a larger rank"
        ),
        Method("MoLE top-1 block, router lr x10", "moe", _mole(e, top_k=1, router_lr_ratio=10.0)),
        Method(
            "MoLE top-1 block, sequence, last token",
            "moe",
            _mole(e, top_k=1, routing_level="sequence", sequence_pooling="last"),
            note="each sample routed once from its prompt's last token",
        ),
    ]
    return {m.name: m for m in rows}


# -- parameter accounting -------------------------------------------------------------------------------------------
def count_trainable(model: nn.Module) -> int:
    """The adapter's trained parameters, routers frozen at init (router_lr_ratio=0, requires_grad False) included:
    they are part of the adapter as saved, and counting them keeps each row's size, and so its fitted rank, what it
    was before frozen routers left PEFT's trainable count."""
    routers = {id(p) for m in model.modules() if isinstance(m, MoELoraLinear) for p in m.routers.parameters()}
    return sum(p.numel() for p in model.parameters() if p.requires_grad or id(p) in routers)


def adapted_linears(base: nn.Module) -> list[nn.Linear]:
    return [m for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in TARGETS]


def phatgoose_params(base: nn.Module, rank: int, num_experts: int, top_k: int = 2) -> tuple[int, int]:
    """(trainable, active per token) of a PHATGOOSE library: num_experts LoRA experts and their gates [in] per module;
    a token uses every gate (routing) and top_k experts."""
    linears = adapted_linears(base)
    lora = sum(rank * (m.in_features + m.out_features) for m in linears)
    gates = sum(m.in_features for m in linears)
    return num_experts * (lora + gates), top_k * lora + num_experts * gates


def params_of(method: Method, base: nn.Module, rank: int, num_experts: int) -> int:
    """Trainable parameters of `method` at expert rank `rank` on `base` (built on a copy, then dropped)."""
    if method.kind == "phatgoose":
        return phatgoose_params(base, rank, num_experts)[0]
    return count_trainable(get_peft_model(copy.deepcopy(base), method.config(rank)))


def fit_rank(
    method: Method, base: nn.Module, budget: int, num_experts: int, max_rank: int = 256, min_rank: int = 1
) -> tuple[int, int]:
    """(rank, trainable parameters) closest to `budget`; ValueError when even the closest is more than 5% off.
    The count grows with the rank, so the search starts at `min_rank` (a lower bound known to the caller saves
    building the smaller adapters) and stops at the first rank above the budget."""
    best = None
    for rank in range(min_rank, max_rank + 1):
        try:
            n = params_of(method, base, rank, num_experts)
        except ValueError:  # a rank the config refuses (e.g. SMoRA with top_k > r)
            continue
        if best is None or abs(n - budget) < abs(best[1] - budget):
            best = (rank, n)
        if n > budget:
            break
    if best is None:
        raise ValueError(f"method {method.name!r}: its config refuses every rank up to {max_rank}.")
    rank, n = best
    if abs(n - budget) > BUDGET_TOLERANCE * budget:
        raise ValueError(
            f"method {method.name!r}: no expert rank brings its trainable parameters within 5% of the budget "
            f"({budget}); the closest is rank {rank} with {n}. Change num_experts or budget_rank."
        )
    return rank, n


@torch.no_grad()
def moe_active_params(model: nn.Module) -> float:
    """Parameters that take part in one token's output, averaged over the (non-padding) tokens of the latest forward:
    every router, plus per adapted linear (experts per token) x (parameters of one expert). Experts per token come
    from the routing records (null experts and top-p make them vary)."""
    total = 0.0
    for module in model.modules():
        if not isinstance(module, MoELoraLinear):
            continue
        for adapter, a in module.experts_A.items():
            if adapter in module.routers:
                total += sum(p.numel() for p in module.routers[adapter].parameters())
            owner = module._router_owner.get(adapter, module)
            record = owner.router_records.get(adapter)
            rank = a.shape[1]
            per_expert = rank * (module.in_features + module.out_features)
            if record is None or record.num_tokens == 0:
                continue
            total += float(record.experts_per_token) * per_expert
    return total


def active_params(method: Method, suite, base, rank: int, trainable: int, runs: list[dict]) -> float:
    """Parameters taking part in one token's output (see quality_methods.moe_active_params)."""
    if method.kind == "moe":
        values = [r["active"] for r in runs if "active" in r]
        return statistics.mean(values) if values else math.nan
    if method.kind == "phatgoose":
        return phatgoose_params(base, rank, suite.phatgoose_experts)[1]
    return trainable  # LoRA, MHR: every parameter takes part
