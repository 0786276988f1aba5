"""expert_scaling: lora_alpha / r times the gate spread c (or sqrt(c)), against PEFT LoRA on the same numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import moe_peft
from moe_peft.tuners.routed.layer import MoELoraLinear

from .conftest import MLP, randomize_experts


def _uniform_routers(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.zero_()  # equal logits: softmax weights exactly 1 / E


def test_loramoe_with_gate_scaling_is_peft_lora_of_rank_e_times_r_under_uniform_routing(base, batch):
    """At uniform routing the mixture sum_e (1/E) c s B_e A_e with c = E is one LoRA of rank E r whose A and B are the
    experts' stacked; PEFT computes that LoRA with lora_alpha' = E * lora_alpha (its scaling divides by E r)."""
    import copy

    num_experts, r, alpha = 4, 3, 6.0
    config = moe_peft.LoRAMoEConfig(
        r=r, lora_alpha=alpha, num_experts=num_experts, target_modules=MLP, expert_scaling="gate", blc_weight=0.0
    )
    peft_base = copy.deepcopy(base)
    moe = get_peft_model(base, config).eval()
    randomize_experts(moe)
    _uniform_routers(moe)
    lora = get_peft_model(
        peft_base, LoraConfig(r=num_experts * r, lora_alpha=num_experts * alpha, target_modules=MLP)
    ).eval()
    with torch.no_grad():
        for name, module in moe.named_modules():
            if isinstance(module, MoELoraLinear):
                peft_layer = lora.get_submodule(name)
                a, b = module.experts_A["default"], module.experts_B["default"]  # [E, r, in], [E, out, r]
                peft_layer.lora_A["default"].weight.copy_(a.reshape(num_experts * r, -1))  # [E*r, in]
                peft_layer.lora_B["default"].weight.copy_(b.permute(1, 0, 2).reshape(b.shape[1], -1))  # [out, E*r]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want, got = lora(**inputs).logits, moe(**inputs).logits
        with lora.disable_adapter():
            assert not torch.allclose(want, lora(**inputs).logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make, spread",
    [
        (lambda s: moe_peft.LoRAMoEConfig(r=4, num_experts=6, target_modules=MLP, expert_scaling=s), 6),
        (lambda s: moe_peft.MoLEConfig(r=4, num_experts=6, top_k=2, target_modules=MLP, expert_scaling=s), 2),
        (lambda s: moe_peft.MoLEConfig(r=4, num_experts=6, top_k=1, target_modules=MLP, expert_scaling=s), 1),
        (
            lambda s: moe_peft.MoLEConfig(
                r=4,
                num_experts=6,
                top_k=1,
                top1_weight="prob",
                num_null_experts=2,
                target_modules=MLP,
                expert_scaling=s,
            ),
            8,
        ),
        (
            lambda s: moe_peft.MoLEConfig(
                r=4, num_experts=6, top_k=2, num_null_experts=3, target_modules=MLP, expert_scaling=s
            ),
            2,
        ),
        (lambda s: moe_peft.MoLEConfig(r=4, num_experts=6, top_p=0.4, target_modules=MLP, expert_scaling=s), 1),
    ],
)
def test_scaling_is_alpha_over_r_times_the_gate_spread_power(make, spread):
    for mode, power in (("lora", 0.0), ("sqrt_gate", 0.5), ("gate", 1.0)):
        config = make(mode)
        assert config.gate_spread() == spread
        assert config.scaling == pytest.approx(config.lora_alpha / config.r * spread**power)


def test_the_layer_uses_the_scaled_value_and_its_delta_follows_it(base):
    """Not silently ignored: the layer's scaling is the config's, and the layer's delta grows by exactly sqrt(E)."""
    import copy

    x = torch.randn(2, 5, base.config.intermediate_size, generator=torch.Generator().manual_seed(0))
    deltas = {}
    for mode in ("lora", "sqrt_gate"):
        config = moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=["down_proj"], expert_scaling=mode)
        torch.manual_seed(0)  # the same A and routers in both
        model = get_peft_model(copy.deepcopy(base), config).eval()
        randomize_experts(model)
        layers = [m for m in model.modules() if isinstance(m, MoELoraLinear)]
        assert all(m.scalings["default"] == config.scaling for m in layers)
        with torch.no_grad():
            deltas[mode] = layers[0](x) - layers[0].base_layer(x)  # [2, 5, hidden]
    assert deltas["lora"].abs().max() > 1e-3
    torch.testing.assert_close(deltas["sqrt_gate"], deltas["lora"] * math.sqrt(4), rtol=1e-5, atol=1e-6)


def test_saved_scaling_reloads_and_a_config_saved_before_the_field_existed_keeps_alpha_over_r(base, batch, tmp_path):
    import copy

    config = moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=MLP, expert_scaling="gate")
    model = get_peft_model(copy.deepcopy(base), config).eval()
    randomize_experts(model)
    model.save_pretrained(tmp_path / "a")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    assert reloaded.peft_config["default"].expert_scaling == "gate"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)
    # an adapter_config.json from before: no expert_scaling key, trained with lora_alpha / r
    path = tmp_path / "a" / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved["expert_scaling"]
    path.write_text(json.dumps(saved))
    old = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    assert old.peft_config["default"].expert_scaling == "lora"
    assert old.peft_config["default"].scaling == config.lora_alpha / config.r  # no gate spread


def test_a_config_saved_without_expert_scaling_has_plain_scaling_on_every_loading_path(base, batch, tmp_path):
    """An adapter_config.json from before the field existed (every expert scaled by lora_alpha / r) reloads with
    "lora" however it is read: PeftConfig.from_pretrained once gave LoRAMoE's new default "sqrt_gate", and a model
    loaded with that config scaled the experts by sqrt(E). Oracle: the same weights with expert_scaling="lora" set."""
    from peft import AutoPeftModelForCausalLM, PeftConfig
    from transformers import AutoModelForCausalLM

    base.save_pretrained(tmp_path / "base")

    def load_base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base")

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def logits(model, adapter=None):
        if adapter is not None:
            model.set_adapter(adapter)
        return model.eval()(**inputs).logits

    config = moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=MLP, expert_scaling="lora")
    model = get_peft_model(load_base(), config)  # records base_model_name_or_path, for AutoPeftModel
    randomize_experts(model)
    want = logits(model)
    model.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved["expert_scaling"]
    path.write_text(json.dumps(saved))
    adapter = str(tmp_path / "a")

    configs = {
        "PeftConfig.from_pretrained": PeftConfig.from_pretrained(adapter),
        "LoRAMoEConfig.from_pretrained": moe_peft.LoRAMoEConfig.from_pretrained(adapter),
        "PeftConfig.from_peft_type": PeftConfig.from_peft_type(**saved),
    }
    for how, loaded in configs.items():
        assert isinstance(loaded, moe_peft.LoRAMoEConfig), how
        assert (loaded.expert_scaling, loaded.scaling) == ("lora", config.lora_alpha / config.r), how
    # a new config still gets LoRAMoE's default, and that default would change these logits
    assert moe_peft.LoRAMoEConfig().expert_scaling == "sqrt_gate"
    sqrt_gate = moe_peft.LoRAMoEConfig(**{k: v for k, v in saved.items() if k != "peft_type"})
    assert sqrt_gate.expert_scaling == "sqrt_gate"
    assert (logits(PeftModel.from_pretrained(load_base(), adapter, config=sqrt_gate)) - want).abs().max() > 1e-2

    models = {
        "PeftModel.from_pretrained": PeftModel.from_pretrained(load_base(), adapter),
        "PeftModel.from_pretrained(config=PeftConfig.from_pretrained)": PeftModel.from_pretrained(
            load_base(), adapter, config=PeftConfig.from_pretrained(adapter)
        ),
        "PeftModel.from_pretrained(config=LoRAMoEConfig.from_pretrained)": PeftModel.from_pretrained(
            load_base(), adapter, config=moe_peft.LoRAMoEConfig.from_pretrained(adapter)
        ),
        "AutoPeftModelForCausalLM.from_pretrained": AutoPeftModelForCausalLM.from_pretrained(adapter),
    }
    for how, loaded in models.items():
        torch.testing.assert_close(logits(loaded), want, msg=how)
    two = PeftModel.from_pretrained(load_base(), adapter)
    two.load_adapter(adapter, adapter_name="second")
    assert two.peft_config["second"].expert_scaling == "lora"
    torch.testing.assert_close(logits(two, "second"), want, msg="load_adapter")


def test_bad_expert_scaling_values_raise_naming_the_field():
    with pytest.raises(ValueError, match="expert_scaling='full'"):
        moe_peft.MoLEConfig(r=4, target_modules=MLP, expert_scaling="full")
    with pytest.raises(ValueError, match="expert_scaling='gate'.*lora_alpha / top_k"):
        moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP, expert_scaling="gate")
