"""`moe-peft bench quality --suite smollm2-135m` (moe_peft/bench/quality_real.py): its data, the budget on the real
architecture, the lr choice, resumable runs in one or several processes and the reports on a tiny chat Llama (fast),
the command line, and a 2-step smoke run on the real base (slow)."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from moe_peft.bases import char_tokenizer, tiny_llama
from moe_peft.bench import quality_methods as qm
from moe_peft.bench import quality_real as qr
from moe_peft.data import instructions as I

FAKE_ANSWERS = [[100 + i, 2] for i in range(len(I.general_prompts("train")))]  # a base's answer ids per prompt


def test_training_mixture_share_order_general_rows_and_held_out_prompts():
    suite = dataclasses.replace(qr.RealSuite(), steps=20, batch_size=8, general_share=0.25)
    rows = qr.training_mixture(suite, 0, FAKE_ANSWERS)
    assert len(rows) == 160
    general = [r for r in rows if r["task"] == qr.GENERAL]
    assert len(general) == 40 and all(r["sample_type"] == 1 for r in general)
    prompts = I.general_prompts("train")
    assert all(r["completion_ids"] == FAKE_ANSWERS[prompts.index(r["prompt"])] for r in general)
    assert len({r["prompt"] for r in general}) == 40  # every prompt once before any twice (48 prompts)
    counts = {t: sum(r["task"] == t for r in rows) for t in suite.tasks}
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 120
    assert all(r["sample_type"] == 0 for r in rows if r["task"] != qr.GENERAL)
    assert not qr.held_out_prompts(suite) & {r["prompt"] for r in rows}
    assert qr.training_mixture(suite, 0, FAKE_ANSWERS) == rows
    assert qr.training_mixture(suite, 1, FAKE_ANSWERS) != rows
    val, test = qr.eval_split(suite, "val"), qr.eval_split(suite, "test")
    assert not {s["prompt"] for g in val.values() for s in g} & {s["prompt"] for g in test.values() for s in g}


def test_batches_carry_task_ids_and_sample_types():
    tok = char_tokenizer()
    suite = dataclasses.replace(qr.RealSuite(), steps=2, batch_size=4, general_share=0.5)
    rows = qr.training_mixture(suite, 0, FAKE_ANSWERS)
    batches = qr.make_batches(suite, rows, tok)
    assert len(batches) == 2
    assert batches[0]["task_ids"].tolist() == [suite.all_tasks.index(r["task"]) for r in rows[:4]]
    assert batches[0]["sample_types"].tolist() == [r["sample_type"] for r in rows[:4]]
    assert len(qr.make_batches(suite, rows[:5], tok, keep_partial=True)) == 2  # a PHATGOOSE expert's last rows
    assert len(qr.make_batches(suite, rows[:5], tok)) == 1


def _smollm2_architecture(path) -> str:
    """SmolLM2-135M's config (as the converted checkpoint's config.json has it), no weights."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
    ).save_pretrained(path)  # fmt: skip
    return str(path)


def test_every_row_fits_the_budget_on_the_real_architecture(tmp_path):
    """LoRA r=44 on the 7 projections: 44 x 10176 x 30 parameters; each mixture of 6 experts within 5% of it."""
    base_dir = _smollm2_architecture(tmp_path)
    suite = qr.RealSuite()
    table = qr.real_method_table(suite)
    ranks, params, budget = qr.fit_ranks(list(table.values()), suite, base_dir)
    per_rank = 30 * sum(
        i + o for i, o in [(576, 576), (576, 192), (576, 192), (576, 576)] + [(576, 1536)] * 2 + [(1536, 576)]
    )
    assert budget == 44 * per_rank == 13_432_320
    for name, m in table.items():
        if not m.equal_active:
            assert abs(params[name] / budget - 1) <= qm.BUDGET_TOLERANCE, name
    want = {"MoLE top-1 block": 7, "LoRAMoE + LBC": 7, "SMoRA": 30, "MHR": 7, "PHATGOOSE": 6}
    assert {n: ranks[n] for n in want} == want
    # LoRAMoE: 6 experts of rank 7 plus a [6, in] router per linear, against the hand count
    assert params["LoRAMoE"] == 6 * 7 * per_rank + 30 * 6 * (576 * 6 + 1536)
    assert (ranks["MoLE top-1 block, equal active"], ranks["MoLE top-2 block, equal active"]) == (44, 22)
    # at r=32 no rank brings MHR within 5% (30 ranks: -6.2%, 36: +12.5%): why the budget is 44
    with pytest.raises(ValueError, match="within 5%"):
        qr.fit_ranks([table["LoRA"], table["MHR"]], dataclasses.replace(suite, budget_rank=32), base_dir)


def test_bad_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="dtype='float16'.*--dtype"):
        qr.RealSuite(dtype="float16")
    with pytest.raises(ValueError, match="num_facts=0"):
        qr.RealSuite(num_facts=0)
    with pytest.raises(ValueError, match="RealSuite.tasks"):
        qr.RealSuite(tasks=("first", "rev"))
    kw = dict(out_dir=str(tmp_path), suite=qr.RealSuite(base=str(tmp_path / "nothing")), log=lambda *a: 0)
    with pytest.raises(ValueError, match="not rows of the real suite.*'MoLE top-1 block'"):
        qr.bench_quality_real(methods=["LoRA", "MoLE"], **kw)
    with pytest.raises(ValueError, match="workers=0.*--workers"):
        qr.bench_quality_real(workers=0, **kw)


def test_lr_choice_on_the_task_score_lower_lr_on_a_tie():
    def run(lr, score):
        return {"lr": lr, "val_summary": {"tasks_mean": score}}

    assert qr.choose_lr([run(1e-3, 0.5), run(3e-3, 0.7)])["lr"] == 3e-3
    assert qr.choose_lr([run(1e-3, 0.7), run(3e-3, 0.7)])["lr"] == 1e-3


@pytest.fixture(scope="module")
def tiny_chat_base(tmp_path_factory):
    """A tiny Llama with the character tokenizer and its chat template, saved: the suite's machinery without the
    real weights (it knows no fact, its scores are noise)."""
    path = tmp_path_factory.mktemp("tiny_chat_base")
    tok = char_tokenizer()
    tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _tiny_suite(base: str, **kw) -> qr.RealSuite:
    return qr.RealSuite(
        base=base, budget_rank=32, steps=3, batch_size=4, lrs=(1e-3, 3e-3), seeds=(0, 1), test_per_task=2,
        val_per_task=1, num_facts=4, num_general_train=4, num_general_held_out=3, gate_steps=1, timing_reps=1,
        general_tokens=6, answer_tokens=8, fact_tokens=6, dtype="float32", **kw,
    )  # fmt: skip


def test_end_to_end_on_a_tiny_chat_base_writes_every_output_and_reuses_its_runs(tmp_path, tiny_chat_base):
    methods = ["LoRA", "LoRAMoE + LBC", "MHR", "PHATGOOSE"]
    logs = []
    kw = dict(out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), suite=_tiny_suite(tiny_chat_base))
    rows = qr.bench_quality_real(methods=methods, log=logs.append, **kw)
    assert [r["method"] for r in rows] == methods
    for r in rows:
        assert r["seeds"] == 2 and r["lr"] in (1e-3, 3e-3)
        assert abs(r["trainable_vs_budget"]) <= qm.BUDGET_TOLERANCE
        assert all(0 <= r[t] <= 1 for t in qr.RealSuite().tasks) and 0 <= r["agreement"] <= 1
    assert rows[0]["step_time_vs_lora"] == 1.0
    assert rows[2]["active_per_token"] == rows[2]["trainable"]  # MHR: dense
    runs = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(runs) == 4 * (2 + 1)  # 2 lrs on seed 0, the chosen lr on seed 1
    first = [json.loads(r) for r in runs if json.loads(r)["seed"] == 0]
    assert all("val" in r for r in first) and not any("val" in json.loads(r) for r in runs if json.loads(r)["seed"])
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| base model (no adapter) |" in md and "| LoRAMoE + LBC |" in md and "retention" in md
    with open(tmp_path / "out" / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 12
    # a restart skips every recorded run, even after a line cut by a kill, and gives the same table
    with open(tmp_path / "out" / "results.jsonl", "a") as f:
        f.write('{"key": "cut in the midd')
    logs.clear()
    again = qr.bench_quality_real(methods=methods, log=logs.append, **kw)
    assert (tmp_path / "out" / "results.jsonl").read_text().splitlines()[:12] == runs
    assert any("1 unreadable line" in str(line) for line in logs)
    assert not any(" seed " in str(line) and "lr " in str(line) for line in logs)  # no run was redone
    assert [r["tasks_mean"] for r in again] == [r["tasks_mean"] for r in rows]


def test_worker_processes_record_the_same_runs_as_one_process(tmp_path, tiny_chat_base):
    """Two processes give the numbers one process gives (one thread each, the same batches, the same seeds)."""
    methods = ["LoRA", "MHR"]
    suite = dataclasses.replace(_tiny_suite(tiny_chat_base), seeds=(0,), lrs=(1e-3,))
    out = {}
    for workers in (1, 2):
        out_dir = tmp_path / f"w{workers}"
        qr.bench_quality_real(
            out_dir=str(out_dir), cache_dir=str(tmp_path / "cache"), suite=suite, methods=methods, workers=workers,
            log=lambda *a: 0,
        )  # fmt: skip
        runs = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
        out[workers] = {r["method"]: (r["test"], r["agreement"], r["loss_last"]) for r in runs}
    assert out[1] == out[2]


def test_cli_routes_the_real_suite_and_the_real_demo(monkeypatch):
    import torch

    from moe_peft.apps import cli, demo, demo_real
    from moe_peft.bases import REAL_BASES

    assert cli.REAL_BASE_NAMES == tuple(REAL_BASES)
    seen = {}
    monkeypatch.setattr(qr, "bench_quality_real", lambda **kw: seen.update(kw))
    cli.main(["bench", "quality", "--suite", "smollm2-135m", "--quick", "--workers", "2", "--dtype", "float32"])
    assert seen["quick"] and seen["workers"] == 2 and seen["dtype"] == "float32"
    assert seen["out_dir"] == "out/quality_smollm2-135m"
    assert seen["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SystemExit):  # the tiny suite has no dtype or workers: refused, not ignored
        cli.main(["bench", "quality", "--workers", "2"])
    calls = {}
    monkeypatch.setattr(demo_real, "run_real_demo", lambda **kw: calls.update(real=kw))
    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.update(tiny=kw))
    cli.main(["demo", "--base", "smollm2-135m", "--steps", "5"])
    assert calls["real"] == {"base": "smollm2-135m", "out_dir": "out/demo_smollm2-135m", "seed": 0, "steps": 5}
    cli.main(["demo"])
    assert calls["tiny"] == {"out_dir": "out/demo", "seed": 0}  # the tiny demo's own defaults


@pytest.mark.slow
def test_real_suite_two_steps_end_to_end(tmp_path):
    """The real base, 2 training steps of LoRA and LoRAMoE + LBC, tiny evaluation sets: the pipeline runs."""
    suite = qr.RealSuite(
        steps=2, batch_size=4, lrs=(1e-3,), seeds=(0,), test_per_task=1, val_per_task=1, num_facts=6,
        num_general_train=4, num_general_held_out=3, timing_reps=1,
    )  # fmt: skip
    rows = qr.bench_quality_real(
        out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), suite=suite, methods=["LoRAMoE + LBC"]
    )
    assert [r["method"] for r in rows] == ["LoRA", "LoRAMoE + LBC"]
    for r in rows:
        assert 0 <= r["retention"] <= 1 and 0 < r["agreement"] <= 1
    assert rows[1]["active_per_token"] == pytest.approx(rows[1]["trainable"])  # LoRAMoE is dense
    assert "SmolLM2-135M-Instruct" in (tmp_path / "out" / "summary.md").read_text()
