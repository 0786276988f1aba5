"""Expert load per modality group, from `moe_peft.routing_stats`."""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..tuners.routed.model import routing_stats


def modality_load(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, dict]:
    """Per modality group of the latest forward: the load of each of the group's experts over the group's own
    (token, slot) picks, averaged over the routed layers, and the group's tokens in one layer. Without modality
    groups the single entry "all" holds the load over every expert."""
    layers = list(routing_stats(model, adapter_name).values())
    if not layers:
        return {}
    per_group = [layer.get("groups", {"all": {"load": layer["load"], "tokens": layer["tokens"]}}) for layer in layers]
    out = {}
    for name in per_group[0]:
        loads = [groups[name]["load"] for groups in per_group]
        out[name] = {
            "load": [sum(column) / len(loads) for column in zip(*loads)],
            "tokens": per_group[0][name]["tokens"],
        }
    return out
