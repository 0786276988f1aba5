"""The README's Python blocks run as written, each on its own (a fresh namespace, so a name a block does not define
is an error), in a temporary directory, with the Hub offline.

Convention: a ```python block whose first line starts with `# fragment:` is not standalone (it needs a real model,
your data, or names from the text around it) and is skipped; the comment says what it needs. Every other Python block
must run as pasted into a file.
"""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
FRAGMENT = "# fragment:"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text[: match.start()].count("\n") + 1, match.group(1)))
    return blocks


BLOCKS = python_blocks(README.read_text())
RUNNABLE = [(line, code) for line, code in BLOCKS if not code.lstrip().startswith(FRAGMENT)]


def test_readme_has_runnable_blocks_and_marks_the_others():
    assert len(RUNNABLE) >= 2  # at least the quick start and the TRL example
    for line, code in BLOCKS:
        if code.lstrip().startswith(FRAGMENT):
            assert len(code.lstrip().splitlines()[0]) > len(FRAGMENT) + 5, f"README line {line}: say what it needs"


@pytest.mark.parametrize("line, code", RUNNABLE, ids=[f"line{line}" for line, _ in RUNNABLE])
def test_readme_block_runs(line, code, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    # a block that reaches for the Hub fails at once instead of retrying (the constant is read at import time)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
