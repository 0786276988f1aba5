"""`enable` / `disable`: make a PeftModel run PEFT's mixed-batch keyword `adapter_names` through the op.

How the keyword travels. PEFT's models call `base_model._enable_peft_forward_hooks(**kwargs)` around every
forward and generate, and drop `adapter_names` from the keywords passed on. `enable` gives the tuner an
instance-level `_enable_peft_forward_hooks` that turns the names into an `AdapterSelection` (validated like
PEFT does) and holds it while the call runs; a pre-hook on the root transformers model makes it the
selection of each forward. The selection stays until the next root forward, because reentrant and
non-reentrant gradient checkpointing recompute layers during backward, after the forward has returned.

Who reads it:
  * PEFT LoRA (`LoraModel`): every adapted module's `forward` is replaced at instance level (lora.py): a
    plain `lora.Linear` runs base + every sample's adapter as one op; any other LoRA module (embeddings,
    conv, DoRA, quantized) and PEFT's `modules_to_save` wrappers run PEFT's own mixed-batch forward.
  * moe-peft tuners (`MoELoraModel`): the selection goes on the tuner's routing context, where the layers
    read it (moe.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional

from torch import nn

from .bank import clear_cache
from .selection import BASE, AdapterSelection

_STATE = "_multi_lora_state"
_GENERATE_KWARGS = ("num_beams", "num_return_sequences", "generation_config", "max_new_tokens", "max_length")


class MultiLoraState:
    """What `enable` installed on one tuner, and the selection of the current forward."""

    def __init__(self, tuner: nn.Module, training: bool, backend: str):
        self.tuner = tuner
        self.training = training
        self.backend = backend
        self.pending: Optional[AdapterSelection] = None  # set for the duration of a forward()/generate() call
        self.current: Optional[AdapterSelection] = None  # the selection of the latest root forward
        self.patched: list[nn.Module] = []

    def known_adapters(self) -> set[str]:
        from peft.tuners.lora import LoraLayer

        from ..tuners.routed.layer import MoELoraLinear

        known = set()
        for module in self.tuner.model.modules():
            if isinstance(module, LoraLayer):
                known |= set(module.lora_A.keys()) | set(module.lora_embedding_A.keys())
            elif isinstance(module, MoELoraLinear):
                known |= set(module.experts_A.keys())
        return known


def _tuner(model: nn.Module) -> nn.Module:
    from peft.tuners.lora import LoraModel

    from ..tuners.routed.model import MoELoraModel

    tuner = model if isinstance(model, (LoraModel, MoELoraModel)) else getattr(model, "base_model", None)
    if not isinstance(tuner, (LoraModel, MoELoraModel)):
        kind = type(getattr(model, "base_model", model)).__name__
        raise TypeError(
            f"moe_peft.multi_lora.enable needs a PeftModel of PEFT LoRA adapters or of a moe-peft MoLE / LoRAMoE / "
            f"SMoRA method, got one whose tuner is {kind}. MHR and PHATGOOSE select per sample with task_ids instead."
        )
    return tuner


def state_of(model: nn.Module) -> Optional[MultiLoraState]:
    """The state `enable` installed on this model's tuner, or None."""
    try:
        return _tuner(model).__dict__.get(_STATE)
    except TypeError:
        return None


def is_enabled(model: nn.Module) -> bool:
    return state_of(model) is not None


def enable(
    model: nn.Module, training: bool = False, adapters: Optional[list[str]] = None, backend: str = "auto"
) -> nn.Module:
    """Run `model(..., adapter_names=[...])` and `model.generate(..., adapter_names=[...])` through the op.

    Args:
        model: a PeftModel with several LoRA adapters (`add_adapter` / `load_adapter`), or with several adapters of
            one moe-peft method (MoLE, LoRAMoE, SMoRA).
        training: allow `adapter_names` in training mode (PEFT refuses it) and make `adapters` trainable: each
            sample's loss then trains only its own adapter (`moe_peft.multi_lora.per_adapter_loss`).
        adapters: the adapters made trainable when `training=True` (default: all that are loaded).
        backend: the op's backend ("auto": Triton on CUDA, batched matmuls elsewhere; see moe_peft.ops).

    Returns the model. Idempotent: a second call updates `training`, `adapters` and `backend`.
    """
    from ..ops import PER_SAMPLE_BACKENDS

    if backend not in PER_SAMPLE_BACKENDS:
        raise ValueError(f"multi_lora.enable: backend must be one of {PER_SAMPLE_BACKENDS}, got {backend!r}.")
    tuner = _tuner(model)
    names = list(tuner.peft_config) if adapters is None else list(adapters)
    unknown = sorted(set(names) - set(tuner.peft_config))
    if unknown:
        raise ValueError(
            f"multi_lora.enable(adapters={adapters!r}): no adapter named {unknown} is loaded; loaded: "
            f"{sorted(tuner.peft_config)}."
        )
    state = tuner.__dict__.get(_STATE)
    if state is None:
        state = MultiLoraState(tuner, training, backend)
        _install(state)
        tuner.__dict__[_STATE] = state
    state.training, state.backend = training, backend
    if training:
        tuner.set_requires_grad(names, requires_grad=True)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo `enable`: PEFT's own mixed-batch forward (inference only) takes `adapter_names` again."""
    tuner = _tuner(model)
    state = tuner.__dict__.pop(_STATE, None)
    if state is None:
        return model
    hooks = tuner.model._forward_pre_hooks
    for key in [k for k, hook in hooks.items() if isinstance(hook, _RootPreHook) and hook.state is state]:
        del hooks[key]  # by identity rather than through a handle: a deep copy of the model holds copies of both
    for module in state.patched:
        module.__dict__.pop("forward", None)
    for module in tuner.model.modules():
        clear_cache(module)  # the stacked copies of the adapters built for inference
    tuner.__dict__.pop("_enable_peft_forward_hooks", None)
    routing_ctx = getattr(tuner, "routing_ctx", None)
    if routing_ctx is not None:
        routing_ctx.adapter_selection = None
    return model


def _install(state: MultiLoraState) -> None:
    _patch_lora_modules(state)
    tuner = state.tuner
    tuner._enable_peft_forward_hooks = _SelectionHooks(tuner, state)
    tuner.model.register_forward_pre_hook(_RootPreHook(state))


def _patch_lora_modules(state: MultiLoraState) -> None:
    """Give every PEFT LoRA module (and modules_to_save wrapper) the mixed-batch forward; called again at each
    mixed-batch call, so that adapters added or loaded after `enable` (new target modules) are covered."""
    from peft.tuners.lora import LoraLayer, LoraModel
    from peft.utils.other import AuxiliaryTrainingWrapper

    from .lora import MixedBatchForward

    if not isinstance(state.tuner, LoraModel):
        return
    for module in state.tuner.model.modules():
        if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)) and "forward" not in module.__dict__:
            module.forward = MixedBatchForward(module, state)
            state.patched.append(module)


class _RootPreHook:
    """Each root forward takes the selection of the call it belongs to (None outside a mixed-batch call)."""

    def __init__(self, state: MultiLoraState):
        self.state = state

    def __call__(self, module: nn.Module, args: tuple) -> None:
        state = self.state
        state.current = state.pending
        routing_ctx = getattr(state.tuner, "routing_ctx", None)
        if routing_ctx is not None:  # moe-peft tuners: the layers read it from their routing context
            routing_ctx.adapter_selection = state.pending


class _SelectionHooks:
    """The tuner's `_enable_peft_forward_hooks` while multi-LoRA is enabled (PEFT calls it around every forward
    and generate). A callable object, not a closure, so that copy.deepcopy of the model rebinds it."""

    def __init__(self, tuner: nn.Module, state: MultiLoraState):
        self.tuner, self.state = tuner, state

    @contextmanager
    def __call__(self, *args: Any, **kwargs: Any):
        adapter_names = kwargs.get("adapter_names")
        original = getattr(type(self.tuner), "_enable_peft_forward_hooks", None)
        if adapter_names is None:
            if original is None:
                yield
            else:
                with original(self.tuner, *args, **kwargs):
                    yield
            return
        if kwargs.get("alora_offsets") is not None:
            raise ValueError("adapter_names cannot be combined with alora_offsets (aLoRA) under moe_peft.multi_lora.")
        if self.tuner.training and not self.state.training:
            raise ValueError(
                "adapter_names was passed in training mode: call moe_peft.multi_lora.enable(model, training=True) "
                "to train several adapters in one batch (PEFT's own mixed batches are inference-only), or model.eval()."
            )
        selection = AdapterSelection(adapter_names, expandable=any(k in kwargs for k in _GENERATE_KWARGS))
        _patch_lora_modules(self.state)
        unknown = sorted(set(selection.adapters) - self.state.known_adapters())
        if unknown:
            raise ValueError(
                f"adapter_names names adapter(s) {unknown} that no layer of this model holds; loaded: "
                f"{sorted(self.state.known_adapters())} (and '{BASE}' for no adapter)."
            )
        self.state.pending = selection
        try:
            yield
        finally:
            self.state.pending = None
