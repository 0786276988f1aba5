"""Resuming a Trainer run from a checkpoint: adapter weights, router state (SMoRA's selection biases), optimizer and
scheduler state and the data order come back, so the losses after the resume equal the uninterrupted run's."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import moe_peft
from moe_peft.bases import char_tokenizer, tiny_llama
from moe_peft.data import make_samples

from .conftest import MLP

STEPS, SAVE_AT = 6, 3


def _config(method: str):
    if method == "smora":  # a large update rate: the biases move visibly within 3 steps
        return moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP, bias_update_rate=1e-2, task_type="CAUSAL_LM")
    return moe_peft.MoLEConfig(
        r=4,
        num_experts=4,
        top_k=1,
        target_modules=MLP,
        router_z_loss_coef=1e-2,
        lora_dropout=0.1,
        task_type="CAUSAL_LM",
    )  # dropout: the RNG state must come back too


def _model(tok, method):
    base = tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
    torch.manual_seed(0)
    return get_peft_model(base, _config(method))


def _state(model) -> dict[str, torch.Tensor]:
    """Trainable weights and routing buffers."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out.update({n: b.detach().clone() for n, b in model.named_buffers() if "selection_bias" in n})
    return out


def _losses(trainer) -> dict[int, float]:
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def rows(tok):
    samples = make_samples(48, ("rev", "srt", "cpy"), seed=0)
    encoded = [tok(s["prompt"] + s["completion"]) for s in samples]
    return Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in encoded])


def _collate(features):
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _trainer(model, rows, out):
    args = TrainingArguments(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=5e-3, lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_steps=SAVE_AT,
        save_strategy="steps", report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=rows, data_collator=_collate)


@pytest.mark.parametrize("method", ["mole", "smora"])
def test_resumed_run_continues_exactly_as_the_uninterrupted_one(tok, rows, tmp_path, method):
    whole = _trainer(_model(tok, method), rows, str(tmp_path / "whole"))
    whole.train()
    want_losses, want_state = _losses(whole), _state(whole.model)
    checkpoint = os.path.join(tmp_path / "whole", f"checkpoint-{SAVE_AT}")
    assert os.path.isdir(checkpoint)

    # a new process would start from a fresh model: here a fresh model with other initial weights
    resumed = _trainer(_model(tok, method), rows, str(tmp_path / "resumed"))
    with torch.no_grad():
        for p in resumed.model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # so that nothing but the checkpoint can give the right weights
    resumed.train(resume_from_checkpoint=checkpoint)
    got_losses, got_state = _losses(resumed), _state(resumed.model)

    assert sorted(got_losses) == list(range(1, STEPS + 1))  # steps 1-3 come back from the checkpoint's log
    for step, loss in got_losses.items():
        assert loss == pytest.approx(want_losses[step], rel=1e-5, abs=1e-6), (step, loss, want_losses[step])
    assert got_state.keys() == want_state.keys()
    for name, value in want_state.items():
        torch.testing.assert_close(got_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    if method == "smora":
        biases = [v for n, v in want_state.items() if "selection_bias" in n]
        assert biases and all(b.abs().max() > 0 for b in biases)  # the router state moved and came back


# TRL turns gradient checkpointing on by default: on here. (It raised a CheckpointError for SMoRA before the routing
# statistics probe ran under no_grad: the first forward saved the probe's tensors, the recomputation did not.)
GC, METHOD = True, "smora"


def test_moe_sft_trainer_resumes_exactly(tok, tmp_path):
    """The same with TRL's SFTTrainer subclass (moe_peft.MoESFTTrainer): prompt/completion rows, its own loss."""
    from trl import SFTConfig

    from moe_peft.train import MoESFTTrainer

    samples = make_samples(48, ("rev", "srt", "cpy"), seed=0)
    data = Dataset.from_list([{"prompt": s["prompt"], "completion": s["completion"]} for s in samples])

    def trainer(out):
        args = SFTConfig(
            output_dir=out, max_steps=STEPS, per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1,
            save_steps=SAVE_AT, save_strategy="steps", report_to=[], use_cpu=True, seed=0, data_seed=0,
            disable_tqdm=True, max_length=64, bf16=False, gradient_checkpointing=GC,
        )  # fmt: skip
        return MoESFTTrainer(model=_model(tok, METHOD), args=args, train_dataset=data, processing_class=tok)

    whole = trainer(str(tmp_path / "whole"))
    whole.train()
    resumed = trainer(str(tmp_path / "resumed"))
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path / "whole", f"checkpoint-{SAVE_AT}"))
    want, got = _losses(whole), _losses(resumed)
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    for name, value in _state(whole.model).items():
        torch.testing.assert_close(_state(resumed.model)[name], value, rtol=1e-5, atol=1e-6, msg=name)
