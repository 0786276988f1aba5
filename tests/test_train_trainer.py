"""MoESFTTrainer: a real trl.SFTTrainer on a tiny Llama (or Mixtral) with a real tokenizer object built locally.

TRL 1.16 computes its loss from fused log-probs and ignores outputs.loss, so a plain SFTTrainer trains a moe-peft
adapter without its router losses: these tests fail if the router loss is dropped, counted per micro-batch, or taken
from the wrong forward, and if the per-sample routing inputs do not reach the layers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

import moe_peft
from moe_peft.bases import char_tokenizer, tiny_llama, tiny_moe
from moe_peft.data import make_samples
from moe_peft.train import MoESFTTrainer

MLP = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _base(tok, seed=0):
    return tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_layers=2, seed=seed)


def _rows(n=32, tasks=("rev", "srt", "cpy", "dup"), seed=0) -> Dataset:
    samples = make_samples(n, tasks, seed=seed)
    names = sorted(set(tasks))
    return Dataset.from_list(
        [
            {
                "prompt": s["prompt"],
                "completion": s["completion"],
                "sample_types": s["sample_type"],
                "task_ids": names.index(s["task"]),
            }
            for s in samples
        ]
    )


def _args(tmp_path, **changes) -> SFTConfig:
    fields = dict(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
        max_length=64, lr_scheduler_type="constant",
    )  # fmt: skip
    fields.update(changes)
    return SFTConfig(**fields)


def _mole(coef: float, **changes):
    config = moe_peft.MoLEConfig(
        r=4, num_experts=4, top_k=2, target_modules=MLP, init_lora_weights=False, router_aux_loss_coef=coef,
        router_z_loss_coef=coef, task_type="CAUSAL_LM",
    )  # fmt: skip
    for k, v in changes.items():
        setattr(config, k, v)
    return config


def _routers(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _train(tok, tmp_path, coef, wrapped=False, trainer_cls=MoESFTTrainer, rows=None, **args):
    base = _base(tok)
    config = _mole(coef)
    kwargs = dict(
        args=_args(tmp_path, **args), train_dataset=rows if rows is not None else _rows(), processing_class=tok
    )
    if wrapped:
        torch.manual_seed(0)
        trainer = trainer_cls(model=get_peft_model(base, config), **kwargs)
    else:
        trainer = trainer_cls(model=base, peft_config=config, **kwargs)
    trainer.train()
    return trainer


# -- the router loss reaches the routers ---------------------------------------------------------------------------
@pytest.mark.parametrize("wrapped", [False, True], ids=["peft_config", "PeftModel"])
def test_router_loss_changes_the_router_weights(tok, tmp_path, wrapped):
    off = _routers(_train(tok, tmp_path, 0.0, wrapped).model)
    again = _routers(_train(tok, tmp_path, 0.0, wrapped).model)
    on = _routers(_train(tok, tmp_path, 1.0, wrapped).model)
    assert _same(off, again)  # the runs are deterministic, so a difference below is the router loss
    assert not _same(off, on)


def test_plain_sft_trainer_drops_the_router_loss(tok, tmp_path):
    # the bug MoESFTTrainer fixes: TRL ignores outputs.loss, so the coefficient changes nothing
    off = _routers(_train(tok, tmp_path, 0.0, trainer_cls=SFTTrainer).model)
    on = _routers(_train(tok, tmp_path, 10.0, trainer_cls=SFTTrainer).model)
    assert _same(off, on)


def test_router_loss_counts_with_label_smoothing(tok, tmp_path):
    # label smoothing: TRL's loss comes from a forward with logits, then a no_grad forward for the metrics
    off = _routers(_train(tok, tmp_path, 0.0, label_smoothing_factor=0.1).model)
    on = _routers(_train(tok, tmp_path, 1.0, label_smoothing_factor=0.1).model)
    assert not _same(off, on)


# -- gradient accumulation ------------------------------------------------------------------------------------------
class _GradsBeforeStep(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _identical_rows(tok, n=4) -> Dataset:
    sample = make_samples(1, seed=3)[0]
    return Dataset.from_list([{"prompt": sample["prompt"], "completion": sample["completion"]}] * n)


def _step_grads(tok, tmp_path, model, batch, steps, accepts_loss_kwargs=True, **args):
    probe = _GradsBeforeStep()
    trainer = MoESFTTrainer(
        model=model, args=_args(tmp_path, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
        learning_rate=0.0, max_grad_norm=0.0, **args), train_dataset=_identical_rows(tok), processing_class=tok,
        callbacks=[probe],
    )  # fmt: skip
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs  # False: the path without num_items_in_batch
    trainer.train()
    return {n: g for n, g in probe.grads.items() if "router" in n}


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False], ids=["num_items_in_batch", "per_batch_mean"])
def test_router_gradient_share_does_not_depend_on_the_accumulation_split(tok, tmp_path, accepts_loss_kwargs):
    torch.manual_seed(0)
    with_loss = get_peft_model(_base(tok), _mole(0.5))
    without = copy.deepcopy(with_loss)
    for layer in without.modules():  # the same weights with the router-loss coefficients at 0
        for config in getattr(layer, "configs", {}).values():
            config.router_aux_loss_coef = config.router_z_loss_coef = 0.0
    shares = []
    for batch, steps in [(4, 1), (2, 2), (1, 4)]:
        full = _step_grads(tok, tmp_path, copy.deepcopy(with_loss), batch, steps, accepts_loss_kwargs)
        task = _step_grads(tok, tmp_path, copy.deepcopy(without), batch, steps, accepts_loss_kwargs)
        shares.append({n: full[n] - task[n] for n in full})
    assert max(float(g.abs().max()) for g in shares[0].values()) > 1e-3  # the router loss is a real part
    for other in shares[1:]:
        for n in shares[0]:
            torch.testing.assert_close(other[n], shares[0][n], rtol=1e-4, atol=1e-6, msg=n)


# -- gradient checkpointing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_router_loss_under_gradient_checkpointing(tok, tmp_path, reentrant):
    torch.manual_seed(0)
    model = get_peft_model(_base(tok), _mole(0.5))
    plain = _step_grads(tok, tmp_path, copy.deepcopy(model), 2, 2)
    checkpointed = _step_grads(
        tok, tmp_path, copy.deepcopy(model), 2, 2, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )  # fmt: skip
    assert plain.keys() == checkpointed.keys() and plain
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


# -- packing ---------------------------------------------------------------------------------------------------------
def test_packing_keeps_the_router_loss(tok, tmp_path):
    rows = _rows().remove_columns(["sample_types", "task_ids"])
    off = _routers(_train(tok, tmp_path, 0.0, rows=rows, packing=True).model)
    on = _routers(_train(tok, tmp_path, 1.0, rows=rows, packing=True).model)
    assert not _same(off, on)


def test_padding_free_packing_refuses_per_sample_columns(tok, tmp_path):
    with pytest.raises(ValueError, match="packing_strategy='wrapped'"):
        MoESFTTrainer(
            model=_base(tok), args=_args(tmp_path, packing=True), train_dataset=_rows(), processing_class=tok,
            peft_config=moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=MLP, task_type="CAUSAL_LM"),
        )  # fmt: skip


def test_wrapped_packing_packs_each_sample_type_apart(tok, tmp_path):
    trainer = MoESFTTrainer(
        model=_base(tok), args=_args(tmp_path, packing=True, packing_strategy="wrapped", max_length=48),
        train_dataset=_rows(64), processing_class=tok,
        peft_config=moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=MLP, task_type="CAUSAL_LM"),
    )  # fmt: skip
    types = {"rev": 0, "srt": 0, "cpy": 1, "dup": 1}
    packed = trainer.train_dataset
    assert "sample_types" in packed.column_names and len(packed) >= 2
    for row in packed:
        text = tok.decode(row["input_ids"])
        found = {types[t] for t in types if f"{t} " in text}
        assert found == {row["sample_types"]}, (text, row["sample_types"])
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["sample_types"].shape == (batch["input_ids"].shape[0],)
    trainer.train()


# -- the base model's own MoE aux loss --------------------------------------------------------------------------------
def test_base_moe_aux_loss_and_router_loss_both_count(tok, tmp_path):
    base = tiny_moe("mixtral", vocab_size=len(tok), hidden_size=32, num_layers=2, num_experts=4, top_k=2)
    config = moe_peft.MoLEConfig(
        r=4, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        router_aux_loss_coef=0.5, task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = MoESFTTrainer(
        model=base, args=_args(tmp_path, router_aux_loss_coef=0.02), train_dataset=_rows(), processing_class=tok,
        peft_config=config,
    )  # fmt: skip
    assert trainer.aux_loss_enabled
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batch.pop("sample_types")
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    out = trainer.model(**batch, fused_lm_head=True, use_cache=False, output_router_logits=True)
    nll = -out.log_probs.sum() / out.label_mask.sum()
    expected = nll + 0.02 * out.aux_loss + out.router_loss  # accumulation weight 1: no num_items_in_batch here
    assert float(out.aux_loss) > 0 and float(out.router_loss) > 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# -- per-sample routing inputs through TRL's collator ------------------------------------------------------------------
def test_sample_types_reach_loramoe_layers(tok, tmp_path):
    def run(rows):
        trainer = MoESFTTrainer(
            model=_base(tok), args=_args(tmp_path), train_dataset=rows, processing_class=tok,
            peft_config=moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=MLP, task_type="CAUSAL_LM"),
        )  # fmt: skip
        return trainer

    trainer = run(_rows())
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["sample_types"].shape == (4,)
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    with_types = moe_peft.router_loss(trainer.model).detach()
    batch.pop("sample_types")
    trainer.compute_loss(trainer.model, dict(batch))
    without = moe_peft.router_loss(trainer.model).detach()
    assert float(without) == 0.0 and float(with_types) > 0  # LoRAMoE's only router loss is the LBC term
    with pytest.warns(UserWarning, match="sample_types"):
        run(_rows().remove_columns("sample_types"))


def test_task_ids_reach_mhr_layers(tok, tmp_path):
    rows = _rows(32, tasks=("rev", "srt")).map(lambda r: {"task_ids": 2 * r["task_ids"]})  # tasks 0 and 2 of 4
    config = moe_peft.MHRConfig(r=4, n_tasks=4, n_skills=2, n_splits=1, target_modules=MLP, task_type="CAUSAL_LM")
    trainer = MoESFTTrainer(
        model=_base(tok), args=_args(tmp_path), train_dataset=rows, processing_class=tok, peft_config=config
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert set(batch["task_ids"].tolist()) <= {0, 2}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "mhr_router" in n}
    trainer.train()
    for name, old in before.items():
        new = dict(trainer.model.named_parameters())[name].detach()  # [n_tasks, H * S]
        assert not torch.equal(new[[0, 2]], old[[0, 2]]), name  # the tasks of the data trained
        assert torch.equal(new[[1, 3]], old[[1, 3]]), name  # the others got no gradient


def test_mhr_without_task_ids_is_refused(tok, tmp_path):
    config = moe_peft.MHRConfig(r=4, n_tasks=2, n_skills=2, target_modules=MLP, task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="task_ids"):
        MoESFTTrainer(
            model=_base(tok), args=_args(tmp_path), train_dataset=_rows().remove_columns("task_ids"),
            processing_class=tok, peft_config=config,
        )  # fmt: skip


# -- RoMA through its mixin --------------------------------------------------------------------------------------------
def test_roma_regularizer_trains_the_routers_under_trl(tok, tmp_path):
    from moe_peft.roma import RoMAConfig, build_reference

    rows = _rows(16).remove_columns(["sample_types", "task_ids"])

    def run(lam):
        base = tiny_moe("mixtral", vocab_size=len(tok), hidden_size=32, num_layers=2, num_experts=4, top_k=2)
        model = get_peft_model(base, RoMAConfig(lambda_reg=lam, lambda_warmup_steps=0, num_neighbours=2))
        trainer = MoESFTTrainer(
            model=model, args=_args(tmp_path, router_aux_loss_coef=0.0), train_dataset=rows, processing_class=tok,
            roma_reference=_reference(model, tok, tmp_path, build_reference),
        )  # fmt: skip
        trainer.train()
        return trainer

    off, on = run(0.0), run(5.0)
    assert any("roma_alignment" in log for log in on.state.log_history)
    assert not _same(_routers(off.model), _routers(on.model))


def _reference(model, tok, tmp_path, build_reference):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from moe_peft.data import tokenize_example

    rows = [{**r, **tokenize_example(r, tok)} for r in _rows(16).remove_columns(["sample_types", "task_ids"])]
    collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
    # a random tiny model answers nothing right: mark every other sample successful so each has neighbours
    return build_reference(model, rows, tok, collate, success=[i % 2 == 0 for i in range(len(rows))])


def test_roma_refuses_packing(tok, tmp_path):
    from moe_peft.roma import RoMAConfig

    base = tiny_moe("mixtral", vocab_size=len(tok), hidden_size=32, num_layers=2, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="packing"):
        MoESFTTrainer(
            model=base, args=_args(tmp_path, packing=True), train_dataset=_rows(), processing_class=tok,
            peft_config=RoMAConfig(),
        )  # fmt: skip


def test_routing_inputs_collator_refuses_a_row_without_its_value():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from moe_peft.train import RoutingInputsCollator

    collate = RoutingInputsCollator(DataCollatorForLanguageModeling(pad_token_id=0), ("task_ids",))
    batch = collate([{"input_ids": [1, 2, 3], "task_ids": 2}, {"input_ids": [1, 2], "task_ids": 0}])
    assert batch["task_ids"].tolist() == [2, 0] and batch["input_ids"].shape == (2, 3)
    with pytest.raises(ValueError, match="'task_ids' has no value in 1 rows"):
        collate([{"input_ids": [1, 2, 3], "task_ids": 2}, {"input_ids": [1, 2], "task_ids": None}])
