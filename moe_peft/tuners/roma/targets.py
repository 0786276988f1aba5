"""Which modules are routers: detection by architecture, or names given by the user.

In transformers 5 a sparse-MoE block holds its router as a module with `weight [num_experts, hidden]`
(e.g. `MixtralTopKRouter`) whose forward returns `(router_logits [T, E], top_k_weights, top_k_index)`.
RoMA tunes those weights and nothing else.
"""

from __future__ import annotations

import re
from typing import Optional

from torch import nn

# model_type -> (router class name, how its logits become routing probabilities)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "mixtral": ("MixtralTopKRouter", "softmax"),
    "olmoe": ("OlmoeTopKRouter", "softmax"),
    "flex_olmo": ("FlexOlmoTopKRouter", "softmax"),
    "qwen2_moe": ("Qwen2MoeTopKRouter", "softmax"),
    "qwen3_moe": ("Qwen3MoeTopKRouter", "softmax"),
    "deepseek_v2": ("DeepseekV2TopkRouter", "softmax"),
    # DeepSeek-V3 scores experts with a sigmoid; its e_score_correction_bias buffer stays frozen (it only
    # biases the selection), as methods-reference.md 6.4 advises
    "deepseek_v3": ("DeepseekV3TopkRouter", "sigmoid"),
}

_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def _unsupported(model_type: Optional[str]) -> ValueError:
    names = ", ".join(f"{k} ({v[0]})" for k, v in SUPPORTED_ARCHITECTURES.items())
    return ValueError(
        f"RoMA cannot detect the routers of model_type={model_type!r}. Detected architectures: {names}. "
        "For another MoE model, name its router modules explicitly, e.g. "
        "RoMAConfig(target_routers=['mlp.gate']) (module-name suffixes, or a regex of full names); each router "
        "must hold `weight [num_experts, hidden]` and return its logits first."
    )


def layer_index(name: str) -> Optional[int]:
    """Decoder-layer index in a module name such as `model.layers.7.mlp.gate`."""
    match = _LAYER_INDEX.search(f".{name}.")
    return int(match.group(1)) if match else None


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def score_function(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return SUPPORTED_ARCHITECTURES.get(model_type, ("", "softmax"))[1]


def find_routers(model: nn.Module, config) -> list[str]:
    """Full names of the router modules to tune, in forward order (config: a RoMAConfig)."""
    # a router already wrapped by an earlier adapter appears as `<name>.base_layer`: target the wrapper
    unwrapped = [(n.replace(".base_layer", ""), m) for n, m in model.named_modules()]
    if config.target_routers is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise _unsupported(model_type)
        cls_name = SUPPORTED_ARCHITECTURES[model_type][0]
        names = [n for n, m in unwrapped if type(m).__name__ == cls_name]
        what = f"{cls_name} modules"
    else:
        names = list(dict.fromkeys(n for n, _ in unwrapped if n and _matches(n, config.target_routers)))
        what = f"modules matching target_routers={config.target_routers!r}"
    if not names:
        raise ValueError(f"RoMA found no {what} in {type(model).__name__}; check target_routers.")
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)  # a wrapper exposes its router's weight
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise TypeError(
                f"{name} is a {type(model.get_submodule(name)).__name__} without a 2-D `weight` parameter "
                "[num_experts, hidden]; RoMA tunes router weights only: point target_routers at the router module."
            )
    if config.layers is not None:
        wanted = set(config.layers)
        names = [n for n in names if layer_index(n) in wanted]
        if not names:
            raise ValueError(
                f"layers={config.layers} selects none of the {what}; use decoder-layer indices of MoE layers."
            )
    elif config.num_last_layers is not None:
        names = names[-config.num_last_layers :]  # the paper tunes the last 5 MoE layers
    return names
