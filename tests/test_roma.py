"""RoMA's PEFT contract on tiny Mixtral and OLMoE models (Qwen3-MoE: detection and a no-op forward):
only routers train, the adapter saves only router weights, reloads in a fresh process, merges exactly,
disables cleanly; the regularizer's gradient reaches the router weights, with and without checkpointing."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from moe_peft.roma import Neighbours, RoMAConfig, RoMARouterLayer, alignment_loss, find_routers, routing_representation
from peft import PeftConfig, get_peft_model
from transformers import AutoModelForCausalLM

from moe_peft.bases import tiny_llama, tiny_moe

from .test_contract import n_hooks

ARCHS = ["mixtral", "olmoe"]
VOCAB, LAYERS, EXPERTS, HIDDEN = 64, 3, 4, 32


def make_base(arch: str = "mixtral", **kwargs):
    return tiny_moe(arch, vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_experts=EXPERTS, **kwargs)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # right padding in the last row
    labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def random_neighbours(batch_size: int, num_layers: int, k: int = 2, seed: int = 0) -> Neighbours:
    g = torch.Generator().manual_seed(seed)
    routing = torch.randn(batch_size, k, num_layers, EXPERTS, generator=g).softmax(-1)  # [B, k, L, E]
    return Neighbours(routing, torch.full((batch_size, k), 1.0 / k))


def perturb_routers(model, std: float = 0.5, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "roma_router" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)


def inputs_of(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# -- wiring ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS + ["qwen3_moe"])
def test_detection_wraps_the_last_moe_routers_and_starts_as_a_noop(arch, batch):
    base = make_base(arch)
    with torch.no_grad():
        ref = base(**inputs_of(batch)).logits
    model = get_peft_model(base, RoMAConfig(num_last_layers=2))
    layers = [n for n, m in model.named_modules() if isinstance(m, RoMARouterLayer)]
    assert layers == [f"base_model.model.model.layers.{i}.mlp.gate" for i in (1, 2)]
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"{n}.roma_router.default" for n in layers}
    assert model.get_nb_trainable_parameters()[0] == 2 * EXPERTS * HIDDEN  # L * E * hidden, by hand
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs_of(batch)).logits, ref, rtol=0, atol=0)


def test_layer_selection_and_explicit_names():
    base = make_base("mixtral")
    assert find_routers(base, RoMAConfig()) == [f"model.layers.{i}.mlp.gate" for i in range(LAYERS)]  # 5 > 3: all
    assert find_routers(base, RoMAConfig(layers=[0, 2])) == ["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]
    assert find_routers(base, RoMAConfig(target_routers=["mlp.gate"], num_last_layers=1)) == ["model.layers.2.mlp.gate"]
    assert find_routers(base, RoMAConfig(target_routers=r".*layers\.1\.mlp\.gate")) == ["model.layers.1.mlp.gate"]
    with pytest.raises(ValueError, match="layers=\\[7\\] selects none"):
        find_routers(base, RoMAConfig(layers=[7]))
    with pytest.raises(TypeError, match="without a 2-D `weight`"):
        find_routers(base, RoMAConfig(target_routers=["mlp"]))


def test_qwen3_moe_dense_layers_are_not_moe_layers():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=EXPERTS, num_experts_per_tok=2,
        decoder_sparse_step=2,
    )  # fmt: skip
    model = Qwen3MoeForCausalLM(config)
    assert find_routers(model, RoMAConfig()) == ["model.layers.1.mlp.gate", "model.layers.3.mlp.gate"]
    assert find_routers(model, RoMAConfig(num_last_layers=1)) == ["model.layers.3.mlp.gate"]


def test_unsupported_model_names_the_architectures_and_the_fix():
    with pytest.raises(ValueError, match="model_type='llama'") as err:
        get_peft_model(tiny_llama(), RoMAConfig())
    assert "mixtral (MixtralTopKRouter)" in str(err.value) and "target_routers=['mlp.gate']" in str(err.value)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(representation="first"), "representation"),
        (dict(num_neighbours=0), "num_neighbours"),
        (dict(sigma=0.0), "sigma"),
        (dict(kernel="rbf"), "kernel"),
        (dict(lambda_reg=-1.0), "lambda_reg"),
        (dict(lambda_warmup_steps=-5), "lambda_warmup_steps"),
        (dict(num_last_layers=0), "num_last_layers"),
        (dict(layers=[]), "layers"),
        (dict(target_routers=[]), "target_routers"),
        (dict(reference_refresh_steps=-1), "reference_refresh_steps"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid: "):
        RoMAConfig(**kwargs)


def test_config_round_trip_and_lambda_warmup(tmp_path):
    config = RoMAConfig(layers=[2], num_neighbours=3, lambda_warmup_steps=100)
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "ROMA" and "target_modules" not in raw
    raw["a_future_key"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RoMAConfig) and loaded.layers == [2] and loaded.num_neighbours == 3
    assert config.lambda_at(0) == pytest.approx(0.8 / 100) and config.lambda_at(99) == config.lambda_at(5000) == 0.8
    assert RoMAConfig(lambda_warmup_steps=0).lambda_at(0) == 0.8


# -- training --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_the_routers(arch, batch):
    base = make_base(arch)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, RoMAConfig(num_last_layers=2, lambda_warmup_steps=0))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        out = model(**batch)
        (out.loss + alignment_loss(model, random_neighbours(3, 2), step=step)).backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n].detach()) for n in before), "every tuned router must train"
    for k, v in model.get_base_model().state_dict().items():
        if "roma_router" not in k:
            assert torch.equal(v, base_state[k.replace(".base_layer", "")]), f"{k} changed"


@pytest.mark.parametrize("arch", ARCHS)
def test_the_regularizer_alone_reaches_the_router_weights(arch, batch):
    model = get_peft_model(make_base(arch), RoMAConfig(num_last_layers=2))
    model.train()
    model(**inputs_of(batch))
    reps = routing_representation(model)
    assert reps.shape == (3, 2, EXPERTS) and reps.requires_grad
    loss = alignment_loss(model, random_neighbours(3, 2))
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "roma_router" in n]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)
    # lambda_reg = 0 (plain router fine-tuning) contributes nothing
    model = get_peft_model(make_base(arch), RoMAConfig(num_last_layers=2, lambda_reg=0.0))
    model.train()
    model(**inputs_of(batch))
    alignment_loss(model, random_neighbours(3, 2)).backward()
    assert all(p.grad.abs().sum() == 0 for n, p in model.named_parameters() if "roma_router" in n)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_keeps_the_regularizer_gradient(reentrant, batch):
    model = get_peft_model(make_base("mixtral"), RoMAConfig(num_last_layers=2, lambda_warmup_steps=0))
    perturb_routers(model)
    reference = copy.deepcopy(model)
    neighbours = random_neighbours(3, 2)

    def grads(m, checkpointing, with_task_loss=True):
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            m.enable_input_require_grads()
        m.train()
        m.zero_grad()
        out = m(**batch)
        reg = alignment_loss(m, neighbours)
        (out.loss * with_task_loss + reg).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}, float(reg.detach())

    want, want_reg = grads(reference, checkpointing=False)
    got, got_reg = grads(model, checkpointing=True)
    assert want.keys() == got.keys() and got_reg == pytest.approx(want_reg)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    # the regularizer's own share is there: without it the gradient differs
    task_only = copy.deepcopy(reference)
    task_only.zero_grad()
    task_only.train()
    task_only(**batch).loss.backward()
    assert any(not torch.allclose(p.grad, want[n]) for n, p in task_only.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_keep_float32_router_copies(dtype, batch):
    base = make_base("mixtral").to(dtype)
    with torch.no_grad():
        ref = base(**inputs_of(batch)).logits
    model = get_peft_model(base, RoMAConfig(num_last_layers=2))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs_of(batch)).logits, ref, rtol=0, atol=0)
    model.train()
    out = model(**batch)
    assert routing_representation(model).dtype == torch.float32
    (out.loss + alignment_loss(model, random_neighbours(3, 2))).backward()


# -- adapter management, merging, generation -------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_disable_merge_unload_and_hooks(arch, batch):
    base = make_base(arch)
    hooks_before = n_hooks(base)
    with torch.no_grad():
        ref = base(**inputs_of(batch)).logits
    model = get_peft_model(base, RoMAConfig(num_last_layers=2)).eval()
    perturb_routers(model)
    with torch.no_grad():
        tuned = model(**inputs_of(batch)).logits
        assert not torch.allclose(tuned, ref)
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs_of(batch)).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(model(**inputs_of(batch)).logits, tuned, rtol=0, atol=0)
        model.merge_adapter()
        model.merge_adapter()  # idempotent: warns, does not merge twice
        torch.testing.assert_close(model(**inputs_of(batch)).logits, tuned, rtol=0, atol=0)  # a replacement: exact
        model.unmerge_adapter()
        torch.testing.assert_close(model(**inputs_of(batch)).logits, tuned, rtol=0, atol=0)
        merged = copy.deepcopy(model).merge_and_unload(safe_merge=True)
        torch.testing.assert_close(merged(**inputs_of(batch)).logits, tuned, rtol=0, atol=0)
        assert not any(isinstance(m, RoMARouterLayer) for m in merged.modules())
        assert n_hooks(merged) == hooks_before
        unloaded = model.unload()
        torch.testing.assert_close(unloaded(**inputs_of(batch)).logits, ref, rtol=0, atol=0)
    assert n_hooks(unloaded) == hooks_before, "unload must remove every hook it added"


def test_several_adapters_and_their_limits(batch):
    model = get_peft_model(make_base("mixtral"), RoMAConfig(num_last_layers=2)).eval()
    perturb_routers(model)
    with torch.no_grad():
        first = model(**inputs_of(batch)).logits
        model.add_adapter("other", RoMAConfig(num_last_layers=1))
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
        model.set_adapter("other")
        with model.disable_adapter():
            ref = model(**inputs_of(batch)).logits
        torch.testing.assert_close(model(**inputs_of(batch)).logits, ref)  # the new adapter starts as a no-op
        model.set_adapter("default")
        torch.testing.assert_close(model(**inputs_of(batch)).logits, first)
        model.base_model.set_adapter(["default", "other"])
        with pytest.raises(ValueError, match="each replaces the router weight"):
            model(**inputs_of(batch))
        model.base_model.set_adapter("default")
        with pytest.raises(ValueError, match="Cannot merge RoMA adapters"):
            model.merge_adapter(adapter_names=["default", "other"])
        model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())


def test_safe_merge_catches_nan():
    model = get_peft_model(make_base("mixtral"), RoMAConfig(num_last_layers=1))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "roma_router" in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)


def test_generate_with_kv_cache_leaves_no_hook(batch):
    model = get_peft_model(make_base("olmoe"), RoMAConfig(num_last_layers=2)).eval()
    perturb_routers(model)
    hooks = n_hooks(model)
    ids = batch["input_ids"][:2, :5]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**kwargs, use_cache=True)
        uncached = model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached, uncached)
    assert n_hooks(model) == hooks


# -- save / load -----------------------------------------------------------------------------------------
FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    import moe_peft  # registers the methods
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    root = sys.argv[1]
    ref = torch.load(f"{root}/ref.pt")
    inputs = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{root}/base"), f"{root}/adapter").eval()
    assert type(model.peft_config["default"]).__name__ == "RoMAConfig"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref["logits"]), "outputs differ after reload"
        if ref["task_type"]:
            auto = AutoPeftModelForCausalLM.from_pretrained(f"{root}/adapter").eval()
            assert torch.equal(auto(**inputs).logits, ref["logits"]), "AutoPeftModelForCausalLM differs"
        merged = model.merge_and_unload()
        assert torch.equal(merged(**inputs).logits, ref["logits"]), "merged outputs differ after reload"
    print("FRESH-PROCESS-OK")
    """
)


@pytest.mark.parametrize("arch,task_type", [("mixtral", None), ("olmoe", "CAUSAL_LM")])
def test_adapter_holds_only_router_weights_and_reloads_in_a_fresh_process(arch, task_type, tmp_path, batch):
    from safetensors.torch import load_file

    make_base(arch).save_pretrained(tmp_path / "base")
    config = RoMAConfig(num_last_layers=2, task_type=task_type)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config)
    perturb_routers(model, seed=3)
    model.eval()
    with torch.no_grad():
        logits = model(**inputs_of(batch)).logits
    model.save_pretrained(tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(weights) == [f"base_model.model.model.layers.{i}.mlp.gate.roma_router" for i in (1, 2)]
    assert all(w.shape == (EXPERTS, HIDDEN) and w.dtype == torch.float32 for w in weights.values())
    torch.save({"logits": logits, "task_type": task_type, **inputs_of(batch)}, tmp_path / "ref.pt")
    script = tmp_path / "reload.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert "FRESH-PROCESS-OK" in result.stdout, result.stderr[-3000:]


def test_zero3_leaf_blocks_reduce_after_the_router_gradient(batch):
    """DeepSpeed ZeRO-3 makes a sparse MoE block a leaf module (its default for Mixtral) and reduces the block's
    gradients in the block's full backward hook; with a frozen model below, the lowest tuned block's input needs no
    gradient, so that hook fires as soon as the block's output gradient arrives, before the router copy's gradient
    (DeepSpeed then stored an empty partition as its gradient). Marked as DeepSpeed marks a leaf's parameters, the RoMA
    model makes each such block's input require grad, so the hook fires after the copy's gradient; the gradients
    themselves are unchanged, and unload removes the hooks."""

    def run(mark: bool):
        base = make_base("mixtral")
        hooks_before = n_hooks(base)
        model = get_peft_model(base, RoMAConfig(num_last_layers=LAYERS, lambda_warmup_steps=0))
        perturb_routers(model)
        model.train()
        seen, handles = [], []
        for name, layer in model.named_modules():
            if isinstance(layer, RoMARouterLayer):
                block = model.get_submodule(name.rsplit(".", 1)[0])  # the MoE block holding the router
                copy_ = layer.roma_router["default"]
                if mark:
                    copy_.ds_z3_leaf_module = block  # what DeepSpeed sets on a leaf's parameters
                handles.append(block.register_full_backward_hook(lambda *_, p=copy_: seen.append(p.grad is not None)))
        out = model(**batch)
        (out.loss + alignment_loss(model, random_neighbours(3, LAYERS))).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        for h in handles:
            h.remove()
        model.unload()
        assert n_hooks(base) == hooks_before
        return seen, grads

    unmarked, want = run(mark=False)
    assert len(unmarked) == LAYERS and not all(unmarked)  # the failure: some block's hook fires before its gradient
    marked, got = run(mark=True)
    assert marked == [True] * LAYERS
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
