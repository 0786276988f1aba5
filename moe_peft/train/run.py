"""`moe-peft train CONFIG.yaml` and `moe-peft stats ADAPTER`: a YAML to a trained adapter and its routing plots.

Outputs of a training run, under `training.output_dir`:

    adapter/        the adapter (save_pretrained), the tokenizer, tasks.json (task names in id order)
    stats/          stats.json and the routing plots (moe_peft.stats)
    experts/<task>  PHATGOOSE only: each task's LoRA expert and its gates

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

from .base import load_model, load_tokenizer, resolve_base
from .config import ConfigError, RunConfig, method_config_class
from .data import DataConfig, DataError, UserData, load_data

TASKS_FILE = "tasks.json"


def _progress_without_layers():
    """Trainer's progress bar, printing the logs without the per-layer routing keys (they still go to report_to)."""
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            shown = {
                k: v for k, v in (logs or {}).items() if not k.startswith("routing/") or k.startswith("routing/mean/")
            }
            return super().on_log(args, state, control, logs=shown, **kwargs)

    return ProgressCallback, QuietProgress


def _sft_config(config: RunConfig, **changes):
    from trl import SFTConfig

    fields = {"output_dir": f"out/{config.method}", "report_to": "none", **config.training, **changes}
    try:
        return SFTConfig(**fields)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{config.path or 'config'}: training: {error}") from error


def _adapter_config(config: RunConfig, data: UserData):
    fields = dict(config.adapter)
    if config.method == "mhr" and data.tasks:
        given = fields.get("n_tasks")
        if given is None:
            fields["n_tasks"] = len(data.tasks)  # one row of the routing matrix per task of the data
        elif given < len(data.tasks):
            raise ConfigError(
                f"adapter.n_tasks={given} is invalid: the data has {len(data.tasks)} tasks {data.tasks}; "
                f"use n_tasks >= {len(data.tasks)} or leave it unset."
            )
    try:
        return method_config_class(config.method)(**fields)
    except (ValueError, TypeError) as error:  # the config class names the field and the fix
        raise ConfigError(f"{config.path or 'config'}: adapter: {error}") from error


def _trainer(config: RunConfig, base: str, train_dataset, tokenizer, peft_config, output_dir: str, stats: bool = True):
    from .trainer import MoESFTTrainer

    init_kwargs = config.training.get("model_init_kwargs") or {}
    trainer = MoESFTTrainer(
        model=load_model(base, init_kwargs),
        args=_sft_config(config, output_dir=output_dir, model_init_kwargs=None),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        routing_stats=stats,
        routing_stats_per_layer=config.stats.log_per_layer,
    )
    plain, quiet = _progress_without_layers()
    if any(isinstance(c, plain) for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(plain)
        trainer.add_callback(quiet)
    return trainer


def _save_adapter(model, tokenizer, tasks: list[str], path: str) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, TASKS_FILE), "w") as f:
        json.dump(tasks, f)


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


def _losses(trainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def _grouping(by: Optional[str], rows, source: str, log: Callable) -> Optional[str]:
    """`by`, or None (one group) when the rows lack that field."""
    column = {"task": "task", "sample_type": "sample_types"}.get(by)
    if column is not None and column not in rows.column_names:
        log(f"{source} has no {by} field: routing statistics over all rows")
        return None
    return by


def train_from_config(config: RunConfig, log: Callable = print) -> TrainRun:
    """Train the adapter a RunConfig describes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    try:
        base = resolve_base(config.model, config.method, config.tiny)
        if config.model == "tiny":
            log(
                f"base: the bundled tiny {config.tiny.arch or ('mixtral' if config.method == 'roma' else 'llama')} ({base})"
            )
        tokenizer = load_tokenizer(base)
        data = load_data(config.data, log=log)
        log(f"data: {len(data.dataset)} rows from {data.source}" + (f", tasks {data.tasks}" if data.tasks else ""))
        output_dir = _sft_config(config).output_dir
        if config.method == "phatgoose":
            model, paths, losses = _train_phatgoose(config, base, tokenizer, data, output_dir, log)
        else:
            peft_config = _adapter_config(config, data)
            trainer = _trainer(config, base, data.dataset, tokenizer, peft_config, output_dir)
            trainer.train()
            model, losses = trainer.model, {"adapter": _losses(trainer)}
            paths = {"adapter": os.path.join(output_dir, "adapter")}
            _save_adapter(model, tokenizer, data.tasks, paths["adapter"])
        if config.stats.enabled:
            paths.update(_write_stats(config, model, tokenizer, data, os.path.join(output_dir, "stats"), log))
    finally:
        torch.set_num_threads(threads)
    return TrainRun(paths, losses, time.perf_counter() - start)


def _train_phatgoose(config: RunConfig, base: str, tokenizer, data: UserData, output_dir: str, log: Callable):
    from peft import LoraConfig

    from ..phatgoose import assemble, train_gates

    if not data.tasks:
        raise DataError(
            "method: phatgoose trains one LoRA expert per task: every row needs a task (data.task_field), and the "
            f"rows of {data.source} have none."
        )
    expert_dirs, losses = [], {}
    for task in data.tasks:
        rows = data.dataset.filter(lambda r, task=task: r["task"] == task)
        lora = LoraConfig(**{"task_type": "CAUSAL_LM", **config.experts})
        path = os.path.join(output_dir, "experts", task)
        log(f"phatgoose: expert {task!r} on {len(rows)} rows")
        trainer = _trainer(config, base, rows, tokenizer, lora, path, stats=False)
        trainer.train()
        losses[task] = _losses(trainer)
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

    import moe_peft  # noqa: F401  (registers the methods with PEFT)

    from ..stats import collect

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base = base or PeftConfig.from_pretrained(adapter).base_model_name_or_path
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
