"""native_moe: top-1 block MoLE on a dense MLP becomes a stock Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint that plain
transformers loads with the routed model's outputs; everything it cannot express is refused by name."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import get_peft_model

import moe_peft
from moe_peft.bases import tiny_dense, tiny_moe
from moe_peft.data import CharTokenizer

from .conftest import MLP
from .export_fresh import left_padded, load_fresh, routed_outputs

TOK = CharTokenizer()
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def routed_model(arch="llama", seed=0, **config):
    """A MoLE adapter with random experts and a sharp random router, so tokens really go to different experts."""
    defaults = dict(r=4, num_experts=4, target_modules=MLP, router_bias=False, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_dense(arch, vocab_size=TOK.vocab_size), moe_peft.MoLEConfig(**{**defaults, **config}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mole_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "mole_router" in name and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def ids(seed=0, shape=(3, 10)):
    return torch.randint(4, TOK.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def export(model, tmp_path, name, **kw):
    return moe_peft.export(
        model, "native_moe", tmp_path / name, tokenizer=TOK, calibration_rows=16, verbose=False, **kw
    )


def test_native_checkpoints_load_with_plain_transformers_and_equal_the_routed_model(tmp_path):
    """Llama/Mistral -> Mixtral, Qwen2 -> Qwen2-MoE (zeroed shared expert), Qwen3 -> Qwen3-MoE, in fp32: a fresh
    process without moe_peft loads them with AutoModelForCausalLM; logits equal to 1e-4, greedy tokens equal.
    Covered on the way: a null expert (AdaMoE) and a layer without a routed MLP (layers_to_transform)."""
    cases = {
        "llama": dict(num_null_experts=1),
        "mistral": dict(layers_to_transform=[1]),
        "qwen2": dict(num_null_experts=1, layers_to_transform=[0]),
        "qwen3": dict(),
    }
    inputs = left_padded(ids())
    jobs, want = [], {}
    for arch, config in cases.items():
        model = routed_model(arch, **config)
        want[arch] = routed_outputs(model, inputs)
        # the routing is not degenerate: several experts are in use
        with torch.no_grad():
            model(**inputs)
        loads = [s["load"] for s in moe_peft.routing_stats(model).values()]
        assert all(sum(x > 0 for x in load) >= 2 for load in loads), loads
        result = export(model, tmp_path, arch)
        assert result.record["exact"] and result.record["output"] == "native_moe"
        assert result.record["measured_error"]["max_abs_logit_diff"] < 1e-4
        jobs.append({"kind": "full", "path": result.path, **inputs})
    got = load_fresh(tmp_path, jobs)
    classes = {"llama": "Mixtral", "mistral": "Mixtral", "qwen2": "Qwen2Moe", "qwen3": "Qwen3Moe"}
    for arch, job in zip(cases, jobs):
        out = got[str(job["path"])]
        assert out["class"] == f"{classes[arch]}ForCausalLM"
        torch.testing.assert_close(out["logits"], want[arch][0], rtol=1e-4, atol=1e-4, msg=arch)
        assert torch.equal(out["tokens"], want[arch][1]), arch


def test_the_expert_count_size_and_record(tmp_path):
    model = routed_model("llama", num_null_experts=2)
    result = export(model, tmp_path, "mixtral")
    config = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 6 and config["num_experts_per_tok"] == 1
    record = json.loads((tmp_path / "mixtral" / "moe_peft_export.json").read_text())
    assert record == json.loads(json.dumps(result.record))  # the file is the record
    assert record["source"]["peft_type"] == "MOLE" and record["moe_peft_version"] == moe_peft.__version__
    # size: the safetensors on disk, against the base's tensors; per layer the MLP is held 6 times
    on_disk = sum(
        os.path.getsize(tmp_path / "mixtral" / f)
        for f in os.listdir(tmp_path / "mixtral")
        if f.endswith(".safetensors")
    )
    assert record["size"]["safetensors_bytes"] == on_disk
    base = tiny_dense("llama", vocab_size=TOK.vocab_size)
    base_bytes = sum(p.numel() * 4 for p in base.parameters())
    mlp_bytes = sum(p.numel() * 4 for n, p in base.named_parameters() if ".mlp." in n)
    router_bytes = 2 * 6 * base.config.hidden_size * 4
    assert record["size"]["base_bytes"] == base_bytes
    with open(tmp_path / "mixtral" / "model.safetensors", "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")  # safetensors: u64 header length, then the JSON header
    assert on_disk - header == base_bytes + 5 * mlp_bytes + router_bytes


def test_the_block_outputs_an_attention_one_expert_adapter_merged_alongside(tmp_path):
    """A second, non-routed adapter (a one-expert mixture on attention, e.g. an imported LoRA) is merged exactly."""
    model = routed_model("llama")
    model.add_adapter(
        "attn", moe_peft.MoLEConfig(r=2, num_experts=1, target_modules=ATTENTION, init_lora_weights=False)
    )
    model.base_model.set_adapter(["default", "attn"])
    model.eval()
    inputs = left_padded(ids(1))
    with torch.no_grad():
        want = model(**inputs).logits
        model.base_model.set_adapter("default")
        without = model(**inputs).logits
        model.base_model.set_adapter(["default", "attn"])
    assert (want - without).abs().max() > 1e-3  # the attention adapter matters
    result = export(model, tmp_path, "both")
    assert "MoLE 'attn' (one expert)" in result.record["parts"]["exact"]
    with torch.no_grad():
        torch.testing.assert_close(result.model(**inputs).logits, want, rtol=1e-4, atol=1e-4)


def test_bf16_base_gives_a_bf16_checkpoint_close_to_the_routed_model(tmp_path):
    model = routed_model("qwen3")
    model.base_model.model.to(torch.bfloat16)
    result = export(model, tmp_path, "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(result.model.parameters()).dtype == torch.bfloat16
    assert result.record["measured_error"]["top1_agreement"] > 0.95  # bf16 rounding of the merged experts only


REFUSALS = [
    (dict(top_k=2), "top_k=2 mixes the experts' LoRA deltas inside each projection"),
    (dict(top1_weight="prob"), "top1_weight='prob'"),
    (dict(top_k=2, top_p=0.5), "top_p=0.5"),
    (dict(top_p=0.5), "top_p=0.5"),
    (dict(eval_routing="dense"), "eval_routing='dense'"),
    (dict(router_granularity="linear"), "router_granularity='linear'"),
    (dict(target_modules=MLP + ["q_proj", "v_proj"]), "routed attention"),
]


@pytest.mark.parametrize("config, match", REFUSALS, ids=[m for _, m in REFUSALS])
def test_what_no_stock_layout_expresses_is_refused_by_name(config, match, tmp_path):
    model = routed_model("llama", **config)
    with pytest.raises(moe_peft.NativeMoEError, match=match):
        export(model, tmp_path, "x")
    assert not (tmp_path / "x").exists()


def test_modality_groups_are_refused_with_the_reason_measured_or_not(tmp_path):
    """Modality groups keep image tokens off the text experts; a stock router sees only the hidden state and cannot.
    Refused from the config, before any measurement (measure_error=False used to record a wrong export as exact),
    and the refusals of 'merge' and merge_and_unload say why native_moe does not apply."""
    model = routed_model("llama", modality_experts={"text": 2, "image": 2})
    reason = r"modality_experts=\{'text': 2, 'image': 2\} routes each token only among the experts of its modality"
    for measure in (False, True):
        with pytest.raises(moe_peft.NativeMoEError, match=reason + ".*image token to a text expert"):
            export(model, tmp_path, f"x{measure}", measure_error=measure)
        assert not (tmp_path / f"x{measure}").exists()
    with pytest.raises(ValueError, match="'native_moe' does not apply: MoLE 'default': " + reason):
        moe_peft.export(model, "merge", tmp_path / "m", measure_error=False, verbose=False)
    with pytest.raises(ValueError, match="'native_moe' does not apply: " + reason):
        model.merge_and_unload()


def test_a_trained_router_bias_is_refused_and_a_zero_one_is_not(tmp_path):
    model = routed_model("llama", router_bias=True)  # the bias starts at zero: shift-invariant, exact
    assert export(model, tmp_path, "zero").record["exact"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mole_router" in name and name.endswith("bias"):
                p.copy_(torch.linspace(-1, 1, p.numel()))
    with pytest.raises(moe_peft.NativeMoEError, match="router_bias=True.*train with router_bias=False"):
        export(model, tmp_path, "trained")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=MLP), "LoRAMoE mixes"),
        (lambda: moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP), "SMoRA routes the ranks"),
    ],
)
def test_other_token_routed_methods_are_refused(make, match, tmp_path):
    model = get_peft_model(tiny_dense("llama", vocab_size=TOK.vocab_size), make())
    with pytest.raises(moe_peft.NativeMoEError, match=match):
        export(model, tmp_path, "x")


def test_bases_without_a_stock_layout_are_refused(tmp_path):
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    mlp_mole = moe_peft.MoLEConfig(r=2, num_experts=2, target_modules=MLP, router_bias=False)
    model = get_peft_model(GemmaForCausalLM(GemmaConfig(**small, num_key_value_heads=2, head_dim=8)), mlp_mole)
    with pytest.raises(moe_peft.NativeMoEError, match="model_type='gemma'"):
        export(model, tmp_path, "gemma")
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**small, attention_bias=True)), mlp_mole)
    with pytest.raises(moe_peft.NativeMoEError, match="attention_bias=True"):
        export(model, tmp_path, "biased")
    attention = moe_peft.MoLEConfig(r=2, num_experts=2, target_modules=ATTENTION)  # an MoE base: its MLPs are experts
    model = get_peft_model(tiny_moe("olmoe"), attention)
    with pytest.raises(moe_peft.NativeMoEError, match="routed attention"):
        export(model, tmp_path, "olmoe")


def test_moe_base_with_expert_lora_merges_each_expert_and_keeps_its_layout(tmp_path):
    base = tiny_moe("qwen3_moe")
    config = moe_peft.MoLEConfig(
        r=4, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mole_B" in name:
                p.normal_(std=0.2)
    model.eval()
    inputs = left_padded(ids(2, (2, 9)))
    want = routed_outputs(model, inputs)
    rows = [{"input_ids": list(range(4, 20))}] * 8  # pre-tokenized calibration rows: no tokenizer needed
    result = moe_peft.export(model, "native_moe", tmp_path / "qwen3moe", rows, verbose=False)
    assert result.record["output"] == "native_moe" and result.record["exact"]
    got = load_fresh(tmp_path, [{"kind": "full", "path": result.path, **inputs}])[result.path]
    assert got["class"] == "Qwen3MoeForCausalLM"
    torch.testing.assert_close(got["logits"], want[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(got["tokens"], want[1])
