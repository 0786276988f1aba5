"""Configs are flat, validated, and round-trip through adapter_config.json (unknown future keys too)."""

from __future__ import annotations

import json
import math

import pytest
from peft import PeftConfig

import moe_peft


@pytest.mark.parametrize(
    "cls,kwargs,field",
    [
        (moe_peft.MoLEConfig, dict(num_experts=4, top_k=5), "top_k"),
        (moe_peft.MoLEConfig, dict(r=0), "r"),
        (moe_peft.MoLEConfig, dict(r=-2), "r"),
        (moe_peft.MoLEConfig, dict(num_experts=0), "num_experts"),
        (moe_peft.MoLEConfig, dict(top_k=0), "top_k"),
        (moe_peft.MoLEConfig, dict(router_granularity="expert"), "router_granularity"),
        (moe_peft.MoLEConfig, dict(top1_weight="gumbel"), "top1_weight"),
        (moe_peft.MoLEConfig, dict(eval_routing="sparse"), "eval_routing"),
        (moe_peft.MoLEConfig, dict(top_p=1.5), "top_p"),
        (moe_peft.MoLEConfig, dict(top_p=0.5, num_null_experts=1, top_k=2), "top_p"),
        (moe_peft.MoLEConfig, dict(num_null_experts=-1), "num_null_experts"),
        (moe_peft.MoLEConfig, dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
        (moe_peft.MoLEConfig, dict(lora_dropout=1.0), "lora_dropout"),
        (moe_peft.MoLEConfig, dict(target_parameters="experts.gate_up_proj"), "target_parameters"),  # not a list
        (moe_peft.LoRAMoEConfig, dict(num_experts=4, top_k=2), "top_k"),
        (moe_peft.LoRAMoEConfig, dict(router_granularity="block"), "router_granularity"),
        (moe_peft.LoRAMoEConfig, dict(blc_alpha=1.5), "blc_alpha"),
        (moe_peft.SMoRAConfig, dict(r=16, num_experts=4), "num_experts"),
        (moe_peft.SMoRAConfig, dict(r=4, top_k=8), "top_k"),
    ],
)
def test_bad_values_raise_naming_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        cls(**kwargs)


def test_null_experts_extend_top_k_range():
    config = moe_peft.MoLEConfig(num_experts=2, num_null_experts=2, top_k=3)
    assert config.top_k == 3


def test_method_defaults_follow_the_papers():
    loramoe = moe_peft.LoRAMoEConfig()
    assert (loramoe.num_experts, loramoe.r, loramoe.top_k) == (8, 4, 8)
    # lora_alpha = 2r with the gate-aware sqrt(E) scaling (docs/quality.md); the released alpha 32 is one setting away
    assert (loramoe.lora_alpha, loramoe.expert_scaling) == (8.0, "sqrt_gate")
    assert loramoe.scaling == pytest.approx(8.0 / 4 * math.sqrt(8))
    assert moe_peft.LoRAMoEConfig(lora_alpha=32, expert_scaling="lora").scaling == 32.0 / 4
    smora = moe_peft.SMoRAConfig()
    assert (smora.r, smora.top_k, smora.num_experts, smora.scaling) == (64, 8, 64, 16.0 / 8)
    mole = moe_peft.MoLEConfig()
    assert (mole.top_k, mole.router_granularity, mole.top1_weight) == (1, "block", "straight_through")


@pytest.mark.parametrize("cls", [moe_peft.MoLEConfig, moe_peft.LoRAMoEConfig, moe_peft.SMoRAConfig])
def test_round_trip_and_unknown_future_keys(cls, tmp_path):
    config = cls(target_modules=["up_proj"], r=8)
    config.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    assert data["peft_type"] == config.peft_type.value
    data["a_field_from_a_future_release"] = 3
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="a_field_from_a_future_release"):
        loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is cls
    assert loaded.to_dict() == config.to_dict()
