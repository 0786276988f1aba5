"""LLaVA-MoLE's adapter for a LLaVA-family model, as the paper sets it up (docs/methods.md, MoLE and modality
groups; configs/mole_llava.yaml holds the same fields):

* MoLE on the language model's MLP projections (gate/up/down), one router per MLP block shared by the three
  (block routing), top-1, K = 3 experts of rank r = 32, alpha = 64, dropout 0.05 (LLaVA-MoLE's released code);
* the attention projections with one plain LoRA of the same rank (the released code; `attention="lora"`) or
  nothing (`attention="none"`);
* the vision tower frozen and never adapted: the target regexes only match modules under `language_model`;
* the multimodal projector trained in full and saved with the adapter (`train_projector=True`, PEFT's
  modules_to_save), as in LLaVA-1.5's LoRA recipe.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from ..tuners.routed.config import MoLEConfig
from ..tuners.routed.model import IMAGE_TOKEN_MODEL_TYPES

SUPPORTED_MODEL_TYPES = IMAGE_TOKEN_MODEL_TYPES  # LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

# transformers 5 names: model.language_model.layers.<i>.mlp.gate_proj, ...; the vision tower lives under
# model.vision_tower (CLIP's own q/k/v/out_proj and fc1/fc2), which these never match
MLP_REGEX = r".*language_model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)"
ATTENTION_REGEX = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
PROJECTOR = "multi_modal_projector"


def _model_type(model: Any) -> Optional[str]:
    if model is None or isinstance(model, str):
        return model
    config = getattr(model, "config", model)
    return getattr(config, "model_type", None)


def check_supported(model: Any) -> str:
    """The model type of `model` (a model, its config or a model_type string), or a ValueError naming the
    supported families."""
    model_type = _model_type(model)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported by moe_peft.llava: it supports LLaVA "
            f"(LlavaForConditionalGeneration, model_type 'llava') and LLaVA-NeXT (LlavaNextForConditionalGeneration, "
            f"'llava_next'). For another model build a MoLEConfig yourself (target_modules naming its language model's "
            "linears) and pass token_types=<[batch, seq] group indices> when you use modality_experts."
        )
    return model_type


def mole_llava_config(
    model: Any = None,
    *,
    num_experts: Optional[int] = None,
    r: int = 32,
    lora_alpha: float = 64.0,
    top_k: int = 1,
    lora_dropout: float = 0.05,
    attention: Literal["lora", "none"] = "lora",
    train_projector: bool = True,
    modality_experts: Optional[dict[str, int]] = None,
    router_aux_loss_coef: float = 0.01,
    **overrides: Any,
) -> MoLEConfig:
    """LLaVA-MoLE's MoLEConfig. `model` (a LLaVA or LLaVA-NeXT model, its config, or None to skip the check) is
    checked to be supported and, when it is a model, to have language-model MLPs the regexes match and no vision
    module they match.

    num_experts: K, the paper's 3 when unset (the sum of modality_experts with modality groups).
    modality_experts: modality-aware expert groups, e.g. {"text": 2, "image": 2} (MoMa); the image tokens of
        input_ids route among the "image" experts, every other token among the "text" experts.
    overrides: any other MoLEConfig field (router_z_loss_coef, eval_routing, kernel_backend, ...).
    """
    if attention not in ("lora", "none"):
        raise ValueError(f"attention={attention!r} is invalid: use 'lora' (one plain LoRA per projection) or 'none'.")
    if model is not None:
        check_supported(model)
    if num_experts is None and modality_experts is None:
        num_experts = 3
    targets = MLP_REGEX if attention == "none" else f"({MLP_REGEX})|({ATTENTION_REGEX})"
    config = MoLEConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        plain_lora_modules=ATTENTION_REGEX if attention == "lora" else None,
        modules_to_save=[PROJECTOR] if train_projector else None,
        num_experts=num_experts,
        modality_experts=modality_experts,
        top_k=top_k,
        router_granularity="block",
        router_aux_loss_coef=router_aux_loss_coef,
        task_type="CAUSAL_LM",
        **overrides,
    )
    if model is not None and hasattr(model, "named_modules"):
        _check_targets(model, config)
    return config


def _check_targets(model, config: MoLEConfig) -> None:
    names = [name for name, _ in model.named_modules()]
    adapted = [n for n in names if re.fullmatch(config.target_modules, n)]
    if not any(re.fullmatch(MLP_REGEX, n) for n in adapted):
        raise ValueError(
            f"no module of this {type(model).__name__} matches the language-model MLP regex {MLP_REGEX!r}; its "
            "language model does not use Llama-style gate_proj/up_proj/down_proj names. Build a MoLEConfig with "
            "target_modules naming its MLP linears."
        )
    vision = [n for n in adapted if "vision" in n]
    if vision:  # never expected: the regexes are anchored on language_model
        raise ValueError(f"the target regex matches vision-tower modules {vision[:3]}; they must stay frozen.")
