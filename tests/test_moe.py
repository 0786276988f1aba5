"""What a mixture of experts adds to the contract: equivalences, router losses, balancing, edge cases."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import moe_peft
from moe_peft.bases import tiny_llama

from .conftest import MLP, make_config, randomize_experts


def test_one_expert_mole_equals_peft_lora(batch):
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    lora = get_peft_model(
        tiny_llama(64, 32, 2, 48), LoraConfig(r=4, lora_alpha=8, target_modules=MLP, init_lora_weights=False)
    )
    mole = get_peft_model(
        tiny_llama(64, 32, 2, 48), moe_peft.MoLEConfig(r=4, lora_alpha=8, num_experts=1, target_modules=MLP)
    )
    with torch.no_grad():
        for name, layer in mole.base_model._moe_layers():
            peft_layer = lora.base_model.model.get_submodule(name)
            layer.experts_A["default"].copy_(peft_layer.lora_A["default"].weight[None])  # [r, in] -> [1, r, in]
            layer.experts_B["default"].copy_(peft_layer.lora_B["default"].weight[None])  # [out, r] -> [1, out, r]
        torch.testing.assert_close(mole(**inputs).logits, lora(**inputs).logits, rtol=1e-5, atol=1e-5)


def _router_grads(model, batch, scale=1.0):
    model.zero_grad()
    out = model(**batch)
    (out.loss * scale).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "router" in n and p.grad is not None}


def test_router_loss_coefficient_zero_contributes_nothing(base, batch):
    model = get_peft_model(base, make_config("mole_block", router_aux_loss_coef=0.0, router_z_loss_coef=0.0))
    model.train()
    out = model(**batch)
    # a zero tensor, not None: `loss + moe_peft.router_loss(model)` always works
    assert torch.equal(out.router_loss, torch.zeros(())) and torch.equal(moe_peft.router_loss(model), torch.zeros(()))
    # with B = 0 the task loss sends no gradient to the router, and no router loss is on: zero router grads
    grads = _router_grads(model, batch)
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_router_loss_reaches_router_and_respects_loss_scaling(base, batch):
    model = get_peft_model(base, make_config("mole_block", router_aux_loss_coef=0.1, router_z_loss_coef=0.01))
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.router_loss) and out.router_loss > 0
    logits, labels = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    task = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    torch.testing.assert_close(out.loss.detach(), (task + out.router_loss).detach())  # loss = task + router
    full = _router_grads(model, batch)
    assert any(torch.count_nonzero(g) > 0 for g in full.values())
    # gradient accumulation divides the loss; fp16 scaling multiplies it: router losses must follow
    half = _router_grads(model, batch, scale=0.5)
    for n in full:
        torch.testing.assert_close(half[n], full[n] * 0.5, rtol=1e-5, atol=1e-8)


def test_router_loss_for_a_custom_loss_from_logits(base, batch):
    model = get_peft_model(base, make_config("mole_block", router_aux_loss_coef=0.1))
    model.train()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # no labels
    rl = moe_peft.router_loss(model)
    assert rl is out.router_loss
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    ce = torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:].reshape(-1))
    model.zero_grad()
    (ce + rl).backward()
    with_rl = {n: p.grad.clone() for n, p in model.named_parameters() if "router" in n}
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:].reshape(-1)).backward()
    without = {n: p.grad for n, p in model.named_parameters() if "router" in n}
    assert any(torch.count_nonzero(with_rl[n]) > 0 for n in with_rl)
    assert all(torch.count_nonzero(without[n]) == 0 for n in without)  # not added -> no auxiliary gradient


def test_straight_through_top1_gives_the_router_task_gradient(base, batch):
    model = get_peft_model(base, make_config("mole_block", router_aux_loss_coef=0.0, router_z_loss_coef=0.0))
    randomize_experts(model)
    model.train()
    grads = _router_grads(model, batch)
    assert any(torch.count_nonzero(g) > 0 for g in grads.values())


def test_padding_takes_no_part_in_router_statistics(base, batch):
    model = get_peft_model(base, make_config("mole_linear_top2"))
    model.train()
    model(**batch)
    stats = moe_peft.routing_stats(model, "default")
    assert all(s["tokens"] == int(batch["attention_mask"].sum()) for s in stats.values())
    loss_masked = model(**batch).router_loss.item()
    # changing what sits at padded positions changes neither statistics nor loss
    ids = batch["input_ids"].clone()
    ids[batch["attention_mask"] == 0] = 5
    loss_other_pad = model(
        input_ids=ids, attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).router_loss.item()
    assert abs(loss_masked - loss_other_pad) < 1e-6


def test_loramoe_localized_balancing_needs_sample_types(base, batch):
    model = get_peft_model(base, make_config("loramoe"))
    model.train()
    assert model(**batch).router_loss == 0  # no sample types: dense soft mixture, no constraint
    out = model(**batch, sample_types=torch.tensor([1, 0, 0]))
    assert out.router_loss > 0
    with pytest.raises(ValueError, match="sample_types"):
        model(**batch, sample_types=torch.tensor([[1, 0, 0]]))


def test_smora_selection_bias_does_not_enter_gate_values():
    from moe_peft.routing import SMoRARouter

    router = SMoRARouter(8, 6, 2)
    x = torch.randn(5, 8)
    router.selection_bias[:] = torch.tensor([100.0, 100.0, 0, 0, 0, 0])
    out = router(x)
    assert (out.idx.sort(dim=-1).values == torch.tensor([0, 1])).all()  # bias decides the selection
    scores = torch.sigmoid(router.linear(x)).gather(1, out.idx)  # [T, k] in the order of idx
    torch.testing.assert_close(out.weights, 2 * scores / scores.sum(-1, keepdim=True))  # b is not in the gate


def test_null_experts_route_some_tokens_nowhere():
    from moe_peft.routing import TopKRouter

    router = TopKRouter(8, num_experts=2, top_k=2, num_null_experts=3)
    with torch.no_grad():
        router.null.weight.mul_(0).add_(1.0)  # make null experts very likely for positive inputs
    x = torch.rand(64, 8)
    out = router(x)
    all_null = (out.idx < 0).all(dim=-1)
    assert all_null.any(), "some tokens pick only null experts"
    assert torch.count_nonzero(out.weights[all_null]) == 0  # ...and get no expert output
    real = ~all_null & (out.idx >= 0).any(-1)
    torch.testing.assert_close(out.weights[real].sum(-1), torch.ones(int(real.sum())))  # renormalized over real


def test_null_expert_fraction_is_reported(base, batch):
    model = get_peft_model(base, make_config("mole_null"))
    model.train()
    model(**batch)
    fractions = [s["null_fraction"] for s in moe_peft.routing_stats(model).values()]
    assert all(0.0 <= f <= 1.0 for f in fractions)


def test_top_p_keeps_a_variable_number_of_experts():
    from moe_peft.routing import TopKRouter

    router = TopKRouter(8, num_experts=4, top_k=4, top_p=0.5)
    with torch.no_grad():
        router.linear.weight.normal_(std=2.0)
    out = router(torch.randn(200, 8))
    kept = (out.idx >= 0).sum(-1)
    assert kept.min() >= 1 and kept.max() > kept.min()
    probs = out.probs.gather(1, out.idx.clamp_min(0))
    torch.testing.assert_close(out.weights, probs * (out.idx >= 0))  # raw p, not renormalized
    # the kept mass crosses top_p, and dropping the last kept expert would not
    mass = out.weights.sum(-1)
    last = out.weights.gather(1, (kept - 1).unsqueeze(-1)).squeeze(-1)
    assert (mass > 0.5 - 1e-6).all() | (kept == 4).all()
    assert ((mass - last) < 0.5).all()


def test_eval_dense_routing_mixes_all_experts():
    from moe_peft.routing import TopKRouter

    router = TopKRouter(8, num_experts=3, top_k=1, eval_routing="dense").eval()
    out = router(torch.randn(4, 8))
    assert out.idx.shape == (4, 3)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(4))


def test_every_expert_parameter_gets_a_gradient_even_without_tokens(base, batch):
    # DDP without find_unused_parameters: an expert that receives no token still has a (zero) gradient
    model = get_peft_model(base, moe_peft.MoLEConfig(r=2, num_experts=16, top_k=1, target_modules=["up_proj"]))
    model.train()
    model(input_ids=batch["input_ids"][:1, :2]).logits.sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n


def test_empty_and_all_padding_batches(base):
    model = get_peft_model(base, make_config("mole_linear_top2"))
    model.train()
    ids = torch.randint(4, 64, (2, 5))
    out = model(input_ids=ids, attention_mask=torch.zeros_like(ids))  # all padding: no router statistic
    assert out.router_loss == 0
    assert all(s["tokens"] == 0 for s in moe_peft.routing_stats(model).values())
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert layer(torch.randn(0, 32)).shape == (0, 48)


def test_nan_inputs_give_nan_outputs_not_a_crash(base):
    model = get_peft_model(base, make_config("mole_linear_top2"))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 32)
    x[1] = float("nan")
    y = layer(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_block_routing_is_shared_by_the_block(base, batch):
    model = get_peft_model(base, make_config("mole_block"))
    mlp = model.base_model.model.model.layers[0].mlp
    assert "default" in mlp.gate_proj.routers and "default" not in mlp.up_proj.routers
    assert mlp.up_proj._router_owner["default"] is mlp.gate_proj
    model(**batch)
    assert mlp.down_proj._router_owner["default"]._block_routing["default"].idx.shape[0] == batch["input_ids"].numel()


def test_block_router_on_a_linear_that_does_not_read_the_block_input(base, batch):
    model = get_peft_model(base, moe_peft.MoLEConfig(r=2, num_experts=2, target_modules=["down_proj"]))
    with pytest.raises(ValueError, match="router_granularity='linear'"):
        model(**batch)
