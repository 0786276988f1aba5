"""The outputs of `moe-peft bench quality`: summary.csv, runs.csv, summary.md and quality.png (matplotlib)."""

from __future__ import annotations

import csv
import math
import os
import statistics

from .quality_methods import BUDGET_TOLERANCE
from .timing import paired_ratio


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.2f}" if seeds == 1 else f"{mean:.2f} ± {std:.2f}"


def summary_rows(suite, methods, runs, best_lr, ranks, params, budget, base, times) -> list[dict]:
    from .quality_methods import active_params

    rows = []
    for m in methods:
        seeds = runs[m.name]
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
            "step_time_ms": times[m.name].median,
            "step_time_vs_lora": paired_ratio(times[m.name], times["LoRA"]).median,
            "step_time_vs_lora_spread": paired_ratio(times[m.name], times["LoRA"]).spread,
            "run_seconds": statistics.mean(r["seconds"] for r in seeds),
        }
        for task in suite.all_tasks:
            row[task], row[f"{task}_std"] = _mean_std([r["test"][task] for r in seeds])
        for what in ("tasks_mean", "knowledge_mean"):
            row[what], row[f"{what}_std"] = _mean_std([r["test_summary"][what] for r in seeds])
        row["val_grid"] = {r["lr"]: round(r["val_summary"]["all_mean"], 4) for r in runs[m.name + "/grid"]}
        rows.append(row)
    return rows


def markdown(suite, rows, base_scores, budget, wall_s, quick, run_s: float = 0.0, num_runs: int = 0) -> str:
    tasks, knowledge = list(suite.tasks), list(suite.knowledge_tasks)
    head = ["method", "lr"] + tasks + ["tasks mean"] + knowledge + ["knowledge", "trainable", "active/token", "step"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    base_cells = [f"{base_scores[t]:.2f}" for t in tasks]
    base_cells += [f"{statistics.mean(base_scores[t] for t in tasks):.2f}"]
    base_cells += [f"{base_scores[t]:.2f}" for t in knowledge]
    base_cells += [f"{statistics.mean(base_scores[t] for t in knowledge):.2f}", "0", "0", "-"]
    lines.append("| base model (pre-trained, no adapter) | - | " + " | ".join(base_cells) + " |")
    for r in rows:
        n = r["seeds"]
        cells = [r["method"], f"{r['lr']:.0e}"]
        cells += [_cell(r[t], r[f"{t}_std"], n) for t in tasks]
        cells += [f"**{_cell(r['tasks_mean'], r['tasks_mean_std'], n)}**"]
        cells += [_cell(r[t], r[f"{t}_std"], n) for t in knowledge]
        cells += [f"**{_cell(r['knowledge_mean'], r['knowledge_mean_std'], n)}**"]
        cells += [f"{r['trainable']} ({r['trainable_vs_budget']:+.1%})", f"{r['active_per_token']:.0f}"]
        cells += [f"{r['step_time_vs_lora']:.2f}x ± {r['step_time_vs_lora_spread'] / 2:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    mode = "--quick (one seed, fewer steps)" if quick else f"{len(suite.seeds)} seeds"
    notes = [
        "",
        f"Exact match on {suite.test_per_task} held-out prompts per task ({mode}; mean ± std over seeds), greedy "
        f"decoding, the model is not told the task (MHR is: task ids given). Fine-tuning: {suite.steps} steps of "
        f"{suite.batch_size}, {suite.knowledge_share:.0%} world-knowledge samples ({', '.join(knowledge)}; "
        "sample_type=1). knowledge: retention of the pre-trained skills. lr: the best of "
        f"{', '.join(f'{x:.0e}' for x in suite.lrs)} on the validation split (seed {suite.seeds[0]}). trainable: "
        f"against the budget of {budget} (LoRA r={suite.budget_rank}; every row within "
        f"{BUDGET_TOLERANCE:.0%} except the equal-active rows). active/token: parameters that take part in one "
        "token's output. step: training step time relative to LoRA (median over rounds of the ratio, ± half its "
        "interquartile range), one step of every method per round, interleaved in the same process.",
        f"Compute: {run_s / 60:.0f} min of training and evaluation over {num_runs} runs (their own wall time, "
        f"summed; runs recorded earlier are reused); this invocation {wall_s / 60:.1f} min.",
    ]
    return "\n".join(lines + notes) + "\n"


def write_csv(path: str, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow(r)


def run_rows(suite, methods, runs) -> list[dict]:
    out = []
    for m in methods:
        for r in runs[m.name + "/grid"] + runs[m.name][1:]:
            row = {"method": m.name, "lr": r["lr"], "seed": r["seed"], "rank": r["rank"], "seconds": r["seconds"]}
            row.update({f"val_{t}": v for t, v in r["val"].items()})
            row.update({f"test_{t}": v for t, v in r["test"].items()})
            row["loss_last"] = r["loss_last"]
            out.append(row)
    return out


def plot(path: str, suite, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    x = range(len(rows))
    fig, (ax, heat) = plt.subplots(2, 1, figsize=(max(8, 0.75 * len(rows)), 9), height_ratios=[1, 1.1])
    width = 0.4
    for offset, key, label in (
        (-width / 2, "tasks_mean", "fine-tuning tasks"),
        (width / 2, "knowledge_mean", "knowledge"),
    ):
        ax.bar(
            [i + offset for i in x],
            [r[key] for r in rows],
            width,
            yerr=[r[f"{key}_std"] for r in rows],
            capsize=3,
            label=label,
        )
    lora = next(r for r in rows if r["method"] == "LoRA")
    ax.axhline(lora["tasks_mean"], color="C0", lw=0.8, ls="--")
    ax.axhline(lora["knowledge_mean"], color="C1", lw=0.8, ls="--")
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(f"held-out exact match, mean ± std over {rows[0]['seeds']} seed(s); dashed: LoRA", fontsize=9)
    tasks = list(suite.all_tasks)
    grid = [[r[t] for t in tasks] for r in rows]
    heat.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
    heat.set_xticks(range(len(tasks)), tasks)
    heat.set_yticks(list(x), names, fontsize=8)
    for i, line in enumerate(grid):
        for j, v in enumerate(line):
            heat.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    heat.set_title("per task", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(
    out_dir, suite, methods, runs, best_lr, ranks, params, budget, base, base_scores, times, wall_s, quick, log
):
    rows = summary_rows(suite, methods, runs, best_lr, ranks, params, budget, base, times)
    write_csv(os.path.join(out_dir, "summary.csv"), rows)
    write_csv(os.path.join(out_dir, "runs.csv"), run_rows(suite, methods, runs))
    every = [r for m in methods for r in runs[m.name + "/grid"] + runs[m.name][1:]]
    md = markdown(suite, rows, base_scores, budget, wall_s, quick, sum(r["seconds"] for r in every), len(every))
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(md)
    plot(os.path.join(out_dir, "quality.png"), suite, rows)
    log("\n" + md)
    return rows
