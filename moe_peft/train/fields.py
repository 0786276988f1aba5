"""The keys of a training YAML and their types: what `moe-peft train` checks before it loads anything.

* `field_types(cls)`: a dataclass's fields with their resolved type hints and defaults (trl.SFTConfig, a method's
  config class, DataConfig, ...);
* `type_matches(value, type)` / `describe_type(type)`: whether a YAML value fits a field's type, and the type in words
  for the error message (an unknown class is not judged here: the class's own checks see the value);
* `close_keys(...)`: the few `block.field` keys closest to a mistyped one, common names (lr, batch_size, steps,
  epochs) first.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import types
import typing
from typing import Any, Literal, Union

# Common names of keys, and the key they mean (what other trainers and scripts call them).
ALIASES: dict[str, tuple[str, ...]] = {
    "lr": ("training.learning_rate",),
    "bs": ("training.per_device_train_batch_size",),
    "batch_size": ("training.per_device_train_batch_size",),
    "train_batch_size": ("training.per_device_train_batch_size",),
    "steps": ("training.max_steps",),
    "num_steps": ("training.max_steps",),
    "epochs": ("training.num_train_epochs",),
    "num_epochs": ("training.num_train_epochs",),
    "max_seq_length": ("training.max_length",),
    "max_seq_len": ("training.max_length",),
    "seq_len": ("training.max_length",),
    "grad_accum": ("training.gradient_accumulation_steps",),
    "gradient_accumulation": ("training.gradient_accumulation_steps",),
    "wd": ("training.weight_decay",),
    "warmup": ("training.warmup_steps",),
    "output": ("training.output_dir",),
    "out": ("training.output_dir",),
    "out_dir": ("training.output_dir",),
    "overwrite": ("training.overwrite_output_dir",),
    "resume": ("training.resume_from_checkpoint",),
    "rank": ("adapter.r",),
    "lora_r": ("adapter.r",),
    "alpha": ("adapter.lora_alpha",),
    "dropout": ("adapter.lora_dropout",),
    "n_experts": ("adapter.num_experts",),
    "dataset": ("data.train",),
    "train_file": ("data.train",),
    "data_path": ("data.train",),
    "base": ("model",),
    "base_model": ("model",),
    "model_name": ("model",),
    "model_name_or_path": ("model",),
}


@functools.cache
def field_types(cls: type) -> dict[str, tuple[Any, Any]]:
    """name -> (resolved type hint, default) of a dataclass's fields (default: dataclasses.MISSING when none)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        out[f.name] = (hints.get(f.name, Any), default)
    return out


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def type_matches(value: Any, tp: Any) -> bool:
    """Whether a value read from YAML fits the type hint `tp`. Types this cannot judge (a class other than the YAML
    scalars and containers, a TypeVar) accept any value: the dataclass's own checks see it."""
    if tp is Any or tp is object or isinstance(tp, (str, typing.TypeVar, typing.ForwardRef)):
        return True
    if tp is type(None) or tp is None:
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        return any(type_matches(value, arg) for arg in args)
    if origin is Literal:  # True is not 1 here: a Literal[False] takes false, not 0
        return any(value == arg and type(value) is type(arg) for arg in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # YAML reads 3 for 3.0
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    container = origin or tp
    if container in (list, tuple, set, frozenset, typing.Sequence) or (
        isinstance(container, type) and container.__module__ == "collections.abc" and container.__name__ == "Sequence"
    ):
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False
        if not args:
            return True
        if container is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(type_matches(v, a) for v, a in zip(value, args))
        return all(type_matches(v, args[0]) for v in value)
    if container in (dict, typing.Mapping) or getattr(container, "__name__", None) == "Mapping":
        if not isinstance(value, dict):
            return False
        if len(args) == 2:
            return all(type_matches(k, args[0]) and type_matches(v, args[1]) for k, v in value.items())
        return True
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in {member.value for member in tp}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return isinstance(value, (dict, tp))  # a block of its fields, as the class reads it
    return True


def describe_type(tp: Any) -> str:
    """A type hint in words: "an integer", "null, a string or a list of strings", "one of 'a', 'b'"."""
    if _is_union(tp):
        args = typing.get_args(tp)
        if str in args:  # an enum beside str (SchedulerType | str): its values are the usual strings
            named = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
            args = [a for a in args if a not in named]
            usual = ", ".join(repr(m.value) for e in named for m in e)
        parts = [describe_type(arg) for arg in args]
        if str in args and usual:
            parts[args.index(str)] = f"a string ({usual})"
        parts = [p for i, p in enumerate(parts) if p not in parts[:i]]
        if "null" in parts:  # null last: "an integer or null"
            parts = [p for p in parts if p != "null"] + ["null"]
        return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} or {parts[-1]}"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if not isinstance(a, bool) else str(a).lower() for a in args)
    simple = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if tp in simple:
        return simple[tp]
    if tp is None:
        return "null"
    container = origin or tp
    if container in (list, tuple, set, frozenset) or getattr(container, "__name__", None) == "Sequence":
        if args and args[0] is not Ellipsis:
            inner = describe_type(args[0])
            for article in ("an ", "a "):
                if inner.startswith(article):
                    inner = inner[len(article) :] + "s"  # "a list of integers"
                    break
            return f"a list of {inner}"
        return "a list"
    if container is dict or getattr(container, "__name__", None) == "Mapping":
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def describe_value(value: Any) -> str:
    names = {
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }
    if value is None:
        return "null"
    if isinstance(value, bool):  # as YAML writes it
        return f"{str(value).lower()} (true/false)"
    return f"{value!r} ({names.get(type(value), type(value).__name__)})"


def close_keys(
    name: str, fields: dict[str, list[str]], top_level: tuple[str, ...], block: str | None = None, n: int = 4
) -> list[str]:
    """Up to `n` valid keys closest to `name` (a key given in `block`, or without a block), as "block.field" (or a
    top-level key): the key a common name stands for (lr: training.learning_rate), the same field in another block,
    then the fields whose names are close."""
    valid = {f"{b}.{f}" for b, names in fields.items() for f in names} | set(top_level)
    out: list[str] = []

    def add(key: str) -> None:
        if key in valid and key not in out and key != (f"{block}.{name}" if block else name):
            out.append(key)

    for target in ALIASES.get(name.lower(), ()):
        add(target)
    for b, names in fields.items():  # training.r -> adapter.r
        if name in names:
            add(f"{b}.{name}")
    if block in fields:
        for match in difflib.get_close_matches(name, fields[block], n=3, cutoff=0.6):
            add(f"{block}.{match}")
    everywhere = sorted({f for names in fields.values() for f in names} | set(top_level))
    for match in difflib.get_close_matches(name, everywhere, n=3, cutoff=0.75):
        for b, names in fields.items():
            if match in names:
                add(f"{b}.{match}")
        add(match)
    return out[:n]
