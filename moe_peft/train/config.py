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

An unknown key raises ConfigError naming the key and the closest valid ones (`lr`: training.learning_rate). Every
value is checked against its field's type (an SFTConfig field's, the method config's, ours) before anything loads.
`--set block.key=value` (or `key=value` when exactly one block has that key) overrides a value; the value is read as
YAML (`20`, `1e-3`, `null`, `[a, b]`).

Two keys of the `training:` block are moe-peft's own (RUN_TRAINING_KEYS): `overwrite_output_dir` (train into an
output_dir that holds a previous run's adapter, removing that run's outputs) and `resume_from_checkpoint` (a
checkpoint directory, or true: the last checkpoint in output_dir), which Trainer itself never reads.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from ..data.user import DataConfig
from .fields import ALIASES, close_keys, describe_type, describe_value, field_types, type_matches


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
            a-j for a MoE (the bundled tasks' own letters, as in examples/roma_router_tuning.py). The base reads
            nothing else but its task names, " " and "=": no uppercase letter, digit or punctuation, which an
            adapter then learns poorly; `moe-peft train` warns when your rows hold such characters.
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
    overwrite_output_dir: bool = False  # training.overwrite_output_dir / `moe-peft train --overwrite`
    resume_from_checkpoint: Optional[Union[str, bool]] = None  # training.resume_from_checkpoint


TOP_LEVEL = ("method", "model", "threads", "adapter", "training", "data", "stats", "tiny", "experts", "gates")
SCALARS = ("method", "model", "threads")
BLOCKS = ("adapter", "training", "data", "stats", "tiny", "experts", "gates")
PHATGOOSE_BLOCKS = ("experts", "gates")
# keys of the training block that moe-peft reads itself, with their types: kept out of trl.SFTConfig (transformers 5
# has no overwrite_output_dir; Trainer never reads resume_from_checkpoint, moe-peft passes it to train())
RUN_TRAINING_KEYS: dict[str, Any] = {
    "overwrite_output_dir": bool,
    "resume_from_checkpoint": Optional[Union[str, bool]],
}


def block_classes(method: Optional[str]) -> dict[str, type]:
    """The dataclass behind each block (the adapter's when the method is known)."""
    from peft import LoraConfig
    from trl import SFTConfig

    classes = {
        "training": SFTConfig,
        "data": DataConfig,
        "stats": StatsConfig,
        "tiny": TinyBaseConfig,
        "gates": GatesConfig,
        "experts": LoraConfig,
    }
    if method in METHODS:
        classes["adapter"] = method_config_class(method)
    return classes


def _class_name(cls: type) -> str:
    """The shortest path users import the class from: trl.SFTConfig, moe_peft.MoLEConfig, moe_peft.train.config.X
    (the packages are looked up in sys.modules: nothing is imported)."""
    parts = cls.__module__.split(".")
    if parts[0] != "moe_peft":
        return f"{parts[0]}.{cls.__name__}"
    while len(parts) > 1 and getattr(sys.modules.get(".".join(parts[:-1])), cls.__name__, None) is cls:
        parts.pop()
    return f"{'.'.join(parts)}.{cls.__name__}"


def block_fields(method: Optional[str]) -> dict[str, list[str]]:
    """Valid keys of every block (for the method, when known)."""
    classes = block_classes(method)
    names = {block: [f.name for f in dataclasses.fields(cls)] for block, cls in classes.items()}
    names["training"] += [k for k in RUN_TRAINING_KEYS if k not in names["training"]]
    names.setdefault("adapter", [])
    if method == "phatgoose":
        names["adapter"] = [n for n in names["adapter"] if n not in ASSEMBLED_FIELDS]
    return {block: names[block] for block in BLOCKS}


def _applicable(fields: dict[str, list[str]], method: Optional[str]) -> dict[str, list[str]]:
    """The blocks a method reads: experts and gates are PHATGOOSE's only."""
    return {b: names for b, names in fields.items() if method == "phatgoose" or b not in PHATGOOSE_BLOCKS}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(valid))}."


def _did_you_mean(key: str, close: list[str], block: Optional[str] = None) -> str:
    """ "did you mean 'max_steps'?" (a field of the same block) or 'training.learning_rate' (another block's), why
    when it is a common name, and the other close keys."""
    first = close[0]
    shown = first.split(".", 1)[1] if block and first.startswith(block + ".") else first
    text = f"did you mean {shown!r}?"
    if first in ALIASES.get(key.lower(), ()):
        text += f" ({key} is a common name for {first})"
    if len(close) > 1:
        text += f" Other close keys: {', '.join(close[1:])}."
    return text


def _block_hint(block: str, fields: dict[str, list[str]], method: Optional[str]) -> str:
    """What a block takes, when no key of it is close: its keys when they are few, else the class they come from."""
    names = fields[block]
    if 0 < len(names) <= 20:
        return f"the {block} block's keys: {', '.join(sorted(names))}."
    cls = block_classes(method).get(block)
    owner = f"the fields of {_class_name(cls)}" if cls else "the fields of the method's config class"
    common = {"training": "max_steps, learning_rate, per_device_train_batch_size, output_dir", "adapter": "r, top_k"}
    example = f" (e.g. {common[block]})" if block in common else ""
    return f"no key of the {block} block is close; it takes {owner}{example}."


def _blocks_overview(fields: dict[str, list[str]], method: Optional[str]) -> str:
    classes = block_classes(method)
    parts = [f"{b} ({_class_name(classes[b])})" if b in classes else b for b in fields]
    return f"the blocks: {', '.join(parts)}"


def unknown_key_message(key: str, block: Optional[str], fields: dict[str, list[str]], method: Optional[str]) -> str:
    """The hint after "unknown key ...": the closest valid keys, or what the block (or the config) takes."""
    applicable = _applicable(fields, method)
    close = close_keys(key, applicable, SCALARS, block)
    if block is not None:
        return _did_you_mean(key, close, block) if close else _block_hint(block, fields, method)
    head = "keys are block.field (training.max_steps, data.train, adapter.r) or one of method, model, threads; "
    if close:
        return head + _did_you_mean(key, close)
    return head + f"no key is close to {key!r}; {_blocks_overview(applicable, method)}."


def _field_type(block: str, key: str, method: str) -> tuple[Any, Any, str]:
    """(type hint, default, where it comes from) of block.key."""
    if block == "training" and key in RUN_TRAINING_KEYS:
        return RUN_TRAINING_KEYS[key], None, "moe-peft"
    cls = block_classes(method)[block]
    tp, default = field_types(cls)[key]
    return tp, default, f"{_class_name(cls)}.{key}"


def check_types(blocks: dict[str, dict[str, Any]], method: str, where: Callable[..., str]) -> None:
    """Every value against its field's type; `where(block, key)` names the YAML file or the --set that gave it."""
    for block, given in blocks.items():
        for key, value in given.items():
            tp, default, owner = _field_type(block, key, method)
            if value is None and default is None:  # the field's own default (some hints omit Optional)
                continue
            if not type_matches(value, tp):
                shown = "" if default in (None, dataclasses.MISSING) else f", default {default!r}"
                hint = ""
                if isinstance(value, bool) and type_matches("no", tp):  # YAML 1.1: no/yes/off/on are booleans
                    hint = f' YAML reads no, yes, off and on as false/true: quote a string ({block}.{key}: "no").'
                raise ConfigError(
                    f"{where(block, key)}: {block}.{key} must be {describe_type(tp)} ({owner}{shown}), "
                    f"got {describe_value(value)}.{hint}"
                )


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


def apply_override(raw: dict[str, Any], assignment: str, where: str = "--set") -> tuple[str, ...]:
    """`block.key=value` or `key=value` (a top-level key, or a key of exactly one block) into the raw YAML dict.
    Returns the key it set: (block, key), or (key,) for a top-level one."""
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
        return (block, name)  # an unknown name is reported by load_config, which knows the method by then
    if key in TOP_LEVEL:
        raw[key] = value
        return (key,)
    method = raw.get("method")
    fields = block_fields(method)
    # experts and gates only count for PHATGOOSE (a bare lr is not gates.lr for MoLE)
    owners = [block for block, names in _applicable(fields, method).items() if key in names]
    # a common name that is also another block's field (batch_size: stats.batch_size, or the training batch?)
    meant = [t for t in ALIASES.get(key.lower(), ()) if owners and t != f"{owners[0]}.{key}"]
    if len(owners) == 1 and not meant:
        raw[owners[0]] = {**(raw.get(owners[0]) or {}), key: value}
        return (owners[0], key)
    if len(owners) == 1:
        raise ConfigError(
            f"{where} {key!r} is ambiguous: it is {owners[0]}.{key}, and {key} is a common name for {meant[0]}; "
            f"write the one you mean with its block: {meant[0]}={text} or {owners[0]}.{key}={text}."
        )
    if len(owners) > 1:
        raise ConfigError(
            f"{where} {key!r} is ambiguous: it is a key of {owners}; write e.g. {owners[0]}.{key}={text}."
        )
    raise ConfigError(f"{where} {key!r}: unknown key; {unknown_key_message(key, None, fields, method)}")


def _check_adapter_values(method: str, adapter: dict[str, Any], at: Callable[..., str], where: str) -> None:
    """A token-routed adapter block's values, checked by its config class before anything loads (a negative
    router_lr_ratio, top_k above num_experts): the block alone builds the config (train/shared.py builds it again
    after the data, identically). MHR and PHATGOOSE get fields from the data and the trained experts: checked then."""
    from ..tuners.routed.config import MoELoraConfig

    cls = method_config_class(method)
    if not issubclass(cls, MoELoraConfig):
        return
    try:
        cls(**adapter)
    except ValueError as error:  # the config class names the field and the fix: "<field>=<value> is invalid: ..."
        named = [key for key in adapter if str(error).startswith(f"{key}=")]
        raise ConfigError(f"{at('adapter', named[0]) if named else where}: adapter: {error}") from None


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
    origins: dict[tuple[str, ...], str] = {}  # which --set gave a key, for the error messages
    for assignment in overrides or []:
        origins[apply_override(raw, assignment)] = f"--set {assignment}"
    where = path or "config"

    def at(*key: str) -> str:
        return origins.get(key, where)

    for key in raw:
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(key, list(TOP_LEVEL), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else unknown_key_message(key, None, block_fields(None), None)
            raise ConfigError(f"{at(key)}: unknown key {key!r}; {hint}")
    method = raw.get("method")
    if method not in METHODS:
        hint = _suggest(str(method), list(METHODS)) if method is not None else f"use one of {', '.join(METHODS)}."
        raise ConfigError(f"{at('method')}: method={method!r} is invalid; {hint}")
    fields = block_fields(method)
    blocks = {}
    for block in BLOCKS:
        given = raw.get(block) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"{at(block)}: {block} must be a block of keys, got {type(given).__name__}.")
        if block in PHATGOOSE_BLOCKS and given and method != "phatgoose":
            raise ConfigError(
                f"{at(block, next(iter(given)))}: the {block} block is for method: phatgoose only; remove it."
            )
        for key in given:
            if key not in fields[block]:
                if block == "adapter" and method == "phatgoose" and key in ASSEMBLED_FIELDS:
                    raise ConfigError(
                        f"{at(block, key)}: adapter.{key} is set by moe_peft.phatgoose.assemble from the trained "
                        "experts; configure the experts in the experts block (peft.LoraConfig fields) instead."
                    )
                hint = unknown_key_message(key, block, fields, method)
                raise ConfigError(f"{at(block, key)}: unknown key {block}.{key}; {hint}")
        blocks[block] = given
    check_types(blocks, method, at)
    threads = raw.get("threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(
            f"{at('threads')}: threads={threads!r} is invalid: use a positive integer (1 for tiny models)."
        )
    model = raw.get("model", "tiny")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{at('model')}: model={model!r} is invalid: use tiny, a hub id or a local path.")
    training = dict(blocks["training"])
    run_keys = {key: training.pop(key) for key in RUN_TRAINING_KEYS if key in training}
    built = {}
    for block, cls in (("data", DataConfig), ("stats", StatsConfig), ("tiny", TinyBaseConfig), ("gates", GatesConfig)):
        try:
            built[block] = cls(**blocks[block])
        except ValueError as error:  # a value of the right type that the block refuses (data.max_samples=0)
            named = [key for key in blocks[block] if f"{block}.{key}" in str(error)]
            raise ConfigError(f"{at(block, named[0]) if named else where}: {error}") from None
    _check_adapter_values(method, blocks["adapter"], at, where)
    return RunConfig(
        method=method,
        model=model,
        threads=threads,
        adapter=blocks["adapter"],
        training=training,
        data=built["data"],
        stats=built["stats"],
        tiny=built["tiny"],
        experts=blocks["experts"],
        gates=built["gates"],
        path=path,
        overwrite_output_dir=bool(run_keys.get("overwrite_output_dir") or False),
        resume_from_checkpoint=run_keys.get("resume_from_checkpoint"),
    )
