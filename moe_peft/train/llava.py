"""`moe-peft train` on a LLaVA-family base (configs/mole_llava.yaml): the same YAML blocks, an image+text path.

A base whose model_type is LLaVA or LLaVA-NeXT (`model: tiny` with `tiny.arch: llava` / `llava_next`, or a hub id /
local path) is loaded with AutoModelForImageTextToText and its processor, and trained by MoESFTTrainer on image+text
conversations batched by `moe_peft.llava.LlavaCollator` (TRL sees an `images` column, leaves the rows as they are
and lets the collator build the batches). Data (`data.train`):

* `bundled_images`: `moe_peft.llava.make_image_tasks` (`data.bundled_tasks` names its tasks; left at the text
  default it means all of moe_peft.llava.TASKS);
* a local .json / .jsonl file of rows `{"messages": [...], "images": [paths], "task": optional}` (chat format with
  `{"type": "image"}` placeholders, the last message the assistant's answer; image paths relative to the file).

Outputs under `training.output_dir`: adapter/ (adapter, processor, tasks.json) and, with `stats.enabled`, stats/:
stats.json and the plots of moe_peft.stats (routing per layer and per task) plus llava.json (exact match of the
greedy answer per task on held-out rows, the expert load per modality group).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import torch

from ..data.bundled import DEFAULT_TASKS
from ..data.user import DataConfig, DataError, UserData
from .config import ConfigError, RunConfig

IMAGE_DATA = "bundled_images"
TINY_IMAGE_SIZE = 16  # moe_peft.llava.pretrain.TINY["image_size"]; a real model's processor resizes larger drawings
REAL_IMAGE_SIZE = 64


def is_llava(base: str) -> bool:
    """Whether `base` (a path or hub id) is a model moe_peft.llava supports."""
    from transformers import AutoConfig

    from ..llava import SUPPORTED_MODEL_TYPES

    return AutoConfig.from_pretrained(base).model_type in SUPPORTED_MODEL_TYPES


def image_rows(data: DataConfig, image_size: int, seed_offset: int = 0, samples: int | None = None) -> list[dict]:
    """Rows for LlavaCollator: `messages`, `images`, `task`, `answer` (the last assistant message)."""
    from ..llava import TASKS
    from ..llava.data import QUESTIONS, TEXT_TASKS, make_image_tasks

    if data.train == IMAGE_DATA:
        tasks = list(TASKS) if list(data.bundled_tasks) == list(DEFAULT_TASKS) else list(data.bundled_tasks)
        known = sorted({*QUESTIONS, *TEXT_TASKS})
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise DataError(f"data.bundled_tasks: unknown image tasks {unknown}; use some of {known}.")
        n = samples or data.max_samples or data.bundled_samples
        return make_image_tasks(n, tasks, seed=data.bundled_seed + seed_offset, image_size=image_size)
    rows = list(_file_rows(data.train, data.task_field))
    limit = samples or data.max_samples
    return rows[:limit] if limit else rows


def _file_rows(path: str, task_field: str | None) -> Iterator[dict]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".jsonl") or not os.path.isfile(path):
        raise DataError(
            f"data.train={path!r}: a LLaVA base reads {IMAGE_DATA!r} or a local .json / .jsonl file of "
            '{"messages": [...], "images": [paths]} rows.'
        )
    with open(path, encoding="utf-8") as f:
        records = json.load(f) if ext == ".json" else [json.loads(line) for line in f if line.strip()]
    folder = os.path.dirname(os.path.abspath(path))
    for i, record in enumerate(records):
        where = f"{path}, row {i + 1}"
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            raise DataError(f"{where}: `messages` must be a list of chat turns ending with the assistant's answer.")
        images = record.get("images") or []
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise DataError(f"{where}: `images` must be a list of image paths.")
        answer = messages[-1]["content"]
        if not isinstance(answer, str):
            answer = " ".join(item.get("text", "") for item in answer if item.get("type") == "text")
        task = record.get(task_field) if task_field else None
        yield {
            "messages": messages,
            "images": [p if os.path.isabs(p) else os.path.join(folder, p) for p in images],
            "task": str(task) if task is not None else "all",
            "answer": answer.strip(),
        }


def train_llava(config: RunConfig, base: str, output_dir: str, log: Callable, output=None):
    """Train the adapter of `config` on the LLaVA-family `base`; returns (model, paths, losses). `output`
    (moe_peft.train.outputs.OutputDir): the previous run's outputs to clear and the checkpoint to resume from."""
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..llava import LlavaCollator, check_supported
    from .shared import adapter_config, logged_losses, sft_config, trainer_callbacks, write_tasks
    from .trainer import MoESFTTrainer

    if config.method != "mole":
        raise ConfigError(
            f"{config.path or 'config'}: method={config.method!r} on a LLaVA base is not supported by moe-peft train: "
            "use method: mole (LLaVA-MoLE, with adapter.modality_experts for modality groups)."
        )
    if config.stats.enabled and config.stats.by == "sample_type":
        raise ConfigError(f"{config.path or 'config'}: stats.by=sample_type: image rows have none; use task or null.")
    image_size = TINY_IMAGE_SIZE if config.model == "tiny" else REAL_IMAGE_SIZE
    rows = image_rows(config.data, image_size)
    tasks = sorted({r["task"] for r in rows})
    log(f"data: {len(rows)} image+text rows from {config.data.train}, tasks {tasks}")
    processor = AutoProcessor.from_pretrained(base)
    collator = LlavaCollator(processor)
    init_kwargs = config.training.get("model_init_kwargs") or {}
    model = AutoModelForImageTextToText.from_pretrained(base, **init_kwargs)
    check_supported(model)

    trainer = MoESFTTrainer(
        model=model,
        # the collator reads `messages` and `images`: TRL must not drop them
        args=sft_config(config, output_dir=output_dir, model_init_kwargs=None, remove_unused_columns=False),
        train_dataset=Dataset.from_list(rows),
        data_collator=collator,
        processing_class=processor,
        peft_config=adapter_config(config, UserData(None, tasks, config.data.train)),
        routing_stats_per_layer=config.stats.log_per_layer,
    )
    trainer_callbacks(trainer)
    if output is not None:
        output.clear()  # the previous run's outputs, when overwriting or resuming: the base and data loaded
    trainer.train(resume_from_checkpoint=output.resume if output is not None else None)
    model = trainer.model
    adapter = os.path.join(output_dir, "adapter")
    model.save_pretrained(adapter)
    processor.save_pretrained(adapter)
    write_tasks(adapter, tasks)
    paths = {"adapter": adapter}
    if config.stats.enabled:
        paths.update(_llava_stats(config, model, collator, tasks, image_size, os.path.join(output_dir, "stats"), log))
    return model, paths, {"adapter": logged_losses(trainer)}


def _llava_stats(config: RunConfig, model, collator, tasks: list[str], image_size: int, out_dir: str, log: Callable):
    """Routing statistics and plots (moe_peft.stats.collect on the collator's batches), exact match per task and the
    expert load per modality group, on held-out rows (bundled: another seed; a file: stats.data or its first rows)."""
    from ..llava import modality_load
    from ..llava.pretrain import accuracy_by_task
    from ..stats import collect

    stats = config.stats
    source = DataConfig(train=stats.data) if stats.data is not None else config.data
    rows = image_rows(source, image_size, seed_offset=1 if source.train == IMAGE_DATA else 0, samples=stats.samples)
    names = tasks + sorted({r["task"] for r in rows} - set(tasks))  # the training tasks first, in their id order

    def batches():
        for start in range(0, len(rows), stats.batch_size):
            chunk = rows[start : start + stats.batch_size]
            batch = collator(chunk)
            batch["task_ids"] = torch.tensor([names.index(r["task"]) for r in chunk], dtype=torch.long)  # [B]
            yield batch

    result = collect(model, batches(), by=stats.by, task_names=names)
    paths = result.save(out_dir)
    accuracy = accuracy_by_task(model, collator, rows, batch_size=stats.batch_size)
    with torch.no_grad():  # one forward, whose routing modality_load reads
        device = next(model.parameters()).device
        model.eval()(**{k: v.to(device) for k, v in collator(rows[: stats.batch_size]).items()})
    load = modality_load(model)
    log("exact match on held-out rows: " + ", ".join(f"{t} {a:.2f}" for t, a in accuracy.items()))
    for group, values in load.items():
        log(f"expert load, {group} tokens: " + " ".join(f"{x:.2f}" for x in values["load"]))
    paths["llava"] = os.path.join(out_dir, "llava.json")
    with open(paths["llava"], "w") as f:
        json.dump({"samples": len(rows), "accuracy": accuracy, "modality_load": load}, f, indent=1)
    return paths
