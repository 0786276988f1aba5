"""The BaseTuner: finds the target linears, swaps in MoE-LoRA layers, carries per-batch routing inputs
(padding mask, sample types) to them, and collects the router losses after each forward."""

from __future__ import annotations

import re
import warnings
import weakref
from typing import Any, Optional

import torch
import torch.distributed as dist
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..._internal.accumulation import label_share
from ..._internal.quantized import refuse_quantized_merge
from ..._internal.state_dict import AdapterNameKeys, FullStateDictKeys
from ..._internal.targets import TargetCheck
from ...routing import sequence
from ...routing.context import RoutingContext, attach_router_loss, padding_mask, router_loss_probe
from .config import MoELoraConfig, SMoRAConfig
from .experts import LoRAMoEExperts, MoELoraExperts, MoLEExperts, SMoRAExperts, inject_fused_experts
from .layer import LoRAMoELinear, MoELoraLinear, MoLELinear, SMoRALinear

_MLP = ["gate_proj", "up_proj", "down_proj"]
_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Default targets when target_modules is None. Sparse MoE models keep their experts in fused 3-D
# parameters in transformers 5, so their default is the attention projections.
DEFAULT_TARGET_MODULES = {
    "llama": _MLP,
    "mistral": _MLP,
    "qwen2": _MLP,
    "qwen3": _MLP,
    "gemma": _MLP,
    "gemma2": _MLP,
    "llava": _MLP,
    "mixtral": _ATTENTION,
    "olmoe": _ATTENTION,
    "qwen3_moe": _ATTENTION,
}

_HIDDEN_KWARGS = ("hidden_states", "x", "input")
# the tuner's attribute holding the adapters whose router_lr_ratio an optimizer applies (set by optim.py's groups)
ROUTER_LR_APPLIED = "_moe_router_lr_applied"
# Models whose token modality moe-peft reads by itself: image tokens are `input_ids == config.image_token_id`
# (transformers' processors expand each image placeholder into that many tokens before the forward).
IMAGE_TOKEN_MODEL_TYPES = ("llava", "llava_next")


def _block_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Route a block's input once for all of its adapted linears (router_granularity="block")."""
    if args:
        hidden, key = args[0], None
    else:
        key = next((k for k in _HIDDEN_KWARGS if k in kwargs), None)
        if key is None:
            raise RuntimeError(
                f"router_granularity='block': cannot find the input of {type(module).__name__} (looked for a "
                f"positional argument or one of {_HIDDEN_KWARGS}); use router_granularity='linear'."
            )
        hidden = kwargs[key]
    total, ctx = None, None
    for child in module.children():
        if isinstance(child, MoELoraLinear):
            loss = child.route_block(hidden)
            ctx = child._routing_ctx
            if loss is not None:
                total = loss if total is None else total + loss
    if total is None:
        return None
    hidden = attach_router_loss(hidden, total, ctx)
    if key is None:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, key: hidden}


class _GenerateWithRoutingInputs:
    """Instance-level `generate` of the adapted model: transformers' generate() rejects keyword arguments its
    forward does not declare, so routing inputs (sample_types) are held on the context for every step.
    A callable object rather than a closure, so that copy.deepcopy of the model rebinds it to the copy."""

    def __init__(self, model: nn.Module, routing_ctx: RoutingContext):
        self.model, self.routing_ctx = model, routing_ctx

    def __call__(self, *args: Any, sample_types: Optional[torch.Tensor] = None, token_types=None, **kwargs: Any):
        self.routing_ctx.sticky_sample_types = sample_types
        self.routing_ctx.sticky_token_types = None if token_types is None else _as_token_types(token_types)
        # sequence-level routing: the first forward of the call is the prompt, the later ones reuse its decisions
        self.routing_ctx.generate_forwards = 0
        try:
            return type(self.model).generate(self.model, *args, **kwargs)
        finally:
            self.routing_ctx.sticky_sample_types = None
            self.routing_ctx.sticky_token_types = None
            self.routing_ctx.generate_forwards = None


class MoELoraModel(AdapterNameKeys, FullStateDictKeys, TargetCheck, BaseTuner):
    """Shared tuner of every token-routed method; each method subclass sets `prefix`, `linear_layer_cls` (what a
    target module becomes) and `tuner_layer_cls`, the (linear, fused-experts) layer pair PEFT finds with isinstance."""

    prefix: str = "moe_"
    linear_layer_cls = MoELoraLinear
    tuner_layer_cls = (MoELoraLinear, MoELoraExperts)
    target_module_mapping = DEFAULT_TARGET_MODULES

    # -- injection -----------------------------------------------------------------------------------
    @property
    def routing_ctx(self) -> RoutingContext:
        ctx = self.__dict__.get("_moe_routing_ctx")
        if ctx is None:
            ctx = RoutingContext()
            self.__dict__["_moe_routing_ctx"] = ctx
        return ctx

    def _create_and_replace(
        self,
        config: MoELoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        plain = _is_plain_lora(config, current_key)
        if isinstance(target, self.linear_layer_cls):
            target.update_layer(adapter_name, config, plain=plain, router_features=self._router_features(config))
            target.module_name = current_key
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"{current_key} already holds a {type(target).__name__} from another PEFT method.")
        if not isinstance(target, nn.Linear):
            raise TypeError(
                f"Target module {current_key} is a {type(target).__name__}; target_modules adapts nn.Linear modules "
                "only. Remove it from target_modules (or exclude it with exclude_modules); name fused 3-D expert "
                "weights in target_parameters instead."
            )
        new_module = self.linear_layer_cls(
            target, adapter_name, config, self.routing_ctx, plain=plain, router_features=self._router_features(config)
        )
        new_module.module_name = current_key  # named in warnings and errors
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _inject_parameters(self, peft_config, model, adapter_name, low_cpu_mem_usage) -> list[str]:
        return inject_fused_experts(self, peft_config, model, adapter_name)  # one layer per experts module

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, MoELoraExperts):  # unloading: fused experts have no `weight` for PEFT to carry over
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if self.peft_config[adapter_name].router_granularity == "block":
            self._setup_block_routing(adapter_name)
        self._check_sequence_routing(adapter_name)

    def _router_features(self, config: MoELoraConfig) -> Optional[int]:
        """What a router reads when it does not read its own layer's input: the model's hidden size for
        router_input_layer (the output of a decoder layer); None otherwise."""
        if getattr(config, "router_input_layer", None) is None:
            return None
        model_config = self.model.config
        text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        return int(text.hidden_size)

    def _check_sequence_routing(self, adapter_name: str) -> None:
        """routing_level="sequence" acts on the adapter's own routers, and router_input_layer names a layer the model
        has: say so now rather than ignore the option."""
        config = self.peft_config[adapter_name]
        if getattr(config, "routing_level", "token") != "sequence":
            return
        if not any(adapter_name in layer.routers for _, layer in self._moe_layers()):
            raise ValueError(
                f"routing_level='sequence' routes adapter '{adapter_name}'s own routers, but it has none: fused "
                "experts (target_parameters) follow the base model's router and plain_lora_modules have no router. "
                "Add routed target_modules, or use routing_level='token'."
            )
        if config.router_input_layer is not None:
            resolve_layer(decoder_layers(self.model), config.router_input_layer)

    def _moe_layers(self):
        for name, module in self.model.named_modules():
            if isinstance(module, MoELoraLinear):
                yield name, module

    def _setup_block_routing(self, adapter_name: str) -> None:
        """One router per parent block, owned by the block's first adapted linear, fed by a pre-hook."""
        config = self.peft_config[adapter_name]
        blocks: dict[str, list[MoELoraLinear]] = {}
        for name, layer in self._moe_layers():
            if adapter_name in layer.experts_A and adapter_name not in layer.plain_adapters:
                blocks.setdefault(name.rpartition(".")[0], []).append(layer)
        hooks = self.__dict__.setdefault("_moe_block_hooks", {})
        for parent_name, layers in blocks.items():
            owner = layers[0]
            owner.add_block_router(adapter_name, config, self._router_features(config))
            for layer in layers:
                layer._router_owner[adapter_name] = owner
            if parent_name not in hooks:
                parent = self.model.get_submodule(parent_name)
                hooks[parent_name] = parent.register_forward_pre_hook(_block_pre_hook, with_kwargs=True)

    def _remove_unused_block_hooks(self, remove_all: bool = False) -> None:
        hooks = self.__dict__.get("_moe_block_hooks", {})
        for parent_name in list(hooks):
            parent = self.model.get_submodule(parent_name)
            in_use = any(isinstance(c, MoELoraLinear) and c.owns_block_router() for c in parent.children())
            if remove_all or not in_use:
                hooks.pop(parent_name).remove()

    # -- adapter management --------------------------------------------------------------------------
    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._remove_unused_block_hooks()

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            for name, layer in self._moe_layers():
                for adapter in adapter_names or layer.active_adapters:
                    if adapter in layer.configs:
                        layer.get_delta_weight(adapter)  # raises for adapters that cannot be merged, before any change
                        refuse_quantized_merge(layer.get_base_layer(), adapter, name)
        self._remove_unused_block_hooks(remove_all=True)
        self._remove_root_hooks()
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    # -- forward -------------------------------------------------------------------------------------
    # The routing context is filled and the router loss added by hooks on the root model, not by
    # overriding forward: PeftModel (no task type) calls the base model directly, PeftModelForCausalLM
    # calls this tuner, generate() calls the root model once per step; the hooks see all of them.
    def _post_injection_hook(self, model: nn.Module, config: MoELoraConfig, adapter_name: str) -> None:
        if "_moe_root_hooks" not in self.__dict__:
            self.__dict__["_moe_root_hooks"] = (
                model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True),
                model.register_forward_hook(self._root_hook, with_kwargs=True),
            )
            if hasattr(model, "generate") and "generate" not in model.__dict__:
                model.generate = _GenerateWithRoutingInputs(model, self.routing_ctx)

    def _remove_root_hooks(self) -> None:
        for handle in self.__dict__.pop("_moe_root_hooks", ()):
            handle.remove()
        if isinstance(self.model.__dict__.get("generate"), _GenerateWithRoutingInputs):
            del self.model.__dict__["generate"]

    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if module.training and torch.is_grad_enabled() and "_moe_router_lr_warned" not in self.__dict__:
            self._warn_unapplied_router_lr()
        ctx = self.routing_ctx
        sample_types = given = kwargs.pop("sample_types", None)
        if sample_types is None:
            sample_types = ctx.sticky_sample_types
        if sample_types is not None:
            # a generate() call holds them for every step (beams expand the batch; no loss is computed there)
            sample_types = as_sample_types(sample_types, None if given is None else _batch_size(args, kwargs))
        token_types = kwargs.pop("token_types", None)
        attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        attention_mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        token_types, image_tokens = self._token_modality(module, args, kwargs, token_types)
        ctx.start_forward(
            attention_mask,
            sample_types,
            token_types,
            image_tokens,
            **self._sequence_inputs(module, args, kwargs, attention_mask),
        )
        if ctx.sequence_prompt is not None:
            self._router_input_prepass(module, args, kwargs)
        return args, kwargs

    def _warn_unapplied_router_lr(self) -> None:
        """A training forward of an active adapter whose router_lr_ratio (not 0: that one is enforced in the forward;
        not 1) no optimizer of ours applies: its routers would train at the experts' lr. Warned once per model; the
        check is a few dict look-ups per training forward until then."""
        applied = self.__dict__.get(ROUTER_LR_APPLIED, set())
        for adapter in self.active_adapters:
            ratio = getattr(self.peft_config.get(adapter), "router_lr_ratio", 1.0)
            if ratio in (0, 1) or adapter in applied:
                continue
            if not any(adapter in layer.routers for _, layer in self._moe_layers()):
                continue  # no router of ours (fused experts follow the base router; plain LoRA modules have none)
            self.__dict__["_moe_router_lr_warned"] = True
            warnings.warn(
                f"adapter '{adapter}' has router_lr_ratio={ratio}, but this model is trained by an optimizer that does "
                "not apply it: its routers train at the experts' learning rate. Build the optimizer with "
                "moe_peft.create_router_optimizer(model, lr=...) (for a transformers Trainer: "
                "optimizers=(optimizer, None)), or train with moe_peft.MoESFTTrainer or `moe-peft train`, which do.",
                UserWarning,
                stacklevel=4,
            )
            return

    def _sequence_inputs(self, module: nn.Module, args: tuple, kwargs: dict, attention_mask) -> dict:
        """For adapters with routing_level="sequence" (routing/sequence.py): whether this forward continues a
        generation (a later generate() step, or a forward continuing a KV cache: its rows reuse the decisions of
        their prompt), else each token's sequence and which tokens are its prompt."""
        if not any(getattr(c, "routing_level", "token") == "sequence" for c in self.peft_config.values()):
            return {}
        ctx = self.routing_ctx
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        step = ctx.generate_forwards
        if step is not None:
            ctx.generate_forwards = step + 1
        if cached > 0 or (step is not None and step > 0):
            return {"sequence_continues": True}
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = input_ids if isinstance(input_ids, torch.Tensor) else kwargs.get("inputs_embeds")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
            return {}  # the routed layers then say what is missing
        batch, seq = tokens.shape[:2]
        real = padding_mask(attention_mask)
        real = torch.ones(batch, seq, dtype=torch.bool, device=tokens.device) if real is None else real
        if tuple(real.shape) != (batch, seq):
            raise ValueError(
                f"routing_level='sequence': attention_mask gives padding for {tuple(real.shape)} tokens but the input "
                f"has [batch, seq] = {(batch, seq)}; pass a mask of the input's shape."
            )
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and tuple(labels.shape) != (batch, seq):
            raise ValueError(
                f"routing_level='sequence' finds each sample's prompt from labels (the tokens before the first label "
                f"!= -100), but labels has shape {tuple(labels.shape)} for an input of {(batch, seq)}; pass labels "
                "aligned with input_ids (unshifted, -100 on the prompt and padding)."
            )
        labels = labels if isinstance(labels, torch.Tensor) else None
        position_ids = kwargs.get("position_ids")
        starts = sequence.sequence_starts(real, position_ids if isinstance(position_ids, torch.Tensor) else None)
        prompt = sequence.prompt_tokens(real, starts, labels)
        if module.training and torch.is_grad_enabled():
            _warn_unless_prompted(real, starts, prompt, labels)
        return {"sequence_prompt": prompt, "sequence_starts": starts}

    def _router_input_prepass(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """router_input_layer: run the frozen base (every moe-peft layer disabled) up to the deepest requested decoder
        layer under no_grad, and keep each requested layer's rms-normalized output for the routers
        (ctx.router_states [B, S, L, d]). The base's hidden states do not depend on the routing, so every routed
        block, before or after that layer, reads the same signal; the pre-pass stops at the layer, so it costs
        L + 1 decoder layers' forward without the activations a backward would keep (benchmarks/sequence_routing.py
        measures it)."""
        wanted = sorted(
            {
                c.router_input_layer
                for c in self.peft_config.values()
                if getattr(c, "routing_level", "token") == "sequence" and c.router_input_layer is not None
            }
        )
        if not wanted:
            return
        layers = [m for m in self.model.modules() if isinstance(m, (MoELoraLinear, MoELoraExperts))]
        if not layers or layers[0].disable_adapters:
            return
        decoder = decoder_layers(module)
        resolved = {raw: resolve_layer(decoder, raw) for raw in wanted}
        last = max(resolved.values())
        captured: dict[int, torch.Tensor] = {}

        def capture(index: int):
            def hook(mod, inputs, output):
                captured[index] = output[0] if isinstance(output, tuple) else output  # [B, S, d]
                if index == last:
                    raise _PrepassDone

            return hook

        handles = [decoder[i].register_forward_hook(capture(i)) for i in sorted(set(resolved.values()))]
        disabled = [(m, m._disable_adapters) for m in layers]
        inputs = {k: v for k, v in kwargs.items() if k not in _PREPASS_DROPPED}
        inputs["use_cache"] = False
        try:
            for m, _ in disabled:
                m._disable_adapters = True  # the attribute only: enable_adapters() would change requires_grad
            with torch.no_grad():
                module.forward(*args, **inputs)  # forward, not __call__: the root hooks run for the real forward only
        except _PrepassDone:
            pass
        finally:
            for m, was in disabled:
                m._disable_adapters = was
            for h in handles:
                h.remove()
        if last not in captured:
            raise RuntimeError(f"router_input_layer: decoder layer {last} did not run in the pre-pass.")
        states = [sequence.rms_normalized(captured[resolved[raw]]) for raw in wanted]  # [B, S, d] each
        ctx = self.routing_ctx
        ctx.router_states = torch.stack(states, dim=2)  # [B, S, L, d]
        ctx.router_state_layers = tuple(wanted)

    def _token_modality(self, module: nn.Module, args: tuple, kwargs: dict, token_types):
        """(token_types [B, S], image_tokens [B, S]) of this forward's input positions, for adapters with modality
        groups; (None, None) when no adapter has them."""
        groups = [c.modality_experts for c in self.peft_config.values() if getattr(c, "modality_experts", None)]
        if not groups:
            return None, None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        tokens = input_ids if isinstance(input_ids, torch.Tensor) else embeds
        if token_types is None and self.routing_ctx.sticky_token_types is not None and tokens is not None:
            token_types = _generate_step_types(self.routing_ctx.sticky_token_types, tokens.shape[:2], kwargs)
        if token_types is not None:
            token_types = _as_token_types(token_types)
            if tokens is not None:
                token_types = token_types.to(tokens.device)
            if token_types.numel() and (
                int(token_types.max()) >= min(len(g) for g in groups) or int(token_types.min()) < -1
            ):
                raise ValueError(
                    f"token_types has values in [{int(token_types.min())}, {int(token_types.max())}], but "
                    f"modality_experts has "
                    f"{min(len(g) for g in groups)} groups ({[list(g) for g in groups]}): use indices into "
                    "modality_experts, in its order (-1: a generated text token)."
                )
            return token_types, None
        config = getattr(module, "config", None)
        image_token_id = getattr(config, "image_token_id", None)
        if getattr(config, "model_type", None) not in IMAGE_TOKEN_MODEL_TYPES or image_token_id is None:
            return None, None  # a routed layer then asks for token_types (RoutingContext.token_groups)
        if isinstance(input_ids, torch.Tensor):
            return None, input_ids == image_token_id  # [B, S] bool
        if isinstance(embeds, torch.Tensor):  # as transformers finds the placeholders: the image token's embedding
            image_embedding = module.get_input_embeddings().weight[image_token_id].to(embeds.dtype)  # [d]
            return None, (embeds == image_embedding).all(-1)  # [B, S, d] -> [B, S]
        return None, None

    def _root_hook(self, module: nn.Module, args: tuple, kwargs: dict, outputs):
        return self._finish_forward(outputs, kwargs)

    def _finish_forward(self, outputs, kwargs: dict):
        ctx = self.routing_ctx
        ctx.in_forward = False
        terms, attached, anchor, smora_counts = [], 0, None, False
        for _, layer in self._moe_layers():
            for adapter, record in layer.router_records.items():
                if record.forward_id != ctx.forward_id:
                    continue
                if record.graph_loss is not None:  # computed with its graph during this forward
                    terms.append(record.graph_loss.float())
                    record.graph_loss = None  # the graph lives on in router_loss only
                elif record.loss is not None:  # no graph yet (reentrant checkpointing): attached on recompute
                    terms.append(record.loss.float())
                    attached += 1
                    if anchor is None:
                        anchor = next((p for p in layer.routers[adapter].parameters() if p.requires_grad), None)
                if self.training and isinstance(layer.configs[adapter], SMoRAConfig):
                    pending = layer.__dict__.setdefault("_pending_counts", {})
                    pending[adapter] = pending.get(adapter, 0) + record.counts
                    smora_counts = True
        if smora_counts:
            _counts_pending(self)  # applied after the next optimizer step
        if terms:
            router_loss = torch.stack(terms).mean()  # averaged over routed layers
            if attached and anchor is not None and torch.is_grad_enabled():
                router_loss = router_loss + router_loss_probe(anchor, ctx, len(terms))
        else:
            router_loss = torch.zeros((), device=_device_of(outputs, self.model))
        if torch.is_grad_enabled():
            ctx.last_router_loss = router_loss  # router_loss(model): the latest forward run with grad enabled
        if terms and kwargs.get("labels") is not None:
            # outputs.loss holds the router loss weighted as the task loss weights this micro-batch
            # (moe_peft/accumulation.py): 1 for a per-batch mean, its label-token share with num_items_in_batch
            share = label_share(self.model, kwargs)
            added = router_loss if share is None else router_loss * share
            if isinstance(outputs, tuple):
                return (outputs[0] + added.to(outputs[0].dtype),) + tuple(outputs[1:])
            if getattr(outputs, "loss", None) is not None:
                outputs.loss = outputs.loss + added.to(outputs.loss.dtype)
        if isinstance(outputs, dict):  # a ModelOutput (a plain tensor or tuple output has no room for it)
            outputs["router_loss"] = router_loss
        return outputs


# keywords the router_input_layer pre-pass does not pass on: the loss and the KV cache belong to the real forward
_PREPASS_DROPPED = ("labels", "cache", "past_key_values", "num_items_in_batch", "logits_to_keep", "shift_labels")


class _PrepassDone(Exception):
    """Raised by the hook on the deepest decoder layer the pre-pass needs: the rest of the model does not run."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers model (`get_decoder().layers`; LLaVA: its language model's)."""
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"router_input_layer: cannot find the decoder layers of {type(model).__name__} (model.get_decoder().layers, "
            "which transformers' decoder models have); leave router_input_layer unset for this model."
        )
    return layers


def resolve_layer(layers: nn.ModuleList, index: int) -> int:
    """router_input_layer as an index into the decoder layers (negative counts from the last)."""
    if not -len(layers) <= index < len(layers):
        raise ValueError(
            f"router_input_layer={index} is invalid: the model has {len(layers)} decoder layers; use 0..{len(layers) - 1}"
            f" (or -1 for the last)."
        )
    return index % len(layers)


def _warn_unless_prompted(real: torch.Tensor, starts: torch.Tensor, prompt: torch.Tensor, labels) -> None:
    """A training forward routed by sequence should say which tokens are the prompt: without labels (or with a label
    on every token), its sequences would be routed from tokens that generation does not see first."""
    if labels is None:
        warnings.warn(
            "routing_level='sequence': a training forward without labels routes every sample from all of its tokens "
            "(the answer included), while generation routes it from the prompt alone. Pass labels with -100 on the "
            "prompt (TRL: completion_only_loss) so that training routes as generation does.",
            stacklevel=4,
        )
        return
    only_first = sequence.label_only_sequences(real, starts, prompt)
    if only_first:
        warnings.warn(
            f"routing_level='sequence': {only_first} sequence(s) of this training batch have a label on every token "
            "after the first, so they are routed from their first token only. Sequence routing reads the prompt: "
            "train on prompt/completion rows with -100 on the prompt's labels (TRL: completion_only_loss).",
            stacklevel=4,
        )


def _as_token_types(token_types) -> torch.Tensor:
    types = torch.as_tensor(token_types)
    if types.dim() != 2 or types.dtype.is_floating_point or types.dtype == torch.bool:
        raise ValueError(
            f"token_types must be a [batch, seq] integer tensor of modality group indices (into modality_experts, "
            f"in its order), got {tuple(types.shape)} {types.dtype}."
        )
    return types.long()


def _generate_step_types(prompt_types: torch.Tensor, tokens_shape: torch.Size, kwargs: dict) -> torch.Tensor:
    """The token types of one generate() step's input positions from the prompt's [B0, P]: the step's input
    covers positions [cached, cached + S) (only the new tokens with a KV cache, everything without one);
    positions past the prompt are generated tokens (-1, routed as text). Rows repeat for beams / samples."""
    batch, seq = tokens_shape
    if prompt_types.shape[0] != batch:
        if batch % prompt_types.shape[0]:
            raise ValueError(
                f"token_types has {prompt_types.shape[0]} rows but generate() runs a batch of {batch}: pass one row "
                "per prompt."
            )
        prompt_types = prompt_types.repeat_interleave(batch // prompt_types.shape[0], dim=0)  # [B0, P] -> [B, P]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    cached = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
    end = cached + seq
    if end > prompt_types.shape[1]:  # [B, P] -> [B, end]: the generated positions are text
        prompt_types = torch.nn.functional.pad(prompt_types, (0, end - prompt_types.shape[1]), value=-1)
    return prompt_types[:, cached:end]  # [B, S]


def _is_plain_lora(config: MoELoraConfig, key: str) -> bool:
    """Whether the target module `key` gets one plain LoRA (MoLEConfig.plain_lora_modules): a regex must match
    the whole name, a list entry the name or its last components, as PEFT matches target_modules."""
    patterns = getattr(config, "plain_lora_modules", None)
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return any(key == p or key.endswith("." + p) for p in patterns)


def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    """The batch size of a root forward: input_ids, inputs_embeds or attention_mask, whichever is given."""
    for value in (kwargs.get("input_ids", args[0] if args else None), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0]
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return mask.shape[0] if isinstance(mask, torch.Tensor) and mask.dim() >= 2 else None


def as_sample_types(sample_types: Any, batch: Optional[int]) -> torch.Tensor:
    """Validate `sample_types` (LoRAMoE's localized balancing): a [batch] integer or bool tensor of 0/1, one entry
    per sample of the forward's batch."""
    types = torch.as_tensor(sample_types)
    fix = "pass one 0/1 per sample (1: world knowledge, 0: downstream task), e.g. torch.tensor([1, 0, 0, 1])"
    if types.dim() != 1 or types.dtype.is_floating_point or types.dtype.is_complex:
        raise ValueError(
            f"sample_types has shape {tuple(types.shape)} and dtype {types.dtype}; {fix}: a [batch] integer tensor."
        )
    if batch is not None and types.shape[0] != batch:
        raise ValueError(f"sample_types has {types.shape[0]} entries but the batch has {batch} samples; {fix}.")
    if types.numel() and not bool(((types == 0) | (types == 1)).all()):
        raise ValueError(f"sample_types={types.tolist()} has values other than 0 and 1; {fix}.")
    return types.long()


def _device_of(outputs, model: nn.Module) -> torch.device:
    logits = getattr(outputs, "logits", None) if not isinstance(outputs, tuple) else None
    if isinstance(logits, torch.Tensor):
        return logits.device
    return next(model.parameters()).device


def _tuner(model: nn.Module) -> MoELoraModel:
    tuner = model if isinstance(model, MoELoraModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, MoELoraModel):
        raise TypeError(f"Expected a PeftModel made from a moe_peft config, got {type(model).__name__}.")
    return tuner


def router_loss(model: nn.Module) -> torch.Tensor:
    """The weighted router loss (mean over routed layers) of the latest forward run with gradients enabled,
    with its gradient path; a zero tensor when that forward had no router-loss term (all coefficients 0,
    eval mode, no routed token).

    Forwards under `torch.no_grad()` (an extra forward a trainer runs for metrics) do not replace it. Each
    forward also returns its own as `outputs.router_loss`, which cannot be confused with another forward's.
    `outputs.loss`, when present, already includes it: add it only to a loss you compute yourself (from the
    logits or log-probs), once, weighted for gradient accumulation (`moe_peft.accumulation_weight`).
    """
    ctx = _tuner(model).routing_ctx
    if ctx.last_router_loss is None:
        return torch.zeros((), device=next(model.parameters()).device)
    return ctx.last_router_loss


def routing_stats(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """Per routed layer, from the latest forward: expert load [E] (fraction of picks), null-expert fraction,
    experts per token (mean number of real experts per non-padding token: what top-p and null-expert papers
    report), the layer's weighted router loss and the number of routed (non-padding) tokens. With modality
    groups (MoLEConfig.modality_experts) also `groups`: per group name, its experts' load over the group's own
    (token, slot) picks and its number of tokens. With routing_level="sequence" the rows are the sequences, one
    decision each ("tokens" counts the routed sequences, "load" their picks), marked `"routing_level": "sequence"`;
    a later generation step keeps its prompt's entry."""
    tuner = _tuner(model)
    stats = {}
    for name, layer in tuner._moe_layers():
        for adapter, record in layer.router_records.items():
            if adapter_name is not None and adapter != adapter_name:
                continue
            entry = stats[name if adapter_name else f"{name}[{adapter}]"] = {
                "load": record.load.tolist(),
                "null_fraction": record.null_fraction,
                "experts_per_token": float(record.experts_per_token),
                "loss": None if record.loss is None else float(record.loss),
                "tokens": record.num_tokens,
            }
            if record.sequences:  # routing_level="sequence": the counts are per sequence (one decision each)
                entry["routing_level"] = "sequence"
            if record.groups is not None:  # modality groups: each group's load over its own picks
                entry["groups"] = {
                    g: {"load": load.tolist(), "tokens": int(tokens)} for g, (load, tokens) in record.groups.items()
                }
    return stats


@torch.no_grad()
def update_router_biases(model: nn.Module) -> int:
    """SMoRA loss-free balancing: apply the expert counts gathered since the last update to the selection
    biases now, and return how many biases moved (0 when no count was pending).

    The single entry point of the update. It runs by itself right after every optimizer step: when a SMoRA
    adapter first has counts pending, a step post-hook common to all torch.optim optimizers is registered
    (once per process), and it calls this function for every model with pending counts. So the update
    happens once per optimizer step with gradient accumulation, gradient checkpointing, a frozen router or
    an optimizer that does not hold the router, and a skipped fp16 step (no optimizer.step()) updates
    nothing. Counts are consumed when applied, so calling it again (a Trainer callback after the step) is a
    no-op. Counts are all-reduced across data-parallel ranks.
    """
    tuner = _tuner(model)
    applied = 0
    for _, layer in tuner._moe_layers():
        pending = layer.__dict__.get("_pending_counts", {})
        for adapter in list(pending):
            config = layer.configs.get(adapter)
            counts = pending.pop(adapter).float()
            if not isinstance(config, SMoRAConfig) or adapter not in layer.routers:
                continue
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(counts)
            layer.routers[adapter].update_bias(counts, config.bias_update_rate)
            applied += 1
    tuner.__dict__["_forwards_pending"] = 0
    _TUNERS_WITH_PENDING_COUNTS.discard(tuner)
    return applied


# The one piece of process-wide state: PyTorch's optimizer step hooks are global by design. A weak set, so
# a model that is deleted with counts pending is not kept alive.
_TUNERS_WITH_PENDING_COUNTS: weakref.WeakSet = weakref.WeakSet()
_STEP_HOOK: list = []
_PENDING_WARN_AFTER = 1000  # training forwards with counts pending and no optimizer step


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    for tuner in list(_TUNERS_WITH_PENDING_COUNTS):
        update_router_biases(tuner)


def _counts_pending(tuner: MoELoraModel) -> None:
    if not _STEP_HOOK:
        _STEP_HOOK.append(register_optimizer_step_post_hook(_after_optimizer_step))
    _TUNERS_WITH_PENDING_COUNTS.add(tuner)
    waiting = tuner.__dict__.get("_forwards_pending", 0) + 1
    tuner.__dict__["_forwards_pending"] = waiting
    if waiting == _PENDING_WARN_AFTER:
        warnings.warn(
            f"SMoRA: expert counts from {waiting} training forwards are waiting for an optimizer step to update "
            "the selection biases, and no torch.optim optimizer step has run. If your optimizer is not a "
            "torch.optim.Optimizer, call moe_peft.update_router_biases(model) after each optimizer step.",
            stacklevel=3,
        )


class MoLEModel(MoELoraModel):
    prefix = "mole_"
    linear_layer_cls = MoLELinear
    tuner_layer_cls = (MoLELinear, MoLEExperts)


class LoRAMoEModel(MoELoraModel):
    prefix = "loramoe_"
    linear_layer_cls = LoRAMoELinear
    tuner_layer_cls = (LoRAMoELinear, LoRAMoEExperts)


class SMoRAModel(MoELoraModel):
    prefix = "smora_"
    linear_layer_cls = SMoRALinear
    tuner_layer_cls = (SMoRALinear, SMoRAExperts)
