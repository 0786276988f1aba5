"""The base model of a training run: `model: tiny` (a bundled tiny model trained in full on bundled tasks, cached
on disk so that adapters record a path they reload from), a real base by name (`model: smollm2-135m`, converted once
into the same cache: moe_peft.bases.real) or a hub id / local path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import torch

from ..bases.cache import cache_root
from ..bases.real import REAL_BASES, base_path
from ..bases.tiny import char_tokenizer, tiny_llama, tiny_moe
from ..data.bundled import DEFAULT_TASKS, make_samples
from ..data.user import tokenize_example
from .config import LLAVA_ARCHS, TinyBaseConfig

BASE_ALPHABET = "abcdefghijklmnopqrstuvwx"  # the letters a tiny Llama base learns (bundled tasks use a-j)
MOE_ALPHABET = "abcdefghij"  # a tiny MoE base learns the bundled tasks themselves (RoMA needs successes)
LLAMA_TASKS = ("cpy", "dup")  # what a tiny Llama base knows before any adapter: the format, the characters


def tiny_arch(config: TinyBaseConfig, method: str) -> str:
    return config.arch or ("mixtral" if method == "roma" else "llama")


def tiny_base_path(config: TinyBaseConfig, method: str) -> str:
    """The tiny base's directory: built and trained on first use, then reused (the key covers every setting)."""
    arch = tiny_arch(config, method)
    if arch in LLAVA_ARCHS:
        from ..llava.data import BASE_TASKS
        from ..llava.pretrain import pretrain_tiny_llava

        # keyed by its settings and the thread count in the directory name (moe_peft.llava.pretrain)
        return pretrain_tiny_llava(
            os.path.join(cache_root(), "llava"), arch, steps=config.pretrain_steps, seed=config.seed,
            tasks=tuple(config.pretrain_tasks or BASE_TASKS), batch_size=config.pretrain_batch_size,
            lr=config.pretrain_lr if config.pretrain_lr is not None else 1e-3,
        )  # fmt: skip
    tasks, alphabet = _pretraining(config, arch)
    settings = {
        "arch": arch,
        "steps": config.pretrain_steps,
        "batch": config.pretrain_batch_size,
        "lr": config.pretrain_lr if config.pretrain_lr is not None else 3e-3,
        "tasks": tasks,
        "alphabet": alphabet,
        "hidden": config.hidden_size,
        "layers": config.num_layers,
        "seed": config.seed,
        "threads": torch.get_num_threads(),  # float sums, and so the trained weights, depend on it
        "format": 1,  # bump when the pretraining recipe changes
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_root(), f"tiny-{arch}-{key}")
    if not os.path.exists(os.path.join(path, "config.json")):
        _build_tiny_base(path, arch, tasks, alphabet, config)
    return path


def _pretraining(config: TinyBaseConfig, arch: str) -> tuple[list[str], str]:
    """The bundled tasks and the letters a tiny (non-LLaVA) base is trained on."""
    tasks = list(config.pretrain_tasks or (DEFAULT_TASKS if arch != "llama" else LLAMA_TASKS))
    alphabet = config.pretrain_alphabet or (BASE_ALPHABET if arch == "llama" else MOE_ALPHABET)
    return tasks, alphabet


def _pretraining_samples(config: TinyBaseConfig, tasks: list[str], alphabet: str) -> list[dict]:
    return make_samples(config.pretrain_steps * config.pretrain_batch_size, tasks, seed=config.seed, alphabet=alphabet)


def tiny_base_characters(config: TinyBaseConfig, method: str) -> set[str]:
    """Every character the tiny base of `model: tiny` read in its pretraining (its samples, regenerated: cheap)."""
    tasks, alphabet = _pretraining(config, tiny_arch(config, method))
    return {c for s in _pretraining_samples(config, tasks, alphabet) for c in s["prompt"] + s["completion"]}


def _row_text(row: dict) -> str:
    parts = []
    for value in (row["prompt"], row["completion"]):
        parts += [m["content"] for m in value] if isinstance(value, list) else [value]
    return "".join(parts)


def tiny_character_warnings(rows, tokenizer, config: TinyBaseConfig, method: str) -> list[str]:
    """What the tiny base cannot read, or never saw, in the user's rows (prompt/completion, text or chat): the
    characters the character tokenizer maps to <unk>, and those outside the base's pretraining (lowercase letters
    a-x, the task names, " " and "="): an adapter leaves the embeddings and the output layer as they are, so their
    untrained rows stay untrained, and a task that writes such characters is learned poorly, if at all."""
    vocab = tokenizer.get_vocab()
    seen = tiny_base_characters(config, method) if config.pretrain_steps else None
    unknown: dict[str, int] = {}  # character -> rows holding it
    unseen: dict[str, int] = {}
    unknown_rows = unseen_rows = n = 0
    if hasattr(rows, "column_names"):  # a datasets.Dataset: its columns read at once, faster than row by row
        rows = ({"prompt": p, "completion": c} for p, c in zip(rows["prompt"], rows["completion"]))
    for row in rows:
        n += 1
        chars = set(_row_text(row))
        bad = {c for c in chars if c not in vocab}
        new = {c for c in chars - bad if seen is not None and c not in seen}
        unknown_rows += bool(bad)
        unseen_rows += bool(new)
        for c in bad:
            unknown[c] = unknown.get(c, 0) + 1
        for c in new:
            unseen[c] = unseen.get(c, 0) + 1
    out = []
    if unknown:
        out.append(
            f"{unknown_rows} of {n} rows hold characters the tiny base's character tokenizer does not have (read as "
            f"<unk>, so their difference is lost): {_characters(unknown)}. Use a real base (model: a hub id or a "
            "path) for such text."
        )
    if unseen:
        tasks, alphabet = _pretraining(config, tiny_arch(config, method))
        out.append(
            f"{unseen_rows} of {n} rows hold characters the tiny base never saw in its pretraining (bundled tasks "
            f"{', '.join(tasks)} on the letters {alphabet!r}): {_characters(unseen)}. An adapter learns them poorly, "
            "if at all (the base's embeddings and output layer for them stay untrained): to teach the base them, "
            "add them to tiny.pretrain_alphabet (a new base is pretrained and cached), or use a real base."
        )
    return out


def _characters(counts: dict[str, int], shown: int = 40) -> str:
    """'A' (12 rows), 'B' (3 rows), ... (most frequent first)."""
    order = sorted(counts, key=lambda c: (-counts[c], c))
    text = ", ".join(f"{c!r} ({counts[c]} row{'s' if counts[c] != 1 else ''})" for c in order[:shown])
    return text + (f" and {len(order) - shown} more" if len(order) > shown else "")


def _build_tiny_base(path: str, arch: str, tasks: list[str], alphabet: str, config: TinyBaseConfig) -> None:
    tokenizer = char_tokenizer()
    vocab = len(tokenizer)
    if arch == "llama":
        model = tiny_llama(vocab, config.hidden_size, config.num_layers, 2 * config.hidden_size, seed=config.seed)
    else:
        model = tiny_moe(
            arch, vocab, config.hidden_size, config.num_layers, num_experts=8, top_k=2,
            intermediate_size=2 * config.hidden_size, seed=config.seed,
        )  # fmt: skip
    steps, batch_size = config.pretrain_steps, config.pretrain_batch_size
    if steps:
        torch.manual_seed(config.seed)
        samples = _pretraining_samples(config, tasks, alphabet)
        lr = config.pretrain_lr if config.pretrain_lr is not None else 3e-3
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
        model.train()
        for step in range(steps):
            batch = _batch(samples[step * batch_size : (step + 1) * batch_size], tokenizer)
            model(**batch).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(path))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, path)  # atomic: a concurrent run sees the whole directory or none
    except OSError:  # another run finished first
        shutil.rmtree(staging, ignore_errors=True)


def _batch(samples: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """<bos> prompt completion <eos>, right-padded; the loss on the completion only."""
    rows = []
    for s in samples:
        ids = tokenize_example(s, tokenizer)["input_ids"]
        prompt = len(tokenizer(s["prompt"])["input_ids"])
        rows.append((ids, [-100] * prompt + ids[prompt:]))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, S]
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def resolve_base(model: str, method: str, tiny: TinyBaseConfig) -> str:
    """A path or hub id TRL / transformers can load: the cached tiny base for "tiny", the converted checkpoint of a
    real base ("smollm2-135m": moe_peft.bases.real, converted on first use), else `model` itself."""
    if model == "tiny":
        return os.path.abspath(tiny_base_path(tiny, method))
    if model in REAL_BASES:
        return os.path.abspath(base_path(model))
    return model


def load_tokenizer(base: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def load_model(base: str, init_kwargs: dict | None = None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, **(init_kwargs or {}))
