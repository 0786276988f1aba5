"""Calibration data for export: what routing_weighted and svd fit on, and what every export's error is measured on.

`calibration` may be
* None or "bundled": the bundled synthetic tasks (moe_peft/data/bundled.py), `rows` samples drawn with their own
  seed (`tasks`: which of them; default DEFAULT_TASKS). Without a tokenizer, and only where the caller allows it
  (`vocab_size`: exact strategies, which need no particular data to show that they are exact), `rows` rows of
  RANDOM_LENGTH token ids drawn uniformly from the vocabulary instead;
* a path to a JSON Lines file whose rows hold "prompt" and "completion" (the loss and perplexity count the
  completion; a "task" field makes exact match by task possible), or "text" (every token counts), or
  "input_ids" (already tokenized; optional "labels");
* a list of such dicts.

An "input_ids" row may carry "token_types" (one modality group index per token, in the adapter's modality_experts
order): what an adapter with modality groups (MoLEConfig.modality_experts) needs to route each token within its
group. They go to the routed model's forward (the exported model has no modality); the error of such rows is measured
on the logits (exact match, which generates, is not run on them).

Rows are split deterministically: every 4th row is held out for measuring the error; the others are what the
approximations fit on (all rows are fit rows when only measuring: exact strategies and "average" fit nothing, but
are measured on the same held-out rows, so every strategy's error is measured on the same tokens).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..data.bundled import DEFAULT_TASKS, TASKS, make_samples, tokenize_rows
from ..tuners.roma.embeddings import encode_text, pad_batch, pad_id_of

BUNDLED_SEED = 2024  # not the demo's training (0) or test (1000) seeds
HOLDOUT_EVERY = 4
RANDOM_LENGTH = 32  # tokens per row of random token ids


@dataclass
class Calibration:
    source: str  # "bundled", "random token ids", a file path, or "rows"
    fit: list[dict]  # rows with input_ids and labels (and prompt/completion/task when given)
    eval: list[dict]
    pad_id: int
    tasks: Optional[list[str]] = None  # the bundled tasks drawn (source "bundled")
    note: Optional[str] = None  # what the measurement on these rows means, when it is not the obvious

    @property
    def has_tasks(self) -> bool:
        """Exact match by task is measured when the held-out rows are prompt/completion/task samples (without token
        types: generation would need each token's modality)."""
        return (
            bool(self.eval)
            and not self.has_token_types
            and all(k in r for r in self.eval for k in ("prompt", "completion", "task"))
        )

    @property
    def has_token_types(self) -> bool:
        """The rows carry each token's modality group (token_types); then every row does (load_calibration)."""
        return any("token_types" in r for r in self.fit + self.eval)

    def describe(self) -> dict:
        count = lambda rows: int(sum(len(r["input_ids"]) for r in rows))  # noqa: E731
        extra = {"tasks": self.tasks} if self.tasks is not None else {}
        if self.note is not None:
            extra["note"] = self.note
        return {
            "source": self.source,
            **extra,
            "fit_rows": len(self.fit),
            "eval_rows": len(self.eval),
            "fit_tokens": count(self.fit),
            "eval_tokens": count(self.eval),
            "held_out": f"every {HOLDOUT_EVERY}th row is held out for the measurement",
            "token_types": self.has_token_types,
        }


def _tokenize(rows: list[dict], tokenizer, where: str) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        if "token_types" in row:
            if "input_ids" not in row:
                raise ValueError(
                    f"calibration: {where} row {i} has token_types but no input_ids; token_types give one modality "
                    "group per token, so give them with the row's input_ids (same length)."
                )
            types = [int(t) for t in row["token_types"]]
            if len(types) != len(row["input_ids"]) or min(types, default=0) < 0:
                raise ValueError(
                    f"calibration: {where} row {i} has {len(types)} token_types for {len(row['input_ids'])} "
                    f"input_ids (smallest {min(types, default=0)}); give one group index >= 0 per token (indices "
                    "into the adapter's modality_experts, in its order)."
                )
            row = {**row, "token_types": types}
        if "input_ids" in row:
            ids = [int(t) for t in row["input_ids"]]
            out.append({**row, "input_ids": ids, "labels": list(row.get("labels", ids))})
            continue
        if not ("prompt" in row and "completion" in row) and "text" not in row:
            raise ValueError(
                f"calibration: {where} row {i} has keys {sorted(row)}; give each row 'prompt' and 'completion', "
                "'text', or 'input_ids'."
            )
        if tokenizer is None:
            raise ValueError(
                f"calibration: {where} row {i} is text, so a tokenizer is needed; pass tokenizer=... (the CLI loads "
                "the base model's tokenizer, or moe_peft's CharTokenizer when the base directory holds one)."
            )
        if "prompt" in row and "completion" in row:
            out.extend(tokenize_rows([row], tokenizer))
        else:
            ids = encode_text(tokenizer, row["text"])
            out.append({**row, "input_ids": ids, "labels": list(ids)})
    return out


def load_calibration(
    calibration: Union[None, str, os.PathLike, list[dict]],
    tokenizer=None,
    rows: int = 512,
    pad_id: Optional[int] = None,
    tasks: Optional[Sequence[str]] = None,
    vocab_size: Optional[int] = None,
) -> Calibration:
    bundled = calibration is None or calibration == "bundled"
    if tasks is not None and not bundled:
        raise ValueError(
            f"calibration_tasks={list(tasks)!r} picks bundled tasks, but calibration={calibration!r} gives other rows; "
            "pass one of them."
        )
    if bundled and tokenizer is None and vocab_size is not None and tasks is None:
        return _random_ids(rows, vocab_size, pad_id)
    if bundled:
        if tokenizer is None:
            raise ValueError(
                "calibration: the bundled data is text, so a tokenizer is needed; pass tokenizer=... or your own "
                "calibration rows with input_ids."
            )
        tasks = list(DEFAULT_TASKS if tasks is None else tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if not tasks or unknown:
            raise ValueError(
                f"calibration_tasks={tasks!r} is invalid: name bundled tasks ({sorted(TASKS)}), or leave it unset."
            )
        source, raw = "bundled", make_samples(rows, tasks=tasks, seed=BUNDLED_SEED)
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
    typed = sum("token_types" in r for r in tokenized)
    if 0 < typed < len(tokenized):
        raise ValueError(
            f"calibration: {typed} of the {len(tokenized)} rows of {source} carry token_types; give them on every row "
            "(each token's modality group) or on none."
        )
    if len(tokenized) < HOLDOUT_EVERY:
        raise ValueError(f"calibration: {len(tokenized)} rows; give at least {HOLDOUT_EVERY} (every 4th is held out).")
    held = [r for i, r in enumerate(tokenized) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    fit = [r for i, r in enumerate(tokenized) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    if pad_id is None:
        pad_id = pad_id_of(tokenizer) if tokenizer is not None else 0
    return Calibration(source=source, fit=fit, eval=held, pad_id=pad_id, tasks=tasks if bundled else None)


def _random_ids(rows: int, vocab_size: int, pad_id: Optional[int]) -> Calibration:
    """`rows` rows of RANDOM_LENGTH token ids drawn uniformly from the vocabulary (seeded): what an exact export is
    measured on when there is no tokenizer for the bundled text. Every token is scored (text rows)."""
    if rows < HOLDOUT_EVERY:
        raise ValueError(f"calibration: {rows} rows; give at least {HOLDOUT_EVERY} (every 4th is held out).")
    g = torch.Generator().manual_seed(BUNDLED_SEED)
    ids = torch.randint(0, vocab_size, (rows, RANDOM_LENGTH), generator=g).tolist()  # [rows, RANDOM_LENGTH]
    tokenized = [{"input_ids": r, "labels": list(r)} for r in ids]
    return Calibration(
        source="random token ids",
        fit=[r for i, r in enumerate(tokenized) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1],
        eval=[r for i, r in enumerate(tokenized) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1],
        pad_id=0 if pad_id is None else pad_id,
        note=(
            f"no tokenizer for the bundled text: measured on {rows} rows of {RANDOM_LENGTH} token ids drawn uniformly "
            f"from the vocabulary of {vocab_size} (seed {BUNDLED_SEED}); they show whether the export is exact (KL, "
            "largest logit difference, top-1 agreement), not how well it models text (perplexity)"
        ),
    )


def batches(rows: list[dict], pad_id: int, batch_size: int = 16) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches: input_ids, attention_mask [B, S] and labels (-100 on padding and unscored tokens), and
    token_types [B, S] when the rows carry them (-1 on padding: the routed model routes it as text; it is masked)."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = pad_batch([r["input_ids"] for r in chunk], pad_id)  # [B, S] each
        labels = torch.full_like(ids, -100)
        for i, r in enumerate(chunk):
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "token_types" in chunk[0]:
            types = torch.full_like(ids, -1)  # [B, S]
            for i, r in enumerate(chunk):
                types[i, : len(r["token_types"])] = torch.tensor(r["token_types"], dtype=torch.long)
            batch["token_types"] = types
        yield batch


def routed_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What only the routed model's forward takes from a batch: the tokens' modality groups (token_types), and the
    labels, from which an adapter with routing_level="sequence" finds each row's prompt (the tokens before the first
    label), so that it routes the calibration rows as it does in training and generation (the loss it then also
    computes is not used)."""
    extra = {"labels": batch["labels"]}
    if "token_types" in batch:
        extra["token_types"] = batch["token_types"]
    return extra
