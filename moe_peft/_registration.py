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
