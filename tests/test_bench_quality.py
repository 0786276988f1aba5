"""`moe-peft bench quality`: the suite's data, the parameter budget, active parameters, lr choice, the reports,
a tiny end-to-end run (fast) and the --quick mode (slow)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import peft
import pytest
import torch

import moe_peft
from moe_peft.bases import tiny_llama
from moe_peft.bench import quality as q
from moe_peft.bench import quality_methods as qm
from moe_peft.data import TASKS, CharTokenizer

TINY = dict(hidden_size=32, intermediate_size=64)


def test_substitution_tasks_against_hand_written_answers():
    assert TASKS["sft"]("abcz") == "bcda"
    assert TASKS["bck"]("abcz") == "zaby"
    assert TASKS["rot"]("abcz") == "nopm"
    assert TASKS["rot"](TASKS["rot"]("hello")) == "hello"  # rot13 is its own inverse


def test_training_mixture_share_types_order_and_held_out_prompts():
    suite = dataclasses.replace(q.Suite(), steps=50, batch_size=8, knowledge_share=0.25)
    splits = {s: q.eval_split(suite, s) for s in ("val", "test")}
    exclude = {x["prompt"] for d in splits.values() for g in d.values() for x in g}
    mix = q.training_mixture(suite, 0, exclude)
    assert len(mix) == 400
    knowledge = [x for x in mix if x["task"] in suite.knowledge_tasks]
    assert len(knowledge) == 100  # 25% of the samples
    assert all(x["sample_type"] == (x["task"] in suite.knowledge_tasks) for x in mix)
    assert not exclude & {x["prompt"] for x in mix}
    counts = {t: sum(x["task"] == t for x in mix) for t in suite.tasks}
    assert max(counts.values()) - min(counts.values()) <= 1  # the fine-tuning tasks are balanced
    assert q.training_mixture(suite, 0, exclude) == mix  # same seed, same order
    assert q.training_mixture(suite, 1, exclude) != mix
    # the splits do not depend on the seed and do not overlap
    assert not {x["prompt"] for g in splits["val"].values() for x in g} & {
        x["prompt"] for g in splits["test"].values() for x in g
    }


def test_batches_carry_sample_types_and_task_ids_only_to_the_methods_that_read_them():
    suite = dataclasses.replace(q.Suite(), steps=2, batch_size=4, knowledge_share=0.5)
    mix = q.training_mixture(suite, 0, set())
    batch = q.make_batches(suite, mix, CharTokenizer())[0]
    assert batch["sample_types"].tolist() == [x["sample_type"] for x in mix[:4]]
    assert batch["task_ids"].tolist() == [suite.all_tasks.index(x["task"]) for x in mix[:4]]
    table = qm.method_table(6, 8, 32)
    assert set(q._model_inputs(batch, table["LoRA"])) == {"input_ids", "attention_mask", "labels"}
    assert "sample_types" in q._model_inputs(batch, table["LoRAMoE + LBC"])
    assert "sample_types" not in q._model_inputs(batch, table["LoRAMoE"])
    assert "task_ids" in q._model_inputs(batch, table["MHR"])


def _linears(base):
    return qm.adapted_linears(base)


def test_trainable_counts_against_hand_formulas():
    base = tiny_llama(vocab_size=40, **TINY)
    lin = _linears(base)
    assert len(lin) == 14
    size = sum(m.in_features + m.out_features for m in lin)  # one rank of LoRA over every target
    ins = sum(m.in_features for m in lin)
    table = qm.method_table(6, 8, 32)
    assert qm.params_of(table["LoRA"], base, 32, 6) == 32 * size
    # LoRAMoE: 6 experts of rank 5 and a bias-free router [6, in] per linear
    assert qm.params_of(table["LoRAMoE"], base, 5, 6) == 6 * 5 * size + 6 * ins
    # SMoRA: r rank-1 experts and a router [r, in] per linear
    assert qm.params_of(table["SMoRA"], base, 21, 6) == 21 * size + 21 * ins
    # MoLE, block routing: one router (with bias) per attention block and per MLP, reading the hidden size
    h, blocks = TINY["hidden_size"], 2 * 2
    assert qm.params_of(table["MoLE top-1 block"], base, 5, 6) == 6 * 5 * size + blocks * (6 * h + 6)
    # PHATGOOSE: 7 LoRA experts and their gates [in] per module; a token uses every gate and 2 experts
    assert qm.phatgoose_params(base, 4, 7) == (7 * (4 * size + ins), 2 * 4 * size + 7 * ins)


def test_every_budget_row_is_within_five_percent_and_a_misfit_raises():
    base = tiny_llama(vocab_size=40, **TINY)
    table = qm.method_table(6, 8, 32)
    budget = qm.params_of(table["LoRA"], base, 32, 6)
    for m in table.values():
        if m.kind == "lora" or m.fixed_rank is not None:
            continue
        rank, n = qm.fit_rank(m, base, budget, 7)
        assert abs(n / budget - 1) <= qm.BUDGET_TOLERANCE, m.name
        assert n == qm.params_of(m, base, rank, 7)
    # LoRAMoE with 4 experts cannot come within 5% of a rank-16 LoRA: rank 4 is +12.5%, rank 3 is -12.5%
    loramoe4 = qm.method_table(4, 8, 16)["LoRAMoE"]
    with pytest.raises(ValueError, match="within 5%"):
        qm.fit_rank(loramoe4, base, qm.params_of(table["LoRA"], base, 16, 4), 4)


@pytest.mark.parametrize(
    "config, experts_per_token",
    [
        (dict(method="mole", top_k=1), 1),
        (dict(method="mole", top_k=2), 2),
        (dict(method="mole", top_k=2, router_granularity="linear"), 2),
        (dict(method="loramoe"), 4),
    ],
)
def test_active_parameters_against_hand_formula(config, experts_per_token):
    base = tiny_llama(vocab_size=40, **TINY)
    lin = _linears(base)
    kind = config.pop("method")
    common = dict(r=3, num_experts=4, target_modules=qm.TARGETS)
    cfg = moe_peft.MoLEConfig(**common, **config) if kind == "mole" else moe_peft.LoRAMoEConfig(**common)
    from peft import get_peft_model

    model = get_peft_model(base, cfg).eval()
    ids = torch.randint(4, 40, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # padding is not a token
    model(input_ids=ids, attention_mask=mask)
    routers = sum(p.numel() for n, p in model.named_parameters() if "router" in n)
    want = routers + experts_per_token * 3 * sum(m.in_features + m.out_features for m in lin)
    assert qm.moe_active_params(model) == pytest.approx(want)
    if kind == "loramoe":
        assert want == qm.count_trainable(model)  # dense routing: every parameter is active


def test_null_experts_lower_the_active_parameters_by_the_measured_null_share():
    from peft import get_peft_model

    from moe_peft.tuners.routed.layer import MoELoraLinear

    base = tiny_llama(vocab_size=40, **TINY)
    cfg = moe_peft.MoLEConfig(r=3, num_experts=4, top_k=2, num_null_experts=4, target_modules=qm.TARGETS)
    model = get_peft_model(base, cfg).eval()
    model(input_ids=torch.randint(4, 40, (2, 7)))
    want = sum(p.numel() for n, p in model.named_parameters() if "router" in n)
    nulls = []
    for layer in model.modules():
        if isinstance(layer, MoELoraLinear):
            null = layer._router_owner["default"].router_records["default"].null_fraction  # share of null picks
            nulls.append(null)
            want += 2 * (1 - null) * 3 * (layer.in_features + layer.out_features)
    assert 0 < max(nulls) < 1  # some picks are null: the count is below top_k experts per token
    assert qm.moe_active_params(model) == pytest.approx(want)


def test_lr_choice_takes_the_best_validation_score_and_the_lower_lr_on_a_tie():
    def run(lr, score):
        return {"lr": lr, "val_summary": {"all_mean": score}}

    assert q.choose_lr([run(1e-3, 0.5), run(3e-3, 0.7), run(1e-2, 0.6)])["lr"] == 3e-3
    assert q.choose_lr([run(1e-3, 0.7), run(3e-3, 0.7), run(1e-2, 0.1)])["lr"] == 1e-3


def test_cli_routes_bench_quality(monkeypatch):
    from moe_peft import cli

    seen = {}
    monkeypatch.setattr(q, "bench_quality", lambda **kw: seen.update(kw))
    cli.main(["bench", "quality", "--quick", "--methods", "LoRA, SMoRA", "--out", "x"])
    assert seen["quick"] and seen["methods"] == ["LoRA", "SMoRA"] and seen["out_dir"] == "x"


def _tiny_suite(**kw) -> q.Suite:
    return dataclasses.replace(
        q.Suite(),
        **TINY,
        pretrain_steps=20,
        steps=6,
        batch_size=8,
        knowledge_share=0.25,
        lrs=(3e-3, 1e-2),
        seeds=(0, 1),
        test_per_task=2,
        val_per_task=2,
        gate_steps=2,
        timing_reps=1,
        **kw,
    )


def test_end_to_end_on_a_tiny_suite_writes_every_output_and_reuses_its_runs(tmp_path):
    methods = ["LoRA", "LoRAMoE + LBC", "MHR"]
    kw = dict(out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), suite=_tiny_suite(), log=lambda *a: 0)
    rows = q.bench_quality(methods=methods, **kw)
    assert [r["method"] for r in rows] == methods
    for r in rows:
        assert r["seeds"] == 2 and r["lr"] in (3e-3, 1e-2)
        assert abs(r["trainable_vs_budget"]) <= qm.BUDGET_TOLERANCE
        assert all(0.0 <= r[t] <= 1.0 for t in _tiny_suite().all_tasks)
    assert rows[0]["step_time_vs_lora"] == 1.0 and rows[0]["step_time_vs_lora_spread"] == 0.0  # LoRA vs itself
    with open(tmp_path / "out" / "summary.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == methods
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| LoRAMoE + LBC |" in md and "base model" in md
    runs = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(runs) == 3 * (2 + 1)  # 2 lrs on the first seed, the chosen lr on the second
    assert {json.loads(r)["method"] for r in runs} == set(methods)
    # a rerun reuses every recorded run and gives the same table
    again = q.bench_quality(methods=methods, **kw)
    assert (tmp_path / "out" / "results.jsonl").read_text().splitlines() == runs
    assert [r["tasks_mean"] for r in again] == [r["tasks_mean"] for r in rows]


def test_unknown_method_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="LoRAMoE"):
        q.bench_quality(
            out_dir=str(tmp_path), cache_dir=str(tmp_path), suite=_tiny_suite(), methods=["LoRA", "MoLE"], log=print
        )


@pytest.mark.slow
def test_quick_mode_runs_every_method_end_to_end(tmp_path):
    threads = torch.get_num_threads()
    try:
        rows = q.bench_quality(out_dir=str(tmp_path / "out"), quick=True, cache_dir=str(tmp_path / "cache"))
    finally:
        torch.set_num_threads(threads)
    table = qm.method_table(6, 8, 32)
    assert [r["method"] for r in rows] == list(table)
    for r in rows:
        assert table[r["method"]].equal_active or abs(r["trainable_vs_budget"]) <= qm.BUDGET_TOLERANCE
        assert r["active_per_token"] <= r["trainable"] + 1e-6
    assert (tmp_path / "out" / "quality.png").stat().st_size > 10_000


def test_run_keys_are_the_same_in_every_process():
    """results.jsonl is reused across processes: a key must not depend on string hashing (sets in configs)."""
    import subprocess
    import sys

    code = (
        "from moe_peft.bench import quality as q, quality_methods as qm; t = qm.method_table(6, 8, 32); "
        "print(q._run_key(q.Suite(), t['LoRAMoE'], 5, 3e-3, 0), q._run_key(q.Suite(), t['LoRA'], 32, 3e-3, 0))"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True
        ).stdout
        for seed in ("1", "2")
    }
    assert len(keys) == 1 and len(next(iter(keys)).split()) == 2


def test_run_keys_ignore_the_row_name_and_int_vs_float_alpha_but_not_the_config():
    table = qm.method_table(6, 8, 32)
    same = dataclasses.replace(
        table["LoRAMoE"],
        name="LoRAMoE, my ablation",
        config=lambda r: moe_peft.LoRAMoEConfig(
            r=r, lora_alpha=2.0 * r, num_experts=6, blc_weight=0.0, target_modules=qm.TARGETS, task_type="CAUSAL_LM"
        ),
    )
    key = q._run_key(q.Suite(), table["LoRAMoE"], 5, 3e-3, 0)
    assert q._run_key(q.Suite(), same, 5, 3e-3, 0) == key
    assert q._run_key(q.Suite(), table["LoRAMoE + LBC"], 5, 3e-3, 0) != key  # LBC on, sample types given
    assert q._run_key(q.Suite(), table["LoRAMoE"], 5, 3e-3, 1) != key
    assert q._run_key(dataclasses.replace(q.Suite(), seeds=(4,)), table["LoRAMoE"], 5, 3e-3, 0) == key
    assert q._run_key(dataclasses.replace(q.Suite(), steps=10), table["LoRAMoE"], 5, 3e-3, 0) != key
    # LoRAMoE's default scaling (sqrt_gate) trains another adapter than alpha / r: not the runs recorded before it
    plain = dataclasses.replace(
        same, config=lambda r: moe_peft.LoRAMoEConfig(
            r=r, lora_alpha=2 * r, num_experts=6, blc_weight=0.0, expert_scaling="lora", target_modules=qm.TARGETS,
            task_type="CAUSAL_LM",
        )
    )  # fmt: skip
    assert q._run_key(q.Suite(), plain, 5, 3e-3, 0) != key


def test_the_configs_router_lr_ratio_is_in_the_key_and_in_the_optimizer(monkeypatch):
    table = qm.method_table(6, 8, 32)
    slow = table["MoLE top-1 block, router lr x0.1"]  # router_lr_ratio=0.1 in the config
    plain = table["MoLE top-1 block"]
    key = q._run_key(q.Suite(), slow, 5, 3e-3, 0)
    assert q._run_key(q.Suite(), plain, 5, 3e-3, 0) != key
    learned = q._run_key(q.Suite(), table["MoLE top-1 block, learned router"], 5, 3e-3, 0)
    assert learned not in (key, q._run_key(q.Suite(), plain, 5, 3e-3, 0))
    # router_init_std enters the key only when it is not the init every router had before the field (0.02)
    keys = {
        q._run_key(q.Suite(), table[f"MoLE top-1 block, learned router{s}"], 5, 3e-3, 0) for s in ("", ", init x10")
    }
    assert len(keys | {q._run_key(q.Suite(), table["MoLE top-1 block, learned router, init x0.1"], 5, 3e-3, 0)}) == 3
    # the runs the real suite recorded (benchmarks/results) keep their keys: a restart skips them. Since issue 23 the
    # default row trains frozen routers, the runs recorded as "frozen router"; the learned ones are their own row
    from moe_peft.bench import quality_real as qr

    path = os.path.join(
        os.path.dirname(__file__), "..", "benchmarks", "results", "quality_smollm2-135m", "results.jsonl"
    )
    with open(path) as f:
        recorded = {json.loads(line)["key"]: json.loads(line)["method"] for line in f}
    real = qr.real_method_table(qr.RealSuite())
    renamed = {
        "MoLE top-1 block": "MoLE top-1 block, frozen router",
        "MoLE top-1 block, learned router": "MoLE top-1 block",
        "MoLE top-1 block, router lr x0.1": "MoLE top-1 block, router lr x0.1",
        "MoLE top-1 block, equal active, learned router": "MoLE top-1 block, equal active",
    }
    for name, was in renamed.items():
        rank = 44 if "equal active" in name else 7
        lr = 1e-3 if "equal active" in name else 2e-3
        assert recorded[q._run_key(qr.RealSuite(), real[name], rank, lr, 0)] == was

    # train() builds its optimizer from the model's config: the routers get lr * 0.1, nothing else does
    seen = {}
    real_adamw = torch.optim.AdamW

    def spy(groups, **kw):
        seen["groups"] = groups
        return real_adamw(groups, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    model = peft.get_peft_model(tiny_llama(**TINY), slow.config(4))
    q.train(model, [], 2e-3)  # no batches: the optimizer is built, nothing is stepped
    router = {id(p) for n, p in model.named_parameters() if "router" in n and p.requires_grad}
    lrs = {g["lr"]: {id(p) for p in g["params"]} for g in seen["groups"]}
    assert lrs[2e-3 * 0.1] == router
    assert router and lrs[2e-3].isdisjoint(router)


@pytest.mark.parametrize("steps", [1, 2, 3, 9, 10, 11, 12])
def test_short_runs_train_without_a_scheduler_error(steps):
    # a PHATGOOSE expert trained on a small share of the rows: OneCycleLR divides by zero at exactly 10 steps
    model = peft.get_peft_model(tiny_llama(**TINY), moe_peft.MoLEConfig(r=2, num_experts=2, target_modules=["q_proj"]))
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    losses, _ = q.train(model, [batch] * steps, 1e-3)
    assert len(losses) == steps and all(map(torch.isfinite, torch.tensor(losses)))
