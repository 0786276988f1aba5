"""What an adapted model is made of, read for export without changing it.

Every tuner layer in the model (at any depth: a RoMA adapter under a MoLE adapter, as in
examples/finetune_mixtral.py, is found too) becomes parts, named by the module's name in the plain model:

    FixedLinear    a LoRA delta on an nn.Linear that does not depend on the token: a one-expert mixture, an MHR
                   task, a PHATGOOSE library under uniform or single-expert routing
    FixedExperts   each fused expert's own LoRA (moe_peft/experts): exact, because the routing is the base model's
    FixedRouter    a router weight retrained by RoMA (merging replaces it)
    RoutedLinear   token-routed LoRA experts (MoLE, LoRAMoE, SMoRA, PHATGOOSE top-k): the bank, each expert's
                   scale and the routing, which only the strategies of native.py and approximate.py can deploy

A fixed part carries the layer's own `get_delta_weight` (exactly what `merge_and_unload` adds) and LoRA factors
with the scaling folded into B (what a plain PEFT LoRA adapter holds). `plain_tensors` unwraps the model into the
tensors of the plain transformers model (shared, not copied): the base weights and the trained `modules_to_save`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from ..tuners.mhr.layer import MHRLinear
from ..tuners.phatgoose.layer import PhatgooseLinear
from ..tuners.roma.layer import RoMARouterLayer
from ..tuners.routed.config import MoELoraConfig, SMoRAConfig
from ..tuners.routed.experts.layer import MoELoraExperts
from ..tuners.routed.layer import MoELoraLinear
from ..tuners.routed.methods import is_mergeable
from ..tuners.routed.methods import route as route_tokens

Factors = tuple[torch.Tensor, torch.Tensor]  # (A [r, in], B [out, r]), the scaling folded into B


@dataclass
class FixedLinear:
    name: str  # the nn.Linear's name in the plain model
    source: str  # what it is, for the record ("MoLE 'default' (one expert)", "MHR 'default' task 3", ...)
    delta: Callable[[], torch.Tensor]  # [out, in], the layer's own get_delta_weight
    factors: Callable[[], Factors]
    exact: bool = True  # False for MHR-mu under strategy "average" (the skills averaged, routing dropped)


@dataclass
class FixedExperts:
    name: str  # the fused-experts module
    source: str
    # {parameter: (delta in the stored layout, A [E, r, in], B [E, out, r] with the scaling folded in)}
    params: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class FixedRouter:
    name: str  # the router module; its `weight` is replaced
    source: str
    weight: torch.Tensor  # [E, hidden]


@dataclass
class RoutedLinear:
    name: str
    source: str
    layer: nn.Module
    adapter: str
    config: object
    lora_A: torch.Tensor  # [E, r, in]
    lora_B: torch.Tensor  # [E, out, r]
    scale: torch.Tensor  # [E], each expert's LoRA scaling
    weight_total: float  # what a token's routing weights sum to (SMoRA: top_k; the others: 1)
    # (x [T, in], the layer input's leading shape, e.g. [B, S]) -> idx, weights [T, k], as the layer routed x
    route: Callable[[torch.Tensor, torch.Size], tuple[torch.Tensor, torch.Tensor]]
    block: Optional[str] = None  # the parent block whose router this layer shares (router_granularity="block")
    router: Optional[nn.Module] = None  # the router module deciding this layer's experts


@dataclass
class Parts:
    fixed: list = field(default_factory=list)  # FixedLinear | FixedExperts | FixedRouter
    routed: list[RoutedLinear] = field(default_factory=list)
    # {plain module name: the trained module PEFT's modules_to_save holds for the active adapter}
    saved: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class Options:
    """What fixes a routing that depends on something other than the token (see `moe_peft.export`)."""

    task_id: Optional[int] = None  # MHR's task; PHATGOOSE routing="oracle": the expert of that task
    phatgoose_routing: Optional[str] = None  # "uniform" or "single" overrides a PHATGOOSE library's routing
    expert: Optional[str] = None  # the expert of phatgoose_routing="single"
    mhr_average: bool = False  # MHR: average the skills (MHR-mu) instead of fixing a task


def _active(layer: BaseTunerLayer, bank: dict) -> list[str]:
    if layer.disable_adapters:
        return []
    return [a for a in layer.active_adapters if a in bank and a not in layer.merged_adapters]


# -- unwrapping ------------------------------------------------------------------------------------------------------
@dataclass
class Plain:
    """The plain model's tensors by name, and where the tuner layers and modules_to_save wrappers sit."""

    params: dict[str, nn.Parameter] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    tuners: list[tuple[str, BaseTunerLayer]] = field(default_factory=list)
    wrappers: list[tuple[str, ModulesToSaveWrapper]] = field(default_factory=list)


def plain_tensors(model: nn.Module, trained: bool) -> Plain:
    """Walk the adapted transformers model as if every wrapper were gone. trained=True takes the trained copy of
    each active modules_to_save module, trained=False the original (a LoRA adapter then carries the trained one)."""
    out = Plain()

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, AuxiliaryTrainingWrapper):
            if not isinstance(module, ModulesToSaveWrapper):
                raise ValueError(
                    f"export: {prefix or 'the model'} is a {type(module).__name__} (PEFT trainable tokens), which "
                    "export does not handle; merge or remove it before exporting."
                )
            out.wrappers.append((prefix, module))
            active = module.active_adapters[0] if module.active_adapters else None
            inner = (
                module.modules_to_save[active]
                if trained and active in module.modules_to_save
                else module.original_module
            )
            visit(inner, prefix)
            return
        if isinstance(module, BaseTunerLayer):
            out.tuners.append((prefix, module))
            visit(module.base_layer, prefix)
            return
        dot = f"{prefix}." if prefix else ""
        for name, p in module.named_parameters(recurse=False):
            out.params[dot + name] = p
        for name, b in module.named_buffers(recurse=False):
            out.buffers[dot + name] = b
        for name, child in module.named_children():
            visit(child, dot + name)

    visit(model, "")
    return out


# -- reading the parts -----------------------------------------------------------------------------------------------
@contextmanager
def _task(layer, task_id: Optional[int]) -> Iterator[None]:
    """Fix the task the layer's merge_key reads, as moe_peft.mhr.merge_task does (the layer shares the tuner's)."""
    state = layer._task_state
    previous = state.merge_task
    state.merge_task = None if task_id is None else int(task_id)
    try:
        yield
    finally:
        state.merge_task = previous


@contextmanager
def phatgoose_routing(config, options: Options) -> Iterator[None]:
    """Apply options.phatgoose_routing to a PHATGOOSE config for the duration, validated like set_routing."""
    if options.phatgoose_routing is None:
        yield
        return
    old = (config.routing, config.expert)
    config.routing, config.expert = options.phatgoose_routing, options.expert
    try:
        config._validate()
        yield
    finally:
        config.routing, config.expert = old


def _moe_linear(name: str, layer: MoELoraLinear, parts: Parts) -> None:
    for adapter in _active(layer, layer.experts_A):
        config: MoELoraConfig = layer.configs[adapter]
        a, b, s = layer.experts_A[adapter], layer.experts_B[adapter], layer.scalings[adapter]
        method = type(config).__name__.removesuffix("Config")
        plain = adapter in layer.plain_adapters  # a plain LoRA module of a MoLE adapter (plain_lora_modules)
        if is_mergeable(config) or plain:
            parts.fixed.append(
                FixedLinear(
                    name,
                    f"{method} '{adapter}' ({'plain LoRA' if plain else 'one expert'})",
                    delta=lambda layer=layer, adapter=adapter: layer.get_delta_weight(adapter),
                    factors=lambda a=a, b=b, s=s: (a[0].detach(), b[0].detach() * s),  # [r, in], [out, r]
                )
            )
            continue
        block = owner = None
        if config.router_granularity == "block":
            owner = layer._router_owner[adapter]
            block = name.rpartition(".")[0]

        def route(x, lead, layer=layer, adapter=adapter, owner=owner):
            if owner is None:  # as the layer routes: with modality groups, each token within its group
                routing = route_tokens(layer.configs[adapter], layer.routers[adapter], x, lead, layer._routing_ctx)
            else:  # the block's routing of this forward, computed by its pre-hook before this layer ran
                routing = owner._block_routing[adapter]
            return routing.idx, routing.weights

        num_experts = a.shape[0]
        parts.routed.append(
            RoutedLinear(
                name=name,
                source=f"{method} '{adapter}'",
                layer=layer,
                adapter=adapter,
                config=config,
                lora_A=a.detach(),
                lora_B=b.detach(),
                scale=torch.full((num_experts,), float(s), device=a.device),
                weight_total=float(config.top_k) if isinstance(config, SMoRAConfig) else 1.0,
                route=route,
                block=block,
                router=(owner or layer).routers[adapter],
            )
        )


def _experts(name: str, layer: MoELoraExperts, parts: Parts) -> None:
    for adapter in _active(layer, layer.experts_A):
        s = layer.scalings[adapter]
        params = {
            p: (layer.get_delta_weight(adapter, p).detach(), a.detach(), layer.experts_B[adapter][p].detach() * s)
            for p, a in layer.experts_A[adapter].items()
        }
        parts.fixed.append(FixedExperts(name, f"expert LoRA '{adapter}' (base routing)", params))


def _mhr(name: str, layer: MHRLinear, parts: Parts, options: Options) -> None:
    for adapter in _active(layer, layer.mhr_A):
        config = layer.mhr_config[adapter]
        if options.mhr_average and config.routed:
            # MHR-mu (moe_peft.mhr.set_mode(model, "mhr_mu")): every head's skills averaged, A and B separately,
            # i.e. the task LoRA under uniform skill weights 1/S; computed here without changing the model
            heads, skills = config.n_splits, layer.mhr_A[adapter].shape[1]
            weights = torch.full((1, heads, skills), 1.0 / skills, device=layer.mhr_A[adapter].device)  # [1, H, S]

            def factors(layer=layer, adapter=adapter, weights=weights, scaling=config.scaling):
                a_t, b_t = layer.task_lora(adapter, weights)  # [1, in, r], [1, r, out]
                return a_t[0].T.detach(), b_t[0].T.detach() * scaling  # [r, in], [out, r]

            def delta(factors=factors):
                a, b = factors()
                return b @ a  # [out, r] @ [r, in]

            parts.fixed.append(FixedLinear(name, f"MHR '{adapter}' (MHR-mu)", delta, factors, exact=False))
            continue
        with _task(layer, options.task_id):
            key = layer.merge_key(adapter)  # raises the MHR error naming task_id when none is chosen

        def factors(layer=layer, adapter=adapter, key=key, scaling=config.scaling):
            a_t, b_t = layer.task_delta_factors(adapter, key)  # [in, r], [r, out]
            return a_t.T.detach(), b_t.T.detach() * scaling  # [r, in], [out, r]

        what = "(one LoRA)" if key is None else f"task {key}"
        parts.fixed.append(
            FixedLinear(
                name,
                f"MHR '{adapter}' {what}",
                delta=lambda layer=layer, adapter=adapter, key=key: layer.get_delta_weight(adapter, key),
                factors=factors,
            )
        )


def _phatgoose(name: str, layer: PhatgooseLinear, parts: Parts, options: Options) -> None:
    for adapter in _active(layer, layer.phatgoose_A):
        config = layer.phatgoose_config[adapter]
        a, b = layer.phatgoose_A[adapter].detach(), layer.phatgoose_B[adapter].detach()
        scale = layer.phatgoose_scaling[adapter].detach().float()  # [E]
        with phatgoose_routing(config, options), _task(layer, options.task_id):
            routing = config.routing
            if routing == "top_k":
                parts.routed.append(
                    RoutedLinear(
                        name=name,
                        source=f"PHATGOOSE '{adapter}' (top-{config.top_k})",
                        layer=layer,
                        adapter=adapter,
                        config=config,
                        lora_A=a,
                        lora_B=b,
                        scale=scale,
                        weight_total=1.0,
                        # the PHATGOOSE layer routes by batch size
                        route=lambda x, lead, layer=layer, adapter=adapter: layer.route(
                            adapter, x, lead[0] if len(lead) > 1 else 1
                        ),
                    )
                )
                continue
            key = layer.merge_key(adapter)  # oracle without a task_id raises, naming the choices
            delta = layer.get_delta_weight(adapter, key).detach()
            coef = torch.zeros_like(scale)  # [E], each expert's weight in the fixed LoRA, as get_delta_weight mixes
            if routing == "uniform":
                coef += 1.0 / len(coef)
            else:
                coef[config.experts.index(config.expert) if key is None else key] = 1.0
            what = {"uniform": "uniform merge", "single": f"expert {config.expert}"}.get(
                routing, f"expert of task {key}"
            )

        def factors(a=a, b=b, coef=coef * scale):
            keep = coef != 0
            ak, bk = a[keep], b[keep] * coef[keep, None, None]  # [E', r, in], [E', out, r]
            return ak.reshape(-1, ak.shape[-1]), bk.permute(1, 0, 2).reshape(bk.shape[1], -1)  # [E'r, in], [out, E'r]

        parts.fixed.append(
            FixedLinear(name, f"PHATGOOSE '{adapter}' ({what})", delta=lambda d=delta: d, factors=factors)
        )


def _roma(name: str, layer: RoMARouterLayer, parts: Parts) -> None:
    active = _active(layer, layer.roma_router)
    if len(active) > 1:
        raise ValueError(f"export: RoMA adapters {active} are active together on {name}; activate one of them.")
    for adapter in active:
        parts.fixed.append(FixedRouter(name, f"RoMA '{adapter}'", layer.roma_router[adapter].detach()))


def read_parts(model: nn.Module, options: Options) -> tuple[Parts, Plain]:
    """The parts of the adapted transformers model `model` (what PeftModel.get_base_model() returns)."""
    plain = plain_tensors(model, trained=True)
    parts = Parts()
    for name, wrapper in plain.wrappers:
        active = wrapper.active_adapters[0] if wrapper.active_adapters else None
        if active in wrapper.modules_to_save:
            parts.saved[name] = wrapper.modules_to_save[active]
    for name, layer in plain.tuners:
        if isinstance(layer, MoELoraLinear):
            _moe_linear(name, layer, parts)
        elif isinstance(layer, MoELoraExperts):
            _experts(name, layer, parts)
        elif isinstance(layer, MHRLinear):
            _mhr(name, layer, parts, options)
        elif isinstance(layer, PhatgooseLinear):
            _phatgoose(name, layer, parts, options)
        elif isinstance(layer, RoMARouterLayer):
            _roma(name, layer, parts)
        else:
            raise ValueError(
                f"export: {name} holds a {type(layer).__name__}, which export does not read (it reads moe-peft's "
                "layers). Merge that adapter with its own merge_and_unload() first, then export."
            )
    return parts, plain
