"""What a routed adapter's merge refusal says about deploying it: which `moe_peft.export` strategies apply, and why
the exact 'native_moe' one does not when it does not. It lives with the tuner (whose merge_and_unload raises it) and
reads only the config, so the tuner never imports the export; the export reads `method_problem` from here."""

from __future__ import annotations

from .config import LoRAMoEConfig, MoLEConfig, SMoRAConfig


def method_problem(config) -> str | None:
    """Why a routed config cannot become a stock sparse-MoE layer, from the config alone (None: it can, if its
    routed layers are whole MLP blocks and its router has no trained bias)."""
    if isinstance(config, LoRAMoEConfig):
        return "LoRAMoE mixes all of a projection's experts with softmax weights inside the projection"
    if isinstance(config, SMoRAConfig):
        return "SMoRA routes the ranks of one LoRA inside each projection"
    if not isinstance(config, MoLEConfig):
        return f"{type(config).__name__} routes every adapted module separately"
    if getattr(config, "routing_level", "token") == "sequence":
        return (
            "routing_level='sequence' routes each sample once, from its prompt's pooled hidden state"
            + (
                f" (of decoder layer {config.router_input_layer} of the frozen base)"
                if config.router_input_layer is not None
                else ""
            )
            + ", and every token keeps that choice, while a stock sparse-MoE router routes each token from its own "
            "hidden state"
        )
    if config.router_granularity != "block":
        return (
            "router_granularity='linear' gives every projection its own router, so gate_proj, up_proj and down_proj "
            "can pick different experts for one token"
        )
    if config.top_p is not None:
        return f"top_p={config.top_p} weights experts by raw, unnormalized probabilities inside each projection"
    if config.top_k != 1:
        return (
            f"top_k={config.top_k} mixes the experts' LoRA deltas inside each projection, before the activation, "
            "while a sparse-MoE layer adds whole expert outputs; only top_k=1 maps exactly"
        )
    if config.top1_weight != "straight_through":
        return (
            "top1_weight='prob' scales each projection's delta by the router probability inside the MLP; the stock "
            "layouts weight a top-1 expert by 1"
        )
    if config.eval_routing != "topk":
        return "eval_routing='dense' mixes every expert by its probability inside each projection at inference"
    if getattr(config, "modality_experts", None):
        groups = dict(config.modality_experts)
        return (
            f"modality_experts={groups} routes each token only among the experts of its modality group (from "
            "token_types or a LLaVA model's image tokens), while a stock sparse-MoE router sees only the hidden "
            "state and may send an image token to a text expert"
        )
    return None


def merge_hint(config) -> str:
    """The part of merge_and_unload()'s refusal (layer.py, experts/layer.py) that names the strategies for a token-routed config."""
    problem = method_problem(config)
    native = (
        "'native_moe' (exact: a stock sparse-MoE checkpoint such as Mixtral, when the routed layers are whole MLP "
        "blocks and router_bias=False), "
        if problem is None
        else ""
    )
    why = f" ('native_moe' does not apply: {problem})" if problem is not None else ""
    return (
        f"To deploy it, use moe_peft.export(model, strategy=..., out=DIR) or `moe-peft merge ADAPTER --strategy ...` "
        f"with {native}'average', 'routing_weighted' or 'svd' (approximate: a plain PEFT LoRA adapter or merged "
        f"weights, with the error measured on calibration data){why}."
    )
