"""router_lr_ratio: the routers of a token-routed adapter train at lr * ratio (optimizer parameter groups), or not at
all with 0 (enforced in the forward, under any optimizer); the field's resolution on every loading path, its
validation, the warning when no optimizer applies it, MoESFTTrainer's optimizer and `moe-peft train`."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

import moe_peft
from moe_peft.tuners.routed.layer import MoELoraLinear

from .conftest import MLP, randomize_experts

WARNING = "router_lr_ratio"


def _model(base, seed: int = 1, **fields):
    """A MoLE adapter (block routers, top-1) with non-zero experts, so that its routers get a task gradient."""
    config = moe_peft.MoLEConfig(r=4, num_experts=4, target_modules=MLP, router_aux_loss_coef=0.1, **fields)
    model = get_peft_model(base, config)
    randomize_experts(model, std=0.3, seed=seed)
    return model


def _routers_by_name(model) -> dict[str, torch.nn.Parameter]:
    """The routers' parameters found by name: a different method than the helper's walk over the routed layers."""
    return {n: p for n, p in model.named_parameters() if "_router." in n and p.requires_grad}


def _routers_by_layer(model) -> list[torch.nn.Parameter]:
    return [
        p for m in model.modules() if isinstance(m, MoELoraLinear) for r in m.routers.values() for p in r.parameters()
    ]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _step(model, optimizer, inputs: dict) -> None:
    model.train()
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _ratio_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if WARNING in str(w.message)]


# -- the optimizer's groups -------------------------------------------------------------------------------------------
def test_two_adamw_steps_equal_a_hand_built_adamw_with_the_router_lr_scaled(base, batch):
    """The oracle: create_router_optimizer's AdamW equals torch's AdamW over [experts at lr, routers at lr * 0.1], the
    routers collected by name on a deep copy. Fails if the ratio is ignored (the routers would move 10x as far)."""
    lr, ratio = 1e-2, 0.1
    model = _model(base, router_lr_ratio=ratio)
    start = _snapshot(model)
    optimizer = moe_peft.create_router_optimizer(model, lr=lr)
    reference = copy.deepcopy(model)
    routers = _routers_by_name(reference)
    others = [p for n, p in reference.named_parameters() if p.requires_grad and n not in routers]
    assert routers and others
    manual = torch.optim.AdamW(
        [{"params": others, "lr": lr}, {"params": list(routers.values()), "lr": lr * ratio}], weight_decay=0.0
    )
    for _ in range(2):
        _step(model, optimizer, batch)
        _step(reference, manual, batch)
    want = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=1e-6, atol=1e-7, msg=name)
    for name in routers:
        assert not torch.equal(dict(model.named_parameters())[name], start[name]), name  # the routers trained


def test_every_trainable_parameter_is_in_exactly_one_group_and_frozen_routers_in_none(base):
    model = _model(base, router_lr_ratio=0.5)
    # a second adapter with frozen routers, made trainable next to the first
    model.add_adapter("frozen", moe_peft.MoLEConfig(r=2, num_experts=2, target_modules=MLP, router_lr_ratio=0.0))
    for m in model.modules():
        if isinstance(m, MoELoraLinear):
            m.experts_A["frozen"].requires_grad_(True)
            m.experts_B["frozen"].requires_grad_(True)
            if "frozen" in m.routers:
                m.routers["frozen"].requires_grad_(True)
    groups = moe_peft.router_param_groups(model, lr=1.0, weight_decay=0.1)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))  # once each
    frozen = {id(p) for m in model.modules() if isinstance(m, MoELoraLinear) and "frozen" in m.routers
              for p in m.routers["frozen"].parameters()}  # fmt: skip
    assert frozen and not frozen & set(grouped)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(grouped) == trainable - frozen
    lrs = {g["name"]: g["lr"] for g in groups}
    # expert banks (3-D) decay; the routers' weights decay, their biases not
    assert lrs == {"params": 1.0, "routers.default": 0.5, "routers.default.no_decay": 0.5}
    routers = {id(p) for p in _routers_by_layer(model)} - frozen
    for g in groups:
        assert all((id(p) in routers) == g["name"].startswith("routers.") for p in g["params"]), g["name"]


def test_the_weight_decay_split_is_the_trainers(base):
    """Decay 2-D+ weights (expert banks, router weights), not the router biases: Trainer.get_decay_parameter_names."""
    from transformers import Trainer

    model = _model(base, router_lr_ratio=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    # the Trainer's rule (it does not read the Trainer instance)
    trainer_decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = moe_peft.router_param_groups(model, lr=1.0, weight_decay=0.1)
    for g in groups:
        for p in g["params"]:
            assert (g["weight_decay"] > 0) == (names[id(p)] in trainer_decay), names[id(p)]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.1}
    # weight decay 0: no split
    assert all(g["weight_decay"] == 0.0 for g in moe_peft.router_param_groups(model, lr=1.0))


def test_the_scheduler_keeps_the_ratio(base, batch):
    model = _model(base, router_lr_ratio=0.1)
    optimizer = moe_peft.create_router_optimizer(model, torch.optim.SGD, lr=0.5, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    for _ in range(3):
        _step(model, optimizer, batch)
        schedule.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert math.isclose(lrs["routers.default"], 0.1 * lrs["params"]) and math.isclose(lrs["params"], 0.5 / 4)
    assert all(g["momentum"] == 0.9 for g in optimizer.param_groups)  # the optimizer's own arguments reach it


# -- ratio 0: frozen in the forward, under any optimizer --------------------------------------------------------------
FROZEN_CASES = {
    "mole_block": lambda: moe_peft.MoLEConfig(r=4, num_experts=4, target_modules=MLP, router_z_loss_coef=0.1),
    "mole_linear": lambda: moe_peft.MoLEConfig(
        r=4, num_experts=4, top_k=2, router_granularity="linear", target_modules=MLP + ["q_proj"]
    ),
    "mole_null": lambda: moe_peft.MoLEConfig(r=4, num_experts=4, top_k=2, num_null_experts=2, target_modules=MLP),
    "mole_groups": lambda: moe_peft.MoLEConfig(
        r=4, modality_experts={"text": 2, "image": 2}, target_modules=MLP, router_granularity="linear"
    ),
    "mole_sequence": lambda: moe_peft.MoLEConfig(r=4, num_experts=4, target_modules=MLP, routing_level="sequence"),
    "mole_sequence_layer": lambda: moe_peft.MoLEConfig(
        r=4, num_experts=4, target_modules=MLP, routing_level="sequence", router_input_layer=0
    ),
    "loramoe": lambda: moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=MLP, blc_weight=0.1),
    "smora": lambda: moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP, router_aux_loss_coef=0.1),
}


def _frozen_inputs(case: str, batch: dict) -> dict:
    inputs = dict(batch)
    labels = batch["labels"].clone()
    labels[:, :6] = -100  # a prompt (the last row's starts after 3 padding tokens): sequence routing reads it
    inputs["labels"] = labels
    if case == "mole_groups":
        inputs["token_types"] = (batch["input_ids"] % 2).long()  # [B, S] group per token
    if case == "loramoe":
        inputs["sample_types"] = torch.tensor([0, 1, 1])
    return inputs


@pytest.mark.parametrize(
    "case, checkpointing",
    [(c, False) for c in FROZEN_CASES] + [("mole_block", True)],
    ids=[*FROZEN_CASES, "checkpointed"],
)
def test_ratio_zero_leaves_every_router_bit_identical_under_a_plain_optimizer(base, batch, case, checkpointing):
    """AdamW with weight decay over every trainable parameter, the routers included even at ratio 0 (whose layer marks
    them requires_grad=False): the routers get no gradient (from the task or the router
    losses), so they do not move; the experts do. With ratio 1 the same step gives the routers a gradient. Also under
    reentrant gradient checkpointing, whose recomputation routes again."""
    models = {}
    for ratio in (0.0, 1.0):
        config = FROZEN_CASES[case]()
        config.router_lr_ratio = ratio
        torch.manual_seed(0)
        models[ratio] = model = get_peft_model(copy.deepcopy(base), config)
        randomize_experts(model, std=0.3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
    inputs = _frozen_inputs(case, batch)
    for ratio, model in models.items():
        routers = _routers_by_layer(model)
        assert routers and all(p.requires_grad == (ratio != 0) for p in routers)
        for p in routers:  # also a router the user marks trainable gets no gradient at 0: the forward reads it detached
            p.requires_grad_(True)
        before = _snapshot(model)
        smora_bias = [b.clone() for n, b in model.named_buffers() if "selection_bias" in n]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        model.train()
        model(**inputs).loss.backward()
        if ratio == 0:
            assert all(p.grad is None for p in routers)
        else:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
            continue
        optimizer.step()
        after = dict(model.named_parameters())
        router_ids = {id(p) for p in routers}
        for name, p in after.items():
            if id(p) in router_ids:
                assert torch.equal(p, before[name]), name
        moved = [n for n, p in after.items() if p.requires_grad and id(p) not in router_ids]
        assert moved and any(not torch.equal(after[n], before[n]) for n in moved)  # the experts trained
        if case == "smora":  # loss-free balancing still updates the selection biases after the step
            now = [b for n, b in model.named_buffers() if "selection_bias" in n]
            assert any(not torch.equal(a, b) for a, b in zip(now, smora_bias))


def test_ratio_zero_routes_exactly_as_the_same_router_trained_at_ratio_one(base, batch):
    """Freezing cuts the gradient only: the outputs (and the router losses) of a forward are the same."""
    torch.manual_seed(0)
    frozen = _model(copy.deepcopy(base), router_lr_ratio=0.0)
    torch.manual_seed(0)
    plain = _model(base, router_lr_ratio=1.0)
    plain.train()
    frozen.train()
    a, b = frozen(**batch), plain(**batch)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.router_loss, b.router_loss, rtol=0, atol=0)


# -- the field: resolution, saving and loading, validation ------------------------------------------------------------
@pytest.mark.parametrize("cls", [moe_peft.MoLEConfig, moe_peft.LoRAMoEConfig, moe_peft.SMoRAConfig])
def test_a_new_config_resolves_none_by_the_class_rule(cls, monkeypatch):
    assert cls(target_modules=MLP).router_lr_ratio == cls(target_modules=MLP)._default_router_lr_ratio()
    monkeypatch.setattr(cls, "_default_router_lr_ratio", lambda self: 0.25)
    assert cls(target_modules=MLP).router_lr_ratio == 0.25
    assert cls(target_modules=MLP, router_lr_ratio=0.5).router_lr_ratio == 0.5


# MoLE top-1's default since issue 23 (docs/quality.md, "Defaults after issue 23"): routers frozen at init where that
# was measured better (plain top-1 token routing), trained at lr everywhere else; the user's value always wins
@pytest.mark.parametrize(
    "fields, expected",
    [
        ({}, 0.0),  # MoLE is top-1 unless told otherwise
        ({"top_k": 1}, 0.0),
        ({"top_k": 1, "router_granularity": "linear"}, 0.0),
        ({"modality_experts": {"text": 2, "image": 2}}, 0.0),  # top-1 within each group
        ({"top_k": 2}, 1.0),
        ({"top_k": 1, "top1_weight": "prob"}, 1.0),
        ({"top_k": 1, "num_null_experts": 2}, 1.0),
        ({"top_p": 0.5}, 1.0),
        ({"top_k": 1, "routing_level": "sequence"}, 1.0),
        ({"top_k": 1, "router_lr_ratio": 1.0}, 1.0),
        ({"top_k": 1, "router_lr_ratio": 0.1}, 0.1),
        ({"top_k": 2, "router_lr_ratio": 0.0}, 0.0),
    ],
)
def test_mole_top1_token_routing_defaults_to_frozen_routers(fields, expected):
    config = moe_peft.MoLEConfig(target_modules=MLP, **fields)
    assert config.router_lr_ratio == expected
    assert moe_peft.MoLEConfig(**config.to_dict()).router_lr_ratio == expected  # as saved: the value, not the rule


@pytest.mark.parametrize("cls", [moe_peft.LoRAMoEConfig, moe_peft.SMoRAConfig])
def test_the_other_token_routed_methods_default_to_routers_at_lr(cls):
    assert cls(target_modules=MLP).router_lr_ratio == 1.0


def test_the_default_top1_adapter_trains_its_experts_not_its_routers(base, batch):
    """The default is applied, not only resolved: under a plain AdamW, a default top-1 MoLE keeps every router bit
    identical while its experts move; the same adapter with router_lr_ratio=1.0 moves its routers."""
    for ratio, routers_move in ((None, False), (1.0, True)):
        fields = {} if ratio is None else {"router_lr_ratio": ratio}
        model = _model(copy.deepcopy(base), **fields)
        before = _snapshot(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            _step(model, optimizer, batch)
        routers = [n for n, _ in model.named_parameters() if "_router." in n]
        assert routers
        moved = {n: not torch.equal(before[n], p) for n, p in model.named_parameters()}
        assert all(moved[n] == routers_move for n in routers), ratio
        assert any(moved[n] for n in moved if "mole_A." in n) and any(moved[n] for n in moved if "mole_B." in n)


def _router_grad_flags(model, adapter: str = "default") -> list[bool]:
    return [p.requires_grad for n, p in model.named_parameters() if f"_router.{adapter}." in n]


def test_frozen_routers_keep_requires_grad_false_on_every_peft_path(base, tmp_path):
    """Ratio 0 leaves the routers out of PEFT's trainable parameters (so DDP / FSDP do not wait for their gradient)
    after every call that marks an adapter trainable; a second adapter with ratio 1 keeps its routers trainable."""
    model = _model(copy.deepcopy(base))  # top-1: frozen by default
    experts = sum(p.numel() for n, p in model.named_parameters() if "mole_A." in n or "mole_B." in n)
    assert _router_grad_flags(model) and not any(_router_grad_flags(model))
    assert model.get_nb_trainable_parameters()[0] == experts  # hand count: the experts, no router
    model.add_adapter("learned", moe_peft.MoLEConfig(r=4, num_experts=4, target_modules=MLP, router_lr_ratio=1.0))
    for call in (
        lambda: model.set_adapter("default"),
        lambda: model.base_model.set_adapter(["default", "learned"]),
        lambda: model.base_model.set_requires_grad(["default", "learned"], True),
        lambda: (model.disable_adapter_layers(), model.enable_adapter_layers()),
    ):
        call()
        assert not any(_router_grad_flags(model, "default"))
    assert all(_router_grad_flags(model, "learned"))  # the other adapter's routers still train
    model.delete_adapter("learned")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert _router_grad_flags(loaded) and not any(_router_grad_flags(loaded))
    loaded.load_adapter(tmp_path, "again", is_trainable=True)
    loaded.set_adapter("again")
    assert _router_grad_flags(loaded, "again") and not any(_router_grad_flags(loaded, "again"))
    for name, p in loaded.named_parameters():  # the frozen routers reloaded as saved (their init)
        if "_router.default." in name:
            torch.testing.assert_close(p, dict(model.named_parameters())[name], rtol=0, atol=0)


def test_a_default_top1_adapter_reloads_frozen(base, tmp_path):
    model = _model(copy.deepcopy(base))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["router_lr_ratio"] == 0.0
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].router_lr_ratio == 0.0


def test_a_saved_adapter_without_the_key_reloads_with_ratio_one(base, tmp_path, monkeypatch):
    """An adapter saved before the field existed trained its routers at lr: 1.0, not the class's new-config default."""
    model = _model(copy.deepcopy(base), router_lr_ratio=0.1)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved["router_lr_ratio"] == 0.1
    del saved["router_lr_ratio"]
    path.write_text(json.dumps(saved))
    monkeypatch.setattr(moe_peft.MoLEConfig, "_default_router_lr_ratio", lambda self: 0.25)  # a new default
    assert PeftConfig.from_pretrained(tmp_path).router_lr_ratio == 1.0
    assert moe_peft.MoLEConfig.from_pretrained(tmp_path).router_lr_ratio == 1.0
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].router_lr_ratio == 1.0
    loaded.load_adapter(tmp_path, "again")
    assert loaded.peft_config["again"].router_lr_ratio == 1.0


@pytest.mark.parametrize("ratio", [0.0, 0.1, 2.0])
def test_a_set_ratio_survives_save_and_load(base, tmp_path, ratio):
    model = _model(copy.deepcopy(base), router_lr_ratio=ratio)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].router_lr_ratio == ratio
    loaded.load_adapter(tmp_path, "again")
    assert loaded.peft_config["again"].router_lr_ratio == ratio
    lrs = {g["name"]: g["lr"] for g in moe_peft.router_param_groups(loaded, lr=1.0)}
    assert lrs.get("routers.default") == (ratio or None)  # applied after the reload (ratio 0: left out)


@pytest.mark.parametrize("value", [-1, -0.1, float("nan"), float("inf"), True, "fast"])
@pytest.mark.parametrize("cls", [moe_peft.MoLEConfig, moe_peft.LoRAMoEConfig, moe_peft.SMoRAConfig])
def test_a_bad_ratio_is_refused_naming_the_field(cls, value):
    with pytest.raises(ValueError, match=r"^router_lr_ratio="):
        cls(target_modules=MLP, router_lr_ratio=value)


def test_bad_learning_rates_are_refused(base):
    model = _model(base)
    with pytest.raises(ValueError, match="lr="):
        moe_peft.router_param_groups(model, lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay="):
        moe_peft.router_param_groups(model, lr=1.0, weight_decay=float("nan"))


# -- no silent ignoring: the warning ----------------------------------------------------------------------------------
def _train_forwards(model, batch, n=2, optimizer=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            model.train()
            loss = model(**batch).loss
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad()
    return _ratio_warnings(caught)


def test_a_plain_optimizer_with_a_ratio_warns_once(base, batch):
    model = _model(base, router_lr_ratio=0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:  # eval and no_grad forwards: nothing to warn about
        warnings.simplefilter("always")
        model.eval()
        model(**batch)
        model.train()
        with torch.no_grad():
            model(**batch)
    assert not _ratio_warnings(caught)
    messages = _train_forwards(model, batch, n=3, optimizer=optimizer)
    assert len(messages) == 1
    assert "'default'" in messages[0] and "router_lr_ratio=0.1" in messages[0]
    assert "moe_peft.create_router_optimizer" in messages[0] and "MoESFTTrainer" in messages[0]


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_no_warning_for_ratio_zero_or_one(base, batch, ratio):
    assert not _train_forwards(_model(base, router_lr_ratio=ratio), batch)


def test_no_warning_after_create_router_optimizer(base, batch):
    model = _model(base, router_lr_ratio=0.1)
    optimizer = moe_peft.create_router_optimizer(model, lr=1e-3)
    assert not _train_forwards(model, batch, optimizer=optimizer)


# -- MoESFTTrainer and moe-peft train ---------------------------------------------------------------------------------
def _trainer(tmp_path, ratio: float, **args):
    from datasets import Dataset
    from trl import SFTConfig

    from moe_peft.bases import char_tokenizer, tiny_llama
    from moe_peft.train import MoESFTTrainer

    tok = char_tokenizer()
    rows = Dataset.from_list(
        [{"prompt": "rev abc=", "completion": "cba"}, {"prompt": "cpy abc=", "completion": "abc"}] * 4
    )
    fields = dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
        max_length=32, lr_scheduler_type="linear", warmup_steps=3,
    )  # fmt: skip
    fields.update(args)
    config = moe_peft.MoLEConfig(
        r=4, num_experts=4, target_modules=MLP, init_lora_weights=False, router_lr_ratio=ratio, task_type="CAUSAL_LM"
    )
    base = tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
    return MoESFTTrainer(
        model=base, args=SFTConfig(**fields), train_dataset=rows, processing_class=tok, peft_config=config
    )


def _group_lrs(optimizer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def test_the_trainer_builds_router_groups_and_the_schedule_keeps_them(tmp_path):
    trainer = _trainer(tmp_path, 0.1, weight_decay=0.01)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW)  # optim's default, adamw_torch
    lrs = _group_lrs(optimizer)
    assert lrs == {
        "params": 1e-2,
        "routers.default": pytest.approx(1e-3),
        "routers.default.no_decay": pytest.approx(1e-3),
    }
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay == {"params": 0.01, "routers.default": 0.01, "routers.default.no_decay": 0.0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not _ratio_warnings(caught)
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer  # under accelerate's wrapper
    lrs = _group_lrs(trainer.optimizer)
    assert lrs["params"] == pytest.approx(1e-2 * 2 / 3)  # the schedule (2 of 3 warm-up steps) moved both...
    assert lrs["routers.default"] == pytest.approx(0.1 * lrs["params"])  # ...by the same factor


def test_the_trainer_keeps_the_optim_choice(tmp_path):
    trainer = _trainer(tmp_path, 0.1, optim="sgd")
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.SGD
    assert _group_lrs(optimizer)["routers.default"] == pytest.approx(1e-3)


def test_the_trainer_with_ratio_one_uses_the_trainers_own_groups(tmp_path):
    optimizer = _trainer(tmp_path, 1.0).create_optimizer()
    assert not any(str(g.get("name", "")).startswith("routers") for g in optimizer.param_groups)


def test_the_trainer_with_ratio_zero_leaves_the_routers_as_initialized(tmp_path):
    trainer = _trainer(tmp_path, 0.0)
    before = _snapshot(trainer.model)
    trainer.train()
    routers = {id(p) for p in _routers_by_layer(trainer.model)}
    after = dict(trainer.model.named_parameters())
    assert routers
    for name, p in after.items():
        if id(p) in routers:
            assert torch.equal(p, before[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in after.items() if p.requires_grad and id(p) not in routers)


@pytest.mark.parametrize("assignment", ["adapter.router_lr_ratio=0.1", "router_lr_ratio=0.1"])
def test_moe_peft_train_takes_the_ratio(assignment):
    import pathlib

    from moe_peft.train.config import load_config

    path = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "mole.yaml")
    assert load_config(path, [assignment]).adapter["router_lr_ratio"] == 0.1


@pytest.mark.parametrize("value, message", [("-1", "router_lr_ratio=-1 is invalid"), ("fast", "must be a number")])
def test_moe_peft_train_refuses_a_bad_ratio_before_anything_loads(value, message, capsys, monkeypatch, tmp_path):
    import pathlib

    import moe_peft.train.run as run_module
    from moe_peft.apps.cli import main

    def loaded(*args, **kwargs):
        raise AssertionError("loaded before the config was checked")

    monkeypatch.setattr(run_module, "resolve_base", loaded)
    monkeypatch.setattr(run_module, "load_data", loaded)
    path = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "mole.yaml")
    assignment = f"adapter.router_lr_ratio={value}"
    assert main(["train", path, "--set", f"training.output_dir={tmp_path}", "--set", assignment]) == 2
    err = capsys.readouterr().err
    assert f"--set {assignment}" in err and "router_lr_ratio" in err and message in err
