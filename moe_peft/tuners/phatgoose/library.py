"""PHATGOOSE step 3: read LoRA experts from disk, check they fit one base, and assemble (or extend) a library.

An expert is a directory saved by PEFT with a LoraConfig (`adapter_config.json` + weights), plus the gates that
`train_gates` saved next to it. moe-peft's own adapters become experts the same way, e.g. an MHR task exported
with `moe_peft.mhr.export_task_lora`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights
from torch import nn

from .config import PhatgooseConfig
from .gates import GATES_FILE, load_gates
from .model import _adapter, _tuner

_PEFT_PREFIX = "base_model.model."
PathLike = Union[str, os.PathLike]


@dataclass
class Expert:
    """One LoRA expert read from disk: per module, A [r, in], B [out, r] and the scaling s (delta = s B A)."""

    name: str
    path: str
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    gates: Optional[dict[str, torch.Tensor]]  # module name -> v [in]; None if train_gates was never run
    task_type: Optional[str]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.lora.values())


def read_expert(path: PathLike, name: Optional[str] = None) -> Expert:
    """Read a PEFT LoRA adapter directory (and its gates, if any); unsupported LoRA options raise, naming the path."""
    path = str(path)
    name = name or os.path.basename(os.path.normpath(path))
    config = PeftConfig.from_pretrained(path)
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type != "LORA":
        raise ValueError(f"Expert '{name}' ({path}) is a {peft_type} adapter; PHATGOOSE experts are LoRA adapters.")
    unsupported = {
        "use_dora": bool(config.use_dora),
        "rank_pattern": bool(config.rank_pattern),
        "alpha_pattern": bool(config.alpha_pattern),
        "modules_to_save": bool(config.modules_to_save),
        "bias": config.bias != "none",
        "lora_bias": bool(getattr(config, "lora_bias", False)),
        "target_parameters": bool(getattr(config, "target_parameters", None)),
    }
    bad = sorted(k for k, v in unsupported.items() if v)
    if bad:
        raise ValueError(
            f"Expert '{name}' ({path}) uses LoRA options {bad}, which PHATGOOSE experts do not support yet; train the "
            "expert as a plain LoRA (linear layers, one rank and alpha, no DoRA, no bias, no modules_to_save)."
        )
    weights = load_peft_weights(path, device="cpu")
    lora: dict[str, list] = {}
    for key, value in weights.items():
        for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if key.endswith(part) and key.startswith(_PEFT_PREFIX):
                lora.setdefault(key[len(_PEFT_PREFIX) : -len(part)], [None, None])[slot] = value.float()
                break
        else:
            raise ValueError(f"Expert '{name}' ({path}) holds {key!r}, which is not a LoRA weight of a linear layer.")
    incomplete = sorted(m for m, (a, b) in lora.items() if a is None or b is None)
    if incomplete:
        raise ValueError(f"Expert '{name}' ({path}) lacks lora_A or lora_B for {incomplete}.")
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    task_type = getattr(config.task_type, "value", config.task_type)
    return Expert(name, path, {m: (a, b) for m, (a, b) in lora.items()}, scaling, load_gates(path), task_type)


def check_experts(experts: list[Expert], base_model: nn.Module, modules: Optional[set[str]] = None) -> set[str]:
    """Every expert adapts the same modules (`modules`, or the first expert's), each an nn.Linear of the base with
    the expert's shapes; gates, where present, cover exactly those modules with [in] vectors."""
    modules = set(experts[0].lora) if modules is None else modules
    for expert in experts:
        where = f"Expert '{expert.name}' ({expert.path})"
        if set(expert.lora) != modules:
            raise ValueError(
                f"{where} adapts other modules than the library: missing {sorted(modules - set(expert.lora))}, extra "
                f"{sorted(set(expert.lora) - modules)}. PHATGOOSE experts must adapt the same target modules."
            )
        for module_name, (a, b) in expert.lora.items():
            try:
                base = base_model.get_submodule(module_name)
            except AttributeError:
                raise ValueError(f"{where} adapts {module_name}, which the base model does not have.") from None
            base = base.get_base_layer() if hasattr(base, "get_base_layer") else base
            if not isinstance(base, nn.Linear):
                raise ValueError(f"{where} adapts {module_name}, a {type(base).__name__}; only nn.Linear is supported.")
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"{where} does not fit the base model at {module_name}: lora_A {tuple(a.shape)} and lora_B "
                    f"{tuple(b.shape)} for a base linear of in={base.in_features}, out={base.out_features}. Was it "
                    "trained on another base model?"
                )
        if expert.gates is not None:
            if set(expert.gates) != modules:
                raise ValueError(f"{where}: its {GATES_FILE} covers other modules than its LoRA; retrain the gates.")
            for module_name, v in expert.gates.items():
                if v.shape != (expert.lora[module_name][0].shape[1],):
                    raise ValueError(f"{where}: gate of {module_name} has shape {tuple(v.shape)}; retrain the gates.")
    return modules


def _need_gates(experts: list[Expert], routing: str) -> None:
    missing = [f"'{e.name}' ({e.path})" for e in experts if e.gates is None]
    if routing == "top_k" and missing:
        raise ValueError(
            f"Experts {', '.join(missing)} have no gates ({GATES_FILE}); run moe_peft.phatgoose.train_gates(model, "
            "data, save_to=<adapter dir>) for each, or assemble a baseline routing ('uniform', 'single', 'oracle')."
        )


@torch.no_grad()
def _write_experts(tuner, adapter: str, experts: list[Expert], first: int) -> None:
    """Copy experts into rows first.. of every layer's banks (A, B zero-padded to the bank rank)."""
    for name, layer in tuner.layers():
        for offset, expert in enumerate(experts):
            e = first + offset
            a, b = expert.lora[name]  # [r_e, in], [out, r_e]
            rank = a.shape[0]
            layer.phatgoose_A[adapter][e].zero_()[:rank].copy_(a)  # [r, in], rows >= r_e stay zero
            layer.phatgoose_B[adapter][e].zero_()[:, :rank].copy_(b)  # [out, r], columns >= r_e stay zero
            layer.phatgoose_scaling[adapter][e] = expert.scaling
            if expert.gates is not None:
                layer.phatgoose_gate[adapter][e].copy_(expert.gates[name])
            else:
                layer.phatgoose_gate[adapter][e].zero_()


def _names(paths: list[PathLike], names: Optional[list[str]], taken: list[str]) -> list[str]:
    if names is not None:
        if len(names) != len(paths):
            raise ValueError(f"names={names!r} is invalid: give one name per adapter path ({len(paths)}).")
        return list(names)
    out = []
    for path in paths:
        base = os.path.basename(os.path.normpath(str(path)))
        name, i = base, 1
        while name in taken or name in out:
            i += 1
            name = f"{base}_{i}"
        out.append(name)
    return out


def assemble(
    base_model: nn.Module,
    adapter_paths: list[PathLike],
    top_k: int = 2,
    routing: str = "top_k",
    expert: Optional[str] = None,
    names: Optional[list[str]] = None,
    adapter_name: str = "default",
) -> PeftModel:
    """Assemble LoRA experts (PEFT adapter directories with their gates) into one PEFT model (PhatgooseConfig) that
    routes per token and per module; `save_pretrained` writes it as one adapter.

    routing="top_k" is PHATGOOSE; the paper's baselines come from the same call: "uniform" (merged experts: the
    average of the LoRA deltas), "single" (only `expert`), "oracle" (each sample's own expert, `task_ids` =
    expert index per sample). Switch later with `set_routing`. `base_model` is wrapped in place, as by
    get_peft_model.
    """
    if not adapter_paths:
        raise ValueError("adapter_paths=[] is invalid: give the directories of at least one LoRA expert.")
    names = _names(adapter_paths, names, [])
    experts = [read_expert(p, n) for p, n in zip(adapter_paths, names)]
    modules = check_experts(experts, base_model)
    _need_gates(experts, routing)
    config = PhatgooseConfig(
        experts=names,
        r=max(e.rank for e in experts),
        top_k=min(top_k, len(experts)) if routing != "top_k" else top_k,
        routing=routing,
        expert=expert,
        target_modules=sorted(modules),
        task_type=experts[0].task_type,
    )
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    _write_experts(_tuner(model), adapter_name, experts, first=0)
    return model


@torch.no_grad()
def add_experts(
    model: nn.Module,
    adapter_paths: list[PathLike],
    names: Optional[list[str]] = None,
    adapter_name: Optional[str] = None,
) -> list[str]:
    """Append experts to an assembled library without touching the others (their weights and gates are kept as
    they are; PHATGOOSE gates are trained per expert, so nothing is retrained). Returns the new experts' names.

    Rebuild any optimizer afterwards: the banks are new tensors.
    """
    tuner = _tuner(model)
    adapter = _adapter(tuner, adapter_name)
    config: PhatgooseConfig = tuner.peft_config[adapter]
    names = _names(adapter_paths, names, config.experts)
    clash = sorted(set(names) & set(config.experts))
    if clash:
        raise ValueError(f"names={clash} are already experts of this library; choose other names.")
    experts = [read_expert(p, n) for p, n in zip(adapter_paths, names)]
    check_experts(experts, tuner.model, modules={name for name, _ in tuner.layers()})
    _need_gates(experts, config.routing)
    first, rank = config.num_experts, max(config.r, *(e.rank for e in experts))
    for _, layer in tuner.layers():
        grow = len(experts)
        banks = (layer.phatgoose_A, layer.phatgoose_B, layer.phatgoose_gate)
        for bank, pad in zip(banks, ((0, 0, 0, rank - config.r), (0, rank - config.r), None)):
            old = bank[adapter]
            data = old.detach() if pad is None else nn.functional.pad(old.detach(), pad)  # wider rank: zero columns
            data = torch.cat([data, data.new_zeros(grow, *data.shape[1:])])  # [E, ...] -> [E + new, ...]
            bank[adapter] = nn.Parameter(data, requires_grad=old.requires_grad)
        scaling = layer.phatgoose_scaling[adapter]
        layer.phatgoose_scaling[adapter] = torch.cat([scaling, scaling.new_ones(grow)])
    config.experts = config.experts + names
    config.r = rank
    _write_experts(tuner, adapter, experts, first=first)
    return names
