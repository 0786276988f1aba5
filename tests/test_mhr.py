"""MHR / Poly: the PEFT contract (testing.md) for every mode, Poly equivalence against PEFT itself, exact task
merge and export, task_ids through every wrapper."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from moe_peft.mhr import MHRLinear
from peft import PeftModel, PolyConfig, get_peft_model
from transformers import AutoModelForCausalLM

import moe_peft
from moe_peft.bases import tiny_llama

from .conftest import MLP, VOCAB, checkpointed_grads
from .test_contract import n_hooks

N_TASKS = 3
TASKS = torch.tensor([2, 0, 1])  # one task id per row of conftest.batch


def mhr_config(case: str, **overrides) -> moe_peft.MHRConfig:
    """The MHR cases every contract test runs over (one row per mode / head layout)."""
    cases = {
        "poly": dict(n_splits=1),
        "mhr": dict(n_splits=4, target_modules=MLP + ["q_proj"]),
        "mhr_det": dict(n_splits=2, relaxed_bernoulli=False),
        "mhr_z": dict(n_splits=2, mode="mhr_z"),
        "mhr_mu": dict(n_splits=2, mode="mhr_mu", n_skills=1),
    }
    kwargs = dict(r=4, n_tasks=N_TASKS, n_skills=3, target_modules=MLP, lora_alpha=2.0)
    kwargs.update(cases[case])
    kwargs.update(overrides)
    return moe_peft.MHRConfig(**kwargs)


CASES = ["poly", "mhr", "mhr_det", "mhr_z", "mhr_mu"]


def randomize(model, seed: int = 1, std: float = 0.2) -> None:
    """Non-zero B and routing logits, as after multi-task training (B = 0 and Z ~ 0 at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mhr_B." in name or "task_logits" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 if "task_logits" in name else std))


def inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def expected_trainable(model, config) -> int:
    """Hand count per adapted linear: skills S*r*(in+out) (frozen in mhr_z) + routing n_tasks*H*S (none in mhr_mu)."""
    total = 0
    for _, layer in model.base_model.layers():
        skills = config.n_skills * config.r * (layer.in_features + layer.out_features)
        routing = config.n_tasks * config.n_splits * config.n_skills
        total += {"mhr": skills + routing, "mhr_z": routing, "mhr_mu": skills}[config.mode]
    return total


@pytest.mark.parametrize("case", CASES)
def test_wiring_counts_and_noop_at_init(case, base, batch):
    with torch.no_grad():
        ref = base(**inputs(batch)).logits
    config = mhr_config(case, exclude_modules=["model.layers.1.mlp.down_proj"])
    model = get_peft_model(base, config)
    names = [n for n, _ in model.base_model.layers()]
    assert "model.layers.1.mlp.down_proj" not in names and "model.layers.0.mlp.down_proj" in names
    assert len(names) == 2 * len(config.target_modules) - 1
    assert model.get_nb_trainable_parameters()[0] == expected_trainable(model, config)
    with torch.no_grad():
        out = model(**inputs(batch), task_ids=TASKS).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # B = 0: a fresh adapter is a no-op


@pytest.mark.parametrize("case", CASES)
def test_training_changes_only_the_adapter(case, base, batch):
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, mhr_config(case))
    randomize(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(moe_peft.mhr.param_groups(model, lr=0.5, router_lr=5.0), lr=0.5)
    for _ in range(3):
        model(**batch, task_ids=TASKS).loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in trainable), n  # only adapter parameters get gradients
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == trainable, changed ^ trainable  # every trainable part moved, nothing else did
    frozen_skills = case == "mhr_z"
    assert any(".mhr_A." in n for n in changed) != frozen_skills
    assert any("task_logits" in n for n in changed) == (case != "mhr_mu")
    for k, v in model.get_base_model().state_dict().items():
        key = k.replace(".base_layer", "")
        if key in base_state:
            assert torch.equal(v, base_state[key]), f"base weight {k} changed"


@pytest.mark.parametrize("case", ["poly", "mhr", "mhr_z"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_keeps_every_gradient(case, reentrant, base, batch):
    model = get_peft_model(base, mhr_config(case))
    randomize(model)

    def loss(m):
        torch.manual_seed(0)  # the same relaxed-Bernoulli noise (checkpointing replays the RNG state)
        return m(**batch, task_ids=TASKS).loss

    got = checkpointed_grads(model, reentrant, loss)
    assert all(got[n].abs().sum() > 0 for n in got if "task_logits" in n)


FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    import moe_peft  # registers the methods
    from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    root = sys.argv[1]
    ref = torch.load(f"{root}/ref.pt")
    for case, want in ref["cases"].items():
        path = f"{root}/{case}"
        config = PeftConfig.from_pretrained(path)
        assert type(config).__name__ == "MHRConfig" and config.mode == want["mode"], (case, config)
        assert config.n_tasks == want["n_tasks"], (case, config.n_tasks)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{root}/base"), path).eval()
        model.load_adapter(f"{path}/second", adapter_name="second")
        with torch.no_grad():
            out = model(**ref["inputs"], task_ids=want["task_ids"]).logits
            assert torch.equal(out, want["default"]), f"{case}: default adapter differs after reload"
            model.set_adapter("second")
            out = model(**ref["inputs"], task_ids=want["task_ids"]).logits
            assert torch.equal(out, want["second"]), f"{case}: second adapter differs after reload"
            auto = AutoPeftModelForCausalLM.from_pretrained(path).eval()
            out = auto(**ref["inputs"], task_ids=want["task_ids"]).logits
            assert torch.equal(out, want["default"]), f"{case}: AutoPeftModelForCausalLM differs"
        trainable = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{root}/base"), path, is_trainable=True)
        names = {n for n, p in trainable.named_parameters() if p.requires_grad}
        assert names and all(("task_logits" in n) == (want["mode"] == "mhr_z") or want["mode"] == "mhr" for n in names)
    print("FRESH-PROCESS-OK")
    """
)


def test_save_and_reload_in_a_fresh_process(tmp_path, batch):
    """Every mode, two adapters each, plus an adapter switched to MHR-z with a new task: one fresh process."""
    tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2).save_pretrained(tmp_path / "base")
    cases = {}
    for case in ["poly", "mhr", "mhr_z", "mhr_mu", "switched_z"]:
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        config_case = "mhr" if case == "switched_z" else case
        model = get_peft_model(base, mhr_config(config_case, task_type="CAUSAL_LM"))
        model.add_adapter("second", mhr_config(config_case, task_type="CAUSAL_LM"))
        randomize(model, seed=3)
        task_ids = TASKS
        if case == "switched_z":
            for adapter in ("default", "second"):
                moe_peft.mhr.set_mode(model, "mhr_z", add_tasks=1, adapter_name=adapter)
            randomize(model, seed=4)
            task_ids = torch.tensor([3, 0, 3])  # the added task
        model.eval()
        with torch.no_grad():
            want = {"default": model(**inputs(batch), task_ids=task_ids).logits}
            model.set_adapter("second")
            want["second"] = model(**inputs(batch), task_ids=task_ids).logits
            model.set_adapter("default")
        config = model.peft_config["default"]
        cases[case] = {**want, "task_ids": task_ids, "mode": config.mode, "n_tasks": config.n_tasks}
        model.save_pretrained(tmp_path / case)
    model.save_pretrained(tmp_path / "selected", selected_adapters=["second"])
    assert (tmp_path / "selected" / "second" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "selected" / "adapter_model.safetensors").exists()
    torch.save({"cases": cases, "inputs": inputs(batch)}, tmp_path / "ref.pt")
    script = tmp_path / "reload.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert "FRESH-PROCESS-OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("case", ["poly", "mhr_mu"])
def test_adapter_management(case, base, batch):
    with torch.no_grad():
        ref = base(**inputs(batch)).logits
    hooks_before = n_hooks(base)
    model = get_peft_model(base, mhr_config(case))
    randomize(model)
    model.eval()
    with torch.no_grad():
        adapted = model(**inputs(batch), task_ids=TASKS).logits
        assert not torch.allclose(adapted, ref)
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs(batch)).logits, ref)  # no task_ids needed when disabled
        torch.testing.assert_close(model(**inputs(batch), task_ids=TASKS).logits, adapted)
        model.add_adapter("other", mhr_config(case))
        model.set_adapter("other")
        torch.testing.assert_close(model(**inputs(batch), task_ids=TASKS).logits, ref)  # new adapter: a no-op
        model.set_adapter("default")
        torch.testing.assert_close(model(**inputs(batch), task_ids=TASKS).logits, adapted)
        model.delete_adapter("other")
        assert not any(".other" in n for n, _ in model.named_parameters())
        assert all("other" not in layer.mhr_config for _, layer in model.base_model.layers())
        unloaded = model.unload()
        torch.testing.assert_close(unloaded(**inputs(batch)).logits, ref)
    assert not any(isinstance(m, MHRLinear) for m in unloaded.modules())
    assert n_hooks(unloaded) == hooks_before and "generate" not in unloaded.__dict__, "unload must remove its hooks"


def test_missing_malformed_and_out_of_range_task_ids(base, batch):
    model = get_peft_model(base, mhr_config("mhr", task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"task_ids is missing: .* pass task_ids=<LongTensor \[batch\]>"):
        model(**inputs(batch))
    with pytest.raises(ValueError, match=r"task_ids=\[2, 0, 3\] is out of range .*n_tasks=3: use ids in \[0, 3\)"):
        model(**inputs(batch), task_ids=torch.tensor([2, 0, 3]))
    with pytest.raises(ValueError, match="out of range"):
        model(**inputs(batch), task_ids=torch.tensor([2, -1, 0]))
    with pytest.raises(ValueError, match="one integer task id per sample"):
        model(**inputs(batch), task_ids=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="task_ids has 2 entries but .* batch size 3"):
        model(**inputs(batch), task_ids=torch.tensor([0, 1]))


def test_task_ids_reach_the_layers_through_every_wrapper(base, batch):
    """PeftModel (no task type), PeftModelForCausalLM (PEFT drops task_ids for non-Poly types unless moe_peft
    re-routes them), the tuner itself, and a plain list."""
    plain = get_peft_model(base, mhr_config("mhr"))
    causal = get_peft_model(tiny_llama(VOCAB, 32, 2, 48), mhr_config("mhr", task_type="CAUSAL_LM"))
    assert type(causal).__name__ == "PeftModelForCausalLM"
    randomize(plain), randomize(causal)  # same seed, same parameter names: same weights
    plain.eval(), causal.eval()
    with torch.no_grad():
        want = plain(**inputs(batch), task_ids=TASKS).logits
        assert torch.equal(causal(**inputs(batch), task_ids=TASKS).logits, want)
        assert torch.equal(causal.base_model(**inputs(batch), task_ids=TASKS).logits, want)
        assert torch.equal(plain(**inputs(batch), task_ids=TASKS.tolist()).logits, want)
        other = causal(**inputs(batch), task_ids=torch.tensor([1, 1, 1])).logits
    assert not torch.allclose(other, want)  # the ids matter


def test_task_ids_through_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from moe_peft.data import TASKS as TASK_NAMES
    from moe_peft.data import CharTokenizer, Collator, make_dataset

    tokenizer = CharTokenizer()
    names = sorted(TASK_NAMES)
    model = get_peft_model(
        tiny_llama(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48),
        moe_peft.MHRConfig(r=2, n_tasks=len(names), n_skills=2, target_modules=MLP, task_type="CAUSAL_LM"),
    )
    randomize(model)
    collate = Collator(tokenizer)

    def collator(rows):  # task ids from the task names
        return {**collate(rows), "task_ids": torch.tensor([names.index(r["task"]) for r in rows])}

    logits = {n: p.detach().clone() for n, p in model.named_parameters() if "task_logits" in n}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=8,
        learning_rate=1e-1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
    )
    Trainer(model=model, args=args, train_dataset=make_dataset(16, tokenizer=tokenizer), data_collator=collator).train()
    moved = [n for n, p in model.named_parameters() if n in logits and not torch.equal(p.detach(), logits[n])]
    assert moved, "the routing logits of the batch's tasks must train through Trainer"


@pytest.mark.parametrize("n_splits", [1, 4])
@pytest.mark.parametrize("source", ["peft_model", "directory"])
def test_poly_adapter_imports_with_equal_outputs(n_splits, source, tmp_path, batch):
    """A real PEFT PolyConfig adapter (randomized weights) converted into ours gives PEFT Poly's outputs."""
    torch.manual_seed(0)
    poly = get_peft_model(
        tiny_llama(VOCAB, 32, 2, 48),
        PolyConfig(
            r=4, n_tasks=N_TASKS, n_skills=3, n_splits=n_splits, target_modules=MLP + ["q_proj"], task_type="CAUSAL_LM"
        ),
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in poly.named_parameters():
            if "poly_" in name:  # randomized skills and routing, not the init
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "module_logits" in name else 0.3))
    if source == "directory":
        poly.save_pretrained(tmp_path)
    ours = moe_peft.import_poly_adapter(tiny_llama(VOCAB, 32, 2, 48), tmp_path if source == "directory" else poly)
    assert isinstance(ours.base_model, moe_peft.MHRModel) and ours.peft_config["default"].n_splits == n_splits
    poly.eval(), ours.eval()
    with torch.no_grad():
        want = poly(**inputs(batch), task_ids=TASKS).logits
        got = ours(**inputs(batch), task_ids=TASKS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # training mode: the same relaxed-Bernoulli samples from the same RNG state give the same outputs too
    poly.train(), ours.train()
    torch.manual_seed(7)
    want = poly(**inputs(batch), task_ids=TASKS).logits
    torch.manual_seed(7)
    got = ours(**inputs(batch), task_ids=TASKS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_importing_something_else_than_poly_is_refused(base):
    from peft import LoraConfig

    lora = get_peft_model(tiny_llama(VOCAB, 32, 2, 48), LoraConfig(r=2, target_modules=MLP))
    with pytest.raises(ValueError, match="peft_type POLY"):
        moe_peft.import_poly_adapter(base, lora)


def _rows_of_task(batch, task: int):
    return inputs(batch), torch.full((batch["input_ids"].shape[0],), task)


@pytest.mark.parametrize("case", ["mhr", "mhr_z", "mhr_mu"])
def test_exact_task_merge_and_export_as_plain_peft_lora(case, base, batch, tmp_path):
    model = get_peft_model(base, mhr_config(case, task_type="CAUSAL_LM"))
    randomize(model)
    model.eval()
    task = 1
    x, task_ids = _rows_of_task(batch, task)
    with torch.no_grad():
        routed = model(**x, task_ids=task_ids).logits
        key = None if case == "mhr_mu" else task
        moe_peft.mhr.export_task_lora(model, key, tmp_path / "lora")
        moe_peft.mhr.merge_task(model, key, unload=False)
        moe_peft.mhr.merge_task(model, key, unload=False)  # idempotent: warns, does not merge twice
        torch.testing.assert_close(model(**x).logits, routed, rtol=1e-5, atol=1e-5)  # merged: no task_ids needed
        model.unmerge_adapter()
        torch.testing.assert_close(model(**x, task_ids=task_ids).logits, routed, rtol=1e-5, atol=1e-5)
        merged = moe_peft.mhr.merge_task(model, key, safe_merge=True)
        torch.testing.assert_close(merged(**x).logits, routed, rtol=1e-5, atol=1e-5)
        lora = PeftModel.from_pretrained(tiny_llama(VOCAB, 32, 2, 48), tmp_path / "lora").eval()
        assert type(lora.peft_config["default"]).__name__ == "LoraConfig"
        torch.testing.assert_close(lora(**x).logits, routed, rtol=1e-5, atol=1e-5)


def test_merge_without_a_task_is_refused_with_the_fix(base):
    model = get_peft_model(base, mhr_config("mhr"))
    randomize(model)
    with pytest.raises(ValueError, match=r"routes per task \(n_tasks=3\).*moe_peft.mhr.merge_task"):
        model.merge_and_unload()
    assert any(isinstance(m, MHRLinear) for m in model.modules())  # nothing was changed by the refused merge
    with pytest.raises(ValueError, match=r"task_id=5 is out of range"):
        moe_peft.mhr.merge_task(model, 5)
    single = get_peft_model(tiny_llama(VOCAB, 32, 2, 48), mhr_config("mhr", n_tasks=1))
    single.merge_and_unload()  # one task: the adapter is one LoRA


def test_safe_merge_catches_nan(base):
    model = get_peft_model(base, mhr_config("poly"))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.mhr_B["default"].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected"):
        moe_peft.mhr.merge_task(model, 0, safe_merge=True)


def test_mode_switches(base, batch):
    model = get_peft_model(base, mhr_config("mhr"))
    randomize(model)
    model.eval()
    with torch.no_grad():
        before = model(**inputs(batch), task_ids=TASKS).logits
    # MHR-z with a new task: only routing trains; the old tasks are untouched
    moe_peft.mhr.set_mode(model, "mhr_z", add_tasks=2)
    config = model.peft_config["default"]
    assert config.mode == "mhr_z" and config.n_tasks == N_TASKS + 2
    assert model.get_nb_trainable_parameters()[0] == expected_trainable(model, config)
    assert all("task_logits" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs(batch), task_ids=TASKS).logits, before)
        model(**inputs(batch), task_ids=torch.tensor([3, 4, 0]))  # the new ids are valid
    # back to MHR: the skills train again
    moe_peft.mhr.set_mode(model, "mhr")
    assert any(".mhr_A." in n for n, p in model.named_parameters() if p.requires_grad)
    # MHR-mu: the skills averaged into one LoRA = uniform routing of the skills, no task_ids needed
    with torch.no_grad():
        for _, layer in model.base_model.layers():
            layer.mhr_router["default"].task_logits.zero_()  # uniform routing: what MHR-mu collapses to
        uniform = model(**inputs(batch), task_ids=TASKS).logits
    moe_peft.mhr.set_mode(model, "mhr_mu")
    config = model.peft_config["default"]
    assert config.mode == "mhr_mu" and config.n_skills == 1
    assert model.get_nb_trainable_parameters()[0] == expected_trainable(model, config)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs(batch)).logits, uniform, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be recovered"):
        moe_peft.mhr.set_mode(model, "mhr")
    with pytest.raises(ValueError, match=r"mode='bogus' is invalid"):
        moe_peft.mhr.set_mode(model, "bogus")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(r=0), "r"),
        (dict(n_tasks=0), "n_tasks"),
        (dict(mode="mhr_q"), "mode"),
        (dict(mode="mhr_mu", n_skills=4), "n_skills"),
        (dict(lora_alpha=0), "lora_alpha"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid: "):
        moe_peft.MHRConfig(target_modules=MLP, **kwargs)


def test_n_splits_must_divide_the_features(base):
    with pytest.raises(
        ValueError, match=r"n_splits=5 is invalid for adapter 'default': .*model.layers.0.mlp.gate_proj"
    ):
        get_peft_model(base, mhr_config("poly", n_splits=5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype, base, batch):
    model = get_peft_model(base.to(dtype), mhr_config("mhr"))
    randomize(model)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, f"adapter weight {n} must stay float32"
    model.train()
    out = model(**batch, task_ids=TASKS)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    router = model.base_model.model.model.layers[0].mlp.up_proj.mhr_router["default"]
    assert router(TASKS).dtype == torch.float32


def test_generate_with_task_ids_and_no_hook_left_behind(base, batch):
    model = get_peft_model(base, mhr_config("mhr", task_type="CAUSAL_LM"))
    randomize(model)
    model.eval()
    hooks = n_hooks(model)
    ids = batch["input_ids"][:2, :5]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**kwargs, task_ids=torch.tensor([0, 2]), use_cache=True)
        uncached = model.generate(**kwargs, task_ids=torch.tensor([0, 2]), use_cache=False)
        assert torch.equal(cached, uncached)
        beams = model.generate(**kwargs, task_ids=torch.tensor([0, 2]), num_beams=2)  # ids follow the beams
        assert beams.shape[0] == 2
        with pytest.raises(ValueError, match="task_ids is missing"):
            model.generate(**kwargs)
    assert n_hooks(model) == hooks
    assert model.base_model.task_state.sticky is None


def test_registered_with_peft_and_unknown_config_keys_still_load(base, tmp_path):
    import json

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType

    for name, config_cls, model_cls, prefix in [
        ("MHR", moe_peft.MHRConfig, moe_peft.MHRModel, "mhr_"),
        ("PHATGOOSE", moe_peft.PhatgooseConfig, moe_peft.PhatgooseModel, "phatgoose_"),
    ]:
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(name)] is config_cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType(name)] is model_cls
        assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType(name)] == prefix
    model = get_peft_model(base, mhr_config("mhr"))
    randomize(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "a_key_from_the_future": 1}))
    reloaded = PeftModel.from_pretrained(tiny_llama(VOCAB, 32, 2, 48), tmp_path).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(
            reloaded(**{"input_ids": torch.tensor([[5, 6, 7]])}, task_ids=[1]).logits,
            model(**{"input_ids": torch.tensor([[5, 6, 7]])}, task_ids=[1]).logits,
        )
