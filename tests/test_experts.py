"""LoRA on fused 3-D experts (moe_peft/experts/): against a hand-written per-expert oracle, against PEFT's own
`target_parameters` LoRA (outputs and gradients), and through the contract (save/load, merge, adapters, losses)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from moe_peft.experts import MoELoraExperts, read_layout
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import ParamWrapper

import moe_peft
from moe_peft.bases import tiny_moe
from moe_peft.tuners.routed.experts.grouped import grouped_linear, sort_pairs
from moe_peft.tuners.routed.layer import MoELoraLinear

from .conftest import checkpointed_grads

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
PEER_ARCHS = ["mixtral", "olmoe", "qwen3_moe"]
ALL_ARCHS = PEER_ARCHS + ["qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"]


def _ids(seed: int = 0, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(3, 60, shape, generator=torch.Generator().manual_seed(seed))


def _randomize(model, std: float = 0.2, seed: int = 3) -> None:
    """Non-zero B (a new adapter is a no-op) on every moe-peft layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (MoELoraExperts, MoELoraLinear)):
                for bank in module.experts_B.values():
                    for p in bank.values() if isinstance(bank, torch.nn.ParameterDict) else [bank]:
                        p.copy_(torch.randn(p.shape, generator=g) * std)


def _experts_model(arch="mixtral", **config):
    config = {"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": EXPERTS, **config}
    model = get_peft_model(tiny_moe(arch), moe_peft.MoLEConfig(**config))
    _randomize(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# the math: one experts module against a per-expert loop with W_e + s B_e A_e (the definition)


def _oracle(experts, layout, loras, scaling, x, idx, w):
    """sum_j w[t,j] * down_e(gate(up_e x_t)) with every weight W_e + s B_e A_e, one token at a time."""
    weights = {}
    for name in layout.param_names:
        weight = getattr(experts, name)
        if name in loras:
            a, b = loras[name]
            delta = torch.bmm(b, a) * scaling  # [E, out, in]
            weight = weight + (delta.transpose(1, 2) if layout.transposed else delta)
        weights[name] = weight
    out = []
    for t in range(x.shape[0]):
        y = 0
        for j in range(idx.shape[1]):
            e = int(idx[t, j])

            def lin(v, name, e=e):
                wt = weights[name][e]
                v = v @ wt if layout.transposed else v @ wt.t()
                return v + getattr(experts, f"{name}_bias")[e] if layout.has_bias else v

            h = lin(x[t : t + 1], layout.up_name)
            a = experts._apply_gate(h) if layout.has_gate else experts.act_fn(h)
            y = y + w[t, j] * lin(a, "down_proj")
        out.append(y)
    return torch.cat(out)  # [T, d]


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])  # [E, out, in] with [gate; up], and [E, in, out] + biases
@pytest.mark.parametrize("params", [EXPERTS, ["experts.down_proj"]])
def test_experts_layer_equals_the_per_expert_oracle(arch, params):
    model = _experts_model(arch, target_parameters=params)
    layer = model.base_model.model.model.layers[0].mlp.experts
    assert isinstance(layer, MoELoraExperts)
    experts, layout = layer.base_layer, layer.layout
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 32, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(7)])  # [T, k], distinct experts per token
    w = torch.rand(7, 2, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    layer.double()
    bank = {n: (layer.experts_A["default"][n], layer.experts_B["default"][n]) for n in layer.experts_A["default"]}
    assert set(bank) == {p.split(".")[-1] for p in params}
    got = layer(x, idx, w)
    want = _oracle(experts, layout, bank, layer.scalings["default"], x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(got)
    inputs = [x, w] + [p for pair in bank.values() for p in pair]
    grads_got = torch.autograd.grad(got, inputs, dy)
    grads_want = torch.autograd.grad(want, inputs, dy)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # dx, router weights, every A and B


def test_grouped_linear_trains_base_experts_too():
    # frozen experts save nothing but W; experts that train (rare) still get their exact gradient
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)  # [E, out, in]
    idx = torch.tensor([[2, 0], [2, 1], [0, 2]])
    pairs = sort_pairs(idx, 3, like=weight)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)  # [P, in], sorted pairs
    y = grouped_linear(x, weight, pairs, transposed=False)
    want = torch.einsum("pi,poi->po", x, weight[pairs.expert.squeeze(1)])
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, weight], dy), torch.autograd.grad(want, [x, weight], dy)):
        torch.testing.assert_close(a, b)
    assert pairs.counts == [2, 1, 3] and pairs.expert.squeeze(1).tolist() == [0, 0, 1, 2, 2, 2]


# ---------------------------------------------------------------------------------------------------------------
# peer check: moe_peft.import_lora_adapter against PEFT itself


def _peft_lora(arch: str, kind: str):
    targets = {
        "target_modules": dict(target_modules=ATTENTION),
        "target_parameters": dict(target_modules=[], target_parameters=EXPERTS),
        "both": dict(target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS),
    }[kind]
    torch.manual_seed(1)
    base = tiny_moe(arch)
    other = copy.deepcopy(base)
    # init_lora_weights=False: B is random too, so every LoRA changes the output
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **targets)), other


def _peft_grads(peft_model) -> dict[str, torch.Tensor]:
    """{our parameter name: PEFT's gradient in our layout}."""
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if "lora_A" not in module._modules or "default" not in module.lora_A:
            continue
        ga, gb = module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad
        if isinstance(module, ParamWrapper):
            num_experts, owner = module.num_experts, name.replace(".base_layer", "")
            out[f"{owner}.mole_A.default.{module.parameter_name}"] = ga.reshape(num_experts, -1, ga.shape[-1])
            out[f"{owner}.mole_B.default.{module.parameter_name}"] = gb.reshape(gb.shape[0], -1, num_experts).permute(
                2, 0, 1
            )
        else:
            out[f"{name}.mole_A.default"] = ga[None]  # [r, in] -> [1, r, in]
            out[f"{name}.mole_B.default"] = gb[None]
    return out


def _compare_with_peft(peft_model, ours, ids):
    embeds_p = peft_model.get_input_embeddings()(ids).detach().requires_grad_()
    embeds_o = embeds_p.detach().clone().requires_grad_()
    peft_model.train()
    ours.train()
    out_p = peft_model(inputs_embeds=embeds_p, labels=ids)
    out_o = ours(inputs_embeds=embeds_o, labels=ids)
    torch.testing.assert_close(out_o.logits, out_p.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_o.loss, out_p.loss, rtol=1e-5, atol=1e-5)
    out_p.loss.backward()
    out_o.loss.backward()
    torch.testing.assert_close(embeds_o.grad, embeds_p.grad, rtol=1e-5, atol=1e-5)  # dL/dx through every layer
    want = _peft_grads(peft_model)
    got = {n.removeprefix("base_model.model."): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    got = {n: g for n, g in got.items() if "router" not in n}  # one-expert routers: constant weight 1, zero grad
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["target_modules", "target_parameters", "both"])
@pytest.mark.parametrize("arch", PEER_ARCHS)
def test_imported_lora_matches_peft_outputs_and_gradients(arch, kind):
    peft_model, base = _peft_lora(arch, kind)
    ours = moe_peft.import_lora_adapter(base, peft_model)
    ids = _ids()
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=ids).logits
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - plain).abs().max() > 1e-2  # the adapter is not a no-op
    _compare_with_peft(peft_model, ours, ids)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"])
def test_imported_lora_matches_peft_on_the_other_layouts(arch):
    # shared experts (Qwen2-MoE, DeepSeek) are plain linears; GPT-OSS stores [E, in, out] with biases
    peft_model, base = _peft_lora(arch, "both")
    _compare_with_peft(peft_model, moe_peft.import_lora_adapter(base, peft_model), _ids())


def test_import_from_a_saved_peft_directory(tmp_path):
    peft_model, base = _peft_lora("olmoe", "both")
    peft_model.save_pretrained(tmp_path)
    ours = moe_peft.import_lora_adapter(base, tmp_path)
    assert not any(isinstance(m, ParamWrapper) for m in ours.modules())  # PEFT's layers were unloaded again
    assert not hasattr(ours.base_model.model, "peft_config") or "default" in ours.peft_config
    ids = _ids()
    peft_model.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_rslora_imports_with_its_scaling():
    torch.manual_seed(0)
    base = tiny_moe("mixtral")
    other = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False, target_modules=["q_proj"])
    peft_model = get_peft_model(base, config)
    ours = moe_peft.import_lora_adapter(other, peft_model)
    assert math.isclose(ours.peft_config["default"].scaling, 8 / math.sqrt(4))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "option, match",
    [
        (dict(use_dora=True), "use_dora"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(bias="all"), "bias"),
        (dict(rank_pattern={"q_proj": 4}), "rank_pattern"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    ],
)
def test_import_refuses_lora_options_it_cannot_reproduce(option, match):
    base = tiny_moe("mixtral")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], **option))
    with pytest.raises(ValueError, match=match):
        moe_peft.import_lora_adapter(base, peft_model)


# ---------------------------------------------------------------------------------------------------------------
# configuration, targeting, errors


def test_target_parameters_must_be_a_list():
    with pytest.raises(ValueError, match="target_parameters"):
        moe_peft.MoLEConfig(target_parameters="experts.gate_up_proj")


def test_default_targets_on_moe_models_are_attention_plus_the_named_experts():
    model = get_peft_model(tiny_moe("qwen3_moe"), moe_peft.MoLEConfig(r=2, num_experts=2, target_parameters=EXPERTS))
    layer = model.base_model.model.model.layers[1]
    assert isinstance(layer.self_attn.q_proj, MoELoraLinear) and isinstance(layer.mlp.experts, MoELoraExperts)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("mole_" in n for n in trainable)
    # the base routers and the base experts stay frozen
    assert not layer.mlp.gate.weight.requires_grad and not layer.mlp.experts.base_layer.gate_up_proj.requires_grad
    assert "mlp.experts.mole_A.default.gate_up_proj" in " ".join(trainable)


def test_exclude_modules_and_layers_to_transform_apply_to_experts():
    model = _experts_model(layers_to_transform=[1], layers_pattern="layers")
    wrapped = [
        i
        for i, layer in enumerate(model.base_model.model.model.layers)
        if isinstance(layer.mlp.experts, MoELoraExperts)
    ]
    assert wrapped == [1]
    model = _experts_model(exclude_modules=["model.layers.0.mlp.experts"])
    layers = model.base_model.model.model.layers
    assert not isinstance(layers[0].mlp.experts, MoELoraExperts) and isinstance(layers[2].mlp.experts, MoELoraExperts)


def test_unknown_layouts_and_wrong_parameters_raise_naming_them():
    from torch import nn

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.Module()
            self.experts.w = nn.Parameter(torch.zeros(4, 8, 8))  # 3-D, but no transformers experts layout
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(ValueError, match=r"experts \(Module\) is not a transformers fused-experts module"):
        get_peft_model(Holder(), moe_peft.MoLEConfig(target_modules=["proj"], target_parameters=["experts.w"]))
    with pytest.raises(ValueError, match=r"q_proj \(Linear\)"):  # a 2-D weight is a linear: target_modules
        get_peft_model(tiny_moe(), moe_peft.MoLEConfig(target_modules=[], target_parameters=["q_proj.weight"]))
    with pytest.raises(ValueError, match="gate_up_proj_bias"):
        get_peft_model(
            tiny_moe("gpt_oss"), moe_peft.MoLEConfig(target_modules=[], target_parameters=["experts.gate_up_proj_bias"])
        )
    with pytest.raises(TypeError, match="target_parameters"):  # the experts module itself in target_modules
        get_peft_model(tiny_moe(), moe_peft.MoLEConfig(target_modules=["experts"]))


def test_layout_is_read_from_the_module():
    layout = read_layout(tiny_moe("gpt_oss").model.layers[0].mlp.experts, "experts")
    assert layout.transposed and layout.has_bias and layout.param_names == ("gate_up_proj", "down_proj")
    layout = read_layout(tiny_moe("olmoe").model.layers[0].mlp.experts, "experts")
    assert not layout.transposed and not layout.has_bias and layout.num_experts == 4


# ---------------------------------------------------------------------------------------------------------------
# the contract: adapters, merging, losses, checkpointing, backends


def test_new_adapter_is_a_no_op_and_disable_gives_the_base():
    base = tiny_moe("mixtral")
    ids = _ids()
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = get_peft_model(base, moe_peft.MoLEConfig(target_modules=[], target_parameters=EXPERTS))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)  # B = 0
        _randomize(model)
        assert (model(input_ids=ids).logits - want).abs().max() > 1e-2
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, want)  # the base module's own forward


def test_two_adapters_switch_and_delete():
    model = _experts_model()
    model.add_adapter("other", moe_peft.MoLEConfig(r=2, target_modules=[], target_parameters=["experts.down_proj"]))
    layer = model.base_model.model.model.layers[0].mlp.experts
    assert set(layer.experts_A) == {"default", "other"} and list(layer.experts_A["other"]) == ["down_proj"]
    assert not layer.experts_A["other"]["down_proj"].requires_grad  # added, not active: frozen
    ids = _ids()
    with torch.no_grad():
        first = model(input_ids=ids).logits
        model.set_adapter("other")
        assert layer.experts_A["other"]["down_proj"].requires_grad
        assert not layer.experts_A["default"]["gate_up_proj"].requires_grad
        second = model(input_ids=ids).logits  # B = 0: the base
        assert (first - second).abs().max() > 1e-2
        model.delete_adapter("default")
        assert set(layer.experts_A) == {"other"}


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_merge_and_unload_folds_each_expert_lora_into_its_expert(arch):
    model = _experts_model(arch)
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        experts_cls = type(model.base_model.model.model.layers[0].mlp.experts.base_layer)
        before = model.base_model.model.model.layers[0].mlp.experts.base_layer.down_proj.detach().clone()
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)  # base forward, merged
        model.unmerge_adapter()
        torch.testing.assert_close(model.base_model.model.model.layers[0].mlp.experts.base_layer.down_proj, before)
        merged = model.merge_and_unload()
        assert type(merged.model.layers[0].mlp.experts) is experts_cls
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_unload_without_merge_restores_the_base():
    base = tiny_moe("olmoe")
    ids = _ids()
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = get_peft_model(base, moe_peft.MoLEConfig(target_modules=[], target_parameters=EXPERTS))
    _randomize(model)
    with torch.no_grad():
        torch.testing.assert_close(model.unload()(input_ids=ids).logits, want)


def test_base_aux_loss_and_router_losses_are_both_in_the_loss():
    ids = _ids()
    losses, grads = {}, {}
    for base_aux in (False, True):
        base = tiny_moe("mixtral")
        base.config.output_router_logits = base_aux
        base.router_aux_loss_coef = 0.5  # read from the config at construction
        config = moe_peft.MoLEConfig(
            r=2, num_experts=2, target_modules=ATTENTION, target_parameters=EXPERTS, router_aux_loss_coef=0.1
        )
        model = get_peft_model(base, config)
        _randomize(model)
        model.train()
        out = model(input_ids=ids, labels=ids)
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        task = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))
        base_part = 0.5 * out.aux_loss if base_aux else 0.0
        assert out.router_loss > 0
        torch.testing.assert_close(out.loss, task + base_part + out.router_loss)  # all three terms
        out.loss.backward()
        losses[base_aux] = out.loss.detach()
        grads[base_aux] = {n: p.grad.clone() for n, p in model.named_parameters() if "q_proj.mole_A" in n}
    assert losses[True] > losses[False]
    # the base router's loss reaches the adapters of the layers below it (the base router itself stays frozen)
    assert any((grads[True][n] - grads[False][n]).abs().max() > 1e-6 for n in grads[True])


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    model = _experts_model(target_modules=["q_proj"], num_experts=2, router_lr_ratio=1.0)  # routers that train
    ids = _ids()
    grads = checkpointed_grads(model, reentrant, lambda m: m(input_ids=ids, labels=ids).loss)
    assert any("experts.mole_B" in n and g.abs().max() > 0 for n, g in grads.items())


@pytest.mark.parametrize("backend", ["dense", "grouped", "triton"])
def test_kernel_backends_agree(backend):
    # "triton" runs the kernels through Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1)
    ids = _ids(shape=(1, 5))
    results = {}
    for name in ("torch", backend):
        model = _experts_model(kernel_backend=name)
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results[name] = (out.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results[backend][0], results["torch"][0], rtol=1e-4, atol=1e-5)
    for n, g in results["torch"][1].items():
        torch.testing.assert_close(results[backend][1][n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_dropout_acts_in_training_only():
    model = _experts_model(lora_dropout=0.5)
    ids = _ids()
    with torch.no_grad():
        model.eval()
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        torch.testing.assert_close(a, b)
        model.train()
        assert (model(input_ids=ids).logits - a).abs().max() > 1e-4


def test_bf16_model_keeps_fp32_adapters_and_matches_fp32():
    ids = _ids()
    model32 = _experts_model()
    model16 = copy.deepcopy(model32)
    model16.base_model.model.to(torch.bfloat16)
    for module in model16.modules():
        if isinstance(module, MoELoraExperts):
            module.experts_A.float()
            module.experts_B.float()
    with torch.no_grad():
        want = model32(input_ids=ids).logits
        got = model16(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()
    model = get_peft_model(
        tiny_moe("mixtral").to(torch.bfloat16), moe_peft.MoLEConfig(target_modules=[], target_parameters=EXPERTS)
    )
    layer = model.base_model.model.model.layers[0].mlp.experts
    assert layer.experts_A["default"]["gate_up_proj"].dtype == torch.float32  # PEFT's autocast_adapter_dtype


def test_rejects_expert_parallel_experts():
    base = tiny_moe("mixtral")
    base.model.layers[0].mlp.experts._is_expert_parallel = True
    with pytest.raises(ValueError, match="expert parallelism"):
        get_peft_model(base, moe_peft.MoLEConfig(target_modules=[], target_parameters=EXPERTS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_uses_grouped_mm_without_a_loop_and_matches_fp32():
    model = _experts_model().cuda()
    ids = _ids(shape=(4, 64)).cuda()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    layer = model.base_model.model.model.layers[0].mlp.experts
    model16 = copy.deepcopy(model)
    model16.base_model.model.to(torch.bfloat16)
    pairs = sort_pairs(
        torch.zeros(3, 2, dtype=torch.long, device="cuda"), 4, like=layer.base_layer.gate_up_proj.bfloat16()
    )
    assert pairs.counts is None  # grouped_mm: no host sync, no per-expert loop
    with torch.no_grad():
        got = model16(input_ids=ids).logits.float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


# ---------------------------------------------------------------------------------------------------------------
# save / load in a fresh process; every token-routed method; RoMA on the base routers

FRESH = """
import sys, torch
import warnings
import moe_peft  # registers the methods
from peft import PeftModel
from transformers import AutoModelForCausalLM

warnings.simplefilter("error", UserWarning)  # a missing or unexpected adapter key fails here
root = sys.argv[1]
ref = torch.load(f"{root}/ref.pt")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{root}/base"), f"{root}/adapter").eval()
layer = model.base_model.model.model.layers[0].mlp.experts
assert type(layer).__name__ == "MoLEExperts", type(layer)
with torch.no_grad():
    logits = model(input_ids=ref["input_ids"]).logits
assert torch.equal(logits, ref["logits"]), (logits - ref["logits"]).abs().max()
print("FRESH-PROCESS-OK")
"""


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_save_and_reload_in_a_fresh_process(tmp_path, arch):
    import subprocess
    import sys

    from safetensors.torch import load_file

    base = tiny_moe(arch)
    base.save_pretrained(tmp_path / "base")
    config = moe_peft.MoLEConfig(r=4, target_modules=["q_proj"], num_experts=2, target_parameters=EXPERTS)
    model = get_peft_model(base, config).eval()
    _randomize(model)
    model.save_pretrained(tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.mlp.experts.mole_A.gate_up_proj" in keys
    assert all("mole_" in k for k in keys)  # the adapter only, no base expert weight
    ids = _ids()
    with torch.no_grad():
        torch.save({"input_ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "ref.pt")
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert "FRESH-PROCESS-OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize(
    "config_cls, prefix",
    [(moe_peft.MoLEConfig, "mole_"), (moe_peft.LoRAMoEConfig, "loramoe_"), (moe_peft.SMoRAConfig, "smora_")],
)
def test_every_token_routed_method_takes_target_parameters(config_cls, prefix):
    extra = dict(top_k=2) if prefix == "smora_" else {}
    config = config_cls(r=4, target_modules=["v_proj"], target_parameters=EXPERTS, **extra)
    model = get_peft_model(tiny_moe("olmoe"), config)
    layer = model.base_model.model.model.layers[0].mlp.experts
    assert isinstance(layer, MoELoraExperts) and layer.prefix == prefix
    assert layer.scalings["default"] == model.peft_config["default"].lora_alpha / 4  # PEFT's LoRA scaling
    assert layer.experts_A["default"]["down_proj"].shape == (4, 4, 48)  # [E, r, ff]
    _randomize(model)
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and "experts" in n}
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads.values())


def test_roma_on_the_base_routers_combines_with_expert_lora(tmp_path):
    """Two adapters on one model: RoMA wraps the base routers, the expert LoRA wraps the experts (docs/methods.md)."""
    from peft import PeftModel

    base = tiny_moe("mixtral")
    base.save_pretrained(tmp_path / "base")
    roma = get_peft_model(base, moe_peft.RoMAConfig(num_last_layers=2))
    config = moe_peft.MoLEConfig(r=4, target_modules=["q_proj"], num_experts=2, target_parameters=EXPERTS)
    model = get_peft_model(roma.base_model.model, config, adapter_name="experts")
    _randomize(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("roma_router" in n for n in trainable) and any("experts.mole_A" in n for n in trainable)
    assert not any("mlp.gate.base_layer" in n or "base_layer.gate_up_proj" in n for n in trainable)
    model.train()
    ids = _ids()
    out = model(input_ids=ids, labels=ids)
    loss = out.loss + moe_peft.roma.routing_representation(roma).square().mean()  # a stand-in regularizer
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(grads[n] is not None and grads[n].abs().max() > 0 for n in grads if "roma_router" in n)
    assert any(grads[n].abs().max() > 0 for n in grads if "experts.mole_B" in n)
    with torch.no_grad():
        for p in roma.parameters():
            if p.requires_grad:
                p.add_(0.05)  # the routers moved: the reload must bring them back
        model.eval()
        want = model(input_ids=ids).logits
    roma.save_pretrained(tmp_path / "roma", selected_adapters=["default"])
    model.save_pretrained(tmp_path / "lora", selected_adapters=["experts"])
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "roma")
    reloaded = PeftModel.from_pretrained(
        reloaded.base_model.model, tmp_path / "lora" / "experts", adapter_name="experts"
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, want)


@pytest.mark.parametrize("arch, shared", [("qwen2_moe", "shared_expert"), ("deepseek_v3", "shared_experts")])
def test_shared_experts_take_a_routed_method_next_to_the_expert_lora(arch, shared):
    targets = [f"{shared}.gate_proj", f"{shared}.up_proj", f"{shared}.down_proj"]
    config = moe_peft.MoLEConfig(
        r=4, num_experts=3, top_k=1, target_modules=targets, target_parameters=EXPERTS, router_lr_ratio=1.0
    )  # routers that train: their gradient is checked
    model = get_peft_model(tiny_moe(arch), config)
    _randomize(model)
    mlp = model.base_model.model.model.layers[0].mlp
    block = getattr(mlp, shared)
    assert isinstance(block.gate_proj, MoELoraLinear) and "default" in block.gate_proj.routers  # one router per block
    assert isinstance(mlp.experts, MoELoraExperts)
    model.train()
    ids = _ids()
    out = model(input_ids=ids, labels=ids)
    assert out.router_loss > 0
    out.loss.backward()
    assert block.gate_proj.routers["default"].linear.weight.grad.abs().max() > 0
    assert mlp.experts.experts_B["default"]["down_proj"].grad.abs().max() > 0


def test_autocast_bf16_trains_close_to_fp32():
    model = _experts_model(target_modules=["q_proj"], num_experts=2)
    ids = _ids()
    model.train()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert (out.logits.float() - want).abs().max() < 0.05 * want.abs().max()
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "experts.mole" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_an_unexpected_experts_call_raises_instead_of_skipping_the_adapter():
    layer = _experts_model().base_model.model.model.layers[0].mlp.experts
    x, idx, w = torch.randn(3, 32), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    assert layer(x, top_k_index=idx, top_k_weights=w).shape == (3, 32)  # keywords of the base forward work
    with pytest.raises(TypeError, match="calls its experts differently"):
        layer(x, idx, w, torch.ones(3))
    with pytest.raises(TypeError, match="calls its experts differently"):
        layer(x[None], idx, w)
