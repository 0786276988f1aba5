"""Routing statistics of a trained adapter over a dataset: per layer, and per task (or sample type).

stats = moe_peft.stats.collect(model, rows, by="task", tokenizer=tokenizer)
stats.layer("model.layers.0.mlp")            # load, load_cv, max_load, entropy, experts_per_token, ...
stats.save("out/stats")                       # stats.json + expert_load.png, routing_by_task.png, ...
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .probe import RoutingProbe
from .summary import Totals, summarize

GROUP_KEYS = {"task": ("task", "task_ids"), "sample_type": ("sample_type", "sample_types")}


@dataclass
class RoutingStats:
    """Routing totals per layer, split into groups (tasks, sample types, or one group "all")."""

    layers: list[str]
    groups: list[str]
    by: Optional[str]
    totals: dict[str, Totals]  # on the CPU
    expert_names: Optional[list[str]] = None  # PHATGOOSE: the experts' names, in bank order

    def layer(self, name: str, group: Optional[str] = None) -> dict[str, Any]:
        """The summaries of one layer (summary.py), over all samples or over one group's."""
        totals = self.totals[name]
        if group is None:
            return summarize(totals.total())
        return summarize(totals, self.groups.index(group))

    def load_matrix(self) -> tuple[list[str], torch.Tensor]:
        """(layers, load [L, E_max]); a layer with fewer experts is padded with NaN."""
        width = max(self.totals[n].counts.shape[1] for n in self.layers)
        rows = []
        for name in self.layers:
            load = torch.tensor(self.layer(name)["load"], dtype=torch.float64)  # [E]
            rows.append(torch.cat([load, load.new_full((width - load.numel(),), float("nan"))]))
        return self.layers, torch.stack(rows)  # [L, E_max]

    def group_matrix(self, name: str) -> torch.Tensor:
        """Load of one layer per group, [G, E] (each row sums to 1, or is 0 for a group with no token)."""
        return torch.tensor([self.layer(name, g)["load"] for g in self.groups], dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        layers = {}
        for name in self.layers:
            entry = {"num_experts": int(self.totals[name].counts.shape[1]), **self.layer(name)}
            if self.by is not None:
                entry["by_" + self.by] = {g: self.layer(name, g) for g in self.groups}
            layers[name] = entry
        return {"by": self.by, "groups": self.groups, "experts": self.expert_names, "layers": layers}

    def save(self, out_dir: str, plots: bool = True) -> dict[str, str]:
        """Write stats.json (every number) and, with plots=True, the PNG plots; returns {what: path}."""
        os.makedirs(out_dir, exist_ok=True)
        paths = {"json": os.path.join(out_dir, "stats.json")}
        with open(paths["json"], "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        if plots:
            from .plots import plot_all

            paths.update(plot_all(self, out_dir))
        return paths


def _tuner_needs_task_ids(model: nn.Module) -> bool:
    from ..tuners.mhr.model import MHRModel
    from ..tuners.phatgoose.model import PhatgooseModel

    tuner = getattr(getattr(model, "module", model), "base_model", model)
    if isinstance(tuner, MHRModel):
        return any(getattr(c, "routed", True) for c in tuner.peft_config.values())
    if isinstance(tuner, PhatgooseModel):
        return any(c.routing == "oracle" for c in tuner.peft_config.values())
    return False


def _group_of(row: dict, by: Optional[str], task_names: Optional[Sequence[str]]) -> str:
    if by is None:
        return "all"
    name_key, id_key = GROUP_KEYS[by]
    if row.get(name_key) is not None:
        return str(row[name_key])
    if row.get(id_key) is not None:
        value = int(row[id_key])
        if by == "task" and task_names is not None and 0 <= value < len(task_names):
            return str(task_names[value])
        return f"{by} {value}"
    raise ValueError(f"by={by!r} needs a `{name_key}` (or `{id_key}`) field in every row; a row has neither.")


def _task_id(row: dict, task_names: Optional[Sequence[str]]) -> int:
    if row.get("task_ids") is not None:
        return int(row["task_ids"])
    task = row.get("task")
    if task is not None and task_names is not None and str(task) in task_names:
        return list(task_names).index(str(task))
    raise ValueError(
        "this adapter routes by task (MHR, or PHATGOOSE with routing='oracle'): give every row a `task_ids` field, "
        f"or a `task` name together with task_names (the adapter's tasks.json); row task={task!r}, "
        f"task_names={None if task_names is None else list(task_names)}."
    )


def _row_batches(
    rows: Sequence[dict], tokenizer, batch_size: int, by: Optional[str], task_names, needs_task_ids: bool, pad_id: int
) -> Iterable[tuple[dict, list[str]]]:
    for start in range(0, len(rows), batch_size):
        chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        ids = []
        for row in chunk:
            if "input_ids" in row:
                ids.append(list(row["input_ids"]))
            else:
                if tokenizer is None:
                    raise ValueError("rows without input_ids need tokenizer= to tokenize them.")
                from ..data.user import tokenize_example

                ids.append(tokenize_example(row, tokenizer)["input_ids"])
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # [B, S], right padding
        mask = torch.zeros_like(input_ids)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if needs_task_ids:
            batch["task_ids"] = torch.tensor([_task_id(r, task_names) for r in chunk], dtype=torch.long)  # [B]
        yield batch, [_group_of(r, by, task_names) for r in chunk]


@torch.no_grad()
def collect(
    model: nn.Module,
    data: Any,
    by: Optional[str] = "task",
    tokenizer=None,
    batch_size: int = 16,
    max_samples: Optional[int] = None,
    task_names: Optional[Sequence[str]] = None,
) -> RoutingStats:
    """Run `model` (eval mode, no gradient) over `data` and gather the routing of every routed layer.

    data: rows (a datasets.Dataset or a list of dicts) that are tokenized (`input_ids`) or raw (prompt/completion
        or messages, tokenized with `tokenizer` as moe_peft.train does); or an iterable of model-ready batches
        (dicts with `input_ids` [B, S], `attention_mask`, and the group column: `task_ids` / `sample_types`).
    by: "task" (rows' `task` name or `task_ids`), "sample_type" (`sample_type` / `sample_types`) or None.
    task_names: names of the task ids (an MHR adapter's tasks, in id order), to name groups and to turn `task`
        names into the `task_ids` an MHR adapter needs.
    """
    if by not in (None, *GROUP_KEYS):
        raise ValueError(f"by={by!r} is invalid: use 'task', 'sample_type' or None.")
    device = next(model.parameters()).device
    needs_task_ids = _tuner_needs_task_ids(model)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    if hasattr(data, "column_names") or isinstance(data, (list, tuple)):
        rows = data if max_samples is None else [data[i] for i in range(min(max_samples, len(data)))]
        batches = _row_batches(rows, tokenizer, batch_size, by, task_names, needs_task_ids, pad_id)
    else:
        batches = _given_batches(data, by, task_names, max_samples, needs_task_ids)
    groups: list[str] = []
    probe = RoutingProbe(model)
    was_training = model.training
    model.eval()
    try:
        for batch, names in batches:
            for name in names:
                if name not in groups:
                    groups.append(name)
            probe.num_groups = len(groups)
            probe.groups = torch.tensor([groups.index(n) for n in names], dtype=torch.long)  # [B]
            model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        totals, _, forwards = probe.take()
    finally:
        probe.remove()
        model.train(was_training)
    if not forwards:
        raise ValueError("data yielded no batch: nothing to measure.")
    # groups in a stable order: the task list's, else sorted names
    known = [str(t) for t in task_names] if by == "task" and task_names is not None else []
    order = sorted(
        range(len(groups)), key=lambda g: (known.index(groups[g]) if groups[g] in known else len(known), groups[g])
    )
    index = torch.tensor(order, dtype=torch.long)
    totals = {name: t.grown(len(groups)).select(index) for name, t in totals.items()}
    layers = [name for name in probe.layers if name in totals]
    return RoutingStats(layers, [groups[g] for g in order], by, totals, _expert_names(model))


def _expert_names(model: nn.Module) -> Optional[list[str]]:
    from ..tuners.phatgoose.model import PhatgooseModel

    tuner = getattr(getattr(model, "module", model), "base_model", model)
    if isinstance(tuner, PhatgooseModel):
        return list(tuner.peft_config[tuner.active_adapters[0]].experts)
    return None


def _given_batches(batches: Iterable[dict], by: Optional[str], task_names, max_samples: Optional[int], task_ids: bool):
    seen = 0
    for batch in batches:
        batch = dict(batch)
        size = batch["input_ids"].shape[0]
        if by is None:
            names = ["all"] * size
        else:
            _, id_key = GROUP_KEYS[by]
            if id_key not in batch:
                raise ValueError(f"by={by!r} needs a `{id_key}` tensor [B] in every batch.")
            names = [_group_of({id_key: int(v)}, by, task_names) for v in batch[id_key].tolist()]
        batch.pop("sample_types", None)  # routing does not depend on it (only LoRAMoE's loss does)
        if not task_ids:
            batch.pop("task_ids", None)  # only MHR and PHATGOOSE's oracle take it
        yield batch, names
        seen += size
        if max_samples is not None and seen >= max_samples:
            return
