"""router_init_std: the std of the routers' normal weight init (MoLE, LoRAMoE, SMoRA; default 0.02). The oracle is the
init itself: under one seed, N(0, s^2) draws are s / 0.02 times the N(0, 0.02^2) draws, router by router, so the value
must reach every router a config builds (block and linear, null experts, modality groups, a later layer's input, a
second adapter, `moe-peft train`); its validation; that it is saved and reloads the trained weights; and the docs'
claim that it cannot change a frozen straight-through top-1 router's routing, while it does change a learned one's."""

from __future__ import annotations

import copy
import json
import math
import pathlib

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

import moe_peft
from moe_peft.tuners.routed.layer import MoELoraLinear

from .conftest import MLP, randomize_experts

CONFIGS = {
    "mole_block": (moe_peft.MoLEConfig, {}),
    "mole_linear": (moe_peft.MoLEConfig, {"router_granularity": "linear", "router_bias": False}),
    "mole_null": (moe_peft.MoLEConfig, {"top_k": 2, "num_null_experts": 2}),
    "mole_groups": (moe_peft.MoLEConfig, {"modality_experts": {"image": 2, "text": 2}}),
    "mole_sequence_layer": (moe_peft.MoLEConfig, {"routing_level": "sequence", "router_input_layer": 0}),
    "loramoe": (moe_peft.LoRAMoEConfig, {}),
    "smora": (moe_peft.SMoRAConfig, {"r": 8, "top_k": 2, "num_experts": 8}),
}


def _build(base, cls, fields: dict, std=None, seed: int = 0):
    kwargs = dict(r=4, num_experts=4, target_modules=MLP, router_lr_ratio=1.0) | fields
    if std is not None:
        kwargs["router_init_std"] = std
    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), cls(**kwargs))


def _routers(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Every router parameter of the adapter, found through the routed layers (not by name)."""
    out = {}
    for layer_name, layer in model.named_modules():
        if isinstance(layer, MoELoraLinear) and adapter in layer.routers:
            for name, p in layer.routers[adapter].named_parameters():
                out[f"{layer_name}.{name}"] = p.detach().clone()
    return out


@pytest.mark.parametrize("case", sorted(CONFIGS))
@pytest.mark.parametrize("std", [0.2, 0.005])
def test_the_std_scales_every_routers_draws(base, case, std):
    cls, fields = CONFIGS[case]
    default = _routers(_build(base, cls, fields))
    scaled = _routers(_build(base, cls, fields, std=std))
    assert default and default.keys() == scaled.keys()
    weights = [n for n in default if n.endswith("weight")]
    assert weights
    for name, w in default.items():
        if name.endswith("bias"):
            assert not w.any() and not scaled[name].any(), name  # router biases start at 0 whatever the std
        else:
            torch.testing.assert_close(scaled[name], w * (std / 0.02), rtol=1e-5, atol=1e-7, msg=name)
    # and the draws are N(0, std^2): the sample std of all router weights together
    drawn = torch.cat([scaled[n].flatten() for n in weights])
    assert drawn.numel() >= 200
    assert abs(drawn.std().item() / std - 1) < 4 / math.sqrt(2 * drawn.numel())  # 4 sd of a sample std


def test_zero_starts_learned_routers_at_zero(base):
    routers = _routers(_build(base, moe_peft.MoLEConfig, {"top_k": 2, "num_null_experts": 1}, std=0.0))
    assert routers and all(not p.any() for p in routers.values())


def test_a_second_adapter_gets_its_own_std(base):
    model = _build(base, moe_peft.MoLEConfig, {})
    torch.manual_seed(0)
    model.add_adapter("wide", moe_peft.MoLEConfig(r=4, num_experts=4, target_modules=MLP, router_init_std=0.5))
    first = torch.cat([p.flatten() for n, p in _routers(model).items() if n.endswith("weight")])
    second = torch.cat([p.flatten() for n, p in _routers(model, "wide").items() if n.endswith("weight")])
    assert 0.015 < first.std().item() < 0.025
    assert 0.4 < second.std().item() < 0.6


def test_the_default_is_002_on_every_token_routed_config():
    for cls in (moe_peft.MoLEConfig, moe_peft.LoRAMoEConfig, moe_peft.SMoRAConfig):
        assert cls(target_modules=MLP).router_init_std == 0.02


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), True, "wide"])
@pytest.mark.parametrize("cls", [moe_peft.MoLEConfig, moe_peft.LoRAMoEConfig, moe_peft.SMoRAConfig])
def test_a_bad_std_is_refused_naming_the_field(cls, value):
    with pytest.raises(ValueError, match=r"^router_init_std="):
        cls(target_modules=MLP, router_init_std=value)


@pytest.mark.parametrize(
    "cls, fields",
    [
        (moe_peft.MoLEConfig, {}),  # MoLE top-1's default router_lr_ratio is 0
        (moe_peft.MoLEConfig, {"top_k": 2, "router_lr_ratio": 0.0}),
        (moe_peft.LoRAMoEConfig, {"router_lr_ratio": 0.0}),
        (moe_peft.SMoRAConfig, {"router_lr_ratio": 0.0}),
    ],
)
def test_zero_routers_frozen_for_good_are_refused(cls, fields):
    with pytest.raises(ValueError, match=r"^router_init_std=0.0 is invalid: .*router_lr_ratio"):
        cls(target_modules=MLP, router_init_std=0.0, **fields)


@pytest.mark.parametrize("cls", [moe_peft.MoLEConfig, moe_peft.LoRAMoEConfig, moe_peft.SMoRAConfig])
def test_zero_routers_that_learn_are_accepted(cls):
    assert cls(target_modules=MLP, router_init_std=0.0, router_lr_ratio=1.0).router_init_std == 0.0


def test_the_std_is_saved_and_a_reload_keeps_the_trained_routers(base, tmp_path):
    model = _build(base, moe_peft.MoLEConfig, {"top_k": 2}, std=0.3)
    with torch.no_grad():  # trained routers: no longer what any init would draw
        for layer in model.modules():
            if isinstance(layer, MoELoraLinear) and "default" in layer.routers:
                layer.routers["default"].linear.weight.add_(1.0)
    trained = _routers(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["router_init_std"] == 0.3
    torch.manual_seed(123)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].router_init_std == 0.3
    reloaded = _routers(loaded)
    assert reloaded.keys() == trained.keys()
    for name, p in trained.items():
        assert torch.equal(reloaded[name], p), name


def test_a_saved_adapter_without_the_key_reloads_with_the_default(base, tmp_path):
    """An adapter saved before the field existed had N(0, 0.02^2) routers; the key only matters for a new adapter."""
    _build(base, moe_peft.MoLEConfig, {}).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved["router_init_std"]
    path.write_text(json.dumps(saved))
    assert PeftConfig.from_pretrained(tmp_path).router_init_std == 0.02
    assert PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).peft_config["default"].router_init_std == 0.02


# -- what the std changes, and what it cannot -----------------------------------------------------------------------
def _choices_and_logits(model, batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The experts every router picked (its Routing.idx, caught by a forward hook) and the model's logits."""
    randomize_experts(model, std=0.3, seed=1)
    model.eval()
    picked = []
    hooks = [
        layer.routers["default"].register_forward_hook(lambda mod, args, out: picked.append(out.idx))
        for layer in model.modules()
        if isinstance(layer, MoELoraLinear) and "default" in layer.routers
    ]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for hook in hooks:
        hook.remove()
    return picked, logits


def test_a_frozen_straight_through_top1_router_routes_the_same_at_any_std(base, batch):
    """argmax(s W x + 0) = argmax(W x) for s > 0 and the straight-through weight is 1: the default top-1 adapter's
    output does not depend on the std (docs/methods.md)."""
    outputs = [
        _choices_and_logits(_build(base, moe_peft.MoLEConfig, {"router_lr_ratio": 0.0}, std=std), batch)
        for std in (0.02, 0.5)
    ]
    (choices_a, logits_a), (choices_b, logits_b) = outputs
    assert choices_a and all(torch.equal(a, b) for a, b in zip(choices_a, choices_b))
    torch.testing.assert_close(logits_a, logits_b)


@pytest.mark.parametrize("fields", [{"top_k": 2}, {"top1_weight": "prob"}])
def test_the_std_changes_the_output_where_the_weights_read_the_probabilities(base, batch, fields):
    """Top-2 renormalizes p over the chosen experts and top1_weight="prob" multiplies by p: a sharper init moves the
    output (the std is not silently dropped on the way to the forward)."""
    _, logits_a = _choices_and_logits(_build(base, moe_peft.MoLEConfig, fields, std=0.02), batch)
    _, logits_b = _choices_and_logits(_build(base, moe_peft.MoLEConfig, fields, std=0.5), batch)
    assert not torch.allclose(logits_a, logits_b, atol=1e-4)


@pytest.mark.parametrize("assignment", ["adapter.router_init_std=0.1", "router_init_std=0.1"])
def test_moe_peft_train_takes_the_std(assignment):
    from moe_peft.train.config import load_config

    path = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "mole.yaml")
    assert load_config(path, [assignment, "adapter.router_lr_ratio=1.0"]).adapter["router_init_std"] == 0.1


def test_moe_peft_train_refuses_a_bad_std_before_anything_loads(capsys, monkeypatch, tmp_path):
    import moe_peft.train.run as run_module
    from moe_peft.apps.cli import main

    def loaded(*args, **kwargs):
        raise AssertionError("loaded before the config was checked")

    monkeypatch.setattr(run_module, "resolve_base", loaded)
    monkeypatch.setattr(run_module, "load_data", loaded)
    path = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "mole.yaml")
    assignment = "adapter.router_init_std=-1"
    assert main(["train", path, "--set", f"training.output_dir={tmp_path}", "--set", assignment]) == 2
    err = capsys.readouterr().err
    assert f"--set {assignment}" in err and "router_init_std=-1 is invalid" in err
