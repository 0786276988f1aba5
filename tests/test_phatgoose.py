"""PHATGOOSE: gate training, assembling a library of plain PEFT LoRA experts, routing, baselines, the PEFT contract."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from moe_peft.phatgoose import PhatgooseLinear
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import moe_peft
from moe_peft.bases import tiny_llama

from .conftest import MLP, VOCAB, train_mode
from .test_contract import n_hooks

TARGETS = MLP + ["q_proj"]
# name -> LoRA options: different ranks and scalings (rsLoRA too), so padding and per-expert scaling are exercised
EXPERTS = {
    "e0": dict(r=4, lora_alpha=8),
    "e1": dict(r=2, lora_alpha=4, use_rslora=True),
    "e2": dict(r=4, lora_alpha=16),
}


def small_base(seed: int = 0):
    return tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=seed)


def save_expert(path, seed: int, gates: bool = True, base=None, targets=TARGETS, **lora) -> str:
    """A plain PEFT LoRA expert with random weights (and random gates next to it), as PEFT saves it."""
    torch.manual_seed(seed)
    model = get_peft_model(
        base or small_base(), LoraConfig(target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM", **lora)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.save_pretrained(path)
    if gates:
        g = torch.Generator().manual_seed(seed + 100)
        layers = moe_peft.tuners.phatgoose.gates.lora_layers(model, "default")
        moe_peft.phatgoose.save_gates({n: torch.randn(m.in_features, generator=g) for n, m in layers.items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return [save_expert(root / name, seed=i, **opts) for i, (name, opts) in enumerate(EXPERTS.items())]


def inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_one_expert_equals_its_peft_lora(library, batch):
    """routing='single' over a library, and a one-expert top-1 library, equal PEFT's own LoRA of that expert
    (e1 has rank 2 in a rank-4 bank and rsLoRA scaling)."""
    lora = PeftModel.from_pretrained(small_base(), library[1]).eval()
    single = moe_peft.phatgoose.assemble(small_base(), library, routing="single", expert="e1").eval()
    alone = moe_peft.phatgoose.assemble(small_base(), library[1:2], top_k=1).eval()
    with torch.no_grad():
        want = lora(**inputs(batch)).logits
        torch.testing.assert_close(single(**inputs(batch)).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone(**inputs(batch)).logits, want, rtol=1e-5, atol=1e-5)


def naive_layer(layer: PhatgooseLinear, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """PHATGOOSE routing written out token by token, from the equations (methods.md)."""
    adapter = "default"
    a, b = layer.phatgoose_A[adapter], layer.phatgoose_B[adapter]
    gates, scaling = layer.phatgoose_gate[adapter], layer.phatgoose_scaling[adapter]
    d = x.shape[-1]
    rows = []
    for t in range(x.shape[0]):
        xt = x[t]
        x_n = (xt - xt.mean()) / torch.sqrt(xt.var(unbiased=False) + 1e-5)
        logits = []
        for e in range(gates.shape[0]):
            v = gates[e]
            v_n = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)
            logits.append(torch.dot(x_n, v_n) / math.sqrt(d))
        logits = torch.stack(logits)
        kept = sorted(range(len(logits)), key=lambda e: -float(logits[e]))[:top_k]
        w = torch.softmax(logits[kept], dim=0)
        y = layer.base_layer(xt)
        for j, e in enumerate(kept):
            y = y + w[j] * scaling[e] * (b[e] @ (a[e] @ xt))
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_routing_equals_a_naive_per_token_loop_outputs_and_gradients(library, top_k):
    model = moe_peft.phatgoose.assemble(small_base(), library, top_k=top_k)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    params = [layer.phatgoose_A["default"], layer.phatgoose_B["default"], layer.phatgoose_gate["default"]]
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def run(fn):
        for p in params:
            p.grad = None
        x.grad = None
        y = fn()
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        return y.detach(), [x.grad.clone()] + [p.grad.clone() for p in params]

    fast, fast_grads = run(lambda: layer(x))
    slow, slow_grads = run(lambda: naive_layer(layer, x, top_k))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for got, want, what in zip(fast_grads, slow_grads, ["x", "A", "B", "gate"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=what)
    # the gates (routing keys) get gradient through the softmax over the kept logits; with top-1 it is constant 1
    assert (fast_grads[3].abs().sum() > 0) == (top_k > 1)


def test_wiring_counts_and_saved_keys(library):
    model = moe_peft.phatgoose.assemble(small_base(), library)
    config = model.peft_config["default"]
    assert config.experts == ["e0", "e1", "e2"] and config.r == 4 and config.top_k == 2
    names = sorted(n for n, _ in model.base_model.layers())
    assert names == sorted(config.target_modules) and len(names) == 2 * len(TARGETS)
    # hand count: per layer E*r*(in + out) expert weights + E*in gate entries; scaling is a buffer
    expected = sum(3 * (4 * (m.in_features + m.out_features) + m.in_features) for _, m in model.base_model.layers())
    assert model.get_nb_trainable_parameters()[0] == expected
    from peft.utils import get_peft_model_state_dict

    keys = get_peft_model_state_dict(model)
    assert sum(k.endswith("phatgoose_scaling") for k in keys) == len(names)
    layer = dict(model.base_model.layers())["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(layer.phatgoose_scaling["default"], torch.tensor([2.0, 4 / math.sqrt(2), 4.0]))


def test_baselines_uniform_oracle_and_merges(library, batch):
    model = moe_peft.phatgoose.assemble(small_base(), library).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match="picks experts per token.*cannot be merged"):
            model.merge_and_unload()
        assert any(isinstance(m, PhatgooseLinear) for m in model.modules())  # the refused merge changed nothing
        # oracle: sample b uses expert task_ids[b] alone
        moe_peft.phatgoose.set_routing(model, "oracle")
        oracle = model(**inputs(batch), task_ids=torch.tensor([2, 0, 1])).logits
        with pytest.raises(ValueError, match="task_ids is missing"):
            model(**inputs(batch))
        for row, expert in enumerate(["e2", "e0", "e1"]):
            moe_peft.phatgoose.set_routing(model, "single", expert=expert)
            torch.testing.assert_close(oracle[row], model(**inputs(batch)).logits[row])
        # uniform: every layer adds the average of the experts' deltas, so it merges exactly
        moe_peft.phatgoose.set_routing(model, "uniform")
        layer = model.base_model.model.model.layers[1].mlp.down_proj
        x = torch.randn(4, layer.in_features)
        deltas = [
            s * (bb @ aa)
            for aa, bb, s in zip(
                layer.phatgoose_A["default"], layer.phatgoose_B["default"], layer.phatgoose_scaling["default"]
            )
        ]  # [out, in] each
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ torch.stack(deltas).mean(0).T)
        uniform = model(**inputs(batch)).logits
        merged = model.merge_and_unload(safe_merge=True)
        torch.testing.assert_close(merged(**inputs(batch)).logits, uniform, rtol=1e-5, atol=1e-5)


FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    import moe_peft  # registers the methods
    from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    root = sys.argv[1]
    ref = torch.load(f"{root}/ref.pt")
    for name, want in ref["cases"].items():
        config = PeftConfig.from_pretrained(f"{root}/{name}")
        assert type(config).__name__ == "PhatgooseConfig" and config.routing == want["routing"], config
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{root}/base"), f"{root}/{name}")
        auto = AutoPeftModelForCausalLM.from_pretrained(f"{root}/{name}")
        with torch.no_grad():
            for m in (model.eval(), auto.eval()):
                assert torch.equal(m(**ref["inputs"], task_ids=want["task_ids"]).logits, want["logits"]), name
    print("FRESH-PROCESS-OK")
    """
)


def test_library_saves_and_reloads_as_one_adapter_in_a_fresh_process(library, tmp_path, batch):
    small_base().save_pretrained(tmp_path / "base")
    cases = {}
    for name, routing in [("top2", "top_k"), ("oracle", "oracle")]:
        model = moe_peft.phatgoose.assemble(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), library)
        moe_peft.phatgoose.set_routing(model, routing)
        task_ids = torch.tensor([1, 2, 0]) if routing == "oracle" else None
        with torch.no_grad():
            logits = model.eval()(**inputs(batch), task_ids=task_ids).logits
        model.save_pretrained(tmp_path / name)
        cases[name] = {"logits": logits, "routing": routing, "task_ids": task_ids}
    files = sorted(p.name for p in (tmp_path / "top2").iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    torch.save({"cases": cases, "inputs": inputs(batch)}, tmp_path / "ref.pt")
    script = tmp_path / "reload.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert "FRESH-PROCESS-OK" in result.stdout, result.stderr[-3000:]


def test_experts_are_added_without_retraining_the_others(library, batch):
    grown = moe_peft.phatgoose.assemble(small_base(), library[:2])
    before = {n: p.detach().clone() for n, p in grown.named_parameters() if "phatgoose" in n}
    assert moe_peft.phatgoose.add_experts(grown, library[2:]) == ["e2"]
    for n, p in grown.named_parameters():
        if n in before:
            assert torch.equal(p.detach()[: before[n].shape[0]], before[n]), n  # the first experts are untouched
    full = moe_peft.phatgoose.assemble(small_base(), library)
    assert grown.peft_config["default"].experts == full.peft_config["default"].experts
    grown.eval(), full.eval()
    with torch.no_grad():
        torch.testing.assert_close(grown(**inputs(batch)).logits, full(**inputs(batch)).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"names=\['e2'\] are already experts"):
        moe_peft.phatgoose.add_experts(grown, library[2:], names=["e2"])
    assert moe_peft.phatgoose.add_experts(grown, library[2:]) == ["e2_2"]  # unnamed: a fresh name


def test_mismatched_or_unsupported_experts_raise_naming_the_adapter(library, tmp_path):
    other_base = tiny_llama(vocab_size=VOCAB, hidden_size=16, intermediate_size=48, num_layers=2)
    wrong_shape = save_expert(tmp_path / "wide", seed=7, base=other_base, r=2)
    with pytest.raises(ValueError, match=r"Expert 'wide' .* does not fit the base model at model.layers.0"):
        moe_peft.phatgoose.assemble(small_base(), [library[0], wrong_shape])
    fewer = save_expert(tmp_path / "mlp_only", seed=8, targets=MLP, r=2)
    with pytest.raises(ValueError, match=r"Expert 'mlp_only' .* adapts other modules .*q_proj"):
        moe_peft.phatgoose.assemble(small_base(), [library[0], fewer])
    no_gates = save_expert(tmp_path / "ungated", seed=9, gates=False, r=2)
    with pytest.raises(ValueError, match=r"Experts 'ungated' .* have no gates .*train_gates"):
        moe_peft.phatgoose.assemble(small_base(), [library[0], no_gates])
    moe_peft.phatgoose.assemble(small_base(), [library[0], no_gates], routing="uniform")  # baselines need none
    dora = save_expert(tmp_path / "dora", seed=10, gates=False, r=2, use_dora=True)
    with pytest.raises(ValueError, match=r"Expert 'dora' .* uses LoRA options \['use_dora'\]"):
        moe_peft.phatgoose.assemble(small_base(), [dora])
    mhr = get_peft_model(small_base(), moe_peft.MHRConfig(r=2, target_modules=MLP))
    mhr.save_pretrained(tmp_path / "mhr")
    with pytest.raises(ValueError, match=r"Expert 'mhr' .* is a MHR adapter"):
        moe_peft.phatgoose.assemble(small_base(), [tmp_path / "mhr"])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(top_k=4), "top_k"),
        (dict(routing="best"), "routing"),
        (dict(routing="single"), "expert"),
        (dict(experts=["a", "a"]), "experts"),
        (dict(target_modules=None), "target_modules"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    args = dict(experts=["a", "b", "c"], target_modules=["up_proj"])
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid: "):
        moe_peft.PhatgooseConfig(**{**args, **kwargs})


def _lora_batches(n: int = 3):
    from moe_peft.data import CharTokenizer, Collator, make_dataset

    tokenizer = CharTokenizer()
    data = make_dataset(8 * n, tasks=["rev"], tokenizer=tokenizer)
    collate = Collator(tokenizer)
    return [collate([data[i] for i in range(8 * k, 8 * k + 8)]) for k in range(n)], data, collate, tokenizer


def _char_expert(tokenizer, seed=0):
    torch.manual_seed(seed)
    base = tiny_llama(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    )
    return model


def test_train_gates_trains_only_the_gates_and_saves_them_with_the_adapter(tmp_path):
    batches, data, collate, tokenizer = _lora_batches()
    model = _char_expert(tokenizer)
    model.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = n_hooks(model)
    gates = moe_peft.phatgoose.train_gates(model, batches, steps=6, lr=1e-2, save_to=tmp_path)
    assert set(gates) == {n for n, _ in moe_peft.phatgoose.gates.lora_layers(model, "default").items()}
    assert all(v.shape == (model.get_base_model().get_submodule(n).in_features,) for n, v in gates.items())
    assert all(v.abs().sum() > 0 for v in gates.values())  # zero-initialized, then trained
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed: the base and the expert must stay frozen"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and n_hooks(model) == hooks
    reloaded = moe_peft.phatgoose.load_gates(tmp_path)
    assert reloaded.keys() == gates.keys() and all(torch.equal(reloaded[n], gates[n]) for n in gates)
    assert moe_peft.phatgoose.read_expert(tmp_path).gates.keys() == gates.keys()
    # a datasets.Dataset plus collator is accepted too; without the collator it is a clear error
    moe_peft.phatgoose.train_gates(model, data, steps=2, collator=collate, batch_size=4)
    with pytest.raises(ValueError, match="collator=None is invalid"):
        moe_peft.phatgoose.train_gates(model, data, steps=1)


def test_the_gate_scales_each_tokens_expert_delta_by_a_sigmoid():
    """y = W x + sigmoid(v . x) * s B A x in every module of the expert while the gates train."""
    _, _, _, tokenizer = _lora_batches(1)
    model = _char_expert(tokenizer).eval()
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        base_out = layer.base_layer(x)
        delta = layer(x) - base_out  # s B A x
        with moe_peft.phatgoose.gate_training(model) as gates:
            torch.testing.assert_close(layer(x), base_out + 0.5 * delta)  # v = 0: half strength
            v = gates["model.layers.0.mlp.up_proj"]
            v.normal_()
            torch.testing.assert_close(layer(x), base_out + torch.sigmoid(x @ v)[..., None] * delta)
        torch.testing.assert_close(layer(x), base_out + delta)  # the hook is gone


def test_gates_are_model_parameters_only_inside_the_block(tmp_path):
    """Registered on the LoRA layers, so that DDP/FSDP/DeepSpeed built inside the block reduce their gradients
    (tests/test_distributed.py trains them under every engine); the saved adapter does not change."""
    _, _, _, tokenizer = _lora_batches(1)
    model = _char_expert(tokenizer)
    before = {n for n, _ in model.named_parameters()}
    model.save_pretrained(tmp_path / "outside")
    with moe_peft.phatgoose.gate_training(model) as gates:
        named = dict(model.named_parameters())
        trainable = {n for n, p in named.items() if p.requires_grad}
        assert trainable == set(named) - before and len(trainable) == len(gates)
        for name, v in gates.items():
            assert named[f"base_model.model.{name}.base_layer.phatgoose_gate"] is v
        v = next(iter(gates.values()))
        with torch.no_grad():
            v.normal_()
        got = moe_peft.phatgoose.gates_from_state_dict(model.state_dict())
        assert got.keys() == gates.keys() and torch.equal(got[next(iter(gates))], v)
        model.save_pretrained(tmp_path / "inside")  # the gates are no LoRA weights: same adapter files
        with pytest.raises(ValueError, match="nested"):
            with moe_peft.phatgoose.gate_training(model):
                pass
    assert {n for n, _ in model.named_parameters()} == before
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "outside" / name).read_bytes() == (tmp_path / "inside" / name).read_bytes()
    with pytest.raises(ValueError, match="no PHATGOOSE gate"):
        moe_peft.phatgoose.gates_from_state_dict(model.state_dict())


def test_saved_gates_are_the_same_bytes_every_time(tmp_path):
    """safetensors writes the metadata in a hash order that changes between saves (and processes): data-parallel
    ranks saving the same gates wrote different files."""
    gates = {"model.layers.0.mlp.up_proj": torch.randn(8), "model.layers.0.mlp.down_proj": torch.randn(16)}
    info = {"steps": 3, "lr": 1e-3, "first_loss": 2.5, "last_loss": 2.0}
    files = [(tmp_path / str(i) / moe_peft.phatgoose.GATES_FILE) for i in range(6)]
    for file in files:
        moe_peft.phatgoose.save_gates(gates, file.parent, info)
    assert len({file.read_bytes() for file in files}) == 1
    loaded = moe_peft.phatgoose.load_gates(files[0].parent)
    assert all(torch.equal(loaded[k], v) for k, v in gates.items())
    from safetensors import safe_open

    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {"format": "pt", "moe_peft": "phatgoose_gates", **{k: str(v) for k, v in info.items()}}


@pytest.mark.parametrize("reentrant", [True, False])
def test_gate_training_under_gradient_checkpointing(reentrant):
    batches, _, _, tokenizer = _lora_batches(1)
    model = _char_expert(tokenizer)
    reference = copy.deepcopy(model)

    def grads(m, checkpointing):
        train_mode(m, checkpointing, reentrant)
        with moe_peft.phatgoose.gate_training(m) as gates:
            m(**batches[0]).loss.backward()
            others = [p for p in m.parameters() if not any(p is v for v in gates.values())]
            assert all(p.grad is None for p in others)  # nothing but the gates receives gradient
            return {n: v.grad.clone() for n, v in gates.items()}

    want, got = grads(reference, False), grads(model, True)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7, msg=n)
    assert all(g.abs().sum() > 0 for g in got.values())


def test_fine_tuning_the_library_changes_only_the_adapter(library, batch):
    base = small_base()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = moe_peft.phatgoose.assemble(base, library)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad == ("phatgoose_" in n), n
    optimizer.step()
    for k, v in model.get_base_model().state_dict().items():
        key = k.replace(".base_layer", "")
        if key in base_state:
            assert torch.equal(v, base_state[key]), f"base weight {k} changed"


def test_adapter_management(library, batch):
    base = small_base()
    with torch.no_grad():
        ref = base(**inputs(batch)).logits
    hooks_before = n_hooks(base)
    model = moe_peft.phatgoose.assemble(base, library).eval()
    with torch.no_grad():
        routed = model(**inputs(batch)).logits
        assert not torch.allclose(routed, ref)
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs(batch)).logits, ref)
        torch.testing.assert_close(model(**inputs(batch)).logits, routed)
        model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
        model.set_adapter("other")
        torch.testing.assert_close(model(**inputs(batch)).logits, ref)  # a new, unfilled library adds nothing
        model.set_adapter("default")
        model.delete_adapter("other")
        assert not any(".other" in n for n, _ in model.named_parameters())
        assert all("other" not in layer.last_load for _, layer in model.base_model.layers())
        torch.testing.assert_close(model(**inputs(batch)).logits, routed)
        unloaded = model.unload()
        torch.testing.assert_close(unloaded(**inputs(batch)).logits, ref)
    assert not any(isinstance(m, PhatgooseLinear) for m in unloaded.modules())
    assert n_hooks(unloaded) == hooks_before and "generate" not in unloaded.__dict__


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(library, batch, dtype):
    model = moe_peft.phatgoose.assemble(small_base().to(dtype), library).eval()
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "phatgoose_" in n)
    with torch.no_grad():
        out = model(**inputs(batch)).logits
        layer = model.base_model.model.model.layers[0].mlp.up_proj
        idx, weights = layer.route("default", torch.randn(5, 32, dtype=dtype), batch=5)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert weights.dtype == torch.float32  # routing math in float32 whatever the model dtype


def test_generate_routes_every_new_token_and_leaves_no_hook(library, batch):
    model = moe_peft.phatgoose.assemble(small_base(), library).eval()
    hooks = n_hooks(model)
    ids = batch["input_ids"][:2, :5]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(**kwargs, use_cache=True), model.generate(**kwargs, use_cache=False))
        moe_peft.phatgoose.set_routing(model, "oracle")
        oracle = model.generate(**kwargs, task_ids=torch.tensor([0, 2]))
        moe_peft.phatgoose.set_routing(model, "single", expert="e2")
        assert torch.equal(oracle[1], model.generate(**kwargs)[1])
    assert n_hooks(model) == hooks and model.base_model.task_state.sticky is None


def test_expert_load_leaves_padding_out(library, batch):
    model = moe_peft.phatgoose.assemble(small_base(), library).eval()
    moe_peft.phatgoose.set_routing(model, "oracle")
    mask = torch.ones_like(batch["input_ids"])
    mask[0, :3] = 0  # 3 padding positions in the row of expert 0: 6 + 9 + 9 real tokens
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=mask, task_ids=torch.tensor([0, 1, 1]))
    load = moe_peft.phatgoose.mean_expert_load(model)
    torch.testing.assert_close(load, torch.tensor([6 / 24, 18 / 24, 0.0]))
    assert len(moe_peft.phatgoose.expert_load(model)) == 2 * len(TARGETS)


def test_empty_and_nan_inputs(library):
    model = moe_peft.phatgoose.assemble(small_base(), library)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert layer(torch.randn(0, 32)).shape == (0, 48)
    x = torch.randn(3, 32)
    x[1] = float("nan")
    y = layer(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()  # a NaN token does not spread
