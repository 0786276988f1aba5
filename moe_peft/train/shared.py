"""What every `moe-peft train` run shares, the text-only runs (run.py) and the LLaVA runs (llava.py): the SFT
arguments, the adapter config from the YAML's `adapter:` block, the progress bar, the task list next to an adapter,
and the logged losses."""

from __future__ import annotations

import json
import os

from ..data.user import UserData
from .config import ConfigError, RunConfig, method_config_class

TASKS_FILE = "tasks.json"


def progress_without_layers():
    """Trainer's progress bar, printing the logs without the per-layer routing keys (they still go to report_to)."""
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            shown = {
                k: v for k, v in (logs or {}).items() if not k.startswith("routing/") or k.startswith("routing/mean/")
            }
            return super().on_log(args, state, control, logs=shown, **kwargs)

    return ProgressCallback, QuietProgress


def sft_config(config: RunConfig, **changes):
    from trl import SFTConfig

    fields = {"output_dir": f"out/{config.method}", "report_to": "none", **config.training, **changes}
    try:
        return SFTConfig(**fields)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{config.path or 'config'}: training: {error}") from error


def adapter_config(config: RunConfig, data: UserData):
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


def trainer_callbacks(trainer) -> None:
    """The progress bar without the per-layer routing keys."""
    plain, quiet = progress_without_layers()
    if any(isinstance(c, plain) for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(plain)
        trainer.add_callback(quiet)


def write_tasks(path: str, tasks: list[str]) -> None:
    with open(os.path.join(path, TASKS_FILE), "w") as f:
        json.dump(tasks, f)


def logged_losses(trainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]
