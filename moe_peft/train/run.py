"""`moe-peft train CONFIG.yaml` and `moe-peft stats ADAPTER`: a YAML to a trained adapter and its routing plots.

Outputs of a training run, under `training.output_dir`:

    adapter/        the adapter (save_pretrained), the tokenizer, tasks.json (task names in id order)
    stats/          stats.json and the routing plots (moe_peft.stats)
    experts/<task>  PHATGOOSE only: each task's LoRA expert and its gates

An output_dir that holds a previous run's outputs is refused before anything loads, unless the run overwrites it
(`--overwrite`, training.overwrite_output_dir) or resumes it (training.resume_from_checkpoint): moe_peft.train.outputs.

PHATGOOSE is a recipe of several trainings (docs/methods.md): `moe-peft train` splits the data by task, trains one
PEFT LoRA expert per task (`experts:` block, `training:` steps each) with MoESFTTrainer, trains each expert's gates
on its own task's rows (`gates:` block), and assembles the library (`adapter:` block: top_k, routing).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from ..bases.real import REAL_BASES, base_path
from ..data.user import DataConfig, DataError, UserData, load_data
from .base import load_model, load_tokenizer, resolve_base, tiny_arch, tiny_character_warnings
from .config import LLAVA_ARCHS, ConfigError, RunConfig
from .llava import is_llava, train_llava
from .outputs import OutputDir, check_output_dir
from .shared import TASKS_FILE, adapter_config, logged_losses, sft_config, trainer_callbacks, write_tasks


def _trainer(config: RunConfig, base: str, train_dataset, tokenizer, peft_config, output_dir: str, stats: bool = True):
    from .trainer import MoESFTTrainer

    init_kwargs = config.training.get("model_init_kwargs") or {}
    trainer = MoESFTTrainer(
        model=load_model(base, init_kwargs),
        args=sft_config(config, output_dir=output_dir, model_init_kwargs=None),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        routing_stats=stats,
        routing_stats_per_layer=config.stats.log_per_layer,
    )
    trainer_callbacks(trainer)
    return trainer


def _save_adapter(model, tokenizer, tasks: list[str], path: str) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_tasks(path, tasks)


def _stats_rows(config: RunConfig, data: UserData, log: Callable):
    """The rows the plots are measured on (StatsConfig.data)."""
    stats = config.stats
    if stats.data is not None:
        return load_data(DataConfig(train=stats.data, max_samples=stats.samples), data.tasks or None, log).dataset
    if config.data.train == "bundled":  # held-out samples: the same tasks, another seed
        held_out = DataConfig(
            bundled_tasks=config.data.bundled_tasks,
            bundled_samples=stats.samples,
            bundled_seed=config.data.bundled_seed + 1,
        )
        return load_data(held_out, data.tasks or None, log).dataset
    return data.dataset.select(range(min(stats.samples, len(data.dataset))))


def _write_stats(config: RunConfig, model, tokenizer, data: UserData, out_dir: str, log: Callable) -> dict[str, str]:
    from ..stats import collect

    stats = config.stats
    rows = _stats_rows(config, data, log)
    by = _grouping(stats.by, rows, config.data.train, log)
    result = collect(
        model, rows, by=by, tokenizer=tokenizer, batch_size=stats.batch_size, task_names=data.tasks or None
    )
    return result.save(out_dir)


@dataclass
class TrainRun:
    """What a training run wrote (paths: adapter, experts, stats.json, plots) and its training losses as logged
    (per part: "adapter", or each PHATGOOSE expert's task)."""

    paths: dict[str, str]
    losses: dict[str, list[float]]
    seconds: float


def _grouping(by: Optional[str], rows, source: str, log: Callable) -> Optional[str]:
    """`by`, or None (one group) when the rows lack that field."""
    column = {"task": "task", "sample_type": "sample_types"}.get(by)
    if column is not None and column not in rows.column_names:
        log(f"{source} has no {by} field: routing statistics over all rows")
        return None
    return by


def train_from_config(config: RunConfig, log: Callable = print) -> TrainRun:
    """Train the adapter a RunConfig describes."""
    # before any work (the tiny base's pretraining, the data): the training arguments, and what to do with an
    # output_dir that holds a previous run
    output_dir = sft_config(config).output_dir
    output = check_output_dir(config, output_dir, log)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    try:
        base = resolve_base(config.model, config.method, config.tiny)
        arch = tiny_arch(config.tiny, config.method)
        if config.model == "tiny":
            log(f"base: the bundled tiny {arch} ({base})")
        elif base != config.model:
            log(f"base: {config.model} ({base})")
        if (arch in LLAVA_ARCHS) if config.model == "tiny" else is_llava(base):
            model, paths, losses = train_llava(config, base, output_dir, log, output)
            return TrainRun(paths, losses, time.perf_counter() - start)
        tokenizer = load_tokenizer(base)
        data = load_data(config.data, log=log)
        log(f"data: {len(data.dataset)} rows from {data.source}" + (f", tasks {data.tasks}" if data.tasks else ""))
        if config.model == "tiny" and config.data.train != "bundled":  # the bundled rows are made for the tiny base
            for warning in tiny_character_warnings(data.dataset, tokenizer, config.tiny, config.method):
                log(f"warning: {warning}")
        if config.method == "phatgoose":
            model, paths, losses = _train_phatgoose(config, base, tokenizer, data, output_dir, log, output)
        else:
            peft_config = adapter_config(config, data)
            trainer = _trainer(config, base, data.dataset, tokenizer, peft_config, output_dir)
            output.clear()  # the previous run's outputs, when overwriting or resuming: the base and data loaded
            trainer.train(resume_from_checkpoint=output.resume)
            model, losses = trainer.model, {"adapter": logged_losses(trainer)}
            paths = {"adapter": os.path.join(output_dir, "adapter")}
            _save_adapter(model, tokenizer, data.tasks, paths["adapter"])
        if config.stats.enabled:
            paths.update(_write_stats(config, model, tokenizer, data, os.path.join(output_dir, "stats"), log))
    finally:
        torch.set_num_threads(threads)
    return TrainRun(paths, losses, time.perf_counter() - start)


def _train_phatgoose(
    config: RunConfig, base: str, tokenizer, data: UserData, output_dir: str, log: Callable, output: OutputDir
):
    from peft import LoraConfig

    from ..tuners.phatgoose import assemble, train_gates

    if not data.tasks:
        raise DataError(
            "method: phatgoose trains one LoRA expert per task: every row needs a task (data.task_field), and the "
            f"rows of {data.source} have none."
        )
    expert_dirs, losses = [], {}
    output.clear()  # the previous run's outputs, when overwriting (resuming is refused for PHATGOOSE)
    for task in data.tasks:
        rows = data.dataset.filter(lambda r, task=task: r["task"] == task)
        lora = LoraConfig(**{"task_type": "CAUSAL_LM", **config.experts})
        path = os.path.join(output_dir, "experts", task)
        log(f"phatgoose: expert {task!r} on {len(rows)} rows")
        trainer = _trainer(config, base, rows, tokenizer, lora, path, stats=False)
        trainer.train()
        losses[task] = logged_losses(trainer)
        trainer.model.save_pretrained(path)
        gates = config.gates
        log(f"phatgoose: gates of {task!r} ({gates.steps} steps)")
        train_gates(
            trainer.model, trainer.train_dataset, steps=gates.steps, lr=gates.lr, collator=trainer.data_collator,
            batch_size=gates.batch_size, warmup_ratio=gates.warmup_ratio, save_to=path, seed=trainer.args.seed,
        )  # fmt: skip
        expert_dirs.append(path)
    fields = {"top_k": 2, **config.adapter}
    library = assemble(load_model(base), expert_dirs, names=list(data.tasks), **fields)
    adapter = os.path.join(output_dir, "adapter")
    _save_adapter(library, tokenizer, data.tasks, adapter)
    return library, {"adapter": adapter, "experts": os.path.join(output_dir, "experts")}, losses


def stats_from_adapter(
    adapter: str,
    data: str,
    out_dir: str,
    by: Optional[str] = "task",
    samples: int = 256,
    batch_size: int = 32,
    base: Optional[str] = None,
    threads: int = 1,
    log: Callable = print,
) -> dict[str, str]:
    """`moe-peft stats`: load an adapter on its base, measure its routing on `data`, write stats.json and plots."""
    from peft import PeftConfig, PeftModel

    from ..stats import collect

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base = base or PeftConfig.from_pretrained(adapter).base_model_name_or_path
        if base in REAL_BASES:  # --base smollm2-135m: its converted checkpoint
            base = base_path(base, log=log)
        if not base:
            raise ConfigError(f"{adapter}/adapter_config.json records no base model: pass --base PATH.")
        tokenizer = load_tokenizer(adapter if os.path.exists(os.path.join(adapter, "tokenizer_config.json")) else base)
        tasks = None
        if os.path.exists(os.path.join(adapter, TASKS_FILE)):
            with open(os.path.join(adapter, TASKS_FILE)) as f:
                tasks = json.load(f) or None
        model = PeftModel.from_pretrained(load_model(base), adapter).eval()
        rows = load_data(DataConfig(train=data, max_samples=samples), tasks, log).dataset
        by = _grouping(by, rows, data, log)
        result = collect(model, rows, by=by, tokenizer=tokenizer, batch_size=batch_size, task_names=tasks)
        return result.save(out_dir)
    finally:
        torch.set_num_threads(previous)
