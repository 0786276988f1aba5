"""Quantized bases (QLoRA): bitsandbytes Linear4bit (NF4 with double quantization and bf16 compute, FP4) and
Linear8bitLt under every method, on CPU (bitsandbytes >= 0.50 runs both there).

The oracle is the same model with each quantized linear replaced by the layer bitsandbytes computes, written by
hand: the weight dequantized by bitsandbytes (4-bit codes times block scales; 8-bit rows times row scales / 127), a
plain `F.linear` in the layer's compute dtype."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

import moe_peft
from moe_peft._internal.quantized import dense_linear, dequantize_base, dequantized_weight, is_quantized
from moe_peft.bases import tiny_llama

from .conftest import MLP, VOCAB, randomize_experts

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

QUANT = {
    "nf4": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
# 4-bit: the oracle does what bitsandbytes does, so only summation order differs. 8-bit: bitsandbytes also
# quantizes each input row to int8 (LLM.int8), which the oracle does not: errors of about 1% of the output.
TOL = {"nf4": dict(rtol=2e-2, atol=2e-2), "fp4": dict(rtol=1e-4, atol=1e-5), "int8": dict(rtol=0.1, atol=0.1)}
METHODS = {
    "mole": lambda: (
        moe_peft.MoLEConfig(  # routers that train (top-1 freezes them by default): their gradient is checked
            r=4, num_experts=4, top_k=1, target_modules=MLP + ["q_proj"], router_lr_ratio=1.0
        )
    ),
    "mole_top2_linear": lambda: moe_peft.MoLEConfig(
        r=4, num_experts=4, top_k=2, router_granularity="linear", target_modules=MLP
    ),
    "loramoe": lambda: moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=MLP),
    "smora": lambda: moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP),
    "mhr": lambda: moe_peft.MHRConfig(r=4, n_tasks=2, n_skills=2, n_splits=2, target_modules=MLP),
}
TASKS = torch.tensor([0, 1, 1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    # dims >= 64: bitsandbytes' CPU inference kernel needs at least one 64-wide quantization block per row
    tiny_llama(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, seed=0).save_pretrained(path)
    return str(path)


def load(model_dir: str, quant: str):
    config = BitsAndBytesConfig(**QUANT[quant])
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu")


class HandDequantized(nn.Linear):
    """What a bitsandbytes linear computes, written out: F.linear in its compute dtype on the dequantized weight."""

    def __init__(self, q: nn.Module):
        super().__init__(q.in_features, q.out_features, bias=q.bias is not None)
        if isinstance(q, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)  # [out, in]
            self.compute = q.compute_dtype or torch.float32
        else:
            weight = q.weight.data.float() * q.weight.SCB.float()[:, None] / 127  # int8 rows times their scales
            self.compute = torch.float16
        self.weight.data = weight.float()
        if q.bias is not None:
            self.bias.data = q.bias.data.float()
        self.requires_grad_(False)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(self.compute)
        return F.linear(x.to(self.compute), self.weight.to(self.compute), bias).to(x.dtype)


def dense_twin(quantized: nn.Module) -> nn.Module:
    """A deep copy with every quantized linear replaced by the hand-written oracle layer."""
    twin = copy.deepcopy(quantized)
    for module in list(twin.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                setattr(module, child_name, HandDequantized(child))
    return twin


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def routed(method: str, batch: dict) -> dict:
    return {**batch, "task_ids": TASKS} if method == "mhr" else batch


def test_dispatch_is_deliberate(model_dir):
    """dense_linear decides whether a layer may compute F.linear(x, base.weight) itself: a plain dense nn.Linear
    only. Quantized linears (nn.Linear subclasses with packed weights), any subclass, hooked or int weights: no."""
    q4, q8 = load(model_dir, "nf4"), load(model_dir, "int8")
    four, eight = q4.model.layers[0].mlp.up_proj, q8.model.layers[0].mlp.up_proj
    assert isinstance(four, nn.Linear) and isinstance(eight, nn.Linear)  # why an isinstance test is not enough
    assert four.weight.dtype == torch.uint8 and four.weight.shape == (64 * 128 // 2, 1)  # packed, not [out, in]
    assert is_quantized(four) and is_quantized(eight) and not dense_linear(four) and not dense_linear(eight)
    plain = nn.Linear(4, 4)
    assert dense_linear(plain) and not is_quantized(plain)
    assert not dense_linear(plain, (1,)) and not dense_linear(plain, (), {"scale": 2})

    class Sub(nn.Linear):
        pass

    assert not dense_linear(Sub(4, 4))
    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda m, i, o: o)
    assert not dense_linear(hooked)
    packed = nn.Linear(4, 4)
    packed.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    assert is_quantized(packed) and not dense_linear(packed)


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("method", list(METHODS))
def test_outputs_equal_the_dequantized_computation_and_the_fused_op_is_never_used(
    model_dir, quant, method, batch, monkeypatch
):
    quantized = load(model_dir, quant)
    twin = dense_twin(quantized)
    # training mode throughout: in eval bitsandbytes repacks 4-bit weights for its bf16 CPU kernel (other rounding)
    quantized.train()
    with torch.no_grad():
        base_logits = quantized(**batch).logits
    torch.manual_seed(0)
    model = get_peft_model(quantized, METHODS[method]())
    with torch.no_grad():  # a fresh adapter is a no-op on the quantized base, exactly
        assert torch.equal(model(**routed(method, batch)).logits, base_logits)
    randomize_experts(model)
    reference = get_peft_model(twin, METHODS[method]())
    set_peft_model_state_dict(reference, get_peft_model_state_dict(model))
    assert all(type(m.get_base_layer()).__name__ in ("Linear4bit", "Linear8bitLt") for m in _tuner_layers(model))

    def no_fused_op(*args, **kwargs):
        raise AssertionError("the fused base + experts op read a quantized base weight")

    monkeypatch.setattr(moe_peft.tuners.routed.layer, "linear_lora_experts", no_fused_op)
    reference.train()
    torch.manual_seed(0)
    got = model(**routed(method, batch))
    torch.manual_seed(0)
    want = reference(**routed(method, batch))
    torch.testing.assert_close(got.logits, want.logits, **TOL[quant])
    torch.testing.assert_close(got.loss, want.loss, **TOL[quant])
    got.loss.backward(), want.loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    checked = 0
    for name, p in model.named_parameters():
        if p.requires_grad and quant != "int8":  # 8-bit: the input quantization moves gradients by more than 10%
            assert p.grad is not None, name
            scale = grads[name].abs().max().clamp_min(1e-6)
            assert ((p.grad - grads[name]).abs().max() / scale) < 0.1, name
            checked += 1
    assert checked or quant == "int8"


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("method", ["mole", "loramoe", "smora", "mhr"])
def test_training_with_prepare_model_for_kbit_training_lowers_the_loss(model_dir, quant, method, batch):
    base = prepare_model_for_kbit_training(load(model_dir, quant))  # reentrant gradient checkpointing, fp32 norms
    packed = [(p, p.detach().clone()) for p in base.parameters() if not p.dtype.is_floating_point]
    torch.manual_seed(0)
    model = get_peft_model(base, METHODS[method]()).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        out = model(**routed(method, batch))
        out.loss.backward()
        if method != "mhr":  # the router losses reach the routers under reentrant checkpointing too
            routers = [p for n, p in model.named_parameters() if "router" in n and p.requires_grad]
            assert routers and all(p.grad is not None for p in routers)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    assert packed and all(torch.equal(p, before) for p, before in packed)  # the quantized base is untouched


def test_phatgoose_on_a_quantized_base_equals_the_dequantized_computation(model_dir, tmp_path, batch):
    """PEFT LoRA experts trained on the 4-bit base (PEFT's own bnb LoRA layers), gates trained on it, the library
    assembled on it: logits equal the library on the hand-dequantized twin."""
    paths = []
    for i in range(3):
        torch.manual_seed(i)
        expert = get_peft_model(
            load(model_dir, "nf4"),
            LoraConfig(r=4, lora_alpha=8, target_modules=MLP, init_lora_weights=False, task_type="CAUSAL_LM"),
        )
        batches = [{**batch, "input_ids": (batch["input_ids"] + i) % VOCAB}] * 2
        moe_peft.phatgoose.train_gates(expert, batches, steps=2, save_to=tmp_path / f"e{i}")
        expert.save_pretrained(tmp_path / f"e{i}")
        paths.append(str(tmp_path / f"e{i}"))
    quantized = load(model_dir, "nf4")
    twin = dense_twin(quantized)
    model = moe_peft.phatgoose.assemble(quantized, paths, top_k=2)
    reference = moe_peft.phatgoose.assemble(twin, paths, top_k=2)
    model.train(), reference.train()
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, **TOL["nf4"])
    assert any(max(load) < 1 for load in moe_peft.phatgoose.expert_load(model).values())  # routed, not one expert


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merge_into_a_quantized_base_refuses_then_dequantize_base_merges_exactly(model_dir, quant, batch):
    cases = {
        "mole": (lambda: moe_peft.MoLEConfig(r=4, num_experts=1, target_modules=MLP), lambda m: m.merge_and_unload()),
        "mhr": (  # one task: merge_adapter needs no task id either
            lambda: moe_peft.MHRConfig(r=4, n_tasks=1, n_skills=2, target_modules=MLP),
            lambda m: moe_peft.mhr.merge_task(m, 0),
        ),
    }
    for name, (config, merge) in cases.items():
        torch.manual_seed(0)
        model = get_peft_model(load(model_dir, quant), config())
        randomize_experts(model, std=0.5)
        inputs = {**batch, "task_ids": torch.tensor([0, 0, 0])} if name == "mhr" else batch
        model.train()  # no bitsandbytes CPU repacking, so before / after compare the same kernel

        def logits(model=model, inputs=inputs):
            torch.manual_seed(0)  # MHR samples its routing in training (relaxed Bernoulli)
            return model(**inputs).logits.detach()

        before = logits()
        with torch.no_grad(), model.disable_adapter():
            base_logits = model(**inputs).logits
        with pytest.raises(ValueError, match=r"(Linear4bit|Linear8bitLt).*dequantize_base"):
            merge(model)
        assert torch.equal(logits(), before)  # nothing changed
        with pytest.raises(ValueError, match="dequantize_base"):
            model.base_model.merge_adapter()  # the layer-level merge refuses too
        assert torch.equal(logits(), before)
        changed = dequantize_base(model)
        assert len(changed) == 2 * len(MLP) and not any(is_quantized(m.get_base_layer()) for m in _tuner_layers(model))
        model.eval()  # merging takes the eval-mode task LoRA (MHR)
        with torch.no_grad():  # the attention linears stay 4-bit: one bitsandbytes kernel for both sides
            dense = model(**inputs).logits
        if name == "mole":
            torch.testing.assert_close(dense, before, **TOL[quant])  # only the quantized kernel's rounding changed
        merged = merge(model)
        plain = {k: v for k, v in inputs.items() if k != "task_ids"}
        with torch.no_grad():
            # exact in the merged MLPs; the still-quantized attention linears round their input to bf16 (nf4) or
            # int8 (8-bit), which turns the merge's fp32 rounding (1e-7) into up to 1e-3 on the logits
            torch.testing.assert_close(merged(**plain).logits, dense, rtol=1e-2, atol=2e-3, msg=name)
            assert (merged(**plain).logits - base_logits).abs().max() > 0.05, name  # the adapter is in (B is random)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_dequantized_weight_survives_bitsandbytes_cpu_repacking(model_dir, quant):
    """bitsandbytes repacks a 4-bit weight for its CPU kernel on the first inference forward (its block scales
    rounded to bf16 on the way, so the layout change itself moves the weight by up to 0.4% of a block's scale);
    dequantized_weight still reads it right, where reading the repacked codes as the original layout is garbage."""
    quantized = load(model_dir, quant)
    layer = quantized.model.layers[0].mlp.up_proj
    want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    assert torch.equal(dequantized_weight(layer), want)
    quantized.eval()
    with torch.no_grad():
        quantized(input_ids=torch.tensor([[5, 6, 7]]))
    assert layer.weight.quant_state.packing_format_for_cpu  # repacked: the codes are in another order now
    garbage = bnb.functional.dequantize_4bit(layer.weight.data.reshape(-1, 1), layer.weight.quant_state)
    assert (garbage.float() - want.float()).abs().max() > 0.05
    torch.testing.assert_close(dequantized_weight(layer).float(), want.float(), rtol=1e-2, atol=2e-3)


def test_adapter_saved_on_a_quantized_base_reloads_on_one(model_dir, tmp_path, batch):
    torch.manual_seed(0)
    model = get_peft_model(load(model_dir, "nf4"), METHODS["smora"]())
    randomize_experts(model)
    model.train()
    want = model(**batch).logits.detach()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load(model_dir, "nf4"), tmp_path / "adapter").train()
    assert torch.equal(reloaded(**batch).logits.detach(), want)
