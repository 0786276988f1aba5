"""Adapter state dict keys, for every moe-peft tuner: from wrapped models (FSDP1, `FullStateDictKeys`) and without
the adapter name in any key layout (`AdapterNameKeys`).

PEFT 0.21 picks an adapter's entries out of a full state dict by the names of the tuner layers' modules
(`BaseTuner._get_adapter_state_dict`). FSDP1 wraps submodules in place, so under it those names carry
`_fsdp_wrapped_module.` (and activation checkpointing `_checkpoint_wrapped_module.`), while the keys of the full
state dict that accelerate, Trainer or `FSDP.state_dict` gather for saving do not: PEFT then finds nothing and
`save_pretrained(dir, state_dict=...)` writes an empty adapter (PEFT's own LoRA too). `FullStateDictKeys` retries
with the wrapper segments removed from the names when the plain match finds nothing.
"""

from __future__ import annotations

import warnings

_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def strip_wrapper_segments(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


class FullStateDictKeys:
    """Put before BaseTuner in a tuner's bases."""

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        found = super()._get_adapter_state_dict(
            model=model,
            config=config,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        if found or not state_dict:
            return found
        from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes

        prefixes = {strip_wrapper_segments(p) for p in _get_tuner_state_dict_key_prefixes(model)}
        return _filter_state_dict_by_key_prefixes(state_dict, prefixes)


class AdapterNameKeys:
    """Adapter files hold no adapter name in their keys, for every key layout of the moe-peft tuners.

    PEFT 0.21 removes the adapter name from a key only where it is the last part (`<layer>.mole_A.<name>`, a
    ParameterDict entry) or the second to last (`<layer>.mhr_router.<name>.task_logits`). A router is a module inside
    a ModuleDict keyed by the adapter name, so its keys are one level deeper
    (`<layer>.mole_router.<name>.linear.weight`): 0.1 wrote them with the name, and loading the file under another
    name (`PeftModel.from_pretrained(..., adapter_name="x")`, `load_adapter`, a non-default adapter of
    `multi_lora.save_adapters`) kept freshly initialised routers. Here the name is the key part right after one of the
    tuner layer's adapter attributes (its `adapter_layer_names` and `other_param_names`: the containers keyed by
    adapter name), wherever it sits, so a router saves as `<layer>.mole_router.linear.weight`; the keys PEFT already
    wrote without the name are unchanged. PEFT builds the load-time mapping from the same function, so saving and
    loading stay symmetric.

    Loading also accepts the 0.1 layout, `<attr>.<any name>.<rest>`, whatever name the file was saved under, and
    warns about keys of the file that match no adapter weight of the model (PEFT drops them silently).

    Put before BaseTuner in a tuner's bases; the tuner's `tuner_layer_cls` (a class or a tuple) names the layers.
    """

    @classmethod
    def _adapter_attribute_names(cls) -> frozenset[str]:
        layers = cls.tuner_layer_cls if isinstance(cls.tuner_layer_cls, tuple) else (cls.tuner_layer_cls,)
        return frozenset(name for layer in layers for name in (*layer.adapter_layer_names, *layer.other_param_names))

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        parts = key.split(".")
        attributes = cls._adapter_attribute_names()
        # the last adapter attribute followed by the name: the layer's container of this adapter's entry
        for i in range(len(parts) - 2, -1, -1):
            if parts[i] in attributes and parts[i + 1] == adapter_name:
                return ".".join(parts[: i + 1] + parts[i + 2 :])
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes

        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        model_keys = set(_filter_state_dict_by_key_prefixes(model.state_dict(), prefixes))
        expected = {cls._remove_adapter_name_from_key(k, adapter_name) for k in model_keys}
        expected |= {f"base_model.model.{k}" for k in expected}  # PEFT's own two forms (see its remap)
        attributes = cls._adapter_attribute_names()
        renamed = {}
        for key, value in state_dict.items():
            if key not in expected:
                key = _without_saved_name(key, attributes, expected)
            renamed[key] = value
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, renamed)
        unused = sorted(k for k in remapped if k not in model_keys and attributes.intersection(k.split(".")))
        if unused:
            warnings.warn(
                f"Adapter '{adapter_name}': {len(unused)} weight(s) of the adapter file match no weight of this model "
                f"and are not loaded, e.g. {unused[:3]}. Was the file saved for another base, or with another "
                "target_modules / router_granularity than its adapter_config.json?",
                stacklevel=2,
            )
        return remapped


def _without_saved_name(key: str, attributes: frozenset[str], expected: set[str]) -> str:
    """A key of the 0.1 layout, `<attr>.<name it was saved under>.<rest>`, as `<attr>.<rest>` when that is a key of
    this model's adapter; otherwise the key unchanged."""
    parts = key.split(".")
    for i in range(len(parts) - 3, -1, -1):
        if parts[i] in attributes:
            candidate = ".".join(parts[: i + 1] + parts[i + 2 :])
            if candidate in expected:
                return candidate
    return key
