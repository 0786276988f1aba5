"""Bundled data and the README demo."""

from __future__ import annotations

import pytest

from moe_peft.data import TASKS, CharTokenizer, Collator, make_dataset, make_samples, tokenize_sample


def test_samples_are_seeded_balanced_and_correct():
    a, b = make_samples(40, seed=3), make_samples(40, seed=3)
    assert a == b and a != make_samples(40, seed=4)
    counts = {t: sum(s["task"] == t for s in a) for t in ("rev", "srt", "sft", "cpy")}
    assert set(counts.values()) == {10}
    for s in a:
        task, text = s["prompt"][:-1].split(" ")
        assert s["completion"] == TASKS[task](text)
        assert s["sample_type"] == int(task in ("cpy", "dup"))
    assert TASKS["sft"]("az") == "ba" and TASKS["alt"]("abcde") == "ace" and TASKS["dup"]("ab") == "aabb"


def test_same_input_different_tasks_conflict():
    outputs = {TASKS[t]("cab") for t in ("rev", "srt", "sft", "cpy")}
    assert len(outputs) == 4


def test_tokenizer_round_trip_and_labels():
    tok = CharTokenizer()
    sample = make_samples(1, seed=0)[0]
    row = tokenize_sample(sample, tok)
    n_prompt = len(sample["prompt"]) + 1  # + <bos>
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["input_ids"]) == sample["prompt"] + sample["completion"]


def test_dataset_and_collator():
    tok = CharTokenizer()
    data = make_dataset(10, tokenizer=tok)
    assert {"task", "sample_type", "prompt", "completion", "input_ids", "labels"} <= set(data.column_names)
    batch = Collator(tok, with_sample_types=True)([data[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batch["sample_types"].shape == (4,)
    with pytest.raises(ValueError, match="tasks="):
        make_samples(4, tasks=["nope"])


def test_demo_runs_trains_saves_and_reloads(tmp_path, capsys):
    from moe_peft.apps.demo import run_demo

    result = run_demo(out_dir=str(tmp_path), steps=60, batch_size=16)
    assert result["reload_identical"]
    assert result["loss_last"] < result["loss_first"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    printed = capsys.readouterr().out
    assert "expert load per layer" in printed and "identical logits = True" in printed
