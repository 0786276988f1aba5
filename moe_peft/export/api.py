"""`moe_peft.export`: one call for every deployment path (README "Deploy", docs/methods.md "Export")."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from peft import PeftModel
from torch import nn

from .._internal.atomic import atomic_directory, write_json
from ..tuners.mhr.config import MHRConfig
from ..tuners.mhr.layer import MHRLinear
from ..tuners.phatgoose.config import PhatgooseConfig
from ..tuners.phatgoose.layer import PhatgooseLinear
from ..tuners.routed.config import SMoRAConfig
from ..tuners.routed.layer import MoELoraLinear
from ..tuners.routed.model import IMAGE_TOKEN_MODEL_TYPES
from . import approximate as approx
from .calibration import Calibration, batches, load_calibration, routed_inputs
from .lora import build_lora_model, linear_factors
from .measure import measure, summary
from .native import NativeMoEError, build_native, check_base, routed_blocks
from .parts import Options, Parts, RoutedLinear, plain_tensors, read_parts
from .plain import check_not_quantized, merge_factors, merge_fixed, new_plain_model, tensor_bytes

STRATEGIES = ("merge", "native_moe", "average", "routing_weighted", "svd")
EXACT = ("merge", "native_moe")
RECORD_FILE = "moe_peft_export.json"


@dataclass
class ExportResult:
    path: str
    record: dict  # what RECORD_FILE holds
    model: nn.Module  # the exported model in memory: plain transformers, sparse-MoE, or a PEFT LoRA model


def _bad(name: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: {fix}")


def routed_hint(parts: Parts) -> str:
    """What to do with token-routed parts that `merge` cannot fold (used by its refusal)."""
    names = sorted({p.name for p in parts.routed})
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    sources = sorted({p.source for p in parts.routed})
    approx = (
        "an approximate strategy, 'average', 'routing_weighted' or 'svd' (a plain PEFT LoRA or merged weights; the "
        "error is measured on calibration data)"
    )
    try:
        routed_blocks(parts)
        use = f"Use strategy='native_moe' (exact: a stock sparse-MoE checkpoint) or {approx}."
    except NativeMoEError as err:
        use = f"Use {approx}. ('native_moe' does not apply: {str(err).split(': ', 1)[-1].rsplit('; use an', 1)[0]}.)"
    return (
        f"{', '.join(sources)} routes every token to its own experts in {len(names)} layers ({shown}), so it is not "
        f"one fixed weight. {use}"
    )


def _task_routed(root: nn.Module) -> bool:
    """Whether the routed model needs task_ids in its forward (MHR routing, PHATGOOSE oracle)."""
    for m in root.modules():
        if isinstance(m, MHRLinear) and any(c.routed for a, c in m.mhr_config.items() if a in m.active_adapters):
            return True
        if isinstance(m, PhatgooseLinear) and any(
            c.routing == "oracle" for a, c in m.phatgoose_config.items() if a in m.active_adapters
        ):
            return True
    return False


def _task_configs(root: nn.Module) -> list:
    """The configs of the active MHR and PHATGOOSE adapters, at any depth: what task_id, phatgoose_routing and
    expert act on."""
    found = {}
    for m in root.modules():
        if isinstance(m, MHRLinear):
            found.update({id(c): c for a, c in m.mhr_config.items() if a in m.active_adapters})
        elif isinstance(m, PhatgooseLinear):
            found.update({id(c): c for a, c in m.phatgoose_config.items() if a in m.active_adapters})
    return list(found.values())


def check_applicable(
    configs: list,
    task_id: Optional[int],
    phatgoose_routing: Optional[str],
    expert: Optional[str],
    what: str,
    shown: Optional[dict[str, str]] = None,
    require_task: bool = False,
) -> None:
    """Refuse task_id, phatgoose_routing and expert where nothing would use them (they were silently ignored), and
    out of range. `configs`: the adapter configs of the model (or of the adapter the CLI is about to load); `what`:
    how the messages name it; `shown`: how each given option is spelled in messages (the CLI: its flags; default
    `name=value`); require_task: the error will be measured, so a per-task model needs its task."""

    def name(option, value):
        return (shown or {}).get(option, f"{option}={value!r}")

    task_flag = (shown or {}).get("task_id_flag", "task_id")
    mhr = [c for c in configs if isinstance(c, MHRConfig)]
    libraries = [c for c in configs if isinstance(c, PhatgooseConfig)]
    per_task = [(c, c.n_tasks, "tasks") for c in mhr if c.routed]
    per_task += [(c, c.num_experts, "experts (one per task)") for c in libraries if c.routing == "oracle"]
    if task_id is not None and not per_task:
        raise ValueError(
            f"{name('task_id', task_id)} does not apply to {what}: it picks the task of an MHR adapter that routes per "
            "task, or the expert of a PHATGOOSE library with routing='oracle'; leave it unset."
        )
    for _, count, unit in per_task:
        if task_id is not None and not 0 <= task_id < count:
            raise ValueError(f"{name('task_id', task_id)} is out of range: {what} has {count} {unit}, 0..{count - 1}.")
    if require_task and task_id is None and per_task:
        raise ValueError(
            f"{what} routes per task (MHR, or PHATGOOSE with routing='oracle'): name the task to export and to measure "
            f"the error on with {task_flag}."
        )
    if phatgoose_routing is not None and not libraries:
        raise ValueError(
            f"{name('phatgoose_routing', phatgoose_routing)} does not apply to {what}: it fixes the routing of a "
            "PHATGOOSE library; leave it unset."
        )
    for c in libraries:
        if expert is not None and expert not in c.experts:
            raise ValueError(f"{name('expert', expert)} is not an expert of {what}; its experts are {c.experts}.")


def _modality_groups(root: nn.Module) -> dict[str, list[str]]:
    """{adapter: its modality group names, in token_types order} for the active routed adapters with
    modality_experts (MoLEConfig), which route each token within its group."""
    found = {}
    for m in root.modules():
        if isinstance(m, MoELoraLinear) and not m.disable_adapters:
            for adapter in m.active_adapters:
                groups = getattr(m.configs.get(adapter), "modality_experts", None)
                if groups and adapter in m.routers:
                    found[adapter] = list(groups)
    return found


def _image_token_id(root: nn.Module) -> Optional[int]:
    """The image token a LLaVA-family model marks its image positions with (their modality group), else None."""
    config = getattr(root, "config", None)
    if getattr(config, "model_type", None) in IMAGE_TOKEN_MODEL_TYPES:
        return getattr(config, "image_token_id", None)
    return None


def _check_modality(groups: dict[str, list[str]], calib: Calibration, image_token_id: Optional[int]) -> None:
    """An adapter with modality groups routes each token within its group, so its forward needs each token's
    modality: calibration rows with token_types, or a LLaVA-family model (whose image tokens give it)."""
    if not groups or calib.has_token_types or image_token_id is not None:
        return
    adapter, names = next(iter(groups.items()))
    raise ValueError(
        f"export: adapter '{adapter}' routes by modality_experts (groups {names}): every token is routed within "
        f"its modality group, so the routed model needs each token's group, which the calibration data "
        f"({calib.source}) does not carry. Give calibration rows with input_ids and token_types (one group index "
        f"per token, 0..{len(names) - 1} in the order {names}), e.g. "
        '{"input_ids": [5, 9, 7], "token_types": [0, 1, 1]}; the error is then measured on those tokens.'
    )


def _modality_tokens(groups, calib: Calibration, image_token_id: Optional[int]) -> Optional[dict]:
    """How many fit and held-out calibration tokens each modality group has (None without modality groups), so the
    record says what the error covers: a group without tokens was not measured."""
    if not groups:
        return None
    names = next(iter(groups.values()))
    text = names.index("text") if "text" in names else 0

    def count(rows):
        totals = [0] * len(names)
        for r in rows:
            if "token_types" in r:
                types = r["token_types"]
            elif image_token_id is not None:  # a LLaVA model: its image tokens are the image group
                image = names.index("image") if "image" in names else text
                types = [image if t == image_token_id else text for t in r["input_ids"]]
            else:
                types = [text] * len(r["input_ids"])
            for t in types:
                totals[t if 0 <= t < len(names) else text] += 1
        return dict(zip(names, totals))

    return {"fit": count(calib.fit), "eval": count(calib.eval)}


def default_rank(part: RoutedLinear) -> int:
    """svd's default rank: one expert's rank (SMoRA, whose experts are single ranks: the ranks a token uses)."""
    return int(part.config.top_k) if isinstance(part.config, SMoRAConfig) else int(part.lora_A.shape[1])


def _approximate(
    strategy: str,
    routed: list[RoutedLinear],
    model: nn.Module,
    calibration: Optional[Calibration],
    rank,
    ridge,
    extra=None,
) -> tuple[dict, dict]:
    """{module: [(A, B)]} replacing the routed layers, and a per-strategy note for the record."""
    stats = None
    if strategy in ("routing_weighted", "svd") and routed:
        collector = approx.Collector(routed, fit=strategy == "svd")
        with torch.no_grad(), collector.attached():
            for batch in batches(calibration.fit, calibration.pad_id):
                collector.mask = batch["attention_mask"]
                device = next(model.parameters()).device
                kw = extra(batch["input_ids"].shape[0]) if extra is not None else {}
                kw.update({k: v.to(device) for k, v in routed_inputs(batch).items()})  # labels, token_types
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), **kw)
        stats = collector.stats
    factors: dict[str, list] = {}
    residuals = []
    for part in routed:
        part_stats = None if stats is None else stats[id(part)]
        if strategy == "svd":
            r = min(rank or default_rank(part), part.lora_B.shape[1], part.lora_A.shape[2])  # <= min(out, in)
            a, b, residual = approx.svd_fit(part_stats, r, ridge)
            residuals.append(residual)
        else:
            a, b = approx.mixture_factors(part, approx.coefficients(part, strategy, part_stats))
            if rank:
                a, b = approx.truncate(a, b, rank)
        factors.setdefault(part.name, []).append((a.to(part.lora_A.device), b.to(part.lora_A.device)))
    note = {"approximated_layers": len(routed)}
    if residuals:
        note["svd_relative_residual_mean"] = sum(residuals) / len(residuals)
        note["ridge"] = ridge
    return factors, note


def measured_on(calib: Calibration) -> str:
    """Which data the error was measured on, in words (printed under the error)."""
    held = f"{len(calib.eval)} held-out rows ({sum(len(r['input_ids']) for r in calib.eval)} tokens)"
    if calib.source == "bundled":
        where = f"the bundled tasks {', '.join(calib.tasks)}"
    elif calib.source == "rows":
        where = "the rows passed in"
    else:
        where = calib.source
    return f"{held} of {where}" + (f"; {calib.note}" if calib.note else "")


def _check_options(strategy, rank, merge, measure_error, ridge, task_id, phatgoose_routing, expert) -> None:
    if strategy not in STRATEGIES:
        raise _bad("strategy", strategy, f"use one of {STRATEGIES}.")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise _bad("rank", rank, "use a positive integer, or None for the strategy's default.")
    if strategy in EXACT and rank is not None:
        raise _bad(
            "rank", rank, f"strategy={strategy!r} is exact; rank applies to 'average', 'routing_weighted', 'svd'."
        )
    if strategy == "native_moe" and merge is False:
        raise _bad("merge", merge, "native_moe writes a full sparse-MoE checkpoint; a LoRA adapter cannot hold it.")
    if strategy not in EXACT and not measure_error:
        raise _bad("measure_error", measure_error, "approximate strategies always measure and record their error.")
    if not ridge > 0:
        raise _bad("ridge", ridge, "use a small positive value, e.g. 1e-4.")
    if task_id is not None and (not isinstance(task_id, int) or task_id < 0):
        raise _bad("task_id", task_id, "use a task index >= 0.")
    if phatgoose_routing not in (None, "uniform", "single"):
        raise _bad("phatgoose_routing", phatgoose_routing, "use 'uniform' or 'single' (with expert=NAME), or None.")
    if (expert is not None) != (phatgoose_routing == "single"):
        raise _bad("expert", expert, "name an expert exactly when phatgoose_routing='single'.")


def _record(strategy, output, parts, peft_config, root, source, base_path, exported, calib, error) -> dict:
    """moe_peft_export.json (without options and size, which the caller adds)."""
    from .._internal.version import __version__

    exact_sources = {p.source for p in parts.fixed if getattr(p, "exact", True)}
    approximated = {p.source for p in parts.fixed if not getattr(p, "exact", True)}
    # native_moe turns the routed layers into experts exactly; the other strategies approximate them
    (exact_sources if strategy == "native_moe" else approximated).update(p.source for p in parts.routed)
    record = {
        "format": "moe-peft export",
        "moe_peft_version": __version__,
        "strategy": strategy,
        "exact": not approximated,
        "output": output,
        "source": {
            "adapter": source,
            "peft_type": str(getattr(getattr(peft_config, "peft_type", None), "value", None)),
            "base_model_name_or_path": base_path,
            "base_model_type": root.config.model_type,
        },
        "parts": {
            "exact": sorted(exact_sources),
            "approximated": sorted(approximated),
            "routed_modules": len({p.name for p in parts.routed}),
            "modules_to_save": sorted(parts.saved),
        },
        "calibration": calib.describe() if calib is not None else None,
        "measured_error": error,
    }
    if output == "native_moe":
        config = exported.config
        experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
        record["target"] = {"model_type": config.model_type, "num_experts": experts}
    return record


def export(
    model: nn.Module,
    strategy: str,
    out: Union[str, os.PathLike],
    calibration: Union[None, str, os.PathLike, list[dict]] = None,
    *,
    tokenizer=None,
    merge: Optional[bool] = None,
    rank: Optional[int] = None,
    task_id: Optional[int] = None,
    phatgoose_routing: Optional[str] = None,
    expert: Optional[str] = None,
    ridge: float = 1e-4,
    calibration_rows: int = 512,
    calibration_tasks: Optional[Sequence[str]] = None,
    measure_error: bool = True,
    overwrite: bool = False,
    source: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
    verbose: bool = True,
) -> ExportResult:
    """Export an adapted model for deployment; see README "Deploy" for which strategy fits which method.

    Args:
        model: a PeftModel made from a moe-peft config (nested adapters, e.g. RoMA under a MoLE adapter, included).
        strategy: "merge" (exact; only adapters whose routing does not depend on the token), "native_moe" (exact;
            a stock sparse-MoE checkpoint), "average", "routing_weighted" or "svd" (approximate; see approximate.py).
        out: the output directory, written atomically (a temporary sibling renamed into place).
        calibration: rows to fit routing_weighted/svd on and to measure the error on (calibration.py); None: the
            bundled synthetic tasks (without a tokenizer, exact strategies are measured on random token ids).
        tokenizer: tokenizes text calibration rows and runs exact match; saved next to merged models.
        merge: write merged weights (True) or a plain PEFT LoRA adapter (False). Default: merged for "merge", a LoRA
            for the approximate strategies; "merge" with merge=False writes the exact parts as a plain LoRA.
        rank: approximate strategies: the LoRA rank (svd: default the adapter's r, or top_k for SMoRA's rank-1
            experts; average/routing_weighted: default the exact rank E*r, truncated by SVD when given).
        task_id: MHR: the task to merge (and to measure against); PHATGOOSE routing="oracle": that task's expert.
        phatgoose_routing, expert: fix a PHATGOOSE library's routing to "uniform" or "single" (with `expert`).
        ridge: svd's regularization, relative to the mean input energy.
        calibration_rows: the number of bundled samples (calibration=None).
        calibration_tasks: which bundled tasks to draw them from (default rev, srt, sft, cpy); the CLI passes the
            adapter's own, from its tasks.json.
        measure_error: exact strategies may skip the measurement; approximate ones always measure.
        overwrite: replace an existing `out` (only once the new one is complete).
        source: where the adapter came from, for the record (the CLI passes the adapter path).
        base_model_name_or_path: the base a LoRA export names in its adapter_config.json (default: the source
            adapter's), so that AutoPeftModelForCausalLM finds it.
    """
    _check_options(strategy, rank, merge, measure_error, ridge, task_id, phatgoose_routing, expert)
    if os.path.exists(out) and not overwrite:  # before any work; atomic_directory checks again when it writes
        raise FileExistsError(f"{os.path.abspath(out)} exists; choose another output directory or pass overwrite=True.")
    needs_data = measure_error or strategy in ("routing_weighted", "svd")
    if not needs_data and (calibration is not None or calibration_tasks is not None):
        if calibration is None:
            given = f"calibration_tasks={list(calibration_tasks)!r}"
        else:  # a list of rows is shown by its length
            shown = f"[{len(calibration)} rows]" if isinstance(calibration, (list, tuple)) else repr(calibration)
            given = f"calibration={shown}"
        raise ValueError(
            f"{given} is invalid: strategy={strategy!r} with measure_error=False fits and measures nothing, so nothing "
            "would use it; drop it, or measure the error."
        )
    merged = (strategy == "merge") if merge is None else bool(merge)
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    check_not_quantized(root)
    check_applicable(_task_configs(root), task_id, phatgoose_routing, expert, "this model")
    peft_config = model.peft_config[model.active_adapters[0]] if isinstance(model, PeftModel) else None
    options = Options(task_id, phatgoose_routing, expert, mhr_average=strategy == "average")
    if strategy in ("routing_weighted", "svd") and task_id is None and _task_routed(root):
        raise ValueError(
            f"strategy={strategy!r}: MHR (and PHATGOOSE's oracle) route per task, not per token; export one task "
            "exactly (strategy='merge', task_id=...) or average MHR's skills (strategy='average', MHR-mu)."
        )
    parts, plain = read_parts(root, options)
    if strategy == "merge" and parts.routed:
        raise ValueError(f"strategy='merge' folds only routing that does not depend on the token: {routed_hint(parts)}")
    blocks = []
    if strategy == "native_moe" and parts.routed:
        blocks = routed_blocks(parts)
        check_base(root.config)

    extra = None
    if _task_routed(root):
        if task_id is None and measure_error:
            raise _bad("task_id", task_id, "the routed model routes per task: name the task the error is measured on.")
        extra = lambda batch: {"task_ids": torch.full((batch,), int(task_id), dtype=torch.long)}  # noqa: E731
    pad_id = getattr(root.config, "pad_token_id", None)
    # an exact export needs no particular data to show it is exact: without a tokenizer for the bundled text, it is
    # measured on token ids drawn from the vocabulary (calibration.py); the approximations fit on real data only
    text_config = root.config.get_text_config() if hasattr(root.config, "get_text_config") else root.config
    vocab = getattr(text_config, "vocab_size", None) if strategy in EXACT else None
    calib = (
        load_calibration(calibration, tokenizer, calibration_rows, pad_id, calibration_tasks, vocab)
        if needs_data
        else None
    )
    modality = _modality_groups(root)
    if calib is not None:
        _check_modality(modality, calib, _image_token_id(root))
    base_path = base_model_name_or_path or getattr(peft_config, "base_model_name_or_path", None)

    was_training = model.training
    model.eval()
    try:
        note: dict = {}
        if strategy == "native_moe":
            dense = new_plain_model(root, plain)
            merge_fixed(dense, parts)
            exported, output = (build_native(dense, blocks) if blocks else dense), "native_moe"
        else:
            factors, note = ({}, {})
            if parts.routed:
                factors, note = _approximate(strategy, parts.routed, model, calib, rank, ridge, extra)
            if merged:
                exported, output = new_plain_model(root, plain), "merged"
                merge_fixed(exported, parts)
                merge_factors(exported, factors)
            else:
                base_plain = new_plain_model(root, plain_tensors(root, trained=False))
                task_type = getattr(peft_config, "task_type", None)
                exported = build_lora_model(base_plain, parts, linear_factors(parts, factors), task_type, base_path)
                output = "peft_lora"
        error = measure(model, exported, calib, tokenizer, extra) if measure_error else None
    finally:
        model.train(was_training)

    record = _record(strategy, output, parts, peft_config, root, source, base_path, exported, calib, error)
    record["options"] = {"rank": rank, "task_id": task_id, "phatgoose_routing": phatgoose_routing, "expert": expert}
    record["options"].update(note)
    modality_tokens = _modality_tokens(modality, calib, _image_token_id(root)) if calib is not None else None
    if modality_tokens is not None:
        record["calibration"]["modality_tokens"] = modality_tokens
    with atomic_directory(out, overwrite=overwrite) as tmp:
        exported.save_pretrained(tmp)
        if output != "peft_lora" and tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        files = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.endswith(".safetensors"))
        base_bytes = tensor_bytes(new_plain_model(root, plain_tensors(root, trained=False)))
        record["size"] = {"safetensors_bytes": files, "base_bytes": base_bytes, "ratio_to_base": files / base_bytes}
        write_json(os.path.join(tmp, RECORD_FILE), record)
    path = os.path.abspath(os.fspath(out))
    if verbose:
        print(f"moe-peft export: strategy {strategy} -> {output} at {path}")
        if record["parts"]["approximated"]:
            print(f"  approximated: {', '.join(record['parts']['approximated'])}")
        if error is not None:
            print(summary(error))
            print(f"  measured on: {measured_on(calib)}")
        if modality_tokens is not None:
            held = modality_tokens["eval"]
            missing = [g for g, n in held.items() if n == 0]
            print(
                "  modality groups of the held-out tokens: "
                + ", ".join(f"{g} {n}" for g, n in held.items())
                + (f" (no {', '.join(missing)} token: the error says nothing about them)" if missing else "")
            )
        size = record["size"]
        print(
            f"  size: {size['safetensors_bytes'] / 2**20:.2f} MiB of safetensors, {size['ratio_to_base']:.2f}x the base"
        )
    return ExportResult(path=path, record=record, model=exported)
