"""Calibration data for export: what routing_weighted and svd fit on, and what every export's error is measured on.

`calibration` may be
* None or "bundled": the bundled synthetic tasks (moe_peft/data.py), `rows` samples drawn with their own seed;
* a path to a JSON Lines file whose rows hold "prompt" and "completion" (the loss and perplexity count the
  completion; a "task" field makes exact match by task possible), or "text" (every token counts), or
  "input_ids" (already tokenized; optional "labels");
* a list of such dicts.

Rows are split deterministically: every 4th row is held out for measuring the error; the others are what the
approximations fit on (all rows are fit rows when only measuring: exact strategies and "average" fit nothing, but
are measured on the same held-out rows, so every strategy's error is measured on the same tokens).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..data.bundled import DEFAULT_TASKS, make_samples, tokenize_rows
from ..tuners.roma.embeddings import encode_text, pad_batch, pad_id_of

BUNDLED_SEED = 2024  # not the demo's training (0) or test (1000) seeds
HOLDOUT_EVERY = 4


@dataclass
class Calibration:
    source: str  # "bundled", a file path, or "rows"
    fit: list[dict]  # rows with input_ids and labels (and prompt/completion/task when given)
    eval: list[dict]
    pad_id: int

    @property
    def has_tasks(self) -> bool:
        """Exact match by task is measured when the held-out rows are prompt/completion/task samples."""
        return bool(self.eval) and all(k in r for r in self.eval for k in ("prompt", "completion", "task"))

    def describe(self) -> dict:
        count = lambda rows: int(sum(len(r["input_ids"]) for r in rows))  # noqa: E731
        return {
            "source": self.source,
            "fit_rows": len(self.fit),
            "eval_rows": len(self.eval),
            "fit_tokens": count(self.fit),
            "eval_tokens": count(self.eval),
            "held_out": f"every {HOLDOUT_EVERY}th row is held out for the measurement",
        }


def _tokenize(rows: list[dict], tokenizer, where: str) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        if "input_ids" in row:
            ids = [int(t) for t in row["input_ids"]]
            out.append({**row, "input_ids": ids, "labels": list(row.get("labels", ids))})
            continue
        if tokenizer is None:
            raise ValueError(
                f"calibration: {where} row {i} is text, so a tokenizer is needed; pass tokenizer=... (the CLI loads "
                "the base model's tokenizer, or moe_peft's CharTokenizer when the base directory holds one)."
            )
        if "prompt" in row and "completion" in row:
            out.extend(tokenize_rows([row], tokenizer))
        elif "text" in row:
            ids = encode_text(tokenizer, row["text"])
            out.append({**row, "input_ids": ids, "labels": list(ids)})
        else:
            raise ValueError(
                f"calibration: {where} row {i} has keys {sorted(row)}; give each row 'prompt' and 'completion', "
                "'text', or 'input_ids'."
            )
    return out


def load_calibration(
    calibration: Union[None, str, os.PathLike, list[dict]],
    tokenizer=None,
    rows: int = 512,
    pad_id: Optional[int] = None,
) -> Calibration:
    if calibration is None or calibration == "bundled":
        if tokenizer is None:
            raise ValueError(
                "calibration: the bundled data is text, so a tokenizer is needed; pass tokenizer=... or your own "
                "calibration rows with input_ids."
            )
        source, raw = "bundled", make_samples(rows, tasks=DEFAULT_TASKS, seed=BUNDLED_SEED)
    elif isinstance(calibration, (str, os.PathLike)):
        source = os.fspath(calibration)
        if not os.path.isfile(source):
            raise ValueError(f"calibration={source!r} is not a file; give a JSON Lines file, 'bundled', or None.")
        with open(source) as f:
            raw = [json.loads(line) for line in f if line.strip()]
    elif isinstance(calibration, (list, tuple)):
        source, raw = "rows", list(calibration)
    else:
        raise ValueError(f"calibration={type(calibration).__name__} is invalid: use None, 'bundled', a path or rows.")
    tokenized = _tokenize(raw, tokenizer, source)
    if len(tokenized) < HOLDOUT_EVERY:
        raise ValueError(f"calibration: {len(tokenized)} rows; give at least {HOLDOUT_EVERY} (every 4th is held out).")
    held = [r for i, r in enumerate(tokenized) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    fit = [r for i, r in enumerate(tokenized) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    if pad_id is None:
        pad_id = pad_id_of(tokenizer) if tokenizer is not None else 0
    return Calibration(source=source, fit=fit, eval=held, pad_id=pad_id)


def batches(rows: list[dict], pad_id: int, batch_size: int = 16) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches: input_ids, attention_mask [B, S] and labels (-100 on padding and unscored tokens)."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = pad_batch([r["input_ids"] for r in chunk], pad_id)  # [B, S] each
        labels = torch.full_like(ids, -100)
        for i, r in enumerate(chunk):
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"], dtype=torch.long)
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}
