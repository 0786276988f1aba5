"""The outputs of the real-model suite (quality_real.py): summary.csv, runs.csv and summary.md."""

from __future__ import annotations

import math
import os
import statistics

from ..bases.real import REAL_BASES
from .quality_methods import BUDGET_TOLERANCE, active_params
from .quality_report import _cell, write_csv


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds; nan when a value is (retention of a base that knew no fact)."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _base_title(base: str) -> str:
    real = REAL_BASES.get(base)
    return f"{real.title} ({real.quantization})" if real else f"base {base}"


def summary_rows(suite, methods, runs, best_lr, ranks, params, budget, times, base) -> list[dict]:
    rows = []
    for m in methods:
        seeds = runs[m.name]
        ms, ratio, spread = times[m.name]
        row = {
            "method": m.name,
            "note": m.note,
            "equal_active": m.equal_active,
            "rank": ranks[m.name],
            "lr": best_lr[m.name],
            "seeds": len(seeds),
            "trainable": params[m.name],
            "trainable_vs_budget": params[m.name] / budget - 1,
            "active_per_token": active_params(m, suite, base, ranks[m.name], params[m.name], seeds),
            "step_time_ms": ms,
            "step_time_vs_lora": ratio,
            "step_time_vs_lora_spread": spread,
            "run_seconds": statistics.mean(r["seconds"] for r in seeds),
        }
        for task in suite.tasks:
            row[task], row[f"{task}_std"] = _mean_std([r["test"][task] for r in seeds])
        row["tasks_mean"], row["tasks_mean_std"] = _mean_std([r["test_summary"]["tasks_mean"] for r in seeds])
        for what in ("retention", "agreement", "nll"):
            row[what], row[f"{what}_std"] = _mean_std([r[what] for r in seeds])
        row["val_grid"] = {r["lr"]: round(r["val_summary"]["tasks_mean"], 4) for r in runs[m.name + "/grid"]}
        rows.append(row)
    return rows


def markdown(suite, rows, ref, budget, wall_s, quick, run_s: float = 0.0, num_runs: int = 0) -> str:
    tasks = list(suite.tasks)
    head = ["method", "lr"] + tasks + ["tasks mean", "retention", "general", "trainable", "active/token", "step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    base = [f"{ref['test'][t]:.2f}" for t in tasks] + [f"{statistics.mean(ref['test'][t] for t in tasks):.2f}"]
    base += ["1.00", f"{ref['agreement']:.2f}", "0", "0", "-"]
    lines.append("| base model (no adapter) | - | " + " | ".join(base) + " |")
    for r in rows:
        n = r["seeds"]
        cells = [r["method"], f"{r['lr']:.0e}"] + [_cell(r[t], r[f"{t}_std"], n) for t in tasks]
        cells += [f"**{_cell(r['tasks_mean'], r['tasks_mean_std'], n)}**"]
        cells += [f"**{_cell(r['retention'], r['retention_std'], n)}**", _cell(r["agreement"], r["agreement_std"], n)]
        cells += [f"{r['trainable']} ({r['trainable_vs_budget']:+.1%})", f"{r['active_per_token']:.0f}"]
        cells += [f"{r['step_time_vs_lora']:.2f}x ± {r['step_time_vs_lora_spread'] / 2:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    known = sum(ref["facts_known"])
    mode = "--quick (one seed, few steps: not the comparison)" if quick else f"{len(suite.seeds)} seed(s)"
    lora_ms = next((r["step_time_ms"] for r in rows if r["method"] == "LoRA"), math.nan)
    notes = [
        "",
        f"{_base_title(suite.base)}, {suite.dtype} on {suite.device}. Exact match on "
        f"{suite.test_per_task} held-out prompts per task ({mode}; mean ± std over seeds), greedy, through the chat "
        f"template; the model is not told the task (MHR is: task ids given). Fine-tuning: {suite.steps} steps of "
        f"{suite.batch_size} rows, {suite.general_share:.1%} of them general requests answered by the base itself "
        f"(sample_type=1). retention: of the {known} facts (of {len(ref['facts_known'])}) the base answers right, the share still "
        "answered right. general: agreement with the base's own greedy answers to held-out general requests "
        "(teacher-forced, share of answer tokens; the base: "
        f"{ref['agreement']:.2f}). lr: the best of {', '.join(f'{x:.0e}' for x in suite.lrs)} on the validation "
        f"split (seed {suite.seeds[0]}). trainable: against the budget of {budget} (LoRA r={suite.budget_rank}; every "
        f"row within {BUDGET_TOLERANCE:.0%} except the equal-active rows). active/token: parameters that take part "
        "in one token's output. step: training step time relative to LoRA (median over rounds of the ratio, ± half "
        f"its interquartile range), each method interleaved with LoRA in one process (LoRA: {lora_ms:.0f} ms).",
        f"Compute: {run_s / 60:.0f} min of training and evaluation over {num_runs} runs (their own wall time, summed; "
        f"runs recorded earlier are reused); this invocation {wall_s / 60:.1f} min.",
    ]
    return "\n".join(lines + notes) + "\n"


def run_rows(suite, methods, runs) -> list[dict]:
    out = []
    for m in methods:
        for r in runs[m.name + "/grid"] + runs[m.name][1:]:
            row = {"method": m.name, "lr": r["lr"], "seed": r["seed"], "rank": r["rank"], "seconds": r["seconds"]}
            row.update({f"val_{t}": v for t, v in r.get("val", {}).items()})
            row.update({f"test_{t}": v for t, v in r["test"].items()})
            row.update({k: r[k] for k in ("retention", "agreement", "nll", "loss_first", "loss_last", "step_s")})
            row["facts_lost"] = "; ".join(r.get("facts_lost", []))
            out.append(row)
    return out


def write_reports(
    out_dir, suite, methods, runs, best_lr, ranks, params, budget, ref, times, base, wall_s, quick, log
) -> list[dict]:
    """base: the base's architecture (the meta-device model is enough: PHATGOOSE's active parameters)."""
    rows = summary_rows(suite, methods, runs, best_lr, ranks, params, budget, times, base)
    write_csv(os.path.join(out_dir, "summary.csv"), rows)
    write_csv(os.path.join(out_dir, "runs.csv"), run_rows(suite, methods, runs))
    every = [r for m in methods for r in runs[m.name + "/grid"] + runs[m.name][1:]]
    md = markdown(suite, rows, ref, budget, wall_s, quick, sum(r["seconds"] for r in every), len(every))
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(md)
    log("\n" + md)
    return rows
