"""Routing results that used to be silently wrong (issue 9, items 3, 4, 5, 7 and 9), each against a hand
computation."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import moe_peft
from moe_peft.bases import tiny_llama
from moe_peft.routing import TopKRouter
from moe_peft.routing.losses import localized_balance

from .conftest import MLP, randomize_experts


def _tiny():
    return tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)


# -- 3. top-p is not capped at the default top_k=1 ------------------------------------------------------------
def test_top_p_without_top_k_caps_at_num_experts():
    config = moe_peft.MoLEConfig(num_experts=4, top_p=0.5, target_modules=MLP)
    assert config.top_k == 4
    assert moe_peft.MoLEConfig(num_experts=4, target_modules=MLP).top_k == 1  # unchanged without top_p
    with pytest.raises(ValueError, match="top_k=1 is invalid.*top-1"):
        moe_peft.MoLEConfig(num_experts=4, top_p=0.5, top_k=1)


def test_top_p_over_nearly_flat_routing_uses_more_than_one_expert(batch):
    model = get_peft_model(_tiny(), moe_peft.MoLEConfig(r=4, num_experts=4, top_p=0.5, target_modules=MLP))
    model.train()
    model(**batch)
    stats = moe_peft.routing_stats(model, "default")
    per_token = [s["experts_per_token"] for s in stats.values()]
    # a fresh router is nearly uniform (p ~ 0.25 each): passing 0.5 takes 2 or 3 experts, never 1
    assert all(1.9 < e <= 3.0 for e in per_token), per_token


def test_experts_per_token_is_the_mean_over_non_padding_tokens(batch):
    model = get_peft_model(_tiny(), moe_peft.MoLEConfig(r=4, num_experts=4, top_p=0.5, router_granularity="linear",
                                                         target_modules=["up_proj"]))  # fmt: skip
    model.train()
    seen = {}
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    layer.routers["default"].register_forward_hook(lambda m, i, o: seen.update(idx=o.idx))
    model(**batch)
    real = (seen["idx"] >= 0).sum(-1).float()  # [T] real experts per token
    keep = batch["attention_mask"].reshape(-1).bool()  # padding excluded
    stats = moe_peft.routing_stats(model, "default")
    got = stats["model.layers.0.mlp.up_proj"]["experts_per_token"]
    assert got == pytest.approx(float(real[keep].mean()), abs=1e-6)
    model2 = get_peft_model(_tiny(), moe_peft.MoLEConfig(r=4, num_experts=4, top_k=2, target_modules=MLP)).train()
    model2(**batch)
    assert all(s["experts_per_token"] == 2.0 for s in moe_peft.routing_stats(model2).values())


# -- 4. dense eval routing with null experts renormalizes over the real experts --------------------------------
def test_dense_eval_with_null_experts_renormalizes():
    router = TopKRouter(8, num_experts=3, top_k=2, num_null_experts=2, eval_routing="dense").eval()
    with torch.no_grad():
        router.null.weight.fill_(0.5)  # make the null slots take most of the softmax
    out = router(torch.rand(6, 8))
    real = out.probs[:, :3]
    assert (real.sum(-1) < 0.9).all()  # the softmax over n + m slots leaves the real experts short
    torch.testing.assert_close(out.weights, real / real.sum(-1, keepdim=True))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(6))


# -- 5. LoRAMoE's localized balancing: the intended form and the released one ---------------------------------
W = torch.tensor([[[0.4, 0.4, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]], [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.0, 0.0]]])
MASK = torch.tensor([[True, True], [True, False]])  # the last token of sample 2 is padding
TYPES, DELTA = torch.tensor([1, 0]), 0.1
Q = torch.tensor([[0.7, 0.7, 0.3, 0.3], [0.1, 0.1, 0.4, 0.4]])  # importance by hand, padding excluded
COEF = torch.tensor([[1.1, 1.1, 0.9, 0.9], [0.9, 0.9, 1.1, 1.1]])  # type 1: first half; type 0: second


@pytest.mark.parametrize("form, z", [("intended", (Q / COEF).flatten()), ("released", (COEF * Q).flatten())])
def test_localized_balance_matches_a_hand_computation(form, z):
    want = z.var() / (z.mean() ** 2 + 1e-10)  # unbiased variance, as the released cv_squared
    torch.testing.assert_close(localized_balance(W, MASK, TYPES, DELTA, form), want)


@pytest.mark.parametrize("form", ["intended", "released"])
def test_optimizing_the_constraint_splits_importance_as_documented(form):
    """Minimize each form directly over free routing logits (5 tokens a sample, 4 experts) and compare the
    importances with the hand-derived optimum."""
    torch.manual_seed(0)
    logits = torch.zeros(2, 5, 4).normal_(std=0.1).requires_grad_()
    mask = torch.ones(2, 5, dtype=torch.bool)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        localized_balance(logits.softmax(-1), mask, TYPES, DELTA, form).backward()
        opt.step()
    q = logits.softmax(-1).sum(1).detach()  # [B, N]
    profile = COEF if form == "intended" else 1 / COEF  # the loss is 0 when Q is proportional to this
    want = 5 * profile / profile.sum(-1, keepdim=True)
    torch.testing.assert_close(q, want, rtol=0, atol=2e-3)
    own = q[0, :2].mean() / q[0, 2:].mean()  # type-1 sample: its own (first) half over the other half
    if form == "intended":
        assert own == pytest.approx(1.1 / 0.9, abs=1e-2)  # [1.375, 1.375, 1.125, 1.125]
    else:
        assert own == pytest.approx(0.9 / 1.1, abs=1e-2)  # [1.125, 1.125, 1.375, 1.375]: the wrong way


def test_loramoe_config_forms_and_odd_expert_counts(batch):
    assert moe_peft.LoRAMoEConfig().blc_form == "intended"
    with pytest.raises(ValueError, match="blc_form"):
        moe_peft.LoRAMoEConfig(blc_form="paper-ish")
    with pytest.raises(ValueError, match="num_experts=5 is invalid.*even"):
        moe_peft.LoRAMoEConfig(num_experts=5)
    moe_peft.LoRAMoEConfig(num_experts=5, blc_weight=0.0)  # no constraint: any count
    losses = {}
    for form in ("intended", "released"):
        model = get_peft_model(_tiny(), moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=MLP, blc_form=form))
        model.train()
        losses[form] = model(**batch, sample_types=torch.tensor([1, 0, 1])).router_loss.item()
    assert losses["intended"] != losses["released"]  # the option reaches the loss


# -- 7. null experts with top_k=1: the router still gets a task gradient -----------------------------------------
def test_top1_with_null_experts_trains_the_router(batch):
    config = moe_peft.MoLEConfig(r=4, num_experts=4, top_k=1, num_null_experts=2, target_modules=MLP,
                                 router_aux_loss_coef=0.0)  # fmt: skip
    model = get_peft_model(_tiny(), config)
    randomize_experts(model)
    model.train()
    model(**batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "router" in n and "null" not in n]
    # (AdaMoE's p / p has a zero gradient up to rounding: ~1e-10 here)
    assert grads and all(g is not None and float(g.abs().max()) > 1e-4 for g in grads), [g.abs().max() for g in grads]
    router = TopKRouter(8, num_experts=2, top_k=1, num_null_experts=2)
    out = router(torch.randn(50, 8))
    torch.testing.assert_close(out.weights, (out.idx >= 0).float())  # AdaMoE's values: 1 real, 0 null


# -- 9. padding from 4-D masks, bad expert indices, merge wording --------------------------------------------------
def test_a_4d_attention_mask_still_keeps_padding_out(batch):
    model = get_peft_model(_tiny(), moe_peft.MoLEConfig(r=4, num_experts=4, top_k=2, target_modules=MLP))
    model.train()
    flat = model(**batch)
    stats_2d = moe_peft.routing_stats(model, "default")
    pad = batch["attention_mask"].bool()  # [B, S]
    seq = pad.shape[1]
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    mask_4d = causal[None, None] & pad[:, None, None, :]  # [B, 1, S, S], padding rows fully masked
    four = model(input_ids=batch["input_ids"], attention_mask=mask_4d, labels=batch["labels"])
    stats_4d = moe_peft.routing_stats(model, "default")
    assert all(s["tokens"] == int(pad.sum()) for s in stats_4d.values())
    assert {k: v["load"] for k, v in stats_4d.items()} == {k: v["load"] for k, v in stats_2d.items()}
    torch.testing.assert_close(four.router_loss, flat.router_loss)
    additive = torch.zeros(mask_4d.shape).masked_fill(~mask_4d, torch.finfo(torch.float32).min)  # float form
    model(input_ids=batch["input_ids"], attention_mask=additive)
    assert all(s["tokens"] == int(pad.sum()) for s in moe_peft.routing_stats(model).values())
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(input_ids=batch["input_ids"], attention_mask=pad.reshape(-1))


@pytest.mark.parametrize("backend", ["dense", "grouped", "triton"])
@pytest.mark.parametrize("bad", [-2, 4])
def test_expert_indices_other_than_minus_one_raise(backend, bad):
    from moe_peft.ops import _HAS_TRITON, apply_lora_experts

    if backend == "triton" and not _HAS_TRITON:
        pytest.skip("triton is not installed")
    x, a, b = torch.randn(6, 8), torch.randn(4, 2, 8), torch.randn(4, 5, 2)
    idx = torch.tensor([[0, -1]] * 6)
    w = torch.ones(6, 2)
    apply_lora_experts(x, a, b, idx, w, 1.0, backend=backend)  # -1 is the empty slot
    idx[3, 1] = bad
    with pytest.raises(ValueError, match=r"expert_idx must hold expert indices in \[0, 4\) or -1"):
        apply_lora_experts(x, a, b, idx, w, 1.0, backend=backend)


def test_smora_merge_error_speaks_in_ranks():
    model = get_peft_model(_tiny(), moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP))
    with pytest.raises(ValueError, match="SMoRA adapter: every token activates its own top_k=2 of the r=8 ranks") as e:
        model.merge_and_unload()
    assert "num_experts" not in str(e.value)
