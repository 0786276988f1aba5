"""Router losses under gradient accumulation, and the router loss of a given forward (issue 9, items 1 and 8).

The same four samples split as batch 4 x accumulation 1, 2 x 2 and 1 x 4 must give the same gradients: the
router loss is a per-micro-batch mean and must count once per optimizer step, like the task loss.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import moe_peft
from moe_peft.bases import tiny_llama

from .conftest import MLP

SPLITS = [(4, 1), (2, 2), (1, 4)]  # (micro-batch size, accumulation steps)


def _model(coef: float = 0.5, method: str = "mole"):
    base = tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
    if method == "smora":
        config = moe_peft.SMoRAConfig(
            r=8, top_k=2, target_modules=MLP, init_lora_weights=False,
            router_aux_loss_coef=coef, router_z_loss_coef=coef,
        )  # fmt: skip
    else:
        # top-2 with random B: the task loss and the router losses both reach the routers
        config = moe_peft.MoLEConfig(
            r=4, num_experts=4, top_k=2, target_modules=MLP, init_lora_weights=False,
            router_aux_loss_coef=coef, router_z_loss_coef=coef,
        )  # fmt: skip
    return get_peft_model(base, config)


def _samples(n: int = 4, seq: int = 7) -> list[dict]:
    ids = torch.randint(4, 64, (seq,), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()} for _ in range(n)]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


class _GradsBeforeStep(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = _grads(model)


def _trainer_grads(model, tmp_path, batch, steps, accepts_loss_kwargs=True, trainer_cls=Trainer):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
        learning_rate=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True,
        remove_unused_columns=False, dataloader_drop_last=False,
    )  # fmt: skip
    probe = _GradsBeforeStep()
    trainer = trainer_cls(model=model, args=args, train_dataset=_samples(), callbacks=[probe])
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs  # False: the path without num_items_in_batch
    trainer.train()
    return probe.grads


def _assert_same(grads: list[dict], atol=1e-5):
    first = grads[0]
    for other in grads[1:]:
        assert other.keys() == first.keys()
        for n in first:
            torch.testing.assert_close(other[n], first[n], rtol=1e-4, atol=atol, msg=n)


def _router(grads: dict) -> dict:
    return {n: g for n, g in grads.items() if "router" in n}


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False], ids=["num_items_in_batch", "per_batch_mean"])
def test_trainer_router_gradients_do_not_depend_on_the_accumulation_split(accepts_loss_kwargs, tmp_path):
    pristine = _model(coef=0.5)
    runs = [
        _trainer_grads(copy.deepcopy(pristine), tmp_path, b, s, accepts_loss_kwargs=accepts_loss_kwargs)
        for b, s in SPLITS
    ]
    _assert_same(runs)
    # the router loss is a real part of those gradients (not lost in the 1e-5 tolerance)
    no_router_loss = _model(coef=0.0)
    task_only = _trainer_grads(no_router_loss, tmp_path, 2, 2, accepts_loss_kwargs=accepts_loss_kwargs)
    part = max(float((runs[0][n] - task_only[n]).abs().max()) for n in _router(runs[0]))
    assert part > 1e-2, part


class _OwnLossTrainer(Trainer):
    """Computes its loss itself and runs an extra no_grad forward without labels afterwards, as TRL 1.16's
    SFTTrainer does: it must add the router loss of the training forward, weighted for accumulation."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1].flatten(0, 1)
        targets = labels[:, 1:].flatten()
        if num_items_in_batch is None:
            loss = torch.nn.functional.cross_entropy(logits, targets)
        else:
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / num_items_in_batch
        with torch.no_grad():
            model(**inputs)  # the metrics forward: must not replace the training forward's router loss
        loss = loss + moe_peft.router_loss(model) * moe_peft.accumulation_weight(self, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False], ids=["num_items_in_batch", "per_batch_mean"])
def test_a_trainer_with_its_own_loss_gets_the_training_forwards_router_loss(accepts_loss_kwargs, tmp_path):
    pristine = _model(coef=0.5)
    runs = [
        _trainer_grads(copy.deepcopy(pristine), tmp_path, b, s, accepts_loss_kwargs, trainer_cls=_OwnLossTrainer)
        for b, s in SPLITS
    ]
    _assert_same(runs)
    # and the same gradients as plain Trainer with outputs.loss
    _assert_same([runs[0], _trainer_grads(copy.deepcopy(pristine), tmp_path, 2, 2, accepts_loss_kwargs)])
    task_only = _trainer_grads(_model(coef=0.0), tmp_path, 4, 1, accepts_loss_kwargs, trainer_cls=_OwnLossTrainer)
    assert max(float((runs[0][n] - task_only[n]).abs().max()) for n in _router(runs[0])) > 1e-2


@pytest.mark.parametrize("method", ["mole", "smora"])
@pytest.mark.parametrize("num_items", [False, True], ids=["divide_by_n", "num_items_in_batch"])
def test_plain_loop_accumulation(method, num_items):
    """A plain loop: divide each micro-batch's loss by N, or pass num_items_in_batch and do not divide."""
    pristine = _model(coef=0.5, method=method)
    samples = _samples()
    results = []
    for batch, steps in [(4, 1), (2, 2)]:
        model = copy.deepcopy(pristine).train()
        total = sum(int(s["labels"][1:].ne(-100).sum()) for s in samples)
        for i in range(steps):
            rows = samples[i * batch : (i + 1) * batch]
            inputs = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
            if num_items:
                model(**inputs, num_items_in_batch=torch.tensor(total)).loss.backward()
            else:
                (model(**inputs).loss / steps).backward()
        results.append(_grads(model))
    _assert_same(results)


def test_router_loss_of_a_given_forward(batch):
    model = _model(coef=0.5).train()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    trained = model(**inputs)  # no labels: outputs.loss is None, outputs.router_loss is still there
    assert trained.loss is None and trained.router_loss.requires_grad and trained.router_loss > 0
    with torch.no_grad():
        extra = model(**inputs)
    assert not extra.router_loss.requires_grad
    assert moe_peft.router_loss(model) is trained.router_loss  # a no_grad forward does not replace it
    # on its own, the router loss reaches every router
    moe_peft.router_loss(model).backward()
    routers = _router(_grads(model))
    assert routers and all(torch.count_nonzero(g) > 0 for g in routers.values())


def test_router_loss_is_a_zero_tensor_without_terms(batch):
    model = _model(coef=0.0).train()
    out = model(**batch)
    assert isinstance(out.router_loss, torch.Tensor) and out.router_loss == 0
    loss = out.loss + moe_peft.router_loss(model)  # no TypeError
    torch.testing.assert_close(loss, out.loss)
    model.eval()
    with torch.no_grad():
        assert model(**batch).router_loss == 0


def test_outputs_loss_already_includes_the_router_loss_once(batch):
    model = _model(coef=0.5).train()
    out = model(**batch)
    logits = out.logits[:, :-1].flatten(0, 1)
    task = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, task + out.router_loss)  # so never add out.router_loss to out.loss


def test_accumulation_weight_follows_trainer_training_step(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=4, report_to=[], use_cpu=True)
    trainer = Trainer(model=_model(), args=args)
    trainer.current_gradient_accumulation_steps = 4
    assert trainer.model_accepts_loss_kwargs
    assert moe_peft.accumulation_weight(trainer, torch.tensor(100)) == 0.25  # Trainer will not divide
    assert moe_peft.accumulation_weight(trainer, None) == 1.0  # Trainer divides by 4 itself
    trainer.loss_is_scaled_for_ga = False
    # transformers 5.17's Trainer does not read the flag: then neither does accumulation_weight
    reads_flag = moe_peft._internal.accumulation.trainer_reads_scaled_flag()
    assert moe_peft.accumulation_weight(trainer, torch.tensor(100)) == (1.0 if reads_flag else 0.25)
    trainer.loss_is_scaled_for_ga = None
    trainer.model_accepts_loss_kwargs = False
    assert moe_peft.accumulation_weight(trainer, torch.tensor(100)) == 1.0
    trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: outputs.loss
    assert moe_peft.accumulation_weight(trainer, None) == 0.25


def test_a_root_module_that_returns_a_plain_tensor():
    """A tuner on a bare torch module: its output has no room for router_loss; router_loss(model) has it."""
    base = torch.nn.Sequential(torch.nn.Linear(8, 8))
    config = moe_peft.MoLEConfig(r=2, num_experts=2, top_k=2, target_modules=["0"], router_granularity="linear")
    model = get_peft_model(base, config).train()
    out = model(torch.randn(3, 5, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (3, 5, 8)
    assert moe_peft.router_loss(model) > 0 and moe_peft.router_loss(model).requires_grad
