"""Mixed batches of PEFT LoRA adapters through the op (moe_peft.multi_lora): serving equals PEFT's own mixed-batch
forward and generate; training gives every adapter the gradient of training it alone on its samples; each adapter
saves to its own directory that plain PEFT loads in a process that never imports moe_peft."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from moe_peft import multi_lora
from moe_peft.bases import tiny_llama

from .conftest import VOCAB

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# adapters of different ranks, alphas, rsLoRA and target modules (the last ones only on some layers)
CONFIGS = [
    dict(r=4, lora_alpha=8, target_modules=ALL),
    dict(r=8, lora_alpha=4, use_rslora=True, target_modules=ALL),
    dict(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
    dict(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"]),
    dict(r=1, lora_alpha=3, target_modules=ALL),
    dict(r=6, lora_alpha=6, use_rslora=True, target_modules=["o_proj", "down_proj"]),
    dict(r=3, lora_alpha=12, target_modules=ALL),
    dict(r=5, lora_alpha=5, target_modules=["k_proj"]),
]


def make_model(n_adapters: int, seed: int = 0, **overrides):
    base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=seed)
    model = None
    for i in range(n_adapters):
        config = LoraConfig(**{**CONFIGS[i], **overrides}, init_lora_weights=False)  # random B: adapters differ
        torch.manual_seed(seed + 100 + i)
        if model is None:
            model = get_peft_model(base, config, adapter_name=f"ad{i}")
        else:
            model.add_adapter(f"ad{i}", config)
    return model.eval()


def mixed_batch(n_adapters: int, batch: int = 7, seq: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[4, :2] = 0
    names = [f"ad{i % n_adapters}" for i in range(batch)]
    names[2] = "__base__"
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels, names


@pytest.mark.parametrize("n_adapters", [2, 8])
def test_mixed_batch_equals_peft_and_runs_the_op(n_adapters, monkeypatch):
    model = make_model(n_adapters)
    ids, mask, _, names = mixed_batch(n_adapters, batch=max(7, n_adapters + 3))  # every adapter has a sample
    names[-1] = "ad1"
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits  # PEFT's loop
        multi_lora.enable(model)
        calls = []
        monkeypatch.setattr(LoraLinear, "_mixed_batch_forward", lambda *a, **k: calls.append(1))
        got = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        assert not calls  # every LoRA linear ran the op, not PEFT's per-adapter loop
        plain = model(input_ids=ids, attention_mask=mask).logits  # no adapter_names: PEFT's usual forward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (plain - want).abs().max() > 1e-2  # the adapters do change the output, so the comparison means something
    model.base_model.set_adapter("ad0")
    with torch.no_grad():
        single = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], single[0], rtol=1e-5, atol=1e-5)  # a row of ad0 = ad0 alone


def test_generate_with_cache_equals_peft():
    model = make_model(4)
    ids, mask, _, names = mixed_batch(4)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(**kwargs, adapter_names=names)
    want_beams = model.generate(**kwargs, adapter_names=names, num_beams=2)
    multi_lora.enable(model)
    torch.testing.assert_close(model.generate(**kwargs, adapter_names=names), want, rtol=0, atol=0)
    torch.testing.assert_close(model.generate(**kwargs, adapter_names=names, num_beams=2), want_beams, rtol=0, atol=0)
    multi_lora.disable(model)  # PEFT's own path again, same answers
    torch.testing.assert_close(model.generate(**kwargs, adapter_names=names), want, rtol=0, atol=0)


def test_errors_name_the_fix():
    model = make_model(2)
    ids, mask, _, names = mixed_batch(2)
    multi_lora.enable(model)
    with pytest.raises(ValueError, match=r"adapter\(s\) \['nope'\]"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["nope"] + names[1:])
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the input"):
        model(input_ids=ids, attention_mask=mask, adapter_names=names[:3])
    with pytest.raises(TypeError, match="one adapter name"):
        model(input_ids=ids, attention_mask=mask, adapter_names="ad0")
    model.train()
    with pytest.raises(ValueError, match=r"enable\(model, training=True\)"):
        model(input_ids=ids, attention_mask=mask, adapter_names=names)
    with pytest.raises(ValueError, match="backend must be one of"):
        multi_lora.enable(model, backend="cuda")
    with pytest.raises(ValueError, match=r"no adapter named \['zz'\]"):
        multi_lora.enable(model, training=True, adapters=["zz"])
    multi_lora.disable(model)
    with pytest.raises(ValueError, match="training mode"):  # PEFT's own refusal is back
        model(input_ids=ids, attention_mask=mask, adapter_names=names)


def alone_grads(model, adapter, ids, mask, labels, rows, checkpointing=False):
    """PEFT LoRA trained alone: only `adapter` active, its samples only, the model's own mean token loss."""
    alone = copy.deepcopy(model)
    multi_lora.disable(alone)
    alone.base_model.set_adapter(adapter)
    if checkpointing:
        alone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        alone.enable_input_require_grads()
    alone.train()
    out = alone(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in alone.named_parameters() if f".{adapter}." in n}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "reentrant-checkpointing"])
def test_training_gives_each_adapter_its_alone_gradient(checkpointing):
    model = make_model(4)
    ids, mask, labels, names = mixed_batch(4, batch=8)
    names[3], names[7] = "ad0", "ad1"  # ad3 has no sample in this batch
    reference = copy.deepcopy(model)
    multi_lora.enable(model, training=True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    model.train()
    out = model(input_ids=ids, attention_mask=mask, adapter_names=names)
    loss, report = multi_lora.per_adapter_loss(out, labels, names)
    loss.backward()
    assert set(report) == {"ad0", "ad1", "ad2", "__base__"}
    grads = dict(model.named_parameters())
    for adapter in ("ad0", "ad1", "ad2"):
        rows = [i for i, n in enumerate(names) if n == adapter]
        alone_loss, want = alone_grads(reference, adapter, ids, mask, labels, rows, checkpointing)
        torch.testing.assert_close(report[adapter], alone_loss, rtol=1e-5, atol=1e-6)
        assert want
        for name, grad in want.items():
            torch.testing.assert_close(grads[name].grad, grad, rtol=1e-4, atol=1e-7, msg=name)
    untouched = [p.grad for n, p in model.named_parameters() if ".ad3." in n]
    assert untouched and all(g is None for g in untouched)  # no sample, no gradient: AdamW does not step it
    for adapter in ("ad0", "ad3"):  # what per-adapter optimizers and clipping take
        want = {id(p) for n, p in model.named_parameters() if f".{adapter}." in n}
        assert {id(p) for p in multi_lora.adapter_parameters(model, adapter)} == want


def assert_dropout_only_on(model, ids, mask, names, adapter):
    """In training, two forwards differ on `adapter`'s samples only (its dropout), and the other samples equal
    the eval forward: dropout is per sample, with each adapter's own rate."""
    multi_lora.enable(model, training=True)
    with torch.no_grad():
        eval_out = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        model.train()
        first = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        second = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    own = [i for i, n in enumerate(names) if n == adapter]
    others = [i for i, n in enumerate(names) if n != adapter]
    assert (first[own] - second[own]).abs().max() > 1e-3  # the adapter's dropout acts on its samples
    torch.testing.assert_close(first[others], eval_out[others])  # and nowhere else


def test_dropout_is_per_sample_and_only_in_training():
    model = make_model(2)
    model.base_model.model.model.layers[0].mlp.up_proj.lora_dropout["ad1"] = torch.nn.Dropout(0.5)
    ids, mask, _, names = mixed_batch(2)
    assert_dropout_only_on(model, ids, mask, names, "ad1")


def test_save_each_adapter_and_load_with_plain_peft_in_a_fresh_process(tmp_path):
    model = make_model(3)
    ids, mask, _, names = mixed_batch(3)
    multi_lora.enable(model)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0).save_pretrained(
        tmp_path / "base"
    )  # the base of make_model (same seed)
    saved = multi_lora.save_adapters(model, str(tmp_path / "adapters"))
    assert sorted(saved) == ["ad0", "ad1", "ad2"]
    for name, path in saved.items():
        assert path == str(tmp_path / "adapters" / name)
        config = json.loads((tmp_path / "adapters" / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == CONFIGS[int(name[2:])]["r"]
    torch.save({"ids": ids, "mask": mask, "names": names, "logits": logits}, tmp_path / "expected.pt")
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM
            root = sys.argv[1]
            expected = torch.load(root + "/expected.pt")
            base = AutoModelForCausalLM.from_pretrained(root + "/base")
            for name in sorted(set(expected["names"]) - {"__base__"}):
                model = PeftModel.from_pretrained(base, root + "/adapters/" + name).eval()
                rows = [i for i, n in enumerate(expected["names"]) if n == name]
                with torch.no_grad():
                    got = model(input_ids=expected["ids"][rows], attention_mask=expected["mask"][rows]).logits
                torch.testing.assert_close(got, expected["logits"][rows], rtol=1e-5, atol=1e-5)
                base = model.unload()
            assert "moe_peft" not in sys.modules
            print("OK")
            """
        )
    )
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


def trainer_args(out, steps, **kw):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(out), max_steps=steps, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.05, train_sampling_strategy="sequential", logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    return TrainingArguments(**{**settings, **kw})


def tagged_rows(n: int, adapters: list[str]):
    from moe_peft.data import make_dataset

    data = make_dataset(n, seed=1)
    return data.add_column("adapter", [adapters[i % len(adapters)] for i in range(n)])


def test_trainer_trains_each_adapter_exactly_as_alone_logs_and_saves_per_adapter(tmp_path):
    from transformers import Trainer as HFTrainer

    from moe_peft.data import CharTokenizer, Collator

    collator = Collator(CharTokenizer())
    model = make_model(2)
    initial = copy.deepcopy(model)
    rows = tagged_rows(12, ["ad0", "ad1"])
    # SGD, not Adam: Adam's step does not change when a gradient is scaled, so it would hide a wrong loss
    # normalization (a batch mean halves each adapter's gradient here) or clipping of the adapters' joint norm
    sgd = dict(optim="sgd", learning_rate=0.5)
    trainer = multi_lora.Trainer(
        model=model, args=trainer_args(tmp_path / "multi", 3, per_device_train_batch_size=4, **sgd),
        train_dataset=rows, data_collator=collator,
    )  # fmt: skip
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(
        {"loss/ad0", "loss/ad1", "grad_norm/ad0", "grad_norm/ad1"} <= set(e) for e in logged
    )
    # each adapter's own loss: their sum is the Trainer's loss
    assert logged[0]["loss"] == pytest.approx(logged[0]["loss/ad0"] + logged[0]["loss/ad1"], abs=1e-3)
    assert max(e["grad_norm/ad0"] for e in logged) > 0.05  # clipping was active (max_grad_norm=0.05)
    for adapter in ("ad0", "ad1"):  # PEFT LoRA trained alone on its rows by transformers.Trainer
        alone = copy.deepcopy(initial)
        alone.delete_adapter("ad1" if adapter == "ad0" else "ad0")
        alone.set_adapter(adapter)
        own = rows.select([i for i, a in enumerate(rows["adapter"]) if a == adapter]).remove_columns("adapter")
        args = trainer_args(tmp_path / adapter, 3, per_device_train_batch_size=2, **sgd)
        HFTrainer(model=alone, args=args, train_dataset=own, data_collator=collator).train()
        want = {n: p for n, p in alone.named_parameters() if f".{adapter}." in n}
        got = dict(model.named_parameters())
        assert want
        for name, p in want.items():
            torch.testing.assert_close(got[name], p, rtol=1e-4, atol=1e-6, msg=name)
            assert not torch.equal(p, dict(initial.named_parameters())[name])  # it did train
    trainer.save_model(str(tmp_path / "saved"))
    for adapter in ("ad0", "ad1"):
        assert (tmp_path / "saved" / adapter / "adapter_model.safetensors").exists()


def test_trainer_resumes_every_adapter_from_its_checkpoint(tmp_path):
    from moe_peft.data import CharTokenizer, Collator

    collator = Collator(CharTokenizer())
    rows = tagged_rows(12, ["ad0", "ad1", "__base__"])
    start = make_model(2)
    finals = []
    for resume in (False, True):
        model = copy.deepcopy(start)
        out = tmp_path / ("resumed" if resume else "straight")
        kw = dict(per_device_train_batch_size=3)
        if resume:  # 2 steps with a checkpoint, then a new Trainer resumes it for the 3rd
            first = multi_lora.Trainer(
                model=model, args=trainer_args(out, 2, save_strategy="steps", save_steps=2, **kw),
                train_dataset=rows, data_collator=collator,
            )  # fmt: skip
            first.train()
            assert (out / "checkpoint-2" / "ad0" / "adapter_model.safetensors").exists()
            model = copy.deepcopy(start)  # fresh weights: everything must come from the checkpoint
            trainer = multi_lora.Trainer(
                model=model, args=trainer_args(out, 3, **kw), train_dataset=rows, data_collator=collator
            )
            trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
        else:
            multi_lora.Trainer(
                model=model, args=trainer_args(out, 3, **kw), train_dataset=rows, data_collator=collator
            ).train()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    for name in finals[0]:
        torch.testing.assert_close(finals[1][name], finals[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_trainer_rejects_a_dataset_without_or_with_unknown_adapters(tmp_path):
    from moe_peft.data import make_dataset

    model = make_model(2)
    with pytest.raises(ValueError, match="has no 'adapter' column"):
        multi_lora.Trainer(model=model, args=trainer_args(tmp_path, 1), train_dataset=make_dataset(4))
    with pytest.raises(ValueError, match=r"names \['ad7'\]"):
        multi_lora.Trainer(model=model, args=trainer_args(tmp_path, 1), train_dataset=tagged_rows(4, ["ad0", "ad7"]))


def test_bench_multi_times_every_candidate_and_checks_equality(monkeypatch):
    from moe_peft import cli
    from moe_peft.bench.multi import ModelShape, bench_model

    lines = []
    shape = ModelShape(hidden=32, intermediate=48, layers=1, heads=4, vocab=64, samples=4, seq=5)
    rows = bench_model(shape, [2, 8], torch.device("cpu"), torch.float32, 1, print_fn=lines.append)
    assert [(r["adapters"], r["mode"]) for r in rows] == [
        (n, m) for n in (2, 8) for m in ("fwd", "generate", "fwd+bwd")
    ]
    for row in rows:
        assert all(row[f"{c}_ms"] > 0 for c in ("ours", "peft", "separate"))
        assert ("base_ms" in row) == (row["mode"] != "fwd+bwd")
        assert row["max_diff"] < 1e-5  # ours equals PEFT's mixed batch on the benchmark's weights
    assert len(lines) == 1 + len(rows) and "peft/ours" in lines[0]
    called = {}
    monkeypatch.setattr("moe_peft.bench.bench_multi", lambda **kw: called.update(kw))
    cli.main(["bench", "multi", "--adapters", "2", "8", "--reps", "3"])  # registered in the CLI
    assert called == {"device": None, "reps": 3, "adapters": [2, 8]}


def test_embedding_lora_and_modules_to_save_take_peft_mixed_path_in_serving_and_training():
    """Modules the op does not cover (LoRA on embeddings, modules_to_save) run PEFT's own mixed-batch forward, in
    training too; the LoRA linears of the same batch still run the op."""
    base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
    config = dict(modules_to_save=["lm_head"], init_lora_weights=False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], **config), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj", "embed_tokens"], **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    model.eval()
    ids = torch.randint(4, VOCAB, (4, 6), generator=torch.Generator().manual_seed(1))
    names = ["a", "b", "__base__", "b"]
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=names).logits
    reference = copy.deepcopy(model)
    multi_lora.enable(model, training=True)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, adapter_names=names).logits, want, rtol=1e-5, atol=1e-5)
    model.train()
    loss, _ = multi_lora.per_adapter_loss(model(input_ids=ids, adapter_names=names), ids, names)
    loss.backward()
    reference.base_model.set_adapter("b")
    reference.train()
    reference(input_ids=ids[[1, 3]], labels=ids[[1, 3]]).loss.backward()
    grads = dict(model.named_parameters())
    compared = [n for n, p in reference.named_parameters() if p.grad is not None]
    assert any("embedding" in n for n in compared) and any("modules_to_save" in n for n in compared)
    for name, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_mixed_batch_runs_the_kernels_and_equals_peft():
    model = make_model(8).cuda().to(torch.bfloat16)
    ids, mask, labels, names = mixed_batch(8, batch=11, seq=24)
    ids, mask, labels = ids.cuda(), mask.cuda(), labels.cuda()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits.float()
        multi_lora.enable(model)
        got = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits.float()
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
    reference = copy.deepcopy(model)
    multi_lora.enable(model, training=True)
    model.train()
    loss, _ = multi_lora.per_adapter_loss(model(input_ids=ids, attention_mask=mask, adapter_names=names), labels, names)
    loss.backward()
    rows = [i for i, n in enumerate(names) if n == "ad1"]
    _, want_grads = alone_grads(reference, "ad1", ids, mask, labels, rows)
    grads = dict(model.named_parameters())
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name].grad.float(), grad.float(), rtol=5e-2, atol=5e-3, msg=name)


def test_trainer_gradient_accumulation_equals_one_big_batch_per_adapter(tmp_path):
    """Samples have different numbers of label tokens, so a mean of micro-batch means would differ: each adapter's
    loss is normalized by its label tokens over the whole accumulation window."""
    from moe_peft.data import CharTokenizer, Collator

    collator = Collator(CharTokenizer())
    rows = tagged_rows(16, ["ad0", "ad1"])
    start = make_model(2)
    finals = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = copy.deepcopy(start)
        args = trainer_args(
            tmp_path / f"ga{accumulation}", 2, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
        )  # fmt: skip
        multi_lora.Trainer(model=model, args=args, train_dataset=rows, data_collator=collator).train()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    for name in finals[0]:
        torch.testing.assert_close(finals[1][name], finals[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_adapters_added_after_enable_on_new_modules_are_covered():
    model = make_model(2)
    multi_lora.enable(model)
    model.add_adapter("late", LoraConfig(r=3, target_modules=["lm_head"], init_lora_weights=False))  # a new LoRA module
    model.eval()
    reference = copy.deepcopy(model)
    multi_lora.disable(reference)
    ids, mask, _, names = mixed_batch(2)
    names[0] = names[5] = "late"
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        want = reference(input_ids=ids, attention_mask=mask, adapter_names=names).logits  # PEFT's loop
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_save_adapters_puts_the_default_adapter_in_its_own_directory_too(tmp_path):
    base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))  # adapter "default"
    model.add_adapter("b", LoraConfig(r=4, target_modules=["v_proj"]))
    saved = multi_lora.save_adapters(model, str(tmp_path))
    assert saved == {"default": str(tmp_path / "default"), "b": str(tmp_path / "b")}
    for name, r in (("default", 2), ("b", 4)):
        assert json.loads((tmp_path / name / "adapter_config.json").read_text())["r"] == r
    assert not (tmp_path / "adapter_config.json").exists()
    with pytest.raises(ValueError, match=r"\['c'\] not loaded"):
        multi_lora.save_adapters(model, str(tmp_path), adapters=["c"])
