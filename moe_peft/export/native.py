"""native_moe: a dense model with top-1 block-level MoLE on its MLP becomes a stock sparse-MoE checkpoint (exact).

With `router_granularity="block"` one router reads the MLP's input and picks one expert e for every projection of
the block, and MoLE's top-1 weight has value 1 (straight-through), so the block computes

    mlp_e(x) = (W_d + s B_d,e A_d,e) [ act((W_g + s B_g,e A_g,e) x) * (W_u + s B_u,e A_u,e) x ]

for the e = argmax softmax(R x) it picked: a sparse-MoE layer with one expert per LoRA expert (base MLP plus that
expert's merged deltas), the MoLE router as its router, and top-1 weight softmax / sum of the kept = 1. Mixtral
(for Llama and Mistral bases), Qwen2-MoE and Qwen3-MoE (for Qwen2 and Qwen3) compute exactly that with
num_experts_per_tok=1 and renormalized weights (Qwen's norm_topk_prob=True); Qwen2-MoE's shared expert is given
zero weights. A null expert (AdaMoE) becomes one more expert holding the plain base MLP, routed by its null logit.
Layers without a routed MLP are dense layers (Qwen's mlp_only_layers) or, in Mixtral, experts that are all the
base MLP. Everything the refusals below name cannot be written in these layouts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..tuners.routed.merge_hint import method_problem
from .parts import Parts, RoutedLinear
from .plain import get_tensor

# dense model_type -> (sparse-MoE model_type, transformers classes)
TARGETS = {
    "llama": ("mixtral", "MixtralConfig", "MixtralForCausalLM"),
    "mistral": ("mixtral", "MixtralConfig", "MixtralForCausalLM"),
    "qwen2": ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_FIX = "use an approximate strategy ('average', 'routing_weighted' or 'svd'; the error is measured) instead"


class NativeMoEError(ValueError):
    """native_moe cannot express this adapter; the message names the part that prevents it."""


@dataclass
class Block:
    """One routed MLP block: its layer index, router rows [E', hidden] and per-projection expert deltas."""

    index: int
    name: str  # "model.layers.3.mlp"
    router_weight: torch.Tensor  # [E + m, hidden]: real experts, then null experts
    num_real: int
    deltas: dict[str, torch.Tensor]  # projection -> [E, out, in], s B_e A_e


def _router_logit_bias(part: RoutedLinear) -> torch.Tensor:
    """The bias over all E + m choices (null experts have none), [E + m]."""
    router = part.router
    real = router.linear.bias
    real = torch.zeros(router.num_experts) if real is None else real.detach().float().cpu()
    return torch.cat([real, torch.zeros(router.num_null_experts)])


def routed_blocks(parts: Parts) -> list[Block]:
    """The routed MLP blocks, or a NativeMoEError naming every kind of part that no stock layout expresses."""
    by_block: dict[str, list[RoutedLinear]] = {}
    problems: dict[str, str] = {}  # one entry per kind of problem, each naming the first place it occurs
    attention, biased = [], {}
    for part in parts.routed:
        problem = method_problem(part.config)
        if problem is not None:
            problems.setdefault(part.source, f"{part.source}: {problem}")
        elif not part.name.rpartition(".")[0].endswith(".mlp"):
            attention.append(part.name)
        else:
            bias = _router_logit_bias(part)
            if not torch.all(bias == bias[0]):
                biased[part.block] = float(bias.max() - bias.min())
            by_block.setdefault(part.block, []).append(part)
    if attention:
        problems["attention"] = (
            f"routed attention: {len(attention)} routed layers are not in an MLP block (e.g. {attention[0]}), and the "
            "stock layouts route MLPs only"
        )
    if biased:
        problems["bias"] = (
            f"router_bias=True: the routers of {len(biased)} blocks (e.g. {next(iter(biased))}) add a trained bias to "
            f"their logits (largest spread {max(biased.values()):.3g}), and no stock sparse-MoE layout (Mixtral, "
            "Qwen2-MoE, Qwen3-MoE) has a router bias, so the exported model would pick other experts; train with "
            "router_bias=False for a native export"
        )
    if problems:
        raise NativeMoEError(f"native_moe cannot express this adapter: {'; '.join(problems.values())}; {_FIX}.")
    blocks = []
    for name, members in by_block.items():
        adapters = {p.adapter for p in members}
        if len(adapters) > 1:
            raise NativeMoEError(
                f"native_moe: the MLP block {name} is routed by {len(adapters)} adapters ({sorted(adapters)}) at once; "
                f"a sparse-MoE layer has one router. Activate one routed adapter; {_FIX}."
            )
        first = members[0]
        router = first.router
        weight = router.linear.weight.detach()
        if router.null is not None:
            weight = torch.cat([weight, router.null.weight.detach()])  # [E + m, hidden]
        deltas = {}
        for p in members:
            projection = p.name.rpartition(".")[2]
            if projection not in _PROJECTIONS:
                raise NativeMoEError(f"native_moe: {p.name} is not one of the MLP projections {_PROJECTIONS}; {_FIX}.")
            # s B_e A_e per expert: [E, out, r] @ [E, r, in] -> [E, out, in]
            scale = p.scale.float().to(p.lora_B.device)[:, None, None]  # [E, 1, 1]
            deltas[projection] = torch.bmm(p.lora_B.float(), p.lora_A.float()) * scale
        index = int(name.split(".")[-2])
        blocks.append(Block(index, name, weight, router.num_experts, deltas))
    return sorted(blocks, key=lambda b: b.index)


def check_base(config) -> None:
    """Refuse a dense base that no stock sparse-MoE layout reproduces, naming the field."""
    base_type = config.model_type
    if base_type not in TARGETS:
        raise NativeMoEError(
            f"native_moe: no stock sparse-MoE layout for model_type={base_type!r}; it maps {sorted(TARGETS)} "
            f"(Llama and Mistral to Mixtral, Qwen2 to Qwen2-MoE, Qwen3 to Qwen3-MoE); {_FIX}."
        )
    for flag in ("attention_bias", "mlp_bias"):
        if base_type == "llama" and getattr(config, flag, False):
            raise NativeMoEError(
                f"native_moe: the Llama base sets {flag}=True, which Mixtral has no place for; {_FIX}."
            )
    sliding = [t for t in (getattr(config, "layer_types", None) or []) if t == "sliding_attention"]
    if base_type == "qwen3" and sliding:
        raise NativeMoEError(
            f"native_moe: the Qwen3 base uses sliding-window attention in {len(sliding)} of its layers, while Qwen3-MoE "
            f"applies it to every layer or to none; {_FIX}."
        )


def _target_config(config, num_experts: int, dense_layers: list[int]):
    import transformers

    check_base(config)
    base_type = config.model_type
    target_type, config_cls, model_cls = TARGETS[base_type]
    common = {
        k: getattr(config, k)
        for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
            "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_dropout",
            "rope_parameters",
        )
    }  # fmt: skip
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    common.update(head_dim=head_dim, num_experts_per_tok=1, dtype=config.dtype)
    if target_type == "mixtral":
        specific = dict(
            intermediate_size=config.intermediate_size,
            num_local_experts=num_experts,
            router_jitter_noise=0.0,
            sliding_window=getattr(config, "sliding_window", None),
        )
    else:
        specific = dict(
            intermediate_size=config.intermediate_size,  # the dense layers (mlp_only_layers)
            moe_intermediate_size=config.intermediate_size,
            num_experts=num_experts,
            norm_topk_prob=True,  # top-1 weight p / p = 1, as MoLE's
            decoder_sparse_step=1,
            mlp_only_layers=dense_layers,
            attention_bias=getattr(config, "attention_bias", False),
        )
        if target_type == "qwen2_moe":
            specific.update(
                shared_expert_intermediate_size=1,  # zero weights below: the shared expert adds exactly 0
                qkv_bias=True,  # Qwen2's q/k/v projections always have a bias
                use_sliding_window=config.use_sliding_window,
                sliding_window=config.sliding_window,
                max_window_layers=config.max_window_layers,
                layer_types=list(config.layer_types),
            )
    target = getattr(transformers, config_cls)(**common, **specific)
    return target, getattr(transformers, model_cls)


def build_native(plain: nn.Module, blocks: list[Block]) -> nn.Module:
    """The sparse-MoE model: `plain` (the dense base with every fixed part merged) with the routed MLPs as experts."""
    config = plain.config
    num_layers = config.num_hidden_layers
    routed = {b.index: b for b in blocks}
    widths = {b.router_weight.shape[0] for b in blocks}
    if len(widths) > 1:
        raise NativeMoEError(f"native_moe: the routed blocks have different expert counts {sorted(widths)}; {_FIX}.")
    num_experts = widths.pop()
    dense = [i for i in range(num_layers) if i not in routed]
    target_config, model_cls = _target_config(config, num_experts, dense)
    is_mixtral = target_config.model_type == "mixtral"
    with torch.device("meta"):
        target = model_cls(target_config)
    target.generation_config = copy.deepcopy(plain.generation_config)
    source = dict(plain.named_parameters(remove_duplicate=False))
    values: dict[str, torch.Tensor] = {}
    for i in range(num_layers):
        prefix = f"model.layers.{i}.mlp"
        w = {p: get_tensor(plain, f"{prefix}.{p}.weight").detach() for p in _PROJECTIONS}  # [ff, d], [ff, d], [d, ff]
        block = routed.get(i)
        if block is None and not is_mixtral:
            continue  # a dense layer of the MoE model: its MLP keeps the base names and weights
        device, dtype = w["gate_proj"].device, w["gate_proj"].dtype
        experts = {p: w[p].float().expand(num_experts, *w[p].shape).clone() for p in _PROJECTIONS}  # [E', out, in]
        router = torch.zeros(num_experts, config.hidden_size, device=device)  # no routed MLP: any pick is exact
        if block is not None:
            for p, delta in block.deltas.items():
                experts[p][: block.num_real] += delta.to(device)  # beyond num_real: the null experts' base MLP
            router = block.router_weight.float().to(device)
        values[f"{prefix}.gate.weight"] = router.to(dtype)
        values[f"{prefix}.experts.gate_up_proj"] = torch.cat([experts["gate_proj"], experts["up_proj"]], 1).to(dtype)
        values[f"{prefix}.experts.down_proj"] = experts["down_proj"].to(dtype)  # [E', d, ff]
        if target_config.model_type == "qwen2_moe":
            hidden = config.hidden_size
            zeros = {"dtype": dtype, "device": device}
            values[f"{prefix}.shared_expert.gate_proj.weight"] = torch.zeros(1, hidden, **zeros)
            values[f"{prefix}.shared_expert.up_proj.weight"] = torch.zeros(1, hidden, **zeros)
            values[f"{prefix}.shared_expert.down_proj.weight"] = torch.zeros(hidden, 1, **zeros)
            values[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, hidden, **zeros)
    buffers = dict(plain.named_buffers())
    shared: dict[int, nn.Parameter] = {}
    used: set[str] = set()
    for module_name, module in target.named_modules():
        dot = f"{module_name}." if module_name else ""
        for name in list(module._parameters):
            if module._parameters[name] is None:
                continue
            key = dot + name
            value = values.get(key)
            if value is None:
                value = source.get(key)
                used.add(key)
            if value is None:
                raise NativeMoEError(f"native_moe: no weight for {key} of the {target_config.model_type} layout.")
            expected = module._parameters[name].shape
            if tuple(value.shape) != tuple(expected):
                raise NativeMoEError(
                    f"native_moe: {key} has shape {tuple(value.shape)}, the layout wants {tuple(expected)}."
                )
            if id(value) not in shared:  # tied weights stay tied
                shared[id(value)] = nn.Parameter(value.detach(), requires_grad=False)
            module._parameters[name] = shared[id(value)]
        for name in list(module._buffers):
            if module._buffers[name] is None:
                continue
            value = buffers.get(dot + name)
            if value is None or value.shape != module._buffers[name].shape:
                raise NativeMoEError(
                    f"native_moe: no buffer for {dot + name} of the {target_config.model_type} layout."
                )
            module._buffers[name] = value
    moved = {f"model.layers.{i}.mlp.{p}.weight" for i in range(num_layers) for p in _PROJECTIONS}
    left = sorted(set(source) - used - moved)
    if left:  # a weight of the dense model that the sparse layout would silently drop
        raise NativeMoEError(f"native_moe: the {target_config.model_type} layout has no place for {left[:3]}; {_FIX}.")
    return target.eval()
