"""`training.output_dir` of `moe-peft train` when it already holds a run: refuse, overwrite or resume.

A directory that holds a previous run's outputs (adapter/, stats/, experts/, Trainer's checkpoint-N/) is refused
before anything loads, unless the run asks to

* overwrite it (`--overwrite`, `training.overwrite_output_dir: true`): that run's outputs (adapter/, stats/,
  experts/, checkpoints, TRL's model card README.md) are removed right before training starts, so that none of them
  sits beside the new adapter looking like its own;
* resume it (`training.resume_from_checkpoint`: true for the last checkpoint in output_dir, or a checkpoint
  directory): Trainer continues from the checkpoint, and the previous adapter/, stats/ are removed right before
  training starts (the run writes its own at the end).

Either way, other entries of output_dir (an export of the old adapter, say) are not ours to delete, and left there
they would look like outputs of the new run: the run is refused, naming them.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from .config import ConfigError, RunConfig

RUN_OUTPUTS = ("adapter", "stats", "experts")  # what moe-peft train writes under output_dir
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # Trainer's checkpoints
MODEL_CARD = "README.md"  # TRL writes its model card into output_dir with each checkpoint
SHOWN = 8  # entries named in a message


@dataclass
class OutputDir:
    """What the run does with its output_dir: `resume` (the checkpoint Trainer continues from, or None) and
    `clear()`, called right before training starts (after the base and the data loaded: a data error leaves the
    previous run as it was)."""

    path: str
    resume: Optional[str] = None
    remove: list[str] = field(default_factory=list)
    log: Callable = print

    def clear(self) -> None:
        if self.remove:
            self.log(f"{self.path}: removing the previous run's {_names(self.remove, every=True)}")
        for name in self.remove:
            target = os.path.join(self.path, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.remove(target)
        self.remove = []


def _names(entries: list[str], every: bool = False, notes: Optional[dict[str, str]] = None) -> str:
    shown = [(e + "/" if not os.path.splitext(e)[1] else e) + (notes or {}).get(e, "") for e in entries]
    if every or len(shown) <= SHOWN:
        return ", ".join(shown)
    return f"{', '.join(shown[:SHOWN])} and {len(shown) - SHOWN} more"


def _is_model_card(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return "generated_from_trainer" in f.read(2000)
    except (OSError, UnicodeDecodeError):
        return False


def checkpoints(path: str) -> list[str]:
    """Trainer's checkpoint directories in `path`, by step."""
    if not os.path.isdir(path):
        return []
    found = [
        (int(m.group(1)), n)
        for n in os.listdir(path)
        if (m := CHECKPOINT.match(n)) and os.path.isdir(os.path.join(path, n))
    ]
    return [n for _, n in sorted(found)]


def previous_run(path: str) -> tuple[list[str], list[str], list[str]]:
    """(outputs of moe-peft train, checkpoints and TRL's model card, every other entry) in `path`."""
    if not os.path.isdir(path):
        return [], [], []
    ours, trainer, other = [], [], []
    for name in sorted(os.listdir(path)):
        if name in RUN_OUTPUTS:
            ours.append(name)
        elif CHECKPOINT.match(name) or (name == MODEL_CARD and _is_model_card(os.path.join(path, name))):
            trainer.append(name)
        else:
            other.append(name)
    trainer = checkpoints(path) + [n for n in trainer if not CHECKPOINT.match(n)]
    return ours, trainer, other


def check_output_dir(config: RunConfig, path: str, log: Callable = print) -> OutputDir:
    """Refuse, before any work, to train into a directory holding a previous run, unless the config asks to
    overwrite or resume it (module docstring); return what the run does with the directory."""
    where = config.path or "config"
    resume = config.resume_from_checkpoint
    if resume is False:
        resume = None
    if config.overwrite_output_dir and resume is not None:
        raise ConfigError(
            f"{where}: training.overwrite_output_dir and training.resume_from_checkpoint={resume!r} contradict each "
            "other (overwriting removes the run that resuming continues): keep one."
        )
    if resume is not None and config.method == "phatgoose":
        raise ConfigError(
            f"{where}: training.resume_from_checkpoint is not supported for method: phatgoose (one training per "
            "expert, each in experts/<task>): remove it, or overwrite with --overwrite."
        )
    ours, trainer, other = previous_run(path)
    saved = checkpoints(path)
    if resume is True:
        if not saved:
            raise ConfigError(
                f"{where}: training.resume_from_checkpoint=true, but training.output_dir={path!r} holds no "
                'checkpoint-N directory (a run saves them with training.save_strategy: steps or epoch, not "no"): '
                "give a checkpoint directory, or start over with --overwrite."
            )
        resume = os.path.join(path, saved[-1])
    if isinstance(resume, str):
        if not os.path.isdir(resume) or not os.path.exists(os.path.join(resume, "trainer_state.json")):
            raise ConfigError(
                f"{where}: training.resume_from_checkpoint={resume!r} is not a Trainer checkpoint (a checkpoint-N "
                "directory with trainer_state.json); use one, or true for the last checkpoint in output_dir."
            )
    if not ours and not trainer:
        return OutputDir(path, resume, log=log)
    notes = {"adapter": " (a trained adapter)", "experts": " (trained experts)"}
    if not config.overwrite_output_dir and resume is None:
        if saved:
            way = f"--set training.resume_from_checkpoint=true (continues from {saved[-1]}/)"
        else:
            way = (
                "--set training.resume_from_checkpoint=CHECKPOINT (this run saved no checkpoint-N/: only a run with "
                'training.save_strategy other than "no" can be resumed)'
            )
        raise ConfigError(
            f"{where}: training.output_dir={path!r} holds a previous run's outputs ({_names(ours + trainer, notes=notes)}): training into "
            f"it would replace them. Either overwrite it: moe-peft train ... --overwrite (or "
            f"training.overwrite_output_dir: true), which removes {_names(ours + trainer)} first; or resume that run "
            f"from a checkpoint: {way}; or train into another directory: --set training.output_dir=DIR."
        )
    if other:
        raise ConfigError(
            f"{where}: training.output_dir={path!r} also holds {_names(other)}, which moe-peft train did not write "
            "and may come from the previous run (an export of its adapter, say): left beside the new adapter they "
            "would look like its outputs. Move or delete them, or train into another training.output_dir."
        )
    # resuming keeps the checkpoints (and the model card Trainer rewrites); overwriting removes them too
    remove = ours if resume is not None else ours + trainer
    return OutputDir(path, resume, remove, log)
