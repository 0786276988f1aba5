"""moe_peft._internal.atomic: a directory appears complete or not at all (used by export; meant for every save_pretrained)."""

from __future__ import annotations

import json
import os

import pytest

from moe_peft._internal.atomic import atomic_directory, write_json


def test_the_directory_appears_only_when_complete(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        assert not (tmp_path / "out").exists()  # not visible before it is complete
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".out.tmp-")
        open(os.path.join(tmp, "a.txt"), "w").write("a")
    assert os.listdir(tmp_path) == ["out"] and (tmp_path / "out" / "a.txt").read_text() == "a"


def test_an_exception_leaves_nothing_and_keeps_the_old_directory(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            open(os.path.join(tmp, "config.json"), "w").write("{}")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with atomic_directory(tmp_path / "out") as tmp:
        open(os.path.join(tmp, "v"), "w").write("1")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_directory(tmp_path / "out"):
            pytest.fail("an existing directory is refused before anything is written")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out", overwrite=True) as tmp:
            open(os.path.join(tmp, "v"), "w").write("2")
            raise RuntimeError("interrupted")
    assert (tmp_path / "out" / "v").read_text() == "1" and os.listdir(tmp_path) == ["out"]
    with atomic_directory(tmp_path / "out", overwrite=True) as tmp:
        open(os.path.join(tmp, "v"), "w").write("3")
    assert (tmp_path / "out" / "v").read_text() == "3" and os.listdir(tmp_path) == ["out"]


def test_write_json_replaces_the_file_whole(tmp_path, monkeypatch):
    write_json(tmp_path / "r.json", {"a": 1})
    monkeypatch.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_json(tmp_path / "r.json", {"a": 2})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1} and os.listdir(tmp_path) == ["r.json"]
