"""The module paths of the 0.1 layout, kept working for one release.

0.2 moved the modules into layers (docs/architecture.md): `moe_peft.config` is now `moe_peft.tuners.routed.config`,
`moe_peft.routers` is `moe_peft.routing`, and so on (`MOVED`). An import of an old path still works and gives the very
module object of the new path (so classes, isinstance checks and monkeypatching agree), with a DeprecationWarning
naming the new path. Nothing is copied: a finder on `sys.meta_path` answers the old names.

Four subpackages keep their short names as public namespaces without a warning, because users import from them
directly (`from moe_peft.phatgoose import build_library`): `moe_peft.experts`, `moe_peft.mhr`, `moe_peft.phatgoose`
and `moe_peft.roma` (the tuners under `moe_peft.tuners`). Their submodules (`moe_peft.mhr.layer`) are old paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

# old module -> new module; a submodule of an old package maps with it (moe_peft.routers.topk -> ...routing.topk)
MOVED = {
    "moe_peft._atomic": "moe_peft._internal.atomic",
    "moe_peft._atomic_save": "moe_peft._internal.atomic",
    "moe_peft._registration": "moe_peft._internal.registration",
    "moe_peft._state_dict": "moe_peft._internal.state_dict",
    "moe_peft.accumulation": "moe_peft._internal.accumulation",
    "moe_peft.qlora": "moe_peft._internal.quantized",  # its one submodule, qlora.base, was internal: not kept
    "moe_peft.routers": "moe_peft.routing",
    "moe_peft.losses": "moe_peft.routing.losses",
    "moe_peft.context": "moe_peft.routing.context",
    "moe_peft.tasks": "moe_peft.routing.tasks",
    "moe_peft.config": "moe_peft.tuners.routed.config",
    "moe_peft.layer": "moe_peft.tuners.routed.layer",
    "moe_peft.model": "moe_peft.tuners.routed.model",
    "moe_peft.methods": "moe_peft.tuners.routed.methods",
    "moe_peft.experts": "moe_peft.tuners.routed.experts",
    "moe_peft.mhr": "moe_peft.tuners.mhr",
    "moe_peft.phatgoose": "moe_peft.tuners.phatgoose",
    "moe_peft.roma": "moe_peft.tuners.roma",
    "moe_peft.task_tuner": "moe_peft.tuners.task_tuner",
    "moe_peft.delta_merge": "moe_peft.tuners.delta_merge",
    "moe_peft.train.data": "moe_peft.data.user",
    "moe_peft.tiny": "moe_peft.bases.tiny",
    "moe_peft.demo": "moe_peft.apps.demo",
    "moe_peft.cli": "moe_peft.apps.cli",
}
# public namespaces: the short name is an alias without a warning (their submodules still warn)
NAMESPACES = ("moe_peft.experts", "moe_peft.mhr", "moe_peft.phatgoose", "moe_peft.roma")


def new_name(old: str) -> str | None:
    """The module an old path now lives at, or None when `old` is not an old path."""
    if old in MOVED:
        return MOVED[old]
    package = old.rpartition(".")[0]
    while package:
        if package in MOVED:
            return MOVED[package] + old[len(package) :]
        package = package.rpartition(".")[0]
    return None


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("moe_peft.") or new_name(fullname) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        new = new_name(spec.name)
        warnings.warn(
            f"{spec.name} moved to {new} in moe-peft 0.2; the old path works for this release only. Import from "
            f"{new} (or the public names from moe_peft).",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        self._spec = module.__spec__  # the import machinery stamps the alias spec on it: put the real one back
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec


def install(root) -> None:
    """Answer the old paths (once), and bind the public namespaces without a warning."""
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.insert(0, _OldPaths())
    for name in NAMESPACES:
        module = importlib.import_module(MOVED[name])
        sys.modules.setdefault(name, module)
        setattr(root, name.rpartition(".")[2], module)
