"""`target_modules` and `target_parameters` entries that match nothing, named, with what the base does have.

PEFT 0.21 raises `NoMatchingPeftModuleError("Target modules {...} not found in the base model")` when nothing at all
matched, without the names that would have, and says nothing when only some entries matched: a typo in
`["q_proj", "vproj"]` trains q_proj alone without a word (its own LoRA too). `TargetCheck` keeps PEFT's decision (an
error when nothing was adapted, carry on otherwise) and adds, for each list entry that matches no module (no
parameter for `target_parameters`), its name and the distinct names of the base's linear modules (fused 3-D expert
parameters for `target_parameters`): in PEFT's error when nothing matched, in a RuntimeWarning (PEFT's category for
its own "no module was matched" warning) otherwise. A regex string `target_modules` is PEFT's matching of whole
names: only the nothing-matched error applies to it.

Entries match as in PEFT (`check_target_module_exists`): a module's name equal to the entry or ending in `.<entry>`;
`<module>.<parameter>` likewise for `target_parameters`. An entry that names existing modules which
`layers_to_transform` or `exclude_modules` then leave out is not "unmatched": it names something real.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Optional

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

# PEFT's own generic warnings for the cases TargetCheck reports entry by entry
_PEFT_GENERIC = r"target_(modules|parameters)=.* were set but no (module|parameter) was matched"


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the base model as it was before any adapter: a tuner layer stands for its base layer under
    its own name, and the adapters' own modules (routers, dropouts, PEFT's modules_to_save copies) are skipped."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, BaseTunerLayer):
                child = child.get_base_layer()
            elif hasattr(child, "original_module") and hasattr(child, "modules_to_save"):  # PEFT's ModulesToSaveWrapper
                child = child.original_module
            yield full, child
            yield from walk(child, full)

    yield from walk(model, "")


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith(f".{entry}")


def _distinct(names: Iterator[str]) -> list[str]:
    return list(dict.fromkeys(names))


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last name parts of the base's nn.Linear modules, in model order (q_proj, k_proj, ...)."""
    return _distinct(name.rpartition(".")[2] for name, m in base_modules(model) if isinstance(m, nn.Linear))


def fused_parameter_names(model: nn.Module) -> list[str]:
    """The distinct `<module>.<parameter>` of the base's 3-D parameters (fused experts), e.g. experts.gate_up_proj."""
    return _distinct(
        f"{name.rpartition('.')[2]}.{p_name}"
        for name, m in base_modules(model)
        for p_name, p in m.named_parameters(recurse=False)
        if p.dim() == 3
    )


def unmatched_entries(model: nn.Module, target_modules, target_parameters) -> tuple[list[str], list[str]]:
    """(target_modules entries that match no module name, target_parameters entries that match no parameter);
    a regex string target_modules is never listed."""
    modules = [name for name, _ in base_modules(model)]
    bad_modules = []
    if target_modules is not None and not isinstance(target_modules, str):
        bad_modules = sorted(e for e in target_modules if not any(_matches(n, e) for n in modules))
    bad_params = []
    if target_parameters:
        params = [f"{n}.{p}" for n, m in base_modules(model) for p, _ in m.named_parameters(recurse=False)]
        bad_params = sorted(e for e in target_parameters if not any(_matches(k, e) for k in params))
    return bad_modules, bad_params


def describe_unmatched(model: nn.Module, target_modules, target_parameters) -> Optional[str]:
    """What matched nothing and what the base has instead; None when every entry matched something."""
    bad_modules, bad_params = unmatched_entries(model, target_modules, target_parameters)
    parts = []
    if bad_modules:
        parts.append(f"target_modules entries {bad_modules} match no module of the base model")
    elif isinstance(target_modules, str) and target_modules != INCLUDE_LINEAR_LAYERS_SHORTHAND:
        parts.append(
            f"the target_modules regex {target_modules!r} must match a whole module name (e.g. "
            r"'.*\.(q_proj|v_proj)' or 'model.layers.0.self_attn.q_proj'), and matched none"
        )
    if bad_params:
        parts.append(f"target_parameters entries {bad_params} match no parameter of the base model")
    if not parts:
        return None
    have = f"Its linear modules are: {', '.join(linear_names(model)) or 'none'}"
    if target_parameters or bad_params:
        fused = fused_parameter_names(model)
        have += f"; its fused 3-D expert parameters (target_parameters): {', '.join(fused) or 'none'}"
    hint = " List entries match a name or its last parts, e.g. 'q_proj' or 'self_attn.q_proj'." if bad_modules else ""
    return f"{'; '.join(parts)}. {have}.{hint}"


class TargetCheck:
    """Put before BaseTuner in a tuner's bases: entries of the adapter's config that match nothing are named in an
    error (nothing was adapted, as PEFT decides) or a RuntimeWarning (something was)."""

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        # as given: PEFT fills target_modules=None with the model type's defaults while injecting
        target_modules = config.target_modules
        target_parameters = getattr(config, "target_parameters", None)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_PEFT_GENERIC, category=RuntimeWarning)
                super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as exc:
            detail = describe_unmatched(model, target_modules, target_parameters)
            if detail is None:
                raise
            raise NoMatchingPeftModuleError(f"Adapter '{adapter_name}' adapts nothing: {detail} ({exc})") from exc
        detail = describe_unmatched(model, target_modules, target_parameters)
        if detail is not None:
            warnings.warn(
                f"Adapter '{adapter_name}': {detail} The other entries are adapted; fix or remove these.",
                RuntimeWarning,
                stacklevel=2,
            )
