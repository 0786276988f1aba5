"""Atomic writes: a loader never sees a half-written export, adapter or gate file.

Two ways, for two kinds of destination (both stage into a hidden sibling `.<name>.tmp-*` of the destination, so a
process killed mid-write leaves only that sibling, which no loader is pointed at):

* `atomic_directory`: a directory of its own (every `moe_peft.export` output). Everything goes into the temporary
  sibling, which is renamed into place once every file is written and flushed:

      with atomic_directory("out/merged") as tmp:      # tmp: a hidden sibling, e.g. out/.merged.tmp-k3j2
          model.save_pretrained(tmp)
          write_json(os.path.join(tmp, "info.json"), {...})
      # out/merged now exists, complete; had anything raised, out/merged would be untouched (absent, or the old one)

  A rename within one parent directory is atomic on POSIX file systems, so a reader sees no directory (or the
  previous one) or the complete new one.

* `atomic_saves`: a moe-peft adapter's `save_pretrained`, into a directory that may hold other files that must stay
  (a Trainer checkpoint keeps its optimizer and scheduler state next to the adapter):
  1. PEFT's own `save_pretrained` writes the whole adapter (every adapter's subdirectory, weights, config, model
     card) into the temporary sibling, and every file there is flushed to disk;
  2. then, per adapter directory, the old `adapter_config.json` is withdrawn first (from that moment the directory is
     no loadable adapter), the other files are moved in with `os.replace` (atomic on POSIX), and the new
     `adapter_config.json` is moved in last: the commit point. At every instant the directory holds the complete old
     adapter, no config (PEFT refuses it), or the complete new adapter.
  `atomic_file` does the same for one file (PHATGOOSE's gate files).

File modes: the temporary directory and files are created private (mkdtemp / mkstemp: 0700 / 0600), and
safetensors >= 0.8 writes its files 0600 whatever the umask (it writes through a temporary file of its own,
safetensors#782). A rename keeps those modes, so before publishing, everything written is given the modes a plain
`open()` / `os.makedirs` gives under the process umask: files 0o666 & ~umask, directories 0o777 & ~umask (a server
running as another user can read what the umask lets it read). A file that replaces an existing one keeps the
existing file's mode, as writing over it in place would.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    """The process umask, read without changing it where the system reports it (Linux: /proc/self/status), else set
    and restored at once (os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def plain_modes() -> tuple[int, int]:
    """(file mode, directory mode) that `open(path, "w")` and `os.makedirs(path)` give a new path under the umask."""
    mask = _umask()
    return 0o666 & ~mask, 0o777 & ~mask


def _share(path: str, mode: int, replaces: Optional[str] = None) -> None:
    """Give `path` the mode `mode`, or the mode of the existing file `replaces` it will be renamed onto."""
    if replaces is not None:
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(os.stat(replaces).st_mode)
    os.chmod(path, mode)


def _share_tree(root: str) -> None:
    """Plain modes (plain_modes) for `root` and every file and directory under it."""
    file_mode, dir_mode = plain_modes()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, dir_mode)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


def _fsync_tree(root: str) -> None:
    """Flush every file and directory under `root` to disk, so the rename publishes complete contents."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_directory(path: PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory that becomes `path` when the block exits without an exception.

    overwrite=False refuses an existing `path` before anything is written (FileExistsError); overwrite=True
    replaces it only after the new contents are complete: the old directory is moved aside, the new one renamed
    into place, then the old one deleted. On an exception the temporary directory is removed and `path` is left
    as it was.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose another output directory or pass overwrite=True.")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    old = None
    try:
        yield tmp
        _share_tree(tmp)  # mkdtemp made it 0700: a rename would publish it private
        _fsync_tree(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(path, os.path.join(old, name))  # aside first: a rename onto a non-empty directory fails
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(path):
            os.rename(os.path.join(old, name), path)  # put the previous directory back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_json(path: PathLike, data: Any) -> None:
    """Write `data` as indented JSON through a temporary file in the same directory and an atomic replace."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _share(tmp, plain_modes()[0], replaces=path)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


CONFIG_NAME = "adapter_config.json"
_ATOMIC_TYPES: set[str] = set()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, dest: str) -> None:
    """Move a fully written adapter directory `tmp` into `dest`, each adapter's config last (module docstring).
    Directories it creates get the plain mode, moved files the plain mode or that of the file they replace."""
    file_mode = plain_modes()[0]
    for dirpath, _, filenames in os.walk(tmp):
        for name in filenames:
            _fsync(os.path.join(dirpath, name))
    configs = []
    for dirpath, _, filenames in os.walk(tmp):
        target = os.path.normpath(os.path.join(dest, os.path.relpath(dirpath, tmp)))
        os.makedirs(target, exist_ok=True)
        if CONFIG_NAME in filenames:
            source, old = os.path.join(dirpath, CONFIG_NAME), os.path.join(target, CONFIG_NAME)
            _share(source, file_mode, replaces=old)  # the old config's mode, read before it is withdrawn
            with contextlib.suppress(FileNotFoundError):
                os.remove(old)  # withdraw the old adapter before touching its files
            configs.append((source, old))
        for name in filenames:
            if name != CONFIG_NAME:
                source, moved = os.path.join(dirpath, name), os.path.join(target, name)
                _share(source, file_mode, replaces=moved)  # safetensors writes 0600 (module docstring)
                os.replace(source, moved)
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
        _share(tmp, plain_modes()[0], replaces=path)  # mkstemp made it 0600
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
