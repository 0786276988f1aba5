"""Atomic directory writes: everything goes into a temporary directory next to the destination, which is renamed
into place only once every file is written and flushed.

    with atomic_directory("out/merged") as tmp:      # tmp: a hidden sibling, e.g. out/.merged.tmp-k3j2
        model.save_pretrained(tmp)
        write_json(os.path.join(tmp, "info.json"), {...})
    # out/merged now exists, complete; had anything raised, out/merged would be untouched (absent, or the old one)

A rename within one parent directory is atomic on POSIX file systems, so a reader sees either no directory (or
the previous one) or the complete new one, never a half-written directory that a loader would accept. A process
killed mid-write can leave only the hidden temporary sibling (`.<name>.tmp-*`), which no loader is pointed at.
Used by `moe_peft.export`, whose outputs are directories of their own. A moe-peft adapter's `save_pretrained` is
atomic through `moe_peft._atomic_save` instead, which publishes into the directory file by file (each adapter's config
last), because a Trainer checkpoint directory holds other files that must stay.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Union

PathLike = Union[str, os.PathLike]


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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
