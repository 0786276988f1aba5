"""Atomic `save_pretrained` for moe-peft adapters, and atomic single-file writes (PHATGOOSE gate files).

A save never leaves a directory that a loader accepts but that holds a half-written or mismatched adapter:

1. PEFT's own `save_pretrained` writes the whole adapter (every adapter's subdirectory, weights, config, model card)
   into a hidden temporary sibling `.<name>.tmp-*` of the destination, and every file there is flushed to disk;
2. then, per adapter directory, the old `adapter_config.json` is withdrawn first (from that moment the directory is
   no loadable adapter), the other files are moved in with `os.replace` (atomic on POSIX), and the new
   `adapter_config.json` is moved in last: the commit point. At every instant the directory holds the complete old
   adapter, no config (PEFT refuses it), or the complete new adapter.

The destination is not replaced as a whole: it may hold other files (a Trainer checkpoint keeps its optimizer and
scheduler state next to the adapter), which stay. A process killed during step 1 leaves the destination untouched
and at most the hidden temporary directory. (`moe_peft._atomic.atomic_directory`, used by `moe_peft.export`,
replaces a whole directory, for exports into a directory of their own; the same temporary-sibling naming.)
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Union

CONFIG_NAME = "adapter_config.json"
_ATOMIC_TYPES: set[str] = set()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, dest: str) -> None:
    """Move a fully written adapter directory `tmp` into `dest`, each adapter's config last (module docstring)."""
    for dirpath, _, filenames in os.walk(tmp):
        for name in filenames:
            _fsync(os.path.join(dirpath, name))
    configs = []
    for dirpath, _, filenames in os.walk(tmp):
        target = os.path.normpath(os.path.join(dest, os.path.relpath(dirpath, tmp)))
        os.makedirs(target, exist_ok=True)
        if CONFIG_NAME in filenames:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(target, CONFIG_NAME))  # withdraw the old adapter before touching its files
            configs.append((os.path.join(dirpath, CONFIG_NAME), os.path.join(target, CONFIG_NAME)))
        for name in filenames:
            if name != CONFIG_NAME:
                os.replace(os.path.join(dirpath, name), os.path.join(target, name))
        _fsync(target)
    for source, target in configs:  # the commit points
        os.replace(source, target)
        _fsync(os.path.dirname(target))


def _is_ours(model) -> bool:
    configs = getattr(model, "peft_config", None) or {}
    return any(getattr(c.peft_type, "value", c.peft_type) in _ATOMIC_TYPES for c in configs.values())


def atomic_saves(names: set[str]) -> None:
    """Make `PeftModel.save_pretrained` atomic for models holding an adapter of the PEFT types `names` (idempotent;
    other models, PEFT's own LoRA included, save exactly as before)."""
    from peft import PeftModel

    _ATOMIC_TYPES.update(names)
    original = PeftModel.__dict__["save_pretrained"]
    if getattr(original, "_moe_peft_atomic", False):
        return

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not _is_ours(self) or not kwargs.get("is_main_process", True) or os.path.isfile(save_directory):
            return original(self, save_directory, *args, **kwargs)  # PEFT's own behaviour and errors
        with staged_adapter(save_directory) as tmp:
            return original(self, tmp, *args, **kwargs)

    save_pretrained._moe_peft_atomic = True
    PeftModel.save_pretrained = save_pretrained


@contextlib.contextmanager
def staged_adapter(path: Union[str, os.PathLike]) -> Iterator[str]:
    """Yield a hidden temporary sibling of `path` to write adapter directories into; when the block exits cleanly
    they are published into `path` with `publish` (each adapter's config last); on an exception `path` is left as
    it was. The temporary directory is removed either way."""
    dest = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=parent)
    try:
        yield tmp
        publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Union[str, os.PathLike]) -> Iterator[str]:
    """Yield a temporary path next to `path`; when the block exits cleanly it is flushed and renamed onto `path`
    (a reader sees the old file or the new one, never a partial one); on an exception it is removed."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
