"""The training-data loader: formats, chat templates, per-row task / sample type, and errors that name the file, the
row and the field (nothing dropped silently)."""

from __future__ import annotations

import csv
import json

import pytest
from datasets import Dataset
from trl import SFTConfig

import moe_peft
from moe_peft.bases import char_tokenizer, tiny_llama
from moe_peft.data import DataConfig, DataError, load_data, tokenize_example

CHAT = [
    {"messages": [{"role": "user", "content": "rev abc="}, {"role": "assistant", "content": "cba"}], "task": "rev"},
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "srt cab="},
            {"role": "assistant", "content": "abc"},
        ],
        "task": "srt",
    },
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_chat_jsonl_becomes_prompt_and_last_answer(tmp_path):
    data = load_data(_jsonl(tmp_path / "chat.jsonl", CHAT))
    row = data.dataset[1]
    assert row["prompt"] == CHAT[1]["messages"][:2] and row["completion"] == CHAT[1]["messages"][2:]
    assert data.tasks == ["rev", "srt"] and data.dataset["task_ids"] == [0, 1]


def test_pairs_in_json_csv_and_alpaca_spellings(tmp_path):
    rows = [
        {"prompt": "rev ab=", "response": "ba", "sample_type": 0},
        {"prompt": "cpy ab=", "response": "ab", "sample_type": 1},
    ]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    data = load_data(str(tmp_path / "pairs.json"))
    assert data.dataset[0] == {"prompt": "rev ab=", "completion": "ba", "sample_types": 0}
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output", "sample_type", "task"])
        writer.writeheader()
        writer.writerow({"instruction": "Reverse", "input": "abc", "output": "cba", "sample_type": "1", "task": "rev"})
        writer.writerow({"instruction": "Say hi", "input": "", "output": "hi", "sample_type": "0", "task": "hi"})
    data = load_data(str(tmp_path / "pairs.csv"))
    assert data.dataset["prompt"] == ["Reverse\n\nabc", "Say hi"] and data.dataset["sample_types"] == [1, 0]
    # a .json file holding one object per line is read as JSON lines
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    assert len(load_data(str(tmp_path / "lines.json")).dataset) == 2


def test_saved_dataset_directory_and_bundled_data(tmp_path):
    Dataset.from_list(CHAT).save_to_disk(str(tmp_path / "saved"))
    assert len(load_data(str(tmp_path / "saved")).dataset) == 2
    bundled = load_data(DataConfig(bundled_samples=8, bundled_tasks=["rev", "cpy"]))
    assert set(bundled.dataset["sample_types"]) == {0, 1} and bundled.tasks == ["cpy", "rev"]


def test_pairs_with_chat_template_become_turns(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"question": "hi?", "answer": "yes"}])
    row = load_data(DataConfig(train=path, chat_template=True)).dataset[0]
    assert row["prompt"] == [{"role": "user", "content": "hi?"}]
    assert row["completion"] == [{"role": "assistant", "content": "yes"}]


@pytest.mark.parametrize(
    "rows, row, message",
    [
        ([{"prompt": "a", "response": "b"}, {"prompt": "a"}], 2, "field 'response' is missing"),
        ([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": 3}], 2, "field 'response' must be a string"),
        ([{"prompt": "a", "response": "b"}, {"prompt": "  ", "response": "b"}], 2, "field 'prompt' is empty"),
        (
            [CHAT[0], {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}],
            2,
            "'role' is 'bot'",
        ),
        (
            [CHAT[0], {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}],
            2,
            "message 2",
        ),
        (
            [{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}],
            1,
            "the last message",
        ),
        ([{"prompt": "a", "response": "b", "sample_type": 2}], 1, "field 'sample_type' must be 0 or 1"),
        (
            [{"prompt": "a", "response": "b", "task": "t"}, {"prompt": "a", "response": "b"}],
            2,
            "field 'task' is missing",
        ),
        ([{"prompt": "a", "response": "b", "task": ""}], 1, "field 'task' is empty"),
    ],
)
def test_bad_rows_name_the_file_row_and_field(tmp_path, rows, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_data(path)
    text = str(error.value)
    assert f"{path}, row {row}" in text and message in text and "skip_bad_rows" in text


def test_invalid_json_line_and_csv_rows_are_located(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": \n')
    with pytest.raises(DataError, match=r"broken.jsonl, row 3: not valid JSON"):
        load_data(str(tmp_path / "broken.jsonl"))
    (tmp_path / "bad.csv").write_text("prompt,response\na,b\nc,\n")
    with pytest.raises(DataError, match=r"bad.csv, row 2 \(line 3\): field 'response' is empty"):
        load_data(str(tmp_path / "bad.csv"))


def test_no_prompt_field_says_how_to_name_it(tmp_path):
    with pytest.raises(DataError, match="data.prompt_field"):
        load_data(_jsonl(tmp_path / "x.jsonl", [{"query": "a", "response": "b"}]))


def test_skip_bad_rows_prints_the_count(tmp_path):
    rows = [
        {"prompt": "a", "response": "b"},
        {"prompt": "a"},
        {"prompt": "c", "response": ""},
        {"prompt": "d", "response": "e"},
    ]
    printed = []
    data = load_data(DataConfig(train=_jsonl(tmp_path / "s.jsonl", rows), skip_bad_rows=True), log=printed.append)
    assert data.dataset["prompt"] == ["a", "d"] and data.skipped == 2
    assert len(printed) == 1 and "skipped 2 bad rows" in printed[0]


def test_task_ids_follow_the_given_task_names(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", CHAT)
    assert load_data(path, task_names=["srt", "rev", "x"]).dataset["task_ids"] == [1, 0]
    with pytest.raises(DataError, match="not among the adapter's tasks"):
        load_data(path, task_names=["rev"])


def test_chat_template_tokens_reach_the_trainer(tmp_path):
    """TRL applies the tokenizer's chat template to the loaded rows and trains on the answer only; the statistics'
    tokenize_example gives the same ids."""
    tok = char_tokenizer()
    data = load_data(_jsonl(tmp_path / "chat.jsonl", CHAT))
    trainer = moe_peft.MoESFTTrainer(
        model=tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=48),
        args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], bf16=False, gradient_checkpointing=False),
        train_dataset=data.dataset,
        processing_class=tok,
        peft_config=moe_peft.MoLEConfig(r=2, num_experts=2, target_modules=["gate_proj"], task_type="CAUSAL_LM"),
    )
    prepared = trainer.train_dataset[1]
    messages = CHAT[1]["messages"]
    want = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert prepared["input_ids"] == want == tokenize_example(data.dataset[1], tok)["input_ids"]
    answer = [t for t, label in zip(prepared["input_ids"], prepared["labels"]) if label != -100]
    assert tok.decode(answer) == "abc<eos>"  # the assistant's answer only


def test_a_file_mixing_chat_and_pairs_reads_pairs_as_turns(tmp_path):
    printed = []
    rows = [CHAT[0], {"prompt": "Sort: cab", "response": "abc", "task": "srt"}]
    data = load_data(_jsonl(tmp_path / "mixed.jsonl", rows), log=printed.append)
    assert data.dataset[1]["prompt"] == [{"role": "user", "content": "Sort: cab"}]
    assert data.dataset[1]["completion"] == [{"role": "assistant", "content": "abc"}]
    assert len(printed) == 1 and "mixes chat rows and prompt/response rows" in printed[0]


def test_an_optional_field_in_a_later_row_only_is_a_bad_first_row(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d", "sample_type": 1}]
    with pytest.raises(DataError, match=r"row 1: field 'sample_type' is missing \(other rows have one\)"):
        load_data(_jsonl(tmp_path / "partial.jsonl", rows))


def test_a_broken_json_line_names_the_file_line_and_the_decoders_column(tmp_path):
    """A JSONL line missing its closing brace: the decoder stops at the end of the line. Parsed with its newline, the
    error pointed at "line 2, column 1" of the one-line text (reported as column 1); it is the column after the last
    character. The expected column comes from the decoder on the line itself, not a hard-coded number."""
    good = json.dumps({"prompt": "a", "response": "b"})
    broken = '{"prompt": "abc", "response": "the answer is 42"'  # no closing brace
    try:
        json.loads(broken)
    except json.JSONDecodeError as e:
        column = e.colno
    assert column == len(broken) + 1 > 1
    path = tmp_path / "broken.jsonl"
    path.write_text(f"{good}\n{broken}\n{good}\n")
    with pytest.raises(DataError) as error:
        load_data(str(path))
    assert f"{path}, row 2: not valid JSON (Expecting ',' delimiter at line 2, column {column})" in str(error.value)
    # the same rows in a .json file (one object per line, the first one broken): located on that line too
    as_json = tmp_path / "rows.json"
    as_json.write_text(f"{broken}\n{good}\n")
    with pytest.raises(DataError) as error:
        load_data(str(as_json))
    assert f"{as_json}, row 1: not valid JSON (Expecting ',' delimiter at line 1, column {column})" in str(error.value)
    # a JSON array keeps the decoder's own line and column in the whole file
    array = tmp_path / "array.json"
    text = f"[\n{good},\n{good}\n{good}\n]\n"  # a missing comma after the second row
    array.write_text(text)
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        want = f"{e.msg} at line {e.lineno}, column {e.colno}"
    with pytest.raises(DataError, match=f"{array}: not valid JSON \\({want}\\)"):
        load_data(str(array))


# -- the tiny base's characters (model: tiny) ---------------------------------------------------------------------------
def test_the_tiny_base_warns_about_characters_it_cannot_read_or_never_saw(tmp_path):
    """The issue: an uppercase task on model: tiny learned 1 of 20 held-out rows; the base was pretrained on lowercase
    letters only. The counts are computed here from the rows, the pretraining characters from the base's recipe."""
    from moe_peft.train.base import tiny_base_characters, tiny_character_warnings
    from moe_peft.train.config import TinyBaseConfig

    tiny = TinyBaseConfig()
    seen = tiny_base_characters(tiny, "mole")
    assert set("abcdefghijklmnopqrstuvwx =") <= seen and not {"A", "Z", "!", "é"} & seen
    rows = [
        {"prompt": "shout abc=", "completion": "ABC"},
        {"prompt": "shout hi=", "completion": "HI!"},
        {"prompt": "café=", "completion": "cafe"},  # é: not in the character tokenizer
        {"prompt": "copy abc=", "completion": "abc"},  # lowercase: nothing to say
    ]
    chat = [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "hi"}]}]
    warnings = tiny_character_warnings(rows + chat, char_tokenizer(), tiny, "mole")
    assert len(warnings) == 2
    unknown, unseen = warnings
    text = ["".join(_flat(r)) for r in rows + chat]
    assert unknown.startswith(f"{sum('é' in t for t in text)} of 5 rows hold characters") and "<unk>" in unknown
    assert "'é' (1 row)" in unknown
    new = sorted({c for t in text for c in t if c not in seen and c != "é"})
    assert new == ["!", "A", "B", "C", "H", "I"]
    rows_with_new = sum(any(c in new for c in t) for t in text)
    assert unseen.startswith(f"{rows_with_new} of 5 rows hold characters the tiny base never saw")
    for c in new:
        assert f"{c!r} ({sum(c in t for t in text)} row" in unseen, c
    assert "tiny.pretrain_alphabet" in unseen and "abcdefghijklmnopqrstuvwx" in unseen
    assert tiny_character_warnings(rows[3:], char_tokenizer(), tiny, "mole") == []
    # a base pretrained on the uppercase letters too has nothing to say about them
    wide = TinyBaseConfig(pretrain_alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!")
    assert tiny_character_warnings(rows[:2], char_tokenizer(), wide, "mole") == []


def _flat(row):
    for value in (row["prompt"], row["completion"]):
        yield from ([m["content"] for m in value] if isinstance(value, list) else [value])


def test_moe_peft_train_on_tiny_warns_before_training(tmp_path, monkeypatch):
    import pathlib

    import moe_peft.train.run as run_module
    from moe_peft.train.config import load_config

    data = _jsonl(tmp_path / "upper.jsonl", [{"prompt": f"up {w}=", "response": w.upper()} for w in ("abc", "de")])
    logged = []

    def stop(*args, **kwargs):
        raise RuntimeError("training would start here")

    monkeypatch.setattr(run_module, "_trainer", stop)
    config = pathlib.Path(__file__).resolve().parent.parent / "configs" / "mole.yaml"
    run = load_config(str(config), [f"data.train={data}", f"training.output_dir={tmp_path / 'out'}"])
    with pytest.raises(RuntimeError, match="training would start here"):
        run_module.train_from_config(run, log=logged.append)
    warning = next(line for line in logged if line.startswith("warning: 2 of 2 rows hold characters the tiny base"))
    assert all(f"{c!r}" in warning for c in "ABCDE")
