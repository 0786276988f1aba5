"""LLaVA-MoLE's setup (moe_peft.llava.mole_llava_config, configs/mole_llava.yaml), plain LoRA modules inside a
MoLE adapter, the image+text collator and the bundled image tasks, on tiny LLaVA and LLaVA-NeXT."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

import moe_peft
from moe_peft.bases import tiny_llama, tiny_llava, tiny_llava_next
from moe_peft.llava import (
    ATTENTION_REGEX,
    IMAGE_TASKS,
    TASKS,
    LlavaCollator,
    build_processor,
    build_tokenizer,
    make_image_tasks,
    make_sample,
    modality_load,
    mole_llava_config,
)

from .conftest import randomize_experts

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
BUILDERS = {"llava": tiny_llava, "llava_next": tiny_llava_next}


def tiny(kind: str, tokenizer):
    """A tiny model of `kind` for the local tokenizer and 16x16 images."""
    return BUILDERS[kind](vocab_size=len(tokenizer), hidden_size=32, image_size=16)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_the_yaml_config_is_the_helpers_config():
    raw = yaml.safe_load((CONFIGS / "mole_llava.yaml").read_text())
    from_yaml = moe_peft.MoLEConfig(**raw["adapter"]).to_dict()
    helper = mole_llava_config().to_dict()
    assert from_yaml == helper
    assert helper["num_experts"] == 3 and helper["r"] == 32 and helper["lora_alpha"] == 64 and helper["top_k"] == 1
    assert helper["router_granularity"] == "block" and helper["modules_to_save"] == ["multi_modal_projector"]


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_mole_llava_adapts_the_language_model_only(kind, tokenizer):
    base = tiny(kind, tokenizer)
    vision_before = {n: p.clone() for n, p in base.named_parameters() if "vision_tower" in n}
    model = get_peft_model(base, mole_llava_config(base, r=4, lora_alpha=8))
    layers = dict(model.base_model._moe_layers())
    assert layers and all(".language_model.layers." in n for n in layers)
    mlp = {n: m for n, m in layers.items() if ".mlp." in n}
    attention = {n: m for n, m in layers.items() if ".self_attn." in n}
    assert len(mlp) == 3 * 2 and len(attention) == 4 * 2  # gate/up/down and q/k/v/o of both layers
    for name, layer in mlp.items():
        assert layer.experts_A["default"].shape[0] == 3 and "default" not in layer.plain_adapters
        assert ("default" in layer.routers) == name.endswith("gate_proj")  # one router per block, on gate_proj
    for layer in attention.values():
        assert layer.experts_A["default"].shape[0] == 1 and "default" in layer.plain_adapters
        assert "default" not in layer.routers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in n for n in trainable)
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)

    collator = LlavaCollator(build_processor(kind, image_size=16, tokenizer=tokenizer))
    batch = collator(make_image_tasks(6, seed=1))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(**batch)
    out.loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if "vision_tower" in n:
            assert torch.equal(p, vision_before[n.replace("base_model.model.", "", 1)]), n
    projector = [p.grad for n, p in model.named_parameters() if "modules_to_save" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in projector)


def test_attention_none_and_modality_groups_through_the_helper(tokenizer):
    base = tiny("llava", tokenizer)
    config = mole_llava_config(base, attention="none", modality_experts={"text": 2, "image": 2}, train_projector=False)
    assert config.num_experts == 4 and config.plain_lora_modules is None and config.modules_to_save is None
    model = get_peft_model(base, config)
    assert all(".mlp." in n for n, _ in model.base_model._moe_layers())
    with pytest.raises(ValueError, match="num_experts=3 is invalid"):
        mole_llava_config(modality_experts={"text": 2, "image": 2}, num_experts=3)


def test_unsupported_models_get_an_error_naming_the_supported_ones():
    with pytest.raises(ValueError, match="LLaVA.*LlavaForConditionalGeneration.*LLaVA-NeXT"):
        mole_llava_config(tiny_llama())
    with pytest.raises(ValueError, match="'qwen2_vl'"):
        mole_llava_config("qwen2_vl")
    with pytest.raises(ValueError, match="attention="):
        mole_llava_config(attention="dense")


def test_the_regexes_never_match_the_vision_tower():
    names = [n for n, _ in tiny_llava().named_modules()]
    config = mole_llava_config()
    vision = [n for n in names if "vision_tower" in n and re.fullmatch(config.target_modules, n)]
    assert not vision and any(n.endswith("self_attn.q_proj") and "vision_tower" in n for n in names)


def test_plain_lora_modules_equal_peft_lora():
    """A MoLE adapter whose attention is plain LoRA equals PEFT's LoRA on the attention (MLP experts B = 0): same
    logits and same gradients of A and B."""
    base = tiny_llava()
    peft_model = get_peft_model(tiny_llava(), LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION_REGEX))
    ours = get_peft_model(base, mole_llava_config(r=4, lora_alpha=8, lora_dropout=0.0, router_aux_loss_coef=0.0))
    g = torch.Generator().manual_seed(0)
    pairs = []
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                layer = ours.base_model.model.get_submodule(name)
                module.lora_B["default"].weight.normal_(0, 0.1, generator=g)
                layer.experts_A["default"][0].copy_(module.lora_A["default"].weight)  # [r, in]
                layer.experts_B["default"][0].copy_(module.lora_B["default"].weight)  # [out, r]
                pairs.append((module, layer))
    assert len(pairs) == 8
    ids = torch.tensor([[5, 6, 63, 63, 63, 63, 7, 8, 9]])
    batch = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 8, 8, generator=g), "labels": ids}
    for m in (peft_model, ours):
        m.train()
    want, got = peft_model(**batch), ours(**batch)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    want.loss.backward()
    got.loss.backward()
    for module, layer in pairs:
        torch.testing.assert_close(layer.experts_A["default"].grad[0], module.lora_A["default"].weight.grad)
        torch.testing.assert_close(layer.experts_B["default"].grad[0], module.lora_B["default"].weight.grad)


def test_plain_lora_modules_merge_exactly_and_routed_ones_refuse():
    model = get_peft_model(tiny_llava(), mole_llava_config(r=4, lora_alpha=8, train_projector=False)).eval()
    randomize_experts(model)
    attention = [m for n, m in model.base_model._moe_layers() if ".self_attn." in n]
    x = torch.randn(3, 32)
    layer = attention[0]
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(layer.base_layer(x), before, rtol=1e-5, atol=1e-6)
        layer.unmerge()
    with pytest.raises(ValueError, match="routes every token"):
        model.merge_and_unload()


def test_export_reads_plain_lora_modules_as_fixed_and_the_experts_as_routed():
    """moe_peft.export's reading of a LLaVA-MoLE adapter: each attention projection (plain LoRA) is a fixed part whose
    delta is its own merge, each MLP projection a routed part."""
    from moe_peft.export.parts import Options, read_parts

    model = get_peft_model(tiny_llava(), mole_llava_config(r=4, lora_alpha=8, train_projector=False)).eval()
    randomize_experts(model)
    parts, _ = read_parts(model.get_base_model(), Options())
    fixed = {p.name: p for p in parts.fixed}
    assert sorted(fixed) == sorted(n for n, _ in model.base_model._moe_layers() if ".self_attn." in n)
    assert sorted(p.name for p in parts.routed) == sorted(n for n, _ in model.base_model._moe_layers() if ".mlp." in n)
    for name, part in fixed.items():
        layer = model.base_model.model.get_submodule(name)
        a, b = part.factors()
        torch.testing.assert_close(b @ a, part.delta())  # [out, r] @ [r, in]: the LoRA factors give the same delta
        torch.testing.assert_close(part.delta(), layer.get_delta_weight("default"))


def test_plain_lora_modules_field_checks():
    with pytest.raises(ValueError, match="plain_lora_modules"):
        moe_peft.MoLEConfig(plain_lora_modules=["q_proj", 3])
    config = moe_peft.MoLEConfig(target_modules=["q_proj", "gate_proj"], plain_lora_modules=["q_proj"])
    model = get_peft_model(tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1), config)
    kinds = {n.rsplit(".", 1)[-1]: "default" in m.plain_adapters for n, m in model.base_model._moe_layers()}
    assert kinds == {"q_proj": True, "gate_proj": False}


# -- data and collator --------------------------------------------------------------------------------------------
def test_bundled_tasks_are_seeded_balanced_and_answerable(tokenizer):
    a, b = make_image_tasks(24, seed=3), make_image_tasks(24, seed=3)
    assert [s["answer"] for s in a] == [s["answer"] for s in b]
    assert {s["task"] for s in a} == set(TASKS)
    for s in a:
        assert (s["modality"] == "image") == (s["task"] in IMAGE_TASKS) == bool(s["images"])
        assert (
            tokenizer.unk_token_id
            not in tokenizer(tokenizer.apply_chat_template(s["messages"], tokenize=False))["input_ids"]
        )
    rng = __import__("random").Random(0)
    left = make_sample("position", rng)
    import numpy as np

    pixels = np.asarray(left["images"][0]).astype(int)  # [H, W, 3]
    shape_columns = np.nonzero((np.abs(pixels - 128).sum(-1) > 0).any(0))[0]
    assert (shape_columns.max() < 8) == (left["answer"] == "left")  # the answer depends on the image


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_collator_labels_only_the_answer_and_the_model_accepts_the_batch(kind, tokenizer, tmp_path):
    processor = build_processor(kind, image_size=16, tokenizer=tokenizer)
    collator = LlavaCollator(processor)
    rows = make_image_tasks(8, seed=2)
    rows[0]["images"] = [rows[0]["images"][0].resize((32, 16))] if rows[0]["images"] else rows[0]["images"]
    image_row = next(i for i, r in enumerate(rows) if r["images"])
    path = tmp_path / "image.png"
    rows[image_row]["images"][0].save(path)
    rows[image_row] = {**rows[image_row], "images": [str(path)]}  # paths work too
    batch = collator(rows)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for i, row in enumerate(rows):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tokenizer.decode(labelled) == f"{row['answer']} </s>"
        assert (batch["labels"][i][batch["input_ids"][i] == image_id] == -100).all()
        assert bool((batch["input_ids"][i] == image_id).any()) == bool(row["images"])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    model = tiny(kind, tokenizer)
    with torch.no_grad():
        out = model(**batch)  # the image tokens match the image features (transformers checks)
    assert torch.isfinite(out.loss)


def test_collator_multi_turn_string_placeholders_and_errors(tokenizer):
    collator = LlavaCollator(build_processor("llava", image_size=16, tokenizer=tokenizer))
    image = make_sample("colour", __import__("random").Random(0))["images"][0]
    row = {
        "messages": [
            {"role": "user", "content": "<image> what colour is the shape ?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "what shape is it ?"},
            {"role": "assistant", "content": "circle"},
        ],
        "images": [image],
    }
    encoded = collator.encode(row)
    labels = [t for t in encoded["labels"] if t != -100]
    assert tokenizer.decode(labels) == "red </s> circle </s>"
    assert sum(t == tokenizer.convert_tokens_to_ids("<image>") for t in encoded["input_ids"]) == 16  # 4x4 patches
    listed = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the shape ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
        "images": [image],
    }
    assert (
        collator.encode(listed)["input_ids"] == collator.encode({**row, "messages": row["messages"][:2]})["input_ids"]
    )
    prompt = collator.generation_batch([listed, make_sample("add", __import__("random").Random(1))])
    assert "labels" not in prompt and (prompt["attention_mask"][:, -1] == 1).all()  # left padding
    assert tokenizer.decode(prompt["input_ids"][0][-2:]) == "ASSISTANT :"
    with pytest.raises(ValueError, match="2 images"):
        collator([{**listed, "images": [image, image]}])


def test_modality_load_averages_each_groups_load_over_the_layers(tokenizer):
    base = tiny("llava", tokenizer)
    model = get_peft_model(base, mole_llava_config(base, r=4, lora_alpha=8, modality_experts={"text": 2, "image": 3}))
    collator = LlavaCollator(build_processor("llava", image_size=16, tokenizer=tokenizer))
    with torch.no_grad():
        model(**collator(make_image_tasks(6, seed=0)))
    load = modality_load(model)
    layers = list(moe_peft.routing_stats(model).values())
    assert set(load) == {"text", "image"} and len(layers) == 2
    for name, size in (("text", 2), ("image", 3)):
        want = [sum(layer["groups"][name]["load"][e] for layer in layers) / 2 for e in range(size)]
        assert load[name]["load"] == pytest.approx(want) and sum(load[name]["load"]) == pytest.approx(1.0)
    assert load["image"]["tokens"] == 16 * 4  # four image rows of 16 image tokens (6 rows, 2 text-only)
    plain = get_peft_model(tiny("llava", tokenizer), mole_llava_config(r=4, lora_alpha=8))
    with torch.no_grad():
        plain(**collator(make_image_tasks(6, seed=0)))
    assert set(modality_load(plain)) == {"all"}


def _train_with_moe_sft_trainer(tokenizer, tmp_path, coef: float, groups=None) -> dict[str, torch.Tensor]:
    """Three steps of MoESFTTrainer (TRL) on a tiny LLaVA with the image+text collator; the router weights after."""
    from datasets import Dataset
    from trl import SFTConfig

    from moe_peft.train import MoESFTTrainer

    processor = build_processor("llava", image_size=16, tokenizer=tokenizer)
    base = tiny("llava", tokenizer)
    config = mole_llava_config(  # routers that train (top-1 freezes them by default): whether they move is checked
        base, r=4, lora_alpha=8, router_aux_loss_coef=coef, router_z_loss_coef=coef, modality_experts=groups,
        router_lr_ratio=1.0,
    )  # fmt: skip
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        save_strategy="no", bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
        remove_unused_columns=False, lr_scheduler_type="constant", logging_steps=1,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = MoESFTTrainer(
        model=get_peft_model(base, config),
        args=args,
        train_dataset=Dataset.from_list(make_image_tasks(12, seed=3)),
        data_collator=LlavaCollator(processor),
        processing_class=processor,
    )
    trainer.train()
    logged = [log for log in trainer.state.log_history if "router_loss" in log]
    assert len(logged) == 3 and all((log["router_loss"] > 0) == (coef > 0) for log in logged)  # the callback's log
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "router" in n}


@pytest.mark.parametrize("groups", [None, {"text": 2, "image": 2}], ids=["mole", "modality_groups"])
def test_moe_sft_trainer_adds_the_router_loss_on_llava(tokenizer, tmp_path, groups):
    # TRL computes its loss from fused log-probs and ignores outputs.loss: the routers move with the coefficient
    # only if MoESFTTrainer adds the router loss of the LLaVA forward
    off = _train_with_moe_sft_trainer(tokenizer, tmp_path, 0.0, groups)
    again = _train_with_moe_sft_trainer(tokenizer, tmp_path, 0.0, groups)
    on = _train_with_moe_sft_trainer(tokenizer, tmp_path, 1.0, groups)
    assert off and off.keys() == again.keys() == on.keys()
    assert all(torch.equal(off[n], again[n]) for n in off)  # deterministic, so a difference below is the loss
    assert not all(torch.equal(off[n], on[n]) for n in off)
