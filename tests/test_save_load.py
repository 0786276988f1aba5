"""Save -> load in a fresh Python process, several and selected adapters, AutoPeftModel, LLaVA, Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import moe_peft
from moe_peft.bases import tiny_llama, tiny_llava

from .conftest import MLP, make_config, randomize_experts

FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    import moe_peft  # registers the methods
    from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    root = sys.argv[1]
    ref = torch.load(f"{root}/ref.pt")
    inputs = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    config = PeftConfig.from_pretrained(f"{root}/adapter")
    assert type(config).__name__ == ref["config_cls"], type(config)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{root}/base"), f"{root}/adapter").eval()
    model.load_adapter(f"{root}/adapter/second", adapter_name="second")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref["default"]), "default adapter differs after reload"
        model.set_adapter("second")
        assert torch.equal(model(**inputs).logits, ref["second"]), "second adapter differs after reload"
        auto = AutoPeftModelForCausalLM.from_pretrained(f"{root}/adapter").eval()
        assert torch.equal(auto(**inputs).logits, ref["default"]), "AutoPeftModelForCausalLM differs"
    print("FRESH-PROCESS-OK")
    """
)


@pytest.mark.parametrize("case", ["mole_block", "mole_null", "loramoe", "smora"])
def test_save_and_reload_in_a_fresh_process(case, tmp_path, batch):
    tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, make_config(case, task_type="CAUSAL_LM"))
    model.add_adapter("second", make_config(case, task_type="CAUSAL_LM"))
    randomize_experts(model, seed=3)
    if case == "smora":
        with torch.no_grad():  # a non-zero selection bias must survive the round trip
            for _, layer in model.base_model._moe_layers():
                for router in layer.routers.values():
                    router.selection_bias.uniform_(-0.5, 0.5)
    model.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ref = {"default": model(**inputs).logits}
        model.set_adapter("second")
        ref["second"] = model(**inputs).logits
        model.set_adapter("default")
    model.save_pretrained(tmp_path / "adapter")
    saved = os.listdir(tmp_path / "adapter")
    assert "adapter_model.safetensors" in saved and "adapter_config.json" in saved and "second" in saved
    torch.save({**ref, **inputs, "config_cls": type(make_config(case)).__name__}, tmp_path / "ref.pt")
    script = tmp_path / "reload.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert "FRESH-PROCESS-OK" in result.stdout, result.stderr[-3000:]


def test_saved_adapter_holds_only_adapter_weights(tmp_path, base):
    from safetensors.torch import load_file

    model = get_peft_model(base, make_config("mole_block"))
    model.add_adapter("second", make_config("mole_block"))
    model.save_pretrained(tmp_path, selected_adapters=["second"])
    assert not (tmp_path / "adapter_model.safetensors").exists()
    weights = load_file(tmp_path / "second" / "adapter_model.safetensors")
    assert weights and all(("mole_A" in k or "mole_B" in k or "mole_router" in k) for k in weights)
    n_layers = 2 * len(MLP)
    assert sum("mole_A" in k for k in weights) == n_layers
    assert sum("mole_router" in k and k.endswith("weight") for k in weights) == 2  # one router per MLP block
    config = json.loads((tmp_path / "second" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOLE" and config["num_experts"] == 4


def test_llava_language_model_with_mole(tmp_path):
    model = tiny_llava()
    image_token = model.config.image_token_id
    ids = torch.tensor([[5, 6, image_token, image_token, image_token, image_token, 7, 8, 9]])
    pixels = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels).logits
    peft_model = get_peft_model(model, moe_peft.MoLEConfig(r=4, num_experts=3, target_modules=MLP))
    names = [n for n, _ in peft_model.base_model._moe_layers()]
    assert names and all("language_model" in n for n in names)  # CLIP's fc1/fc2 are not touched
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids, pixel_values=pixels).logits, ref)
    peft_model.train()
    out = peft_model(input_ids=ids, pixel_values=pixels, labels=ids)
    assert torch.isfinite(out.loss) and out.router_loss > 0
    out.loss.backward()
    randomize_experts(peft_model)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids, pixel_values=pixels).logits
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llava(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, pixel_values=pixels).logits, adapted)


@pytest.mark.parametrize("coef", [0.0, 0.5])
def test_router_loss_reaches_the_gradient_through_trainer(coef, tmp_path):
    from transformers import Trainer, TrainingArguments

    from moe_peft.data import CharTokenizer, Collator, make_dataset

    tokenizer = CharTokenizer()
    model = get_peft_model(
        tiny_llama(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48),
        make_config("mole_block", router_aux_loss_coef=coef, router_z_loss_coef=0.0),
    )
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        weight_decay=0.0,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        gradient_accumulation_steps=2,
        remove_unused_columns=False,
    )
    data = make_dataset(32, tokenizer=tokenizer).remove_columns(["task", "prompt", "completion", "sample_type"])
    Trainer(model=model, args=args, train_dataset=data, data_collator=Collator(tokenizer)).train()
    after = dict(model.named_parameters())
    moved = [n for n in routers if not torch.equal(routers[n], after[n].detach())]
    # one optimizer step over two accumulated micro-batches with B = 0: the task loss cannot reach the
    # routers, so they move if and only if the router loss reaches the gradient through Trainer
    if coef == 0.0:
        assert not moved, moved
    else:
        assert len(moved) == len(routers), "every router must receive the router-loss gradient"
