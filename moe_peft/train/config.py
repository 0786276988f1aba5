"""Training YAML: what `moe-peft train CONFIG.yaml` reads. Every block maps one-to-one onto a dataclass:

    method: mole                 # mole, loramoe, smora, mhr, phatgoose, roma
    model: tiny                  # "tiny" (a bundled tiny base, pretrained here and cached), a hub id or a local path
    threads: 1                   # torch threads (1 is the fastest for tiny models on a shared CPU)
    adapter:  {...}              # the method's config class (MoLEConfig, ..., RoMAConfig)
    training: {...}              # trl.SFTConfig
    data:     {...}              # moe_peft.data.DataConfig
    stats:    {...}              # StatsConfig: the routing statistics and plots written after training
    tiny:     {...}              # TinyBaseConfig: the bundled base of `model: tiny`
    experts:  {...}              # PHATGOOSE only: peft.LoraConfig of each expert
    gates:    {...}              # PHATGOOSE only: GatesConfig (moe_peft.phatgoose.train_gates)

An unknown key raises ConfigError naming the key and the closest valid one. `--set block.key=value` (or `key=value`
when exactly one block has that key) overrides a value; the value is read as YAML (`20`, `1e-3`, `null`, `[a, b]`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from ..data.user import DataConfig


class ConfigError(ValueError):
    """A training YAML (or a --set override) that cannot be used as it is."""


METHODS = ("mole", "loramoe", "smora", "mhr", "phatgoose", "roma")
# PhatgooseConfig fields that moe_peft.phatgoose.assemble fills from the experts
ASSEMBLED_FIELDS = ("experts", "r", "target_modules", "exclude_modules", "modules_to_save")


def method_config_class(method: str) -> type:
    from ..tuners import LoRAMoEConfig, MHRConfig, MoLEConfig, PhatgooseConfig, RoMAConfig, SMoRAConfig

    return {
        "mole": MoLEConfig,
        "loramoe": LoRAMoEConfig,
        "smora": SMoRAConfig,
        "mhr": MHRConfig,
        "phatgoose": PhatgooseConfig,
        "roma": RoMAConfig,
    }[method]


@dataclass
class StatsConfig:
    """The `stats:` block: routing statistics logged during training and plotted after it.

    Args:
        enabled: write stats.json and the plots after training (moe_peft.stats.collect).
        data: the rows to measure (a data.train value: file, datasets name, "bundled"); None: held-out bundled
            samples (another seed) when the training data is bundled, else the training rows.
        samples: how many rows to measure.
        by: group the routing by "task", "sample_type", or null.
        batch_size: rows per forward.
        log_per_layer: log every layer's summaries during training (False: only their means over layers).
    """

    enabled: bool = True
    data: Optional[str] = None
    samples: int = 256
    by: Optional[str] = "task"
    batch_size: int = 32
    log_per_layer: bool = True

    def __post_init__(self):
        if self.by not in (None, "task", "sample_type"):
            raise ConfigError(f"stats.by={self.by!r} is invalid: use task, sample_type or null.")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"stats.samples={self.samples!r} is invalid: use a positive integer.")


LLAVA_ARCHS = ("llava", "llava_next")
TINY_ARCHS = ("llama", "mixtral", "olmoe", "qwen3_moe", *LLAVA_ARCHS)


@dataclass
class TinyBaseConfig:
    """The `tiny:` block: the base model of `model: tiny`, built from a config and trained in full on bundled tasks
    (so that it knows the characters and the prompt format), saved under $MOE_PEFT_CACHE (default
    ~/.cache/moe_peft) and reused by every later run with the same settings.

    Args:
        arch: "llama", or a sparse MoE ("mixtral", "olmoe", "qwen3_moe"; RoMA needs one), or a tiny LLaVA / LLaVA-NeXT
            ("llava", "llava_next": trained on the bundled image tasks, moe_peft.llava.pretrain, sizes in its TINY);
            null: llama, mixtral for RoMA.
        pretrain_steps / pretrain_batch_size / pretrain_lr: the full training of the base (pretrain_lr null: 3e-3,
            1e-3 for a LLaVA).
        pretrain_tasks: its bundled tasks; null: cpy and dup (llama: the adapters then learn new tasks), or the
            default tasks (MoE, for RoMA, whose router tuning needs a base that already gets samples right), or
            caption and add (LLaVA: moe_peft.llava.BASE_TASKS).
        pretrain_alphabet: the letters of its samples; null: a-x for llama (every letter the bundled tasks use),
            a-j for a MoE (the bundled tasks' own letters, as in examples/roma_router_tuning.py).
        hidden_size, num_layers: its size; seed: its initialization and data.
    """

    arch: Optional[str] = None
    pretrain_steps: int = 300
    pretrain_batch_size: int = 32
    pretrain_lr: Optional[float] = None
    pretrain_tasks: Optional[list[str]] = None
    pretrain_alphabet: Optional[str] = None
    hidden_size: int = 64
    num_layers: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.arch not in (None, *TINY_ARCHS):
            raise ConfigError(f"tiny.arch={self.arch!r} is invalid: use {', '.join(TINY_ARCHS)} or null.")
        if self.arch in LLAVA_ARCHS and (self.hidden_size, self.num_layers, self.pretrain_alphabet) != (64, 2, None):
            raise ConfigError(
                f"tiny.hidden_size / tiny.num_layers / tiny.pretrain_alphabet are fixed for tiny.arch={self.arch!r} "
                "(64, 2 and the image tasks' words: moe_peft.llava.pretrain.TINY): remove them."
            )
        if not isinstance(self.pretrain_steps, int) or self.pretrain_steps < 0:
            raise ConfigError(f"tiny.pretrain_steps={self.pretrain_steps!r} is invalid: use an integer >= 0.")


@dataclass
class GatesConfig:
    """The `gates:` block (PHATGOOSE): moe_peft.phatgoose.train_gates for each expert, on the expert's own data."""

    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    warmup_ratio: float = 0.1


@dataclass
class RunConfig:
    """A whole training YAML, checked."""

    method: str
    model: str = "tiny"
    threads: int = 1
    adapter: dict[str, Any] = field(default_factory=dict)  # fields of the method's config class
    training: dict[str, Any] = field(default_factory=dict)  # fields of trl.SFTConfig
    data: DataConfig = field(default_factory=DataConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    tiny: TinyBaseConfig = field(default_factory=TinyBaseConfig)
    experts: dict[str, Any] = field(default_factory=dict)  # fields of peft.LoraConfig (PHATGOOSE)
    gates: GatesConfig = field(default_factory=GatesConfig)
    path: Optional[str] = None


TOP_LEVEL = ("method", "model", "threads", "adapter", "training", "data", "stats", "tiny", "experts", "gates")
SCALARS = ("method", "model", "threads")


def block_fields(method: Optional[str]) -> dict[str, list[str]]:
    """Valid keys of every block (for the method, when known)."""
    from peft import LoraConfig
    from trl import SFTConfig

    names = {
        "training": [f.name for f in dataclasses.fields(SFTConfig)],
        "data": [f.name for f in dataclasses.fields(DataConfig)],
        "stats": [f.name for f in dataclasses.fields(StatsConfig)],
        "tiny": [f.name for f in dataclasses.fields(TinyBaseConfig)],
        "gates": [f.name for f in dataclasses.fields(GatesConfig)],
        "experts": [f.name for f in dataclasses.fields(LoraConfig)],
        "adapter": [],
    }
    if method in METHODS:
        adapter = [f.name for f in dataclasses.fields(method_config_class(method))]
        if method == "phatgoose":
            adapter = [n for n in adapter if n not in ASSEMBLED_FIELDS]
        names["adapter"] = adapter
    return names


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(valid))}."


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _coerce(value: Any) -> Any:
    """YAML 1.1 reads 1e-3 (no dot) as a string: make such strings floats, recursively."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_coerce(v) for v in value]
    if isinstance(value, dict):
        return {k: _coerce(v) for k, v in value.items()}
    return value


def apply_override(raw: dict[str, Any], assignment: str, where: str = "--set") -> None:
    """`block.key=value` or `key=value` (a top-level key, or a key of exactly one block) into the raw YAML dict."""
    if "=" not in assignment:
        raise ConfigError(f"{where} {assignment!r} is invalid: use key=value, e.g. training.max_steps=20.")
    key, text = assignment.split("=", 1)
    key = key.strip()
    value = _coerce(yaml.safe_load(text)) if text.strip() else None
    if "." in key:
        block, name = key.split(".", 1)
        if block not in TOP_LEVEL or block in SCALARS:
            raise ConfigError(
                f"{where} {key!r}: unknown block {block!r}; {_suggest(block, [b for b in TOP_LEVEL if b not in SCALARS])}"
            )
        if not isinstance(raw.get(block) or {}, dict):
            raise ConfigError(f"{where} {key!r}: {block} is not a block of keys.")
        raw[block] = {**(raw.get(block) or {}), name: value}
        return
    if key in TOP_LEVEL:
        raw[key] = value
        return
    fields = block_fields(raw.get("method"))
    owners = [block for block, names in fields.items() if key in names]
    if len(owners) == 1:
        raw[owners[0]] = {**(raw.get(owners[0]) or {}), key: value}
        return
    if len(owners) > 1:
        raise ConfigError(
            f"{where} {key!r} is ambiguous: it is a key of {owners}; write e.g. {owners[0]}.{key}={text}."
        )
    every = [f"{b}.{n}" for b, names in fields.items() for n in names] + list(TOP_LEVEL)
    raise ConfigError(f"{where} {key!r}: unknown key; {_suggest(key, every)}")


def load_config(
    path: Optional[str] = None, overrides: Optional[list[str]] = None, raw: Optional[dict] = None
) -> RunConfig:
    """Read a training YAML (or a dict), apply `--set` overrides, check every key, and return a RunConfig."""
    if raw is None:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a training config is a mapping of blocks (method, model, adapter, training, data).")
    raw = _coerce(raw)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    where = path or "config"
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{where}: unknown key {key!r}; {_suggest(key, list(TOP_LEVEL))}")
    method = raw.get("method")
    if method not in METHODS:
        hint = _suggest(str(method), list(METHODS)) if method is not None else f"use one of {', '.join(METHODS)}."
        raise ConfigError(f"{where}: method={method!r} is invalid; {hint}")
    fields = block_fields(method)
    blocks = {}
    for block in ("adapter", "training", "data", "stats", "tiny", "experts", "gates"):
        given = raw.get(block) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"{where}: {block} must be a block of keys, got {type(given).__name__}.")
        if block in ("experts", "gates") and given and method != "phatgoose":
            raise ConfigError(f"{where}: the {block} block is for method: phatgoose only; remove it.")
        for key in given:
            if key not in fields[block]:
                if block == "adapter" and method == "phatgoose" and key in ASSEMBLED_FIELDS:
                    raise ConfigError(
                        f"{where}: adapter.{key} is set by moe_peft.phatgoose.assemble from the trained experts; "
                        "configure the experts in the experts block (peft.LoraConfig fields) instead."
                    )
                raise ConfigError(f"{where}: unknown key {block}.{key}; {_suggest(key, fields[block])}")
        blocks[block] = given
    threads = raw.get("threads", 1)
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"{where}: threads={threads!r} is invalid: use a positive integer (1 for tiny models).")
    model = raw.get("model", "tiny")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}: model={model!r} is invalid: use tiny, a hub id or a local path.")
    return RunConfig(
        method=method,
        model=model,
        threads=threads,
        adapter=blocks["adapter"],
        training=blocks["training"],
        data=DataConfig(**blocks["data"]),
        stats=StatsConfig(**blocks["stats"]),
        tiny=TinyBaseConfig(**blocks["tiny"]),
        experts=blocks["experts"],
        gates=GatesConfig(**blocks["gates"]),
        path=path,
    )
