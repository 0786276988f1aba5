"""Bad input, property-based (hypothesis): configs and forward inputs of every method.

The `ci` profile (tests/conftest.py) runs a fixed, derandomized set of examples per property so that the file runs
in well under a minute; `HYPOTHESIS_PROFILE=thorough` runs 20x more. Run with `--hypothesis-show-statistics` to see
how many cases each property ran."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from peft.config import PeftConfig

import moe_peft
from moe_peft.bases import tiny_llama

from .conftest import MLP, VOCAB, randomize_experts

SCALE = max(1, settings.default.max_examples // 25)  # the "ci" profile: 1; "thorough": 20


def examples(n: int) -> settings:
    return settings(max_examples=n * SCALE, suppress_health_check=[HealthCheck.too_slow])


CONFIGS = {
    "MoLEConfig": lambda **kw: moe_peft.MoLEConfig(**kw),
    "LoRAMoEConfig": lambda **kw: moe_peft.LoRAMoEConfig(**kw),
    "SMoRAConfig": lambda **kw: moe_peft.SMoRAConfig(**kw),
    "MHRConfig": lambda **kw: moe_peft.MHRConfig(**kw),
    "PhatgooseConfig": lambda **kw: moe_peft.PhatgooseConfig(
        **{"experts": ["a", "b"], "target_modules": ["q_proj"], **kw}
    ),
    "RoMAConfig": lambda **kw: moe_peft.RoMAConfig(**kw),
}
BASE_FIELDS = {f.name for f in dataclasses.fields(PeftConfig)}
# changing one of these can make a field checked against it invalid (SMoRA: top_k ranks of r)
RELATED = {"r": {"top_k"}, "num_experts": {"top_k"}, "num_null_experts": {"top_k"}, "top_p": {"top_k"}}

garbage = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-3, 3), max_size=3),
    st.sampled_from(["linear", "block", "topk", "dense", "uniform", "mhr_z", "mean", "cosine", "auto", "torch"]),
)


def _own_fields(name: str) -> list[str]:
    config = CONFIGS[name]()
    return sorted(f.name for f in dataclasses.fields(config) if f.name not in BASE_FIELDS)


@examples(400)
@given(data=st.data(), name=st.sampled_from(sorted(CONFIGS)))
def test_a_config_value_is_accepted_or_refused_with_a_value_error_naming_the_field(data, name):
    field = data.draw(st.sampled_from(_own_fields(name)), label="field")
    value = data.draw(garbage, label="value")
    try:
        config = CONFIGS[name](**{field: value})
    except ValueError as error:  # never a TypeError, an AttributeError or a crash deeper down
        named = {field} | RELATED.get(field, set())
        assert any(f"{n}=" in str(error) or f"{n} " in str(error) for n in named), (field, value, str(error))
        return
    # accepted: it survives adapter_config.json (the dict PEFT writes, and PEFT's way back)
    again = type(config).from_peft_type(**json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "name,kwargs,field",
    [
        ("MoLEConfig", dict(r=0), "r"),
        ("MoLEConfig", dict(r=4.0), "r"),
        ("MoLEConfig", dict(lora_dropout="0.1"), "lora_dropout"),
        ("MoLEConfig", dict(router_aux_loss_coef=float("nan")), "router_aux_loss_coef"),
        ("MoLEConfig", dict(router_z_loss_coef=float("inf")), "router_z_loss_coef"),
        ("MoLEConfig", dict(top_k=5), "top_k"),
        ("MoLEConfig", dict(top1_weight="soft"), "top1_weight"),
        ("LoRAMoEConfig", dict(num_experts=3), "num_experts"),
        ("LoRAMoEConfig", dict(router_granularity="block"), "router_granularity"),
        ("SMoRAConfig", dict(r=4, top_k=8), "top_k"),
        ("SMoRAConfig", dict(bias_update_rate=None), "bias_update_rate"),
        ("MHRConfig", dict(n_tasks=0), "n_tasks"),
        ("MHRConfig", dict(mode="mhr_x"), "mode"),
        ("PhatgooseConfig", dict(routing="random"), "routing"),
        ("RoMAConfig", dict(sigma=-1.0), "sigma"),
    ],
)
def test_known_invalid_values_raise_naming_the_field(name, kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        CONFIGS[name](**kwargs)


# -- forward inputs ---------------------------------------------------------------------------------------------
METHODS = {
    "mole": lambda: moe_peft.MoLEConfig(r=2, num_experts=4, top_k=1, target_modules=MLP, router_z_loss_coef=1e-3),
    "mole_null_top2": lambda: moe_peft.MoLEConfig(r=2, num_experts=4, top_k=2, num_null_experts=1, target_modules=MLP),
    "mole_top_p": lambda: moe_peft.MoLEConfig(r=2, num_experts=4, top_p=0.6, target_modules=MLP),
    "loramoe": lambda: moe_peft.LoRAMoEConfig(r=2, num_experts=4, target_modules=MLP),
    "smora": lambda: moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP),
    "mhr": lambda: moe_peft.MHRConfig(r=2, n_tasks=3, n_skills=2, n_splits=2, target_modules=MLP),
}
_MODELS: dict = {}


def model_for(method: str):
    """One adapted tiny Llama per method for the whole file (building one per example would dominate the time)."""
    if method not in _MODELS:
        torch.manual_seed(0)
        base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
        model = get_peft_model(base, METHODS[method]())
        randomize_experts(model)
        _MODELS[method] = model
    return _MODELS[method].train()


@st.composite
def batches(draw):
    """A batch of 1-3 rows of 1-5 tokens, no / left / right padding, maybe a row that is all padding."""
    rows, seq = draw(st.integers(1, 3), label="batch"), draw(st.integers(1, 5), label="seq")
    lengths = draw(st.lists(st.integers(1, seq), min_size=rows, max_size=rows), label="lengths")
    side = draw(st.sampled_from(["none", "left", "right"]), label="padding")
    mask = torch.ones(rows, seq, dtype=torch.long)
    if side != "none":
        for i, n in enumerate(lengths):
            if side == "left":
                mask[i, : seq - n] = 0
            else:
                mask[i, n:] = 0
        if rows > 1 and draw(st.booleans(), label="an all-padding row"):
            mask[draw(st.integers(0, rows - 1))] = 0
    seed = draw(st.integers(0, 2**16))
    ids = torch.randint(4, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def routed_inputs(method: str, batch: dict, draw=None) -> dict:
    rows = batch["input_ids"].shape[0]
    if method == "loramoe":
        return {**batch, "sample_types": torch.arange(rows) % 2}
    if method == "mhr":
        return {**batch, "task_ids": torch.arange(rows) % 3}
    return batch


def _records(model):
    return [r for _, layer in model.base_model._moe_layers() for r in layer.router_records.values()]


@examples(60)
@given(method=st.sampled_from(sorted(METHODS)), batch=batches())
def test_any_batch_shape_and_padding_routes_only_real_tokens(method, batch):
    model = model_for(method)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no non-finite-logits warning: padding is never counted
        out = model(**routed_inputs(method, batch))
    real = int(batch["attention_mask"].sum())
    assert torch.isfinite(out.logits[batch["attention_mask"].bool()]).all()
    if method != "mhr":  # MHR routes by task: no router loss
        assert torch.isfinite(out.router_loss)
    if (batch["labels"][:, 1:] != -100).any():
        assert torch.isfinite(out.loss)
    if method != "mhr":  # token-routed: every routed layer counted exactly the real tokens
        records = _records(model)
        assert records and all(r.num_tokens == real for r in records)
        assert all(int(r.counts.sum()) <= real * r.counts.numel() for r in records)
        out.loss.backward() if out.loss is not None and out.loss.requires_grad else None
        model.zero_grad()


@examples(40)
@given(
    method=st.sampled_from(["mole", "loramoe", "smora"]),
    batch=batches(),
    poison=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    position=st.integers(0, 100),
)
def test_nan_or_inf_inputs_warn_naming_the_layer_and_leave_the_router_statistics_clean(method, batch, poison, position):
    """A non-finite input gives non-finite hidden states in the routed layers: each such layer warns with its name,
    and its statistics and router loss count only the finite real tokens (never NaN, never a made-up pick)."""
    model = model_for(method)
    real = batch["attention_mask"].bool()
    assume(real.sum() >= 2)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().clone()  # [B, S, H]
    where = real.nonzero()[position % int(real.sum())]
    embeds[where[0], where[1], 0] = poison
    inputs = {k: v for k, v in routed_inputs(method, batch).items() if k != "input_ids"}
    with pytest.warns(
        UserWarning, match=r"model\.layers\.\d+\.mlp\.\w+_proj: \d+ token\(s\) reach the router with NaN"
    ):
        out = model(inputs_embeds=embeds, **inputs)
    for record in _records(model):
        assert torch.isfinite(record.counts.float()).all() and record.num_tokens < int(real.sum())
        assert record.loss is None or torch.isfinite(record.loss)
    assert torch.isfinite(out.router_loss)


@examples(30)
@given(scale=st.floats(1.0, 6.0e4), method=st.sampled_from(["mole", "loramoe", "smora"]), seed=st.integers(0, 99))
def test_fp16_activations_with_large_values_give_finite_router_logits(scale, method, seed):
    """Routers compute in float32: fp16 inputs up to the fp16 maximum give finite logits and router losses (the
    fp16 base output may overflow; that is the base layer's)."""
    config = METHODS[method]()
    config.target_modules, config.router_granularity = ["0"], "linear"
    config.router_z_loss_coef = 1e-3  # logsumexp(logits)^2: overflows unless the logits are float32
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16)), config).half().train()
    x = (torch.rand(2, 5, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * scale
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model(x.half())
    (record,) = _records(model)
    assert record.loss is not None and torch.isfinite(record.loss) and record.num_tokens == 10


def per_sample_values(upper: int):
    """Lists for a per-sample routing input whose valid values are 0..upper-1: integers partly out of range and of
    any length (the valid ones among them), floats, and 2-D lists."""
    return st.one_of(
        st.lists(st.integers(-2, upper + 1), min_size=0, max_size=6),
        st.lists(st.floats(0, upper - 1), min_size=1, max_size=4),
        st.lists(st.lists(st.integers(0, upper - 1), min_size=2, max_size=2), min_size=1, max_size=3),
    )


def accepted_exactly_when_valid(method: str, field: str, values: list, rows: int, upper: int) -> None:
    """A [batch] integer tensor in [0, upper) runs; anything else raises a ValueError naming the field."""
    given = torch.tensor(values)
    valid = given.dim() == 1 and not given.dtype.is_floating_point and len(given) == rows
    valid = valid and bool(((given >= 0) & (given < upper)).all())
    model = model_for(method)
    ids = torch.randint(4, VOCAB, (rows, 4), generator=torch.Generator().manual_seed(rows))
    if valid:
        model(input_ids=ids, labels=ids, **{field: given})
    else:
        with pytest.raises(ValueError, match=field):
            model(input_ids=ids, labels=ids, **{field: given})


@examples(60)
@given(rows=st.integers(1, 4), given_types=per_sample_values(2))
def test_sample_types_of_the_wrong_shape_dtype_or_range_raise(rows, given_types):
    """LoRAMoE's sample_types: a [batch] tensor of 0/1 (before, 2 entries for a batch of 4 were accepted silently)."""
    accepted_exactly_when_valid("loramoe", "sample_types", given_types, rows, upper=2)


def test_loramoe_sample_types_of_length_two_for_a_batch_of_four_raise():
    ids = torch.randint(4, VOCAB, (4, 5))
    with pytest.raises(ValueError, match="sample_types has 2 entries but the batch has 4 samples"):
        model_for("loramoe")(input_ids=ids, labels=ids, sample_types=torch.tensor([0, 1]))


@examples(60)
@given(rows=st.integers(1, 4), ids=per_sample_values(3))
def test_task_ids_of_the_wrong_shape_dtype_or_range_raise(rows, ids):
    accepted_exactly_when_valid("mhr", "task_ids", ids, rows, upper=3)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_empty_batch_at_the_layer_gives_the_base_output(method):
    """transformers' Llama itself refuses a batch of 0 rows; our layers return the base layer's empty output."""
    model = model_for(method)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.zeros(0, 3, layer.in_features)
    assert layer(x).shape == (0, 3, layer.out_features)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_loading_into_a_base_with_other_shapes_names_the_module(method, tmp_path):
    model = model_for(method)
    model.save_pretrained(tmp_path)
    other = tiny_llama(vocab_size=VOCAB, hidden_size=48, intermediate_size=48, num_layers=2, seed=0)
    with pytest.raises((RuntimeError, ValueError), match=r"model\.layers\.0\.(mlp|self_attn)\.\w+"):
        PeftModel.from_pretrained(other, tmp_path)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_adapter_from_a_newer_moe_peft_loads_with_a_warning_naming_the_unknown_key(method, tmp_path):
    model = model_for(method)
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_config.json")
    with open(path) as f:
        saved = json.load(f)
    with open(path, "w") as f:
        json.dump({**saved, "expert_capacity_factor": 1.25}, f)
    base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
    with pytest.warns(UserWarning, match=r"does not know: \['expert_capacity_factor'\].*newer moe-peft"):
        loaded = PeftModel.from_pretrained(base, tmp_path)
    assert not hasattr(loaded.peft_config["default"], "expert_capacity_factor")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_process_writes_the_same_adapter_config(method, tmp_path):
    """Sets (target_modules) are written sorted, not in the hash order of the process that saved them."""
    config = METHODS[method]()
    config.target_modules = {"up_proj", "down_proj", "gate_proj"}
    assert config.to_dict()["target_modules"] == ["down_proj", "gate_proj", "up_proj"]
