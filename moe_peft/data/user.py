"""User data for training: one loader for local JSON / JSONL / CSV files, any `datasets` name or saved dataset
directory, and the bundled synthetic tasks.

Two row formats (told apart row by row, or fixed with `format`):

* chat: `{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}`; the last
  message must be the assistant's. It trains on that last answer (TRL's completion-only loss); the earlier turns
  are its prompt, rendered with the tokenizer's chat template.
* prompt/response pairs: `{"prompt": ..., "response": ...}`, also spelled instruction/output (Alpaca, with an
  optional `input` appended to the instruction), question/answer or prompt/completion. Plain text by default;
  `chat_template: true` turns each pair into a user turn and an assistant turn rendered with the chat template (and
  so does a file that also has chat rows: one dataset has one prompt format).

Optional per-row fields: `task` (a name or an int: MHR routes by it, PHATGOOSE trains one expert per task, the
statistics group by it) and `sample_type` (0 or 1: LoRAMoE's localized balancing). Either is in every row or in
none: a row without one that other rows have is a bad row.

A bad row (a missing field, a wrong type, an empty text) raises `DataError` naming the file, the row and the field.
Nothing is dropped silently: with `skip_bad_rows: true` bad rows are skipped and their count printed.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .bundled import DEFAULT_TASKS, make_samples

PROMPT_FIELDS = ("prompt", "instruction", "question")
RESPONSE_FIELDS = ("response", "output", "completion", "answer")
ROLES = ("system", "user", "assistant", "tool")
FILE_TYPES = (".json", ".jsonl", ".csv")


class DataError(ValueError):
    """A training row that cannot be used as it is."""


@dataclass
class DataConfig:
    """The `data:` block of a training YAML (each key is a field here).

    Args:
        train: "bundled" (moe_peft.data.bundled's synthetic tasks), "instructions" (moe_peft.data.instructions' chat
            tasks for a real chat model, named in bundled_tasks), a local .json / .jsonl / .csv file, a directory saved
            with `Dataset.save_to_disk`, or a `datasets` name (`datasets.load_dataset(train, subset, split=split)`).
        format: "auto" (a row with `messages_field` is chat, any other a pair), "messages" or "pairs".
        prompt_field / response_field / input_field: field names of pairs (None: the first of PROMPT_FIELDS /
            RESPONSE_FIELDS present in the first pair row; `input` goes with `instruction`).
        task_field / sample_type_field: the optional per-row fields (None: not read).
        chat_template: render pairs as a user and an assistant turn with the tokenizer's chat template.
        skip_bad_rows: skip bad rows (their count is printed) instead of raising.
        max_samples: read only the first N rows.
        bundled_tasks / bundled_samples / bundled_seed: what train="bundled" makes.
    """

    train: str = "bundled"
    split: str = "train"
    subset: Optional[str] = None
    format: Literal["auto", "messages", "pairs"] = "auto"
    messages_field: str = "messages"
    prompt_field: Optional[str] = None
    response_field: Optional[str] = None
    input_field: Optional[str] = None
    task_field: Optional[str] = "task"
    sample_type_field: Optional[str] = "sample_type"
    chat_template: bool = False
    skip_bad_rows: bool = False
    max_samples: Optional[int] = None
    bundled_tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    bundled_samples: int = 4096
    bundled_seed: int = 0

    def __post_init__(self):
        if self.format not in ("auto", "messages", "pairs"):
            raise ValueError(f"data.format={self.format!r} is invalid: use 'auto', 'messages' or 'pairs'.")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise ValueError(f"data.max_samples={self.max_samples!r} is invalid: use a positive integer or null.")
        if not isinstance(self.bundled_samples, int) or self.bundled_samples < 1:
            raise ValueError(f"data.bundled_samples={self.bundled_samples!r} is invalid: use a positive integer.")


@dataclass
class UserData:
    """Rows ready for MoESFTTrainer: `prompt`, `completion` (strings, or lists of chat messages), and when the data
    has them `task` (name), `task_ids` (its index in `tasks`) and `sample_types` (0/1)."""

    dataset: Any  # datasets.Dataset
    tasks: list[str]  # task names in id order ([] without a task field)
    source: str
    skipped: int = 0


# -- reading records ------------------------------------------------------------------------------------------------
def _records(config: DataConfig) -> Iterator[tuple[str, Any]]:
    """(location, raw record) pairs; location names the file and the row for error messages."""
    source = config.train
    if source == "bundled":
        for i, row in enumerate(make_samples(config.bundled_samples, config.bundled_tasks, config.bundled_seed)):
            yield f"bundled data, row {i + 1}", row
        return
    if source == "instructions":  # natural-language chat tasks for a real chat model (instructions.py)
        from .instructions import instruction_records

        try:
            records = instruction_records(config.bundled_tasks, config.bundled_samples, config.bundled_seed)
        except ValueError as error:
            raise DataError(str(error)) from None
        for i, row in enumerate(records):
            yield f"instruction data, row {i + 1}", row
        return
    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        if ext not in FILE_TYPES:
            raise DataError(f"{source}: unknown file type {ext!r}; use a .json, .jsonl or .csv file.")
        yield from {".json": _json_records, ".jsonl": _jsonl_records, ".csv": _csv_records}[ext](source)
        return
    if ext in FILE_TYPES:
        raise FileNotFoundError(f"data.train={source!r}: no such file.")
    import datasets

    saved = ("dataset_info.json", "state.json", "dataset_dict.json")
    if os.path.isdir(source) and any(os.path.exists(os.path.join(source, name)) for name in saved):
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[config.split]
    else:
        loaded = datasets.load_dataset(source, config.subset, split=config.split)
    for i, row in enumerate(loaded):
        yield f"{source} [{config.split}], row {i + 1}", row


def _jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines separate nothing in JSONL
            try:
                # without its newline: parsed with it, an error at the end of the line (a missing closing brace)
                # lands on "line 2, column 1" of the one-line text instead of the column after its last character
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}, row {line_no}: not valid JSON ({e.msg} at line {line_no}, column {e.colno})."
                ) from None
            yield f"{path}, row {line_no}", record


def _json_records(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        # one object per line under a .json name: read line by line, so that an error names its own line and column
        # (in the whole text, a line missing its closing brace is reported at column 1 of the next line)
        if e.msg == "Extra data" or text.lstrip().startswith("{"):
            yield from _jsonl_records(path)
            return
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of row objects, got a {type(records).__name__}.")
    for i, record in enumerate(records):
        yield f"{path}, row {i + 1}", record


def _csv_records(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        for i, record in enumerate(csv.DictReader(f)):
            yield f"{path}, row {i + 1} (line {i + 2})", record


# -- checking and converting rows -------------------------------------------------------------------------------------
def _text(where: str, row: dict, name: str, required: bool = True) -> Optional[str]:
    value = row.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: field {name!r} is missing.")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}.")
    if required and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty.")
    return value


def _messages(where: str, row: dict, name: str) -> list[dict]:
    value = row.get(name)
    if value is None:
        raise DataError(f"{where}: field {name!r} is missing.")
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field {name!r} is a string that is not a JSON list of messages.") from None
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(f"{where}: field {name!r} must be a list of at least 2 messages (a prompt and the answer).")
    messages = []
    for j, message in enumerate(value):
        at = f"{where}: field {name!r}, message {j + 1}"
        if not isinstance(message, dict):
            raise DataError(f"{at}: must be an object with 'role' and 'content', got {type(message).__name__}.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{at}: 'role' is {role!r}; use one of {ROLES}.")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{at}: 'content' must be a non-empty string, got {content!r}.")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: field {name!r}: the last message must be the assistant's answer (the one trained on)."
        )
    return messages


def _task(where: str, row: dict, name: str) -> Optional[str]:
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field {name!r} must be a task name or an integer, got {type(value).__name__}.")
    value = str(value).strip()
    if not value:
        raise DataError(f"{where}: field {name!r} is empty.")
    return value


def _sample_type(where: str, row: dict, name: str) -> Optional[int]:
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, str) and value.strip() in ("0", "1"):  # CSV
        value = int(value)
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int) or value not in (0, 1):
        raise DataError(f"{where}: field {name!r} must be 0 or 1 (LoRAMoE's sample type), got {value!r}.")
    return value


def _pick(first: dict, given: Optional[str], candidates: tuple[str, ...], what: str, where: str) -> str:
    if given is not None:
        return given
    for name in candidates:
        if name in first:
            return name
    raise DataError(
        f"{where}: no {what} field (looked for {list(candidates)}; fields: {sorted(first)}); name it with "
        f"data.{what}_field."
    )


def load_data(config: Any = None, task_names: Optional[list[str]] = None, log=print) -> UserData:
    """Load and check training rows (module docstring). `config`: a DataConfig, a dict of its fields, or a path.
    `task_names` fixes the task ids (an adapter's tasks.json); otherwise they are the sorted task names."""
    import datasets

    if config is None or isinstance(config, str):
        config = DataConfig() if config is None else DataConfig(train=config)
    elif isinstance(config, dict):
        config = DataConfig(**config)
    records = []
    for where, record in _records(config):
        if config.max_samples is not None and len(records) >= config.max_samples:
            break
        records.append((where, record))
    # an optional field that some row has must be in every row: a row without it is a bad row, not a silent default
    has_task = config.task_field is not None and any(_has(r, config.task_field) for _, r in records)
    has_type = config.sample_type_field is not None and any(_has(r, config.sample_type_field) for _, r in records)
    chat_rows = config.format == "messages" or (
        config.format == "auto" and any(_has(r, config.messages_field) for _, r in records)
    )
    pairs_as_chat = config.chat_template or chat_rows  # one file, one prompt format: pairs become chat turns
    rows, bad, first_error, pair_fields, mixed = [], 0, None, None, False
    for where, record in records:
        try:
            if not isinstance(record, dict):
                raise DataError(f"{where}: a row must be an object with named fields, got {type(record).__name__}.")
            if config.format == "messages" or (config.format == "auto" and config.messages_field in record):
                messages = _messages(where, record, config.messages_field)
                row = {"prompt": messages[:-1], "completion": messages[-1:]}
            else:
                pair_fields = pair_fields or _pair_fields(config, record, where)  # named by the first pair row
                row = _pair(record, pair_fields, where, pairs_as_chat)
                mixed = mixed or chat_rows
            if has_task:
                row["task"] = _task(where, record, config.task_field)
                if row["task"] is None:
                    raise DataError(f"{where}: field {config.task_field!r} is missing (other rows have one).")
            if has_type:
                row["sample_types"] = _sample_type(where, record, config.sample_type_field)
                if row["sample_types"] is None:
                    raise DataError(f"{where}: field {config.sample_type_field!r} is missing (other rows have one).")
        except DataError as e:
            if not config.skip_bad_rows:
                raise DataError(f"{e} Fix the row, or set data.skip_bad_rows: true to skip bad rows.") from None
            bad += 1
            first_error = first_error or str(e)
            continue
        rows.append(row)
    if mixed:
        log(
            f"{config.train} mixes chat rows and prompt/response rows: the pairs are read as a user and an assistant turn"
        )
    if bad:
        log(f"skipped {bad} bad rows of {config.train} (data.skip_bad_rows); the first: {first_error}")
    if not rows:
        raise DataError(f"{config.train}: no usable row.")
    tasks: list[str] = []
    if has_task:
        tasks = list(task_names) if task_names is not None else sorted({r["task"] for r in rows})
        unknown = sorted({r["task"] for r in rows} - set(tasks))
        if unknown:
            raise DataError(f"{config.train}: tasks {unknown} are not among the adapter's tasks {tasks}.")
        for r in rows:
            r["task_ids"] = tasks.index(r["task"])
    return UserData(datasets.Dataset.from_list(rows), tasks, config.train, bad)


def _has(record: Any, name: str) -> bool:
    return isinstance(record, dict) and record.get(name) is not None


def _pair_fields(config: DataConfig, first: dict, where: str) -> dict[str, Optional[str]]:
    prompt = _pick(first, config.prompt_field, PROMPT_FIELDS, "prompt", where)
    response = _pick(first, config.response_field, RESPONSE_FIELDS, "response", where)
    extra = config.input_field or ("input" if prompt == "instruction" and "input" in first else None)
    return {"prompt": prompt, "response": response, "input": extra}


def _pair(record: dict, fields: dict[str, Optional[str]], where: str, as_chat: bool) -> dict[str, Any]:
    prompt = _text(where, record, fields["prompt"])
    response = _text(where, record, fields["response"])
    if fields["input"] is not None:
        extra = _text(where, record, fields["input"], required=False)
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    if as_chat:
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": response}],
        }
    return {"prompt": prompt, "completion": response}


# -- tokenizing outside TRL (statistics) ------------------------------------------------------------------------------
def tokenize_example(row: dict, tokenizer) -> dict[str, list[int]]:
    """input_ids of a prompt/completion row as TRL's SFTTrainer builds them: the chat template for message lists,
    else the tokenizer's own special tokens around prompt + completion + EOS."""
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return {"input_ids": list(ids)}
    eos = tokenizer.eos_token or ""
    text = prompt + completion + ("" if completion.endswith(eos) else eos)
    return {"input_ids": list(tokenizer(text)["input_ids"])}
