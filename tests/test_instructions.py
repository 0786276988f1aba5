"""moe_peft.data.instructions: the chat tasks against hand-written answers, the samples, `data.train: instructions`,
the scoring (whole-word mentions, retention against a hand count, agreement against a per-prompt loop) and the
chat generation helpers, on a tiny Llama with the character tokenizer's chat template (no download)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_peft.bases import char_tokenizer, tiny_llama
from moe_peft.data import DataConfig, DataError, load_data
from moe_peft.data import instructions as I


def test_tasks_against_hand_written_answers():
    xs = ["river", "apple", "stone"]
    want = {
        "first": "river",
        "last": "stone",
        "reverse": "stone, apple, river",
        "sort": "apple, river, stone",
        "upper": "RIVER, APPLE, STONE",
        "initials": "r, a, s",
        "repeat": "river, apple, stone",
    }
    assert set(want) == set(I.INSTRUCTION_TASKS)
    for task, answer in want.items():
        s = I.instruction_sample(task, xs)
        assert s["completion"] == answer, task
        assert s["prompt"].endswith(": river, apple, stone") and "this list" in s["prompt"]  # the same input
        assert s["sample_type"] == (task == "repeat")


def test_samples_are_balanced_seeded_distinct_and_respect_held_out_prompts():
    samples = I.make_instruction_samples(120, seed=3)
    counts = {t: sum(s["task"] == t for s in samples) for t in I.DEFAULT_INSTRUCTION_TASKS}
    assert set(counts.values()) == {20}
    assert I.make_instruction_samples(120, seed=3) == samples
    assert I.make_instruction_samples(120, seed=4) != samples
    for s in samples:
        words = s["prompt"].split(": ", 1)[1].split(", ")
        assert 3 <= len(words) <= 4 and len(set(words)) == len(words)
    held_out = {s["prompt"] for s in samples[:60]}
    again = I.make_instruction_samples(120, seed=3, exclude=held_out)
    assert not held_out & {s["prompt"] for s in again}


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown instruction tasks \\['rev'\\].*'first'"):
        I.make_instruction_samples(4, ["first", "rev"])


def test_training_rows_from_data_train_instructions():
    data = load_data(DataConfig(train="instructions", bundled_tasks=["first", "repeat"], bundled_samples=10))
    assert data.tasks == ["first", "repeat"]
    row = data.dataset[0]
    assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
    assert {r["sample_types"] for r in data.dataset} == {0, 1}  # repeat is sample_type 1
    assert all(r["sample_types"] == (r["task"] == "repeat") for r in data.dataset)
    with pytest.raises(DataError, match="data.bundled_tasks .*unknown instruction tasks \\['rev', 'srt'\\]"):
        load_data(DataConfig(train="instructions", bundled_tasks=["rev", "srt"]))


def test_mentions_is_whole_words_case_and_punctuation_free():
    assert I.mentions("The capital of France is Paris.", ["Paris"])
    assert I.mentions("PARIS!", ["Paris"])
    assert not I.mentions("Parisian cafes", ["Paris"])
    assert I.mentions("It is New Delhi, of course", ["New Delhi", "Delhi"])
    assert I.mentions("A day has 24 hours", ["twenty-four", "24"])
    assert I.mentions("twenty-four hours", ["twenty-four"])
    assert not I.mentions("", ["Paris"])


def test_retention_against_a_hand_count():
    before = [True, True, False, True, False, True]
    after = [True, False, True, True, False, False]
    # known before: facts 0, 1, 3, 5; still right: 0 and 3; fact 2 (unknown before, right after) does not count
    assert I.retention(before, after) == 2 / 4
    assert math.isnan(I.retention([False, False], [True, True]))
    with pytest.raises(ValueError, match="3 facts before, 2 after"):
        I.retention([True] * 3, [True] * 2)


def test_exact_match_is_exact_but_for_surrounding_whitespace():
    assert I.exact_match(" apple, river ", "apple, river")
    assert not I.exact_match("Apple, river", "apple, river")


@pytest.fixture
def chat_model():
    tokenizer = char_tokenizer()
    return tiny_llama(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, seed=0), tokenizer


def test_tokenize_chat_labels_the_answer_and_eos_after_the_generation_prompt(chat_model):
    _, tok = chat_model
    row = I.tokenize_chat({"prompt": "Give the first word of this list: a, b", "completion": "a"}, tok)
    prompt = I.prompt_ids(tok, "Give the first word of this list: a, b")
    assert row["input_ids"][: len(prompt)] == prompt
    assert row["input_ids"][len(prompt) :] == tok("a", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["labels"] == [-100] * len(prompt) + row["input_ids"][len(prompt) :]
    given = I.tokenize_chat({"prompt": "x", "completion_ids": [7, 8, 9]}, tok)  # a base's own answer ids, as they are
    assert given["input_ids"][-3:] == [7, 8, 9] and given["labels"][-3:] == [7, 8, 9]


def test_batched_generation_equals_one_prompt_at_a_time(chat_model):
    model, tok = chat_model
    prompts = ["Give the last word of this list: a, b, c", "hi", "What is the capital of France?"]
    together = I.generate_chat_ids(model, tok, prompts, max_new_tokens=6, batch_size=2)
    alone = [I.generate_chat_ids(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    assert all(len(a) <= 6 and tok.eos_token_id not in a for a in together)


def test_agreement_against_a_per_prompt_loop(chat_model):
    """Teacher-forced agreement and NLL on left-padded batches equal a plain loop over single unpadded prompts."""
    model, tok = chat_model
    prompts = ["Give the first word of this list: a, b", "hi", "Describe a forest in one sentence."]
    own = I.generate_chat_ids(model, tok, prompts, max_new_tokens=5)
    g = torch.Generator().manual_seed(0)
    other = [torch.randint(4, len(tok), (4,), generator=g).tolist() for _ in prompts]
    for reference in (own, other):
        hits = total = 0
        nll = 0.0
        with torch.no_grad():
            for p, r in zip(prompts, reference):
                ids = I.prompt_ids(tok, p) + r
                logits = model(input_ids=torch.tensor([ids])).logits[0]  # [S, V]
                for t in range(len(ids) - len(r), len(ids)):  # the answer tokens, each predicted at t - 1
                    hits += int(logits[t - 1].argmax().item() == ids[t])
                    nll -= torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
                    total += 1
        agreement, mean_nll = I.agreement_with_reference(model, tok, prompts, reference, batch_size=2)
        assert agreement == pytest.approx(hits / total)
        assert mean_nll == pytest.approx(nll / total, rel=1e-4)
    assert I.agreement_with_reference(model, tok, prompts, own)[0] == 1.0  # its own greedy answers


def test_general_prompts_split_is_disjoint():
    train, held_out = I.general_prompts("train"), I.general_prompts("held_out")
    assert len(train) == I.GENERAL_TRAIN_COUNT and held_out and not set(train) & set(held_out)
    with pytest.raises(ValueError, match="split='test'"):
        I.general_prompts("test")
