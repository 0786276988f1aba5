"""SMoRA's loss-free balancing: the selection bias stays float32 in bf16/fp16 models (issue 9, item 2) and the
update runs once per optimizer step even when the router weight does not change (item 6)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import moe_peft
from moe_peft.bases import tiny_llama

from .conftest import MLP, randomize_experts

UPDATES, RATE = 2000, 1e-5
# one rank always under-loaded: its bias grows by u per update; the others (loaded) shrink by u
COUNTS = torch.tensor([0.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])


def _smora(dtype=torch.float32, **overrides):
    base = tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, seed=0).to(dtype)
    config = moe_peft.SMoRAConfig(**{"r": 8, "top_k": 2, "target_modules": MLP, "bias_update_rate": RATE, **overrides})
    return get_peft_model(base, config)


def _routers(model):
    return [r for _, layer in model.base_model._moe_layers() for r in layer.routers.values()]


def _biases_after_updates(model) -> torch.Tensor:
    router = _routers(model)[0]
    for _ in range(UPDATES):
        router.update_bias(COUNTS, RATE)
    return router.selection_bias.clone()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selection_bias_stays_float32_and_keeps_moving(dtype):
    want = _biases_after_updates(_smora(torch.float32))
    assert abs(float(want[0]) - UPDATES * RATE) < 1e-6  # 0.02
    model = _smora(dtype)
    assert all(r.selection_bias.dtype == torch.float32 for r in _routers(model))
    assert _routers(model)[0].linear.weight.dtype == torch.float32  # adapter weights: float32 (PEFT's cast)
    torch.testing.assert_close(_biases_after_updates(model), want, rtol=0, atol=0)


@pytest.mark.parametrize("cast", ["to_bf16", "half", "bfloat16", "to_fp16_device"])
def test_selection_bias_survives_model_casts(cast):
    model = _smora()
    for r in _routers(model):
        r.selection_bias.fill_(0.004)
    if cast == "to_bf16":
        model.to(torch.bfloat16)
    elif cast == "half":
        model.half()
    elif cast == "bfloat16":
        model.bfloat16()
    else:
        model.to("cpu", torch.float16)
    for r in _routers(model):
        assert r.selection_bias.dtype == torch.float32
        assert torch.equal(r.selection_bias, torch.full_like(r.selection_bias, 0.004))  # no round trip through bf16
        r.update_bias(COUNTS, RATE)
        assert float(r.selection_bias[0]) == pytest.approx(0.004 + RATE, abs=1e-9)


def test_selection_bias_reloads_as_float32_into_a_bf16_model(tmp_path):
    model = _smora()
    with torch.no_grad():
        for r in _routers(model):
            r.selection_bias.uniform_(-0.01, 0.01, generator=torch.Generator().manual_seed(0))
    saved = [r.selection_bias.clone() for r in _routers(model)]
    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):  # True loads with assign=True
        base = tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
        reloaded = PeftModel.from_pretrained(base.to(torch.bfloat16), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        for r, want in zip(_routers(reloaded), saved):
            assert r.selection_bias.dtype == torch.float32
            assert torch.equal(r.selection_bias, want)


def test_bf16_model_trains_with_a_float32_bias(batch):
    model = _smora(torch.bfloat16)
    randomize_experts(model)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    biases = torch.stack([r.selection_bias for r in _routers(model)])
    assert biases.dtype == torch.float32 and torch.count_nonzero(biases) > 0


def _first_layer(model):
    return model.base_model.model.model.layers[0].mlp.up_proj


@pytest.mark.parametrize("frozen_router", [False, True], ids=["trained_router", "frozen_router"])
def test_bias_updates_once_per_optimizer_step(frozen_router, batch):
    model = _smora(router_aux_loss_coef=0.0, bias_update_rate=0.01)
    randomize_experts(model)
    model.train()
    if frozen_router:  # the router weight never changes: the update must not depend on it
        for r in _routers(model):
            r.requires_grad_(False)
    layer = _first_layer(model)
    router = layer.routers["default"]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    counts = 0
    for _ in range(2):  # gradient accumulation: two micro-batches, no step in between
        model(**batch).loss.backward()
        counts = counts + layer.router_records["default"].counts
    assert torch.count_nonzero(router.selection_bias) == 0
    optimizer.step()  # the update runs right after the step, from both micro-batches' counts
    want = 0.01 * torch.sign(counts.float().mean() - counts.float())
    torch.testing.assert_close(router.selection_bias, want)
    # a Trainer callback calling the public entry point after the step does not apply it again
    assert moe_peft.update_router_biases(model) == 0
    model(**batch)  # forwards without a step: no update
    model(**batch)
    torch.testing.assert_close(router.selection_bias, want)
    assert "selection_bias" in " ".join(model.state_dict().keys())  # saved with the adapter


def test_update_by_hand_and_no_update_without_a_step(batch):
    model = _smora(router_aux_loss_coef=0.0, bias_update_rate=0.01).train()
    model(**batch)
    router = _routers(model)[0]
    assert torch.count_nonzero(router.selection_bias) == 0  # no optimizer step (e.g. a skipped fp16 step)
    assert moe_peft.update_router_biases(model) == len(_routers(model))  # by hand: applied now, once
    bias = router.selection_bias.clone()
    assert torch.count_nonzero(bias) > 0
    assert moe_peft.update_router_biases(model) == 0
    assert torch.equal(router.selection_bias, bias)
    model.eval()
    model(**batch)  # eval forwards gather no counts
    assert moe_peft.update_router_biases(model) == 0


def test_warns_once_when_counts_wait_for_a_step(batch, monkeypatch):
    import moe_peft.tuners.routed.model as tuner_module

    monkeypatch.setattr(tuner_module, "_PENDING_WARN_AFTER", 3)
    model = _smora().train()
    with pytest.warns(UserWarning, match="update_router_biases"):
        for _ in range(3):
            model(**batch)
    moe_peft.update_router_biases(model)
