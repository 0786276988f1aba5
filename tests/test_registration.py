"""Registration with PEFT: idempotent, version-guarded, visible through PEFT's own entry points."""

from __future__ import annotations

import importlib

import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import moe_peft
from moe_peft import _registration


def test_methods_are_registered():
    for name, config_cls, model_cls, prefix in [
        ("MOLE", moe_peft.MoLEConfig, moe_peft.MoLEModel, "mole_"),
        ("LORAMOE", moe_peft.LoRAMoEConfig, moe_peft.LoRAMoEModel, "loramoe_"),
        ("SMORA", moe_peft.SMoRAConfig, moe_peft.SMoRAModel, "smora_"),
    ]:
        peft_type = PeftType(name)
        assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is config_cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is model_cls
        assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == prefix
        assert PEFT_TYPE_TO_CONFIG_MAPPING[name] is config_cls  # plain strings from adapter_config.json


def test_registration_is_idempotent():
    before = len(PeftType)
    _registration.register_methods({"MOLE": (moe_peft.MoLEConfig, moe_peft.MoLEModel)})
    assert _registration.ensure_peft_type("MOLE") is PeftType.MOLE
    assert len(PeftType) == before


def test_reloading_the_package_replaces_the_entries():
    before = len(PeftType)
    reloaded = importlib.reload(moe_peft)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MOLE] is reloaded.MoLEConfig
    assert len(PeftType) == before


@pytest.mark.parametrize("version", ["0.20.1", "0.22.0", "1.0.0"])
def test_unsupported_peft_versions_raise_with_the_fix(version):
    with pytest.raises(ImportError, match=r"pip install 'peft>=0.21.0,<0.22.0'"):
        _registration.check_peft_version(version)


def test_supported_versions_pass():
    _registration.check_peft_version("0.21.0")
    _registration.check_peft_version("0.21.2.dev0")
