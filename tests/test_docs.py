"""The documentation's Python blocks run as written: every ```python block of README.md and of docs/*.md, each on its
own (a fresh namespace, so a name a block does not define is an error), in a temporary directory, with the Hub offline.

Convention: a ```python block whose first line starts with `# fragment:` is not standalone (it needs a real model, a
GPU, your data, or names from the text around it) and is skipped; the comment says what it needs. Every other Python
block must run as pasted into a file, in a few seconds on one CPU thread.

Also checked here, because mkdocs does not see README.md: its relative links and their anchors resolve (the site
itself, docs/, is checked by `mkdocs build --strict`).
"""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FILES = [README, *DOCS]
FRAGMENT = "# fragment:"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text[: match.start()].count("\n") + 1, match.group(1)))
    return blocks


def is_fragment(code: str) -> bool:
    return code.lstrip().startswith(FRAGMENT)


# (file relative to the repository, line, code) of every block
BLOCKS = [
    (path.relative_to(ROOT).as_posix(), line, code) for path in FILES for line, code in python_blocks(path.read_text())
]
RUNNABLE = [block for block in BLOCKS if not is_fragment(block[2])]
README_RUNNABLE = [block for block in RUNNABLE if block[0] == "README.md"]


def test_readme_has_runnable_blocks_and_every_fragment_says_what_it_needs():
    assert len(README_RUNNABLE) >= 2  # at least the quick start and the TRL example
    for name, line, code in BLOCKS:
        if is_fragment(code):
            assert len(code.lstrip().splitlines()[0]) > len(FRAGMENT) + 5, f"{name} line {line}: say what it needs"


@pytest.mark.parametrize("name, line, code", RUNNABLE, ids=[f"{name}:{line}" for name, line, _ in RUNNABLE])
def test_block_runs(name, line, code, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    # a block that reaches for the Hub fails at once instead of retrying (the constant is read at import time)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "__docs__"})
    # PEFT's AutoPeftModel asks the Hub for a tokenizer when none is beside the adapter and the path could be a hub id
    # (out/adapter): a block a user pastes must not print that (docs/reliability.md, "Warnings you may see")
    lookups = [str(w.message) for w in caught if "Unable to fetch remote file" in str(w.message)]
    assert not lookups, lookups


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: the text without Markdown code marks, lower case, punctuation dropped,
    spaces as hyphens (mkdocs makes the same one for headings without runs of spaces or hyphens)."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # headings only outside code blocks
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_readme_links_resolve():
    text = re.sub(r"^```.*?^```", "", README.read_text(), flags=re.S | re.M)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = README.parent / target if target else README
        assert path.exists(), f"README.md links to {link}: no such file"
        if anchor:
            assert anchor in anchors(path), f"README.md links to {link}: {target or 'README.md'} has no such heading"


def test_readme_lists_every_guide():
    text = README.read_text()
    for path in DOCS:
        if path.name == "index.md":  # the site's front page: README.md is the repository's
            continue
        assert f"](docs/{path.name})" in text, f"README.md's guide table does not link docs/{path.name}"
