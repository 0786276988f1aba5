"""Several moe-peft adapters of one method selected per sample (moe_peft.multi_lora on MoLE, LoRAMoE, SMoRA): every
sample is routed by its own adapter's router to its own adapter's experts, all in one bank and one op call; outputs,
router statistics and gradients (experts and routers, router losses included) equal each adapter run alone on its
samples."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

import moe_peft
from moe_peft import multi_lora
from moe_peft.bases import tiny_llama

from .conftest import MLP, VOCAB, make_config, randomize_experts
from .test_multi_lora import assert_dropout_only_on

# per method: adapters of one method with different E, r, k, routing granularity, null experts, top-p, losses
GROUPS = {
    "mole": [
        make_config("mole_block"),
        make_config("mole_linear_top2", lora_alpha=16),
        make_config("mole_null", r=6),
        make_config("mole_top_p", router_granularity="linear"),
    ],
    "loramoe": [
        make_config("loramoe", blc_weight=0.1),
        make_config("loramoe", r=2, num_experts=3, blc_weight=0.1, target_modules=["up_proj", "down_proj"]),
    ],
    "smora": [make_config("smora"), make_config("smora", r=4, top_k=1, lora_alpha=4)],
}


def make_model(group: str):
    base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
    model = None
    for i, config in enumerate(copy.deepcopy(GROUPS[group])):
        if model is None:
            model = get_peft_model(base, config, adapter_name="m0")
        else:
            model.add_adapter(f"m{i}", config)
    randomize_experts(model, std=0.2)
    return model.eval()


def batch_for(n_adapters: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (8, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[5, :2] = 0
    names = [f"m{i % n_adapters}" for i in range(8)]
    names[3] = "__base__"  # every adapter keeps at least one sample
    labels = ids.masked_fill(mask == 0, -100)
    sample_types = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    return ids, mask, labels, names, sample_types


def alone(model, adapter, rows, **inputs):
    """The adapter active on its own, on its samples only."""
    model.set_adapter(adapter)
    return model(**{k: v[rows] for k, v in inputs.items()})


@pytest.mark.parametrize("group", list(GROUPS))
def test_outputs_and_routing_stats_equal_each_adapter_alone(group):
    model = make_model(group)
    ids, mask, _, names, types = batch_for(len(GROUPS[group]))
    multi_lora.enable(model)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, sample_types=types, adapter_names=names).logits
        stats = moe_peft.routing_stats(model)
        for adapter in sorted(set(names) - {"__base__"}):
            rows = [i for i, n in enumerate(names) if n == adapter]
            want = alone(model, adapter, rows, input_ids=ids, attention_mask=mask, sample_types=types).logits
            torch.testing.assert_close(got[rows], want, rtol=1e-5, atol=1e-5, msg=adapter)
            for layer, record in moe_peft.routing_stats(model, adapter).items():  # padding excluded, own tokens only
                assert stats[f"{layer}[{adapter}]"]["load"] == pytest.approx(record["load"], abs=1e-6)
                assert stats[f"{layer}[{adapter}]"]["tokens"] == record["tokens"]
        base_rows = [i for i, n in enumerate(names) if n == "__base__"]
        with model.disable_adapter():
            base_out = model(input_ids=ids[base_rows], attention_mask=mask[base_rows]).logits
        torch.testing.assert_close(got[base_rows], base_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", list(GROUPS))
def test_gradients_equal_each_adapter_trained_alone(group):
    model = make_model(group)
    n = len(GROUPS[group])
    ids, mask, labels, names, types = batch_for(n)
    reference = copy.deepcopy(model)
    multi_lora.enable(model, training=True)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, sample_types=types, adapter_names=names)
    loss, report = multi_lora.per_adapter_loss(out, labels, names)
    assert out.router_loss is not None  # every group trains with router loss terms
    loss.backward()
    params = dict(model.named_parameters())
    checked = 0
    for i in range(n):
        adapter = f"m{i}"
        rows = [j for j, name in enumerate(names) if name == adapter]
        ref = copy.deepcopy(reference)
        ref.set_adapter(adapter)
        ref.train()
        ref_out = alone(ref, adapter, rows, input_ids=ids, attention_mask=mask, labels=labels, sample_types=types)
        ref_out.loss.backward()  # task loss + the adapter's router loss, as when it trains alone
        for name, p in ref.named_parameters():
            if p.requires_grad and p.grad is not None:
                scale = float(
                    p.grad.abs().max()
                )  # other summation orders (the bank's op path): relative to the largest
                torch.testing.assert_close(params[name].grad, p.grad, rtol=1e-4, atol=1e-4 * scale, msg=name)
                checked += "router" in name
        ce_alone = ref_out.loss - ref_out.router_loss
        torch.testing.assert_close(report[adapter], ce_alone.detach(), rtol=1e-5, atol=1e-6)
    assert checked > 0  # the routers' gradients were compared, router losses included


def test_generate_picks_each_samples_adapter():
    model = make_model("mole")
    ids, mask, _, names, _ = batch_for(4)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    multi_lora.enable(model)
    got = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs)
    for adapter in sorted(set(names) - {"__base__"}):
        rows = [i for i, n in enumerate(names) if n == adapter]
        model.set_adapter(adapter)
        want = model.generate(input_ids=ids[rows], attention_mask=mask[rows], **kwargs)
        torch.testing.assert_close(got[rows], want, rtol=0, atol=0, msg=adapter)


def test_block_routing_needs_the_peft_model_and_other_tuners_are_refused():
    model = make_model("mole")
    multi_lora.enable(model)
    layer = model.base_model.model.model.layers[0].mlp.up_proj  # a block-routed adapter's non-owner linear
    assert multi_lora.is_enabled(model)
    model.base_model.routing_ctx.adapter_selection = multi_lora.AdapterSelection(["m0", "m0"])
    with pytest.raises(RuntimeError, match="routes per block"):
        layer(torch.randn(2, 3, 32))
    model.base_model.routing_ctx.adapter_selection = None
    mhr = get_peft_model(tiny_llama(vocab_size=VOCAB, hidden_size=32), moe_peft.MHRConfig(r=2, target_modules=MLP))
    with pytest.raises(TypeError, match="task_ids"):
        multi_lora.enable(mhr)


def test_dropout_is_per_sample_and_only_in_training():
    model = make_model("mole")
    model.base_model.model.model.layers[0].mlp.up_proj.dropouts["m1"] = torch.nn.Dropout(0.5)
    ids, mask, _, names, _ = batch_for(4)
    assert_dropout_only_on(model, ids, mask, names, "m1")


def test_trainer_router_loss_counts_once_per_step_under_gradient_accumulation(tmp_path):
    """multi_lora.Trainer normalizes the task loss over the accumulation window, so the router loss (a per-micro-batch
    mean) must enter each micro-batch with weight 1/N; with weight 1 its share of the gradient was N times too large.
    Identical samples make every micro-batch's router loss equal the whole batch's, so 4 x 1 and 2 x 2 must agree."""
    from datasets import Dataset

    from moe_peft.data import CharTokenizer, Collator, make_dataset

    from .test_multi_lora import trainer_args

    row = make_dataset(1, seed=1)[0]
    rows = Dataset.from_list([{**row, "adapter": "m0"}] * 8)
    tokenizer = CharTokenizer()
    config = moe_peft.MoLEConfig(r=4, num_experts=4, top_k=2, target_modules=MLP, router_aux_loss_coef=1.0)
    start = get_peft_model(
        tiny_llama(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_layers=2, seed=0),
        config,
        adapter_name="m0",
    )
    randomize_experts(start, std=0.2)
    finals = []
    for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        model = copy.deepcopy(start)
        args = trainer_args(
            tmp_path / f"ga{accumulation}", 2, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
        )  # fmt: skip
        multi_lora.Trainer(model=model, args=args, train_dataset=rows, data_collator=Collator(tokenizer)).train()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if "router" in n})
    assert finals[0] and any(not torch.equal(finals[0][n], start.state_dict()[n]) for n in finals[0])
    for other in finals[1:]:
        for name in finals[0]:
            torch.testing.assert_close(other[name], finals[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_per_adapter_loss_refuses_window_normalization_without_a_router_loss_weight():
    model = make_model("mole")
    multi_lora.enable(model, training=True)
    model.train()
    ids, mask, labels, names, _ = batch_for(4)
    outputs = model(input_ids=ids, attention_mask=mask, adapter_names=names)
    with pytest.raises(ValueError, match="router_loss_weight"):
        multi_lora.per_adapter_loss(outputs, labels, names, num_items={n: 10 for n in set(names)})
