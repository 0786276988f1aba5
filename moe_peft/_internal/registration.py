"""The one place that touches PEFT's private tables.

PEFT keys its mappings by `PeftType`, a closed enum. `register_peft_method` (public since PEFT 0.14)
fills the mappings but requires the enum member to exist, so we add members the way `aenum.extend_enum`
does. Everything here is idempotent: importing moe_peft twice, or reloading it, registers once.
"""

from __future__ import annotations

import peft
from packaging.version import Version
from peft.utils.peft_types import PeftType

SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))  # [min, max)


def check_peft_version(version: str = peft.__version__) -> None:
    v = Version(version)
    lo, hi = SUPPORTED_PEFT
    if not lo <= Version(v.base_version) < hi:
        raise ImportError(
            f"moe_peft supports peft>={lo},<{hi} but peft {version} is installed; run `pip install 'peft>={lo},<{hi}'`."
        )


def ensure_peft_type(name: str) -> PeftType:
    """Return PeftType[name], adding the member first if PEFT does not have it."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register_methods(methods: dict[str, tuple[type, type]]) -> None:
    """Register {PEFT type name: (config class, tuner class)} with PEFT, once."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    check_peft_version()
    for name, (config_cls, model_cls) in methods.items():
        peft_type = ensure_peft_type(name)
        if (
            PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls
            and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls
        ):
            continue
        # a reload of moe_peft brings new class objects: replace the old entries instead of failing
        for table_name in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING"):
            getattr(peft.mapping, table_name).pop(peft_type, None)
        register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)


# ---------------------------------------------------------------------------------------------------------------------
# task_ids for methods other than PEFT's Poly
#
# PEFT's task-specific models (PeftModelForCausalLM, ...) declare `task_ids` as a named forward argument and pass it on
# only when the active adapter is PeftType.POLY (peft_model.py: `if peft_config.peft_type == PeftType.POLY:
# kwargs["task_ids"] = task_ids`); for any other type it is silently dropped. The plain PeftModel passes it through
# untouched. For the types registered here we re-route it under TASK_IDS_KWARG, which PEFT forwards with **kwargs to
# the root transformers model, where the tuner's pre-hook takes it out (moe_peft/tasks.py). Other types, Poly
# included, see no change.

TASK_IDS_KWARG = "_moe_peft_task_ids"
_TASK_ID_TYPES: set[str] = set()


def forward_task_ids(names: set[str]) -> None:
    """Make PEFT's task-specific models pass `task_ids` on for the PEFT types `names` (idempotent)."""
    import functools
    import inspect

    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    _TASK_ID_TYPES.update(names)
    for cls in MODEL_TYPE_TO_PEFT_MODEL_MAPPING.values():
        original = cls.__dict__.get("forward")
        if original is None or getattr(original, "_moe_peft_task_ids", False):
            continue
        if "task_ids" not in inspect.signature(original).parameters:
            continue

        def forward(self, *args, task_ids=None, _original=original, **kwargs):
            peft_type = self.active_peft_config.peft_type
            if task_ids is not None and getattr(peft_type, "value", peft_type) in _TASK_ID_TYPES:
                return _original(self, *args, **{TASK_IDS_KWARG: task_ids}, **kwargs)
            return _original(self, *args, task_ids=task_ids, **kwargs)

        forward = functools.wraps(original)(forward)
        forward._moe_peft_task_ids = True
        cls.forward = forward
