"""`moe-peft bench quality`: do the mixtures beat one LoRA at the same trainable-parameter budget?

    moe-peft bench quality --quick                 # one seed, fewer steps: the whole pipeline in minutes
    moe-peft bench quality --out out/quality       # the README table: 3 seeds, each method at its best lr
    moe-peft bench quality --methods LoRA,SMoRA    # a subset (names as in the table)

The suite (fixed before any method was tuned; docs/quality.md):

1. A tiny Llama is pre-trained in full on "world knowledge" skills (copy and duplicate a string over a-z) and
   cached on disk (`--cache`), so that forgetting can be measured as LoRAMoE measures it.
2. Each method fine-tunes it on a mixture of conflicting tasks over the same inputs (reverse, sort, every other
   letter, and three per-character substitutions: shift +1, shift -1, rot13), with a share of world-knowledge
   samples labelled `sample_type=1` (LoRAMoE's localized balancing reads them). Every method sees the same
   batches in the same order for a given seed, for the same number of steps, with the same optimizer and schedule.
3. Trainable parameters are equal to LoRA's within 5% (moe_peft/bench/quality_methods.py sizes each method).
4. Learning rate: every method at its own best from the same grid, chosen on a validation split with the first
   seed; the other seeds reuse it. A softmax gate of weight ~1/E scales an expert's update by ~1/E, so one shared
   learning rate would not be a fair comparison.
5. Reported: exact match per task on held-out prompts (greedy decoding), mean and std over seeds; retention of
   the world-knowledge skills; trainable and active parameters per token; training step time relative to LoRA,
   measured interleaved in the same process. CSV, Markdown and a bar chart under `--out`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from ..data.answers import generate_answers
from ..data.bundled import CharTokenizer, Collator, make_samples, tokenize_sample
from .quality_methods import (
    TARGETS,
    Method,
    count_trainable,
    fit_rank,
    method_table,
    moe_active_params,
)

KNOWLEDGE_GROUP = "knowledge"  # the PHATGOOSE expert trained on the world-knowledge samples


@dataclass(frozen=True)
class Suite:
    """Everything that defines the benchmark. The defaults are the full mode; `quick()` shrinks it."""

    # the base model and its pre-training (the "world knowledge")
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    knowledge_tasks: tuple[str, ...] = ("cpy", "dup")
    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    # fine-tuning
    tasks: tuple[str, ...] = ("rev", "srt", "alt", "sft", "bck", "rot")
    alphabet: str = "abcdefghijklmnopqrstuvwxyz"
    min_len: int = 3
    max_len: int = 6
    knowledge_share: float = 0.02
    steps: int = 800
    batch_size: int = 32
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    seeds: tuple[int, ...] = (0, 1, 2)
    budget_rank: int = 32
    # evaluation
    test_per_task: int = 64
    val_per_task: int = 32
    gate_steps: int = 100  # PHATGOOSE gate training per expert (paper: 100 steps, lr 1e-3)
    timing_reps: int = 30

    def quick(self) -> Suite:
        """One seed, one learning rate, fewer steps and prompts, a shorter pre-training: minutes, not an hour."""
        return dataclasses.replace(
            self,
            pretrain_steps=600,
            steps=300,
            lrs=(3e-3,),
            seeds=(0,),
            test_per_task=24,
            val_per_task=12,
            gate_steps=20,
            timing_reps=5,
        )

    @property
    def all_tasks(self) -> tuple[str, ...]:
        return self.tasks + self.knowledge_tasks

    @property
    def phatgoose_experts(self) -> int:
        """PHATGOOSE's library: one expert per task, plus one for the knowledge rows when there are any."""
        return len(self.tasks) + (1 if self.knowledge_share > 0 else 0)

    def base_key(self) -> str:
        fields = ("hidden_size", "intermediate_size", "num_layers", "knowledge_tasks", "pretrain_steps")
        fields += ("pretrain_lr", "alphabet", "min_len", "max_len", "batch_size")
        blob = json.dumps({f: getattr(self, f) for f in fields}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


# -- data -----------------------------------------------------------------------------------------------------------
def _samples(suite: Suite, n: int, tasks, seed: int) -> list[dict]:
    return make_samples(n, tasks, seed, min_len=suite.min_len, max_len=suite.max_len, alphabet=suite.alphabet)


def eval_split(suite: Suite, split: str) -> dict[str, list[dict]]:
    """{task: held-out samples}; the same prompts for every method and seed (test: 64 a task, val: 32)."""
    n, offset = (suite.test_per_task, 10_000) if split == "test" else (suite.val_per_task, 20_000)
    return {t: _samples(suite, n, [t], offset + i) for i, t in enumerate(suite.all_tasks)}


def training_mixture(suite: Suite, seed: int, exclude: set[str]) -> list[dict]:
    """steps * batch_size samples in training order: the fine-tuning tasks in equal numbers, plus knowledge_share of
    world-knowledge samples (sample_type 1, the knowledge tasks in equal numbers), shuffled by `seed`; no prompt of
    the evaluation splits."""
    total = suite.steps * suite.batch_size
    n_knowledge = round(suite.knowledge_share * total)
    samples = []
    for tasks, n, sample_type in ((suite.tasks, total - n_knowledge, 0), (suite.knowledge_tasks, n_knowledge, 1)):
        for i, task in enumerate(tasks):
            count = n // len(tasks) + (i < n % len(tasks))
            drawn = _samples(suite, int(count * 1.1) + 8, [task], 1000 * seed + suite.all_tasks.index(task))
            samples += [{**s, "sample_type": sample_type} for s in drawn if s["prompt"] not in exclude][:count]
    random.Random(seed).shuffle(samples)
    return samples


def make_batches(suite: Suite, samples: list[dict], tokenizer: CharTokenizer) -> list[dict]:
    """Collated batches with sample_types and task_ids (index into suite.all_tasks) kept alongside."""
    collate = Collator(tokenizer, with_sample_types=True)
    task_index = {t: i for i, t in enumerate(suite.all_tasks)}
    batches = []
    for i in range(0, len(samples) - suite.batch_size + 1, suite.batch_size):
        rows = samples[i : i + suite.batch_size]
        batch = collate([{**tokenize_sample(s, tokenizer), "sample_type": s["sample_type"]} for s in rows])
        batch["task_ids"] = torch.tensor([task_index[s["task"]] for s in rows])  # [B]
        batches.append(batch)
    return batches


def _model_inputs(batch: dict, method: Optional[Method]) -> dict:
    keys = ["input_ids", "attention_mask", "labels"]
    if method is not None and method.sample_types:
        keys.append("sample_types")
    if method is not None and method.task_ids:
        keys.append("task_ids")
    return {k: batch[k] for k in keys}


# -- training and evaluation ----------------------------------------------------------------------------------------
def make_optimizer(model, lr: float, steps: int):
    """AdamW without weight decay over the model's parameter groups (`router_param_groups`: each token-routed
    adapter's routers at lr * its router_lr_ratio, everything else at lr) and a one-cycle schedule over `steps`
    (10% warm-up, cosine decay). Returns (optimizer, scheduler)."""
    from ..tuners import router_param_groups

    param_groups = router_param_groups(model, lr)
    optimizer = torch.optim.AdamW(param_groups, lr=lr, weight_decay=0.0)
    # OneCycleLR needs a warm-up of at least one step and a decay after it: a short run (a PHATGOOSE expert on a small
    # share of the rows) warms up over 2 steps instead of 10%, and a run of 1-2 steps keeps lr constant
    if steps < 3:
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    max_lr = [g["lr"] for g in param_groups]
    pct_start = 0.1 if steps > 10 else 2 / steps
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=steps, pct_start=pct_start)


def train(
    model, batches: list[dict], lr: float, method: Optional[Method] = None, device=None, autocast_dtype=None
) -> tuple[list[float], float]:
    """AdamW (no weight decay), one-cycle schedule (10% warm-up, cosine decay), the loss the model returns (task +
    router losses); one pass over `batches`. Returns the losses and the median seconds per step. device: where the
    batches go (the model is there already); autocast_dtype: mixed precision (torch.autocast on that device, the
    weights stay float32), None for none."""
    import contextlib

    optimizer, schedule = make_optimizer(model, lr, len(batches))
    model.train()
    losses, times = [], []
    device = torch.device(device or "cpu")
    for batch in batches:
        t0 = time.perf_counter()
        inputs = {k: v.to(device) for k, v in _model_inputs(batch, method).items()}
        with torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a host sync: the step is over when it is timed
        times.append(time.perf_counter() - t0)
    model.eval()
    return losses, statistics.median(times) if times else 0.0


@torch.no_grad()
def evaluate(model, tokenizer: CharTokenizer, split: dict[str, list[dict]], suite: Suite, method=None) -> dict:
    """Exact match per task (greedy decoding with the KV cache); MHR gets each prompt's task id."""
    scores = {}
    for task, samples in split.items():
        kwargs = {}
        if method is not None and method.task_ids:
            kwargs["task_ids"] = torch.full((len(samples),), suite.all_tasks.index(task))
        answers = generate_answers(model, tokenizer, [s["prompt"] for s in samples], **kwargs)
        scores[task] = sum(a == s["completion"] for a, s in zip(answers, samples)) / len(samples)
    return scores


def summarize(scores: dict[str, float], suite: Suite) -> dict[str, float]:
    return {
        "tasks_mean": statistics.mean(scores[t] for t in suite.tasks),
        "knowledge_mean": statistics.mean(scores[t] for t in suite.knowledge_tasks),
        "all_mean": statistics.mean(scores[t] for t in suite.all_tasks),
    }


# -- the pre-trained base (cached) ----------------------------------------------------------------------------------
def pretrained_base(suite: Suite, cache_dir: str, tokenizer: CharTokenizer, log=print) -> str:
    """Directory of the base pre-trained on the knowledge tasks; trained once per suite.base_key() and cached."""
    from ..bases.tiny import tiny_llama

    path = os.path.join(cache_dir, f"base-{suite.base_key()}")
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    t0 = time.perf_counter()
    log(f"pre-training the base on {', '.join(suite.knowledge_tasks)} ({suite.pretrain_steps} steps) -> {path}")
    base = tiny_llama(
        vocab_size=tokenizer.vocab_size,
        hidden_size=suite.hidden_size,
        intermediate_size=suite.intermediate_size,
        num_layers=suite.num_layers,
        seed=0,
    )
    samples = _samples(suite, suite.pretrain_steps * suite.batch_size, suite.knowledge_tasks, 7)
    for p in base.parameters():
        p.requires_grad_(True)
    losses, _ = train(base, make_batches(suite, samples, tokenizer), suite.pretrain_lr)
    scores = evaluate(base, tokenizer, eval_split(suite, "test"), suite)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir)
    base.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {"loss_first": losses[0], "loss_last": losses[-1], "test": scores, "seconds": time.perf_counter() - t0}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    log(
        f"  base: loss {losses[0]:.3f} -> {losses[-1]:.3f}, knowledge EM {summarize(scores, suite)['knowledge_mean']:.2f}"
    )
    return path


def load_base(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


# -- one run --------------------------------------------------------------------------------------------------------
def build(method: Method, base_dir: str, rank: int):
    from peft import get_peft_model

    return get_peft_model(load_base(base_dir), method.config(rank))


def run_phatgoose(method, suite, base_dir, rank, lr, samples, tokenizer, workdir):
    """One LoRA expert per fine-tuning task and one for the knowledge samples, each trained on its own samples of
    the mixture (in the mixture's order), its gates trained after it; the library routes top-2 without task ids."""
    from peft import PeftModel, get_peft_model

    from ..tuners import phatgoose

    groups = list(suite.tasks) + ([KNOWLEDGE_GROUP] if suite.knowledge_share > 0 else [])
    paths, seconds = [], []
    for g in groups:
        own = [s for s in samples if (s["task"] == g) or (g == KNOWLEDGE_GROUP and s["sample_type"] == 1)]
        batches = make_batches(suite, own, tokenizer)
        expert = get_peft_model(load_base(base_dir), method.config(rank))
        _, per_step = train(expert, batches, lr)
        seconds.append(per_step)
        path = os.path.join(workdir, g)
        expert.save_pretrained(path)
        reloaded = PeftModel.from_pretrained(load_base(base_dir), path)
        gate_batches = [_model_inputs(b, None) for b in batches]
        phatgoose.train_gates(reloaded, gate_batches, steps=suite.gate_steps, lr=1e-3, save_to=path)
        paths.append(path)
    library = phatgoose.assemble(load_base(base_dir), paths, top_k=2)
    return library.eval(), statistics.median(seconds)


def run_one(method, suite, base_dir, rank, lr, seed, tokenizer, splits, exclude) -> dict:
    t0 = time.perf_counter()
    samples = training_mixture(suite, seed, exclude)
    torch.manual_seed(seed)
    if method.kind == "phatgoose":
        with tempfile.TemporaryDirectory() as workdir:
            model, per_step = run_phatgoose(method, suite, base_dir, rank, lr, samples, tokenizer, workdir)
        losses = [float("nan")]
    else:
        model = build(method, base_dir, rank)
        losses, per_step = train(model, make_batches(suite, samples, tokenizer), lr, method)
    result = {"loss_last": statistics.mean(losses[-20:]), "step_s": per_step}
    for split, data in splits.items():
        scores = evaluate(model, tokenizer, data, suite, method)
        result[split] = scores
        result[f"{split}_summary"] = summarize(scores, suite)
    if method.kind == "moe":
        batch = make_batches(
            suite, [s for t in suite.all_tasks for s in splits["test"][t]][: suite.batch_size], tokenizer
        )
        model(**_model_inputs(batch[0], None))  # one forward for the routing records (eval: no sample types)
        result["active"] = moe_active_params(model)
    result["seconds"] = time.perf_counter() - t0
    return result


# -- step time, interleaved -----------------------------------------------------------------------------------------
def step_times(methods: list[Method], ranks: dict[str, int], suite, base_dir, tokenizer, exclude) -> dict:
    """Median ms per training step of every method on one fixed batch, one step of each per round (bench/timing.py),
    so that all see the same machine load. PHATGOOSE's training step is its LoRA expert's."""
    from peft import get_peft_model

    from .quality_methods import _lora
    from .timing import interleaved

    batch = make_batches(suite, training_mixture(suite, 0, exclude)[: suite.batch_size], tokenizer)[0]
    fns = {}
    for m in methods:
        torch.manual_seed(0)
        model = get_peft_model(
            load_base(base_dir), _lora(ranks[m.name]) if m.kind == "phatgoose" else m.config(ranks[m.name])
        )
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        inputs = _model_inputs(batch, m if m.kind != "phatgoose" else None)

        def step(model=model, opt=opt, inputs=inputs):
            model(**inputs).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[m.name] = step
    return interleaved(fns, torch.device("cpu"), reps=suite.timing_reps, warmup=2)


# -- the whole benchmark --------------------------------------------------------------------------------------------
def _stable(value):
    """A JSON-able value whose text does not depend on the process (sets are ordered by hash)."""
    if isinstance(value, dict):
        return {str(k): _stable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_stable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # lora_alpha=10 and lora_alpha=10.0 train the same adapter
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _run_key(suite: Suite, method: Method, rank: int, lr: float, seed: int) -> str:
    """What a run depends on: the suite (less the lists it is repeated over), the method's config and inputs, lr and
    seed; not its name, so that a study reuses the runs of another that trained the same thing."""
    config = method.config(rank)
    cfg = _stable(config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config))
    if cfg.get("expert_scaling") == "lora":
        del cfg["expert_scaling"]  # what every config did before the field existed: the runs recorded then still count
    # the routers' lr enters under the name it had before the config field existed (a row's router_lr_scale): the
    # runs recorded then still count
    scale = float(cfg.pop("router_lr_ratio", 1.0))  # _stable wrote 0.0 as 0
    if cfg.get("router_init_std") == 0.02:
        del cfg["router_init_std"]  # the init every router had before the field existed: its runs still count
    blob = json.dumps(
        {"suite": dataclasses.asdict(suite) | {"seeds": None, "lrs": None, "timing_reps": None}, "kind": method.kind,
         "config": cfg, "lr": lr, "seed": seed, "sample_types": method.sample_types, "task_ids": method.task_ids}
        | ({"router_lr_scale": scale} if scale != 1.0 else {}),
        sort_keys=True,
        default=str,
    )  # fmt: skip
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def bench_quality(
    out_dir: str = "out/quality",
    quick: bool = False,
    methods: Optional[list] = None,
    cache_dir: Optional[str] = None,
    suite: Optional[Suite] = None,
    fresh: bool = False,
    threads: int = 1,
    runs_file: Optional[str] = None,
    log=print,
) -> dict:
    """Run the benchmark on `methods` (names from quality_methods.method_table, or your own `Method` objects; default:
    every method of the table); write results.jsonl (every run, reused on a rerun unless `fresh`; `runs_file` puts it
    elsewhere, e.g. shared by several studies), summary.csv, summary.md and quality.png under out_dir; return the
    summary rows."""
    import transformers

    from .quality_report import write_reports

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*generation flags.*")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    suite = suite or (Suite().quick() if quick else Suite())
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "moe_peft", "bench_quality")
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    tokenizer = CharTokenizer()
    base_dir = pretrained_base(suite, cache_dir, tokenizer, log)
    base = load_base(base_dir)
    splits = {"val": eval_split(suite, "val"), "test": eval_split(suite, "test")}
    exclude = {s["prompt"] for data in splits.values() for group in data.values() for s in group}

    table = method_table(len(suite.tasks), len(suite.all_tasks), suite.budget_rank)
    names = methods or list(table)
    unknown = [n for n in names if not isinstance(n, Method) and n not in table]
    if unknown:
        raise ValueError(f"methods={unknown} are unknown; choose from {list(table)} or pass Method objects.")
    chosen = [n if isinstance(n, Method) else table[n] for n in names]
    if "LoRA" not in [m.name for m in chosen]:
        chosen = [table["LoRA"]] + chosen  # the baseline of every ratio

    budget = count_trainable_lora(base, suite.budget_rank)
    ranks, params = {}, {}
    num_groups = suite.phatgoose_experts
    for m in chosen:
        if m.kind == "lora":
            ranks[m.name], params[m.name] = suite.budget_rank, budget
        elif m.fixed_rank is not None:
            ranks[m.name] = m.fixed_rank
            params[m.name] = count_trainable(build(m, base_dir, m.fixed_rank))
        else:
            ranks[m.name], params[m.name] = fit_rank(m, base, budget, num_groups)
    log(f"budget: {budget} trainable parameters (LoRA r={suite.budget_rank} on {', '.join(TARGETS)})")
    for m in chosen:
        log(
            f"  {m.name:34s} rank {ranks[m.name]:3d}  trainable {params[m.name]:7d} ({params[m.name] / budget - 1:+.1%})"
        )

    # base model row: what the pre-training gave
    base_scores = evaluate(base, tokenizer, splits["test"], suite)
    records_path = runs_file or os.path.join(out_dir, "results.jsonl")
    done = {}
    if os.path.exists(records_path) and not fresh:
        with open(records_path) as f:
            for line in f:
                r = json.loads(line)
                done[r["key"]] = r
    runs: dict[str, list[dict]] = defaultdict(list)

    def run(m: Method, lr: float, seed: int) -> dict:
        key = _run_key(suite, m, ranks[m.name], lr, seed)
        if key in done:
            return done[key]
        r = run_one(m, suite, base_dir, ranks[m.name], lr, seed, tokenizer, splits, exclude)
        r.update(key=key, method=m.name, lr=lr, seed=seed, rank=ranks[m.name])
        with open(records_path, "a") as f:
            f.write(json.dumps(r) + "\n")
        done[key] = r
        log(
            f"  {m.name:34s} lr {lr:.0e} seed {seed}: val {r['val_summary']['all_mean']:.3f}  test tasks "
            f"{r['test_summary']['tasks_mean']:.3f} knowledge {r['test_summary']['knowledge_mean']:.3f}  "
            f"({r['seconds']:.0f}s)"
        )
        return r

    best_lr = {}
    first, rest = suite.seeds[0], suite.seeds[1:]
    for m in chosen:
        grid = [run(m, lr, first) for lr in suite.lrs]
        best = choose_lr(grid)
        best_lr[m.name] = best["lr"]
        runs[m.name] = [best] + [run(m, best["lr"], s) for s in rest]
        runs[m.name + "/grid"] = grid

    log("timing one training step of every method, interleaved ...")
    times = step_times(chosen, ranks, suite, base_dir, tokenizer, exclude)
    summary = write_reports(
        out_dir, suite, chosen, runs, best_lr, ranks, params, budget, base, base_scores, times,
        wall_s=time.perf_counter() - t_start, quick=quick, log=log,
    )  # fmt: skip
    return summary


def choose_lr(grid: list[dict]) -> dict:
    """The run with the best validation score (mean exact match over every task of the mixture, knowledge tasks
    included); a tie goes to the lower learning rate."""
    return max(grid, key=lambda r: (r["val_summary"]["all_mean"], -r["lr"]))


def count_trainable_lora(base, rank: int) -> int:
    from peft import get_peft_model

    from .quality_methods import _lora

    return count_trainable(get_peft_model(copy.deepcopy(base), _lora(rank)))
