"""How far an export is from the routed model, measured on held-out calibration rows.

kl_mean            mean over non-padding positions of KL(p_routed || p_export) of the next-token distributions
ppl_routed/export  exp(mean next-token NLL) over the scored tokens (labels != -100), each model on its own
ppl_change         ppl_export - ppl_routed (and in percent of ppl_routed)
max_abs_logit_diff the largest |logit difference| at a non-padding position (exact strategies: rounding only)
top1_agreement     fraction of non-padding positions where both models' most likely next token is the same
exact_match        greedy answers equal to the reference completion, per task and overall, for both models,
                   when the held-out rows are prompt/completion/task samples (the bundled data)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from ..tuners.roma.reference import exact_match_success
from .calibration import Calibration, batches, routed_inputs

Extra = Optional[Callable[[int], dict]]  # batch size -> extra forward/generate keywords (MHR's task_ids)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def compare_logits(routed: nn.Module, export: nn.Module, calibration: Calibration, extra: Extra = None) -> dict:
    kl_sum = agree = positions = 0.0
    nll = {"routed": 0.0, "export": 0.0}
    scored = 0
    max_diff = 0.0
    for batch in batches(calibration.eval, calibration.pad_id):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        kw = extra(batch["input_ids"].shape[0]) if extra is not None else {}
        kw.update(routed_inputs(batch))  # labels, token_types: only the routed model routes by them
        logits = {
            "routed": routed(**{k: v.to(_device(routed)) for k, v in {**inputs, **kw}.items()}).logits,
            "export": export(**{k: v.to(_device(export)) for k, v in inputs.items()}).logits,
        }
        logits = {k: v.double().cpu() for k, v in logits.items()}  # [B, S, V]
        mask = batch["attention_mask"].bool()  # [B, S]
        lp_r = logits["routed"].log_softmax(-1)[mask]  # [N, V]
        lp_e = logits["export"].log_softmax(-1)[mask]
        kl_sum += float((lp_r.exp() * (lp_r - lp_e)).sum())
        agree += float((lp_r.argmax(-1) == lp_e.argmax(-1)).sum())
        positions += int(mask.sum())
        max_diff = max(max_diff, float((logits["routed"] - logits["export"]).abs()[mask].max()))
        labels = batch["labels"][:, 1:]  # [B, S-1], the token each position predicts
        keep = labels != -100
        scored += int(keep.sum())
        for k, v in logits.items():
            lp = v[:, :-1].log_softmax(-1)  # [B, S-1, V]
            token_lp = lp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)  # [B, S-1]
            nll[k] -= float(token_lp[keep].sum())
    ppl = {k: math.exp(v / max(scored, 1)) for k, v in nll.items()}
    return {
        "kl_mean": kl_sum / max(positions, 1),
        "ppl_routed": ppl["routed"],
        "ppl_export": ppl["export"],
        "ppl_change": ppl["export"] - ppl["routed"],
        "ppl_change_pct": 100.0 * (ppl["export"] - ppl["routed"]) / ppl["routed"],
        "max_abs_logit_diff": max_diff,
        "top1_agreement": agree / max(positions, 1),
        "positions": int(positions),
        "scored_tokens": scored,
    }


def exact_match(model: nn.Module, tokenizer, rows: list[dict], extra: Extra = None) -> dict[str, float]:
    hits = exact_match_success(
        model, tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows], extra=extra
    )
    by_task, total = defaultdict(list), []
    for row, hit in zip(rows, hits):
        by_task[row["task"]].append(hit)
        total.append(hit)
    out = {task: sum(v) / len(v) for task, v in sorted(by_task.items())}
    out["mean"] = sum(total) / len(total)
    return out


def measure(
    routed: nn.Module, export: nn.Module, calibration: Calibration, tokenizer=None, extra: Extra = None
) -> dict:
    """The error of `export` against `routed` (both in eval mode) on the held-out calibration rows."""
    result = compare_logits(routed, export, calibration, extra)
    if calibration.has_tasks and tokenizer is not None:
        result["exact_match"] = {
            "routed": exact_match(routed, tokenizer, calibration.eval, extra),
            "export": exact_match(export, tokenizer, calibration.eval),
        }
    return result


def summary(result: dict) -> str:
    lines = [
        f"  mean KL(routed || export) per token: {result['kl_mean']:.3g}",
        f"  perplexity: routed {result['ppl_routed']:.4f} -> export {result['ppl_export']:.4f} "
        f"({result['ppl_change']:+.4f}, {result['ppl_change_pct']:+.2f}%)",
        f"  same top-1 next token: {100 * result['top1_agreement']:.2f}% of {result['positions']} positions; "
        f"max |logit difference| {result['max_abs_logit_diff']:.3g}",
    ]
    em = result.get("exact_match")
    if em:
        tasks = [t for t in em["routed"] if t != "mean"]
        lines.append(
            "  exact match routed -> export: "
            + ", ".join(f"{t} {em['routed'][t]:.2f}->{em['export'][t]:.2f}" for t in tasks)
            + f"; mean {em['routed']['mean']:.3f} -> {em['export']['mean']:.3f}"
        )
    return "\n".join(lines)
