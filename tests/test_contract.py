"""PEFT's tuner contract (testing.md), for every method case in conftest.CASES."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import moe_peft
from moe_peft.tuners.routed.layer import MoELoraLinear
from moe_peft.tuners.routed.methods import expert_bank_shape

from .conftest import CASES, checkpointed_grads, make_config, randomize_experts


def n_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def expected_trainable(model, config) -> int:
    """Hand count: every adapted linear holds E*r*(in+out) expert weights; every router owner holds its router."""
    num_experts, rank = expert_bank_shape(config)
    total = 0
    for _, layer in model.base_model._moe_layers():
        total += num_experts * rank * (layer.in_features + layer.out_features)
        if layer.routers:
            if isinstance(config, moe_peft.MoLEConfig):
                total += layer.in_features * (config.num_experts + config.num_null_experts)
                total += config.num_experts if config.router_bias else 0
            else:
                total += layer.in_features * num_experts
    return total


@pytest.mark.parametrize("case", CASES)
def test_wiring_counts_and_noop_at_init(case, base, batch):
    with torch.no_grad():
        ref = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    config = make_config(case, exclude_modules=["model.layers.1.mlp.down_proj"])
    model = get_peft_model(base, config)
    names = [n for n, _ in model.base_model._moe_layers()]
    assert "model.layers.1.mlp.down_proj" not in names and "model.layers.0.mlp.down_proj" in names
    assert all(not isinstance(m, MoELoraLinear) for n, m in model.named_modules() if "lm_head" in n)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected_trainable(model, config)
    routers = [n for n, p in model.named_parameters() if p.requires_grad and "router" in n]
    assert routers, "router parameters must have 'router' in their names"
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # B = 0: a fresh adapter is a no-op


@pytest.mark.parametrize("case", CASES)
def test_training_changes_only_the_adapter(case, base, batch):
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, make_config(case))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        out = model(**batch, sample_types=torch.tensor([1, 0, 1]))
        out.loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n  # only adapter parameters get gradients
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert any("router" in n for n in changed), "routers must train"
    assert any("_A." in n for n in changed) and any("_B." in n for n in changed)
    for k, v in model.get_base_model().state_dict().items():
        key = k.replace(".base_layer", "")
        if key in base_state:
            assert torch.equal(v, base_state[key]), f"base weight {k} changed"


@pytest.mark.parametrize("case", ["mole_block", "mole_linear_top2", "loramoe", "smora"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_keeps_every_gradient(case, reentrant, base, batch):
    model = get_peft_model(base, make_config(case, router_aux_loss_coef=0.05))
    randomize_experts(model)
    got = checkpointed_grads(model, reentrant, lambda m: m(**batch).loss)
    assert any("router" in n and got[n].abs().sum() > 0 for n in got)


@pytest.mark.parametrize("case", ["mole_block", "loramoe", "smora"])
def test_adapter_management(case, base, batch):
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ref = base(**inputs).logits
    hooks_before = n_hooks(base)
    model = get_peft_model(base, make_config(case))
    randomize_experts(model)
    model.eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
        assert not torch.allclose(adapted, ref)
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, ref)
        torch.testing.assert_close(model(**inputs).logits, adapted)  # previous state restored on exit

        model.add_adapter("other", make_config(case))
        model.set_adapter("other")
        torch.testing.assert_close(model(**inputs).logits, ref)  # the new adapter starts as a no-op
        model.set_adapter("default")
        torch.testing.assert_close(model(**inputs).logits, adapted)
        model.delete_adapter("other")
        assert not any(".other" in n for n, _ in model.named_parameters())
        assert all("other" not in m.router_records for _, m in model.base_model._moe_layers())

        unloaded = model.unload()
        torch.testing.assert_close(unloaded(**inputs).logits, ref)
    assert not any(isinstance(m, MoELoraLinear) for m in unloaded.modules())
    assert n_hooks(unloaded) == hooks_before, "unload must remove every hook it added"


def test_single_expert_merge_is_exact_and_idempotent(base, batch):
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model = get_peft_model(base, moe_peft.MoLEConfig(r=4, num_experts=1, target_modules=["up_proj", "q_proj"]))
    randomize_experts(model)
    model.eval()
    with torch.no_grad():
        routed = model(**inputs).logits
        model.merge_adapter()
        model.merge_adapter()  # idempotent: warns, does not merge twice
        torch.testing.assert_close(model(**inputs).logits, routed, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(**inputs).logits, routed, rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload(safe_merge=True)
        torch.testing.assert_close(merged(**inputs).logits, routed, rtol=1e-5, atol=1e-5)


def test_safe_merge_catches_nan(base):
    model = get_peft_model(base, moe_peft.MoLEConfig(r=4, num_experts=1, target_modules=["up_proj"]))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.experts_B["default"].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)


@pytest.mark.parametrize("case", ["mole_block", "loramoe", "smora"])
def test_routed_adapters_refuse_to_merge_with_a_clear_message(case, base):
    model = get_peft_model(base, make_config(case))
    with pytest.raises(ValueError, match="cannot be merged into the base layer"):
        model.merge_and_unload()
    # nothing was changed by the refused merge
    assert any(isinstance(m, MoELoraLinear) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype, base, batch):
    base = base.to(dtype)
    model = get_peft_model(base, make_config("mole_block"))
    randomize_experts(model)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, f"adapter weight {n} must stay float32"
    out = model(**batch)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    x = torch.randn(5, 32, dtype=dtype)
    routing = layer.routers["default"](x)
    assert routing.logits.dtype == torch.float32 and routing.weights.dtype == torch.float32


@pytest.mark.parametrize("case", ["mole_block", "loramoe"])
def test_generate_with_kv_cache_leaves_no_hook(case, base, batch):
    model = get_peft_model(base, make_config(case))
    randomize_experts(model)
    model.eval()
    hooks = n_hooks(model)
    ids = batch["input_ids"][:2, :5]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    extra = {"sample_types": torch.tensor([1, 0])} if case == "loramoe" else {}
    with torch.no_grad():
        cached = model.generate(**kwargs, **extra, use_cache=True)
        uncached = model.generate(**kwargs, **extra, use_cache=False)
    assert torch.equal(cached, uncached)
    assert n_hooks(model) == hooks
    assert model.base_model.routing_ctx.sticky_sample_types is None
