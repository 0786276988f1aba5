"""Adapter state dicts from wrapped models (FSDP1), for every moe-peft tuner.

PEFT 0.21 picks an adapter's entries out of a full state dict by the names of the tuner layers' modules
(`BaseTuner._get_adapter_state_dict`). FSDP1 wraps submodules in place, so under it those names carry
`_fsdp_wrapped_module.` (and activation checkpointing `_checkpoint_wrapped_module.`), while the keys of the full
state dict that accelerate, Trainer or `FSDP.state_dict` gather for saving do not: PEFT then finds nothing and
`save_pretrained(dir, state_dict=...)` writes an empty adapter (PEFT's own LoRA too). `FullStateDictKeys` retries
with the wrapper segments removed from the names when the plain match finds nothing.
"""

from __future__ import annotations

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
