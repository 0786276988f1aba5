"""Bundled synthetic multi-task instruction data: no download, seeded, small.

Every task takes the same kind of input (a short lowercase string) and demands a different output,
so one LoRA has to split its capacity between conflicting mappings, while routed experts can
specialize. A prompt is `"<task> <string>="`, the completion the answer followed by EOS:

    rev abcd=  -> dcba        (reverse)
    srt dbca=  -> abcd        (sort the letters)
    sft abcz=  -> bcda        (shift each letter by one, z -> a)
    bck abcz=  -> zaby        (shift each letter back by one, a -> z)
    rot abcz=  -> nopm        (shift each letter by thirteen: rot13)
    cpy abcd=  -> abcd        (copy)
    dup abc=   -> aabbcc      (double each letter)
    alt abcdef= -> ace        (every other letter)

sft, bck and rot are per-character substitutions: the same input letter must become a different output
letter depending on the task name alone, the sharpest conflict one LoRA can be asked to resolve.

Each sample carries its `task` and a `sample_type` (LoRAMoE's world-knowledge vs downstream split:
copy/duplicate count as type 1, "recall the input", the others as type 0).
"""

from __future__ import annotations

import json
import os
import random
import string
from collections.abc import Callable, Iterable
from typing import Optional

import torch


def _shift(s: str, k: int) -> str:
    """Each lowercase letter moved k places along the alphabet, wrapping around (a per-character substitution)."""
    return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in s)


TASKS: dict[str, Callable[[str], str]] = {
    "rev": lambda s: s[::-1],
    "srt": lambda s: "".join(sorted(s)),
    "sft": lambda s: _shift(s, 1),
    "bck": lambda s: _shift(s, -1),
    "rot": lambda s: _shift(s, 13),
    "cpy": lambda s: s,
    "dup": lambda s: "".join(c + c for c in s),
    "alt": lambda s: s[::2],
}
KNOWLEDGE_TASKS = ("cpy", "dup")  # sample_type 1; every other task is sample_type 0
DEFAULT_TASKS = ("rev", "srt", "sft", "cpy")


class CharTokenizer:
    """A character-level tokenizer that needs no download: ids 0..3 are <pad>, <bos>, <eos>, <unk>."""

    specials = ("<pad>", "<bos>", "<eos>", "<unk>")
    char_level = True  # how code below the data layer (RoMA's task embeddings) tells it from a transformers tokenizer

    def __init__(self, chars: str = string.ascii_lowercase + " =:>0123456789"):
        self.chars = chars
        self.id_to_token = list(self.specials) + list(chars)
        self.token_to_id = {t: i for i, t in enumerate(self.id_to_token)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2, 3

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [self.token_to_id.get(c, self.unk_token_id) for c in text]
        return [self.bos_token_id] + ids if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id and skip_special_tokens:
                break
            if i < len(self.specials) and skip_special_tokens:
                continue
            out.append(self.id_to_token[i] if 0 <= i < self.vocab_size else "")
        return "".join(out)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "char_tokenizer.json"), "w") as f:
            json.dump({"chars": self.chars}, f)

    @classmethod
    def from_pretrained(cls, path: str) -> CharTokenizer:
        with open(os.path.join(path, "char_tokenizer.json")) as f:
            return cls(**json.load(f))


def make_samples(
    num_samples: int,
    tasks: Iterable[str] = DEFAULT_TASKS,
    seed: int = 0,
    min_len: int = 3,
    max_len: int = 6,
    alphabet: str = "abcdefghij",
) -> list[dict]:
    """Balanced, seeded samples: {task, sample_type, prompt, completion}."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks={unknown} are unknown; choose from {sorted(TASKS)}.")
    rng = random.Random(seed)
    samples = []
    for i in range(num_samples):
        task = tasks[i % len(tasks)]
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))
        samples.append(
            {
                "task": task,
                "sample_type": int(task in KNOWLEDGE_TASKS),
                "prompt": f"{task} {s}=",
                "completion": TASKS[task](s),
            }
        )
    rng.shuffle(samples)
    return samples


def tokenize_sample(sample: dict, tokenizer: CharTokenizer) -> dict:
    """input_ids = <bos> prompt completion <eos>; labels mask the prompt with -100 (loss on the answer only)."""
    prompt = tokenizer.encode(sample["prompt"], add_bos=True)
    answer = tokenizer.encode(sample["completion"]) + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def tokenize_rows(samples: list[dict], tokenizer) -> list[dict]:
    """Each sample plus input_ids = prompt + completion + EOS and labels on the completion only, with moe-peft's
    CharTokenizer or a transformers tokenizer (its usual special tokens before the prompt)."""
    if isinstance(tokenizer, CharTokenizer):
        return [{**s, **tokenize_sample(s, tokenizer)} for s in samples]
    rows = []
    for s in samples:
        prompt = list(tokenizer(s["prompt"])["input_ids"])
        answer = tokenizer(s["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({**s, "input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def make_dataset(
    num_samples: int,
    tasks: Iterable[str] = DEFAULT_TASKS,
    seed: int = 0,
    tokenizer: Optional[CharTokenizer] = None,
    **kwargs,
):
    """A `datasets.Dataset` with task, sample_type, prompt, completion, input_ids and labels columns."""
    from datasets import Dataset

    tokenizer = tokenizer or CharTokenizer()
    rows = [{**s, **tokenize_sample(s, tokenizer)} for s in make_samples(num_samples, tasks, seed, **kwargs)]
    return Dataset.from_list(rows)


class Collator:
    """Right-pads a list of tokenized samples into a batch: input_ids, attention_mask, labels, sample_types."""

    def __init__(self, tokenizer: CharTokenizer, with_sample_types: bool = False):
        self.pad = tokenizer.pad_token_id
        self.with_sample_types = with_sample_types

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)  # [B, S]
        labels = torch.full((len(rows), width), -100, dtype=torch.long)  # [B, S]
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, S]
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.with_sample_types:
            batch["sample_types"] = torch.tensor([r["sample_type"] for r in rows], dtype=torch.long)  # [B]
        return batch
