"""The package's shape, checked: the import contracts of pyproject.toml ([tool.importlinter]: layers, tuner families,
no circles), nothing imports the root package, the top level holds folders only, and the 0.1 module paths still work
(deprecated) and give the very objects of the new paths (docs/architecture.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import moe_peft
from moe_peft._internal.compat import MOVED, NAMESPACES

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "moe_peft"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts from `root`/pyproject.toml, over the moe_peft package found first on the path."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_import_contracts_hold():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize(
    "module, line, contract",
    [
        # a tuner reading the export (the circle the 0.1 layout had through the merge hint)
        ("tuners/routed/layer.py", "from ...export import api", "Layers"),
        # the routed layer importing the capability built on it (0.1's mixed-batch path)
        ("tuners/routed/layer.py", "from ...multi_lora import moe", "Layers"),
        # one tuner family importing another
        ("tuners/mhr/layer.py", "from ..phatgoose import layer", "Tuner families"),
        # a circle inside one package (0.1's bench/quality <-> bench/quality_report)
        ("bench/quality_methods.py", "from . import quality_report", "No import circles"),
    ],
)
def test_the_contracts_catch_a_violation(tmp_path, module, line, contract):
    """The same contracts fail on a copy of the package with one forbidden import added inside a function (imports
    in functions count as much as those at the top)."""
    shutil.copytree(PACKAGE, tmp_path / "moe_peft", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "moe_peft" / module, "a") as f:
        f.write(f"\n\ndef _violation():\n    {line}  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout[-3000:]
    broken = [chunk for chunk in result.stdout.split("\n\n") if "BROKEN" in chunk]
    assert any(contract in chunk for chunk in broken), result.stdout[-3000:]


def test_nothing_imports_the_root_package():
    """`moe_peft/__init__.py` imports every layer; a module importing it back would import all layers above it."""
    import grimp

    graph = grimp.build_graph("moe_peft")
    importers = graph.find_modules_that_directly_import("moe_peft")
    assert not importers, sorted(importers)


def test_the_top_level_holds_the_layers_only():
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    loose = sorted(e for e in entries if e.endswith(".py") and e != "__init__.py")
    assert not loose, f"modules loose at the package top: {loose}; put them in the layer they belong to"
    want = {"__init__.py", "_internal", "ops", "routing", "tuners", "data", "bases"}
    want |= {"train", "stats", "export", "multi_lora", "llava", "bench", "apps"}
    assert entries == want


def test_every_public_name_imports_from_moe_peft():
    for name in moe_peft.__all__:
        assert getattr(moe_peft, name) is not None, name
    assert moe_peft.dequantize_base.__module__ == "moe_peft._internal.quantized"


OLD_PATHS = textwrap.dedent(
    """
    import importlib, json, sys, warnings
    import moe_peft
    from moe_peft._internal.compat import MOVED, NAMESPACES
    report = {}
    for old in sorted(MOVED) + ["moe_peft.routers.topk", "moe_peft.mhr.layer", "moe_peft.experts.layer"]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        new = MOVED.get(old) or MOVED[old.rpartition(".")[0]] + "." + old.rpartition(".")[2]
        report[old] = {
            "same": module is sys.modules[new] and module.__name__ == new and module.__spec__.name == new,
            "warnings": [str(w.message) for w in caught if w.category is DeprecationWarning],
        }
    from moe_peft.layer import MoLELinear
    from moe_peft.tuners.routed.layer import MoLELinear as new_class
    report["class"] = MoLELinear is new_class
    print("REPORT" + json.dumps(report))
    """
)


def test_old_module_paths_work_with_a_deprecation_warning():
    """In a fresh process (where nothing is imported yet): each 0.1 path is the new module object itself, and its
    first import warns naming the new path; the public namespaces (moe_peft.mhr, ...) do not warn."""
    result = subprocess.run([sys.executable, "-c", OLD_PATHS], capture_output=True, text=True, timeout=300)
    line = next((x for x in result.stdout.splitlines() if x.startswith("REPORT")), None)
    assert line is not None, result.stderr[-3000:]
    import json

    report = json.loads(line[len("REPORT") :])
    assert report.pop("class") is True
    for old, seen in report.items():
        assert seen["same"], old
        if old in NAMESPACES:
            assert seen["warnings"] == [], old
        else:
            new = MOVED.get(old) or MOVED[old.rpartition(".")[0]] + "." + old.rpartition(".")[2]
            assert any(old in w and new in w for w in seen["warnings"]), (old, seen["warnings"])


def test_the_moved_map_names_real_modules():
    import importlib

    for old, new in MOVED.items():
        assert importlib.util.find_spec(new) is not None, (old, new)
        assert not (REPO / (old.replace(".", "/") + ".py")).exists(), f"{old} exists as a file and as an alias"
