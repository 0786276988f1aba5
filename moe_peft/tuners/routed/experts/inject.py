"""Finding the fused expert parameters a config names and wrapping their modules (PEFT's `target_parameters`).

Matching is PEFT's (tuners_utils.BaseTuner._inject_parameters): the key `<module name>.<parameter name>` matches
a target equal to it or ending in `.<target>`, so `"experts.gate_up_proj"` or `"gate_up_proj"` adapt every
layer's experts. Unlike PEFT, which nests one ParamWrapper per parameter, all targeted parameters of one experts
module live in one layer (the forward needs both projections at once). `exclude_modules`, `layers_to_transform`
/ `layers_pattern` and `modules_to_save` apply to the experts module as they do to target_modules (PEFT ignores
them for parameters).
"""

from __future__ import annotations

import copy

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from .layer import EXPERTS_LAYERS
from .layout import read_layout, unsupported


def _strip_base_layer(name: str) -> str:
    return name.replace(".base_layer", "")


def find_expert_parameters(model: nn.Module, config) -> dict[str, list[str]]:
    """{experts module name (without `.base_layer`): [targeted parameter names]}, in model order."""
    targets = set(config.target_parameters)
    tuner_layers = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not name or isinstance(module, BaseTunerLayer):
            continue  # a wrapped module is visited as `<wrapper>.base_layer`
        if any(name.startswith(f"{t}.") and not name.startswith(f"{t}.base_layer") for t in tuner_layers):
            continue  # adapter weights, routers, dropouts of existing tuner layers
        unwrapped = _strip_base_layer(name)
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{unwrapped}.{param_name}"
            if key in targets or any(key.endswith(f".{t}") for t in targets):
                found.setdefault(unwrapped, []).append(param_name)
    selected = {}
    for name, params in found.items():
        probe = copy.copy(config)  # PEFT's own module filter, applied to the experts module's name (by suffix:
        probe.target_modules = {name.rpartition(".")[2]}  # PEFT checks layers_to_transform on suffix matches only)
        if check_target_module_exists(probe, name):
            selected[name] = params
    return selected


def inject_fused_experts(tuner: BaseTuner, config, model: nn.Module, adapter_name: str) -> list[str]:
    """Wrap every experts module with targeted parameters in the method's experts layer (or add the adapter to
    an existing one); return the full names of the targeted parameters."""
    layer_cls = EXPERTS_LAYERS[tuner.prefix]
    targeted = []
    for name, params in find_expert_parameters(model, config).items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        target = getattr(parent, child_name)
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layout = read_layout(base, name)
        wrong = [p for p in params if p not in layout.param_names]
        if wrong:
            raise unsupported(
                f"{name}.{wrong[0]}", base, f"is not one of the expert weights {layout.param_names} of this module"
            )
        params = [p for p in layout.param_names if p in params]
        if isinstance(target, layer_cls):
            target.update_layer(adapter_name, config, params)
        elif isinstance(target, BaseTunerLayer):
            raise TypeError(f"{name} already holds a {type(target).__name__} from another PEFT method.")
        else:
            new_module = layer_cls(target, adapter_name, config, params, layout)
            if adapter_name not in tuner.active_adapters:
                new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
            setattr(parent, child_name, new_module)
        targeted += [f"{name}.{p}" for p in params]
    return targeted
