"""`moe-peft bench quality --suite smollm2-135m`: the quality suite on a real chat model (docs/quality.md).

    moe-peft bench quality --suite smollm2-135m --quick               # one seed, one lr, few steps: the pipeline
    moe-peft bench quality --suite smollm2-135m --workers 2           # the full table: 2 processes on 2 cores
    moe-peft bench quality --suite smollm2-135m --device cuda         # bf16 on a GPU

The protocol of the tiny suite (quality.py), on SmolLM2-135M-Instruct (moe_peft.bases.real):

1. Conflicting instruction tasks in natural language through the chat template (moe_peft.data.instructions:
   first / last word, reverse, sort, capital letters, initials of a 3-4 word list: prompts that differ by a few
   words, answers that differ completely), plus a share of general rows labelled `sample_type=1` (LoRAMoE's
   world-knowledge side): general requests answered by the base itself (its greedy answers, cut at
   `general_tokens`), so they teach nothing new and pull towards what the base did.
2. Every method sees the same batches in the same order for a seed; trainable parameters equal LoRA's within 5%
   (quality_methods.fit_rank); equal-active rows as extra rows; each method at its best learning rate of `lrs`
   on a validation split (seed 0), the other seeds reuse it; 3 seeds.
3. Reported: exact match per task on held-out prompts (greedy); retention: of the facts the base answers right
   before fine-tuning (greedy, the accepted answer as whole words in its first `fact_tokens` tokens), the share
   still answered right; general ability: teacher-forced agreement with the base's own greedy answers to held-out
   general prompts (the share of answer tokens that are the model's argmax; the base scores 1.00); trainable and
   active parameters; step time relative to LoRA, interleaved with LoRA in the same process.
4. Each finished run is appended to results.jsonl under --out and skipped on a restart; `--workers N` runs N
   independent runs at a time in their own processes (one torch thread each unless --threads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from ..bases.real import REAL_BASES, base_path
from ..data.bundled import Collator
from ..data.instructions import (
    DEFAULT_INSTRUCTION_TASKS,
    FACTS,
    agreement_with_reference,
    check_tasks,
    exact_match,
    general_prompts,
    generate_chat,
    generate_chat_ids,
    make_instruction_samples,
    mentions,
    tokenize_chat,
)
from .quality import _model_inputs, _run_key, train
from .quality_methods import Method, _mole, fit_rank, method_table, moe_active_params

GENERAL = "general"  # the group of the general rows: MHR's task id for them, PHATGOOSE's expert trained on them
# the rows the real suite can run (--methods), from the tiny suite's table
REAL_METHODS = (
    "LoRA",
    "MoLE top-1 block",
    "MoLE top-2 block",
    "LoRAMoE",
    "LoRAMoE + LBC",
    "LoRAMoE + LBC released",
    "SMoRA",
    "MHR",
    "PHATGOOSE",
    "MoLE top-1 block, equal active",
    "MoLE top-2 block, equal active",
    "SMoRA k=r",
    "MoLE top-1 block, sequence",
    "MoLE top-1 block, learned router",
    "MoLE top-1 block, router lr x0.1",
    "MoLE top-1 block, equal active, learned router",
    "MoLE top-1 block, weight p, alpha x E",
    "MoLE top-1 block, balance 0.1",
    "MoLE top-2 block, frozen router",
    "MoLE top-2 block, balance 0",
    "MoLE top-2 block, E=2",
    "SMoRA k=1",
    "SMoRA, no bias update",
    "MoLE top-1 block, sequence, router reads layer 15",
    "SMoRA k=r/3",
    "MoLE top-2 block, balance 0.1",
    "MoLE top-1 block, learned router, init x10",
    "MoLE top-1 block, learned router, init x0.1",
    "MoLE top-2 block, init x10",
    "MoLE top-1 linear",
    "MoLE top-1 linear, learned router",
    "MoLE top-2 block, E=4",
    "MoLE top-1 block, router lr x10",
    "MoLE top-1 block, sequence, last token",
)
# what it runs by default: LoRA, MoLE top-1 / top-2, LoRAMoE with both forms of localized balancing, SMoRA, MHR (told
# the task), PHATGOOSE, and MoLE at LoRA's active parameters (the budget in docs/quality.md is for these 10 rows)
DEFAULT_METHODS = (
    "LoRA",
    "MoLE top-1 block",
    "MoLE top-2 block",
    "LoRAMoE + LBC",
    "LoRAMoE + LBC released",
    "SMoRA",
    "MHR",
    "PHATGOOSE",
    "MoLE top-1 block, equal active",
    "MoLE top-2 block, equal active",
)
DTYPES = {"bfloat16": torch.bfloat16, "float32": None}  # None: no autocast, float32 throughout


@dataclass(frozen=True)
class RealSuite:
    """Everything that defines the real-model suite; `quick()` shrinks it. The budget arithmetic behind the
    defaults is in docs/quality.md ("Real model: budget")."""

    base: str = "smollm2-135m"
    tasks: tuple[str, ...] = DEFAULT_INSTRUCTION_TASKS
    min_words: int = 3
    max_words: int = 4
    general_share: float = 0.125  # of the training rows: the base's own answers, sample_type 1
    general_tokens: int = 24  # the base's general answers are cut here (the reference and the training rows)
    steps: int = 64
    batch_size: int = 8
    lrs: tuple[float, ...] = (1e-3, 2e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    # LoRA r=44 on the 7 projections: the smallest budget at which every mixture of 6 experts (LoRAMoE's
    # per-linear routers and MHR included) comes within 5% (docs/quality.md)
    budget_rank: int = 44
    test_per_task: int = 12
    val_per_task: int = 6
    answer_tokens: int = 16  # greedy tokens of a task answer (the longest, 4 words in capitals, is ~12)
    fact_tokens: int = 16
    num_facts: int = len(FACTS)  # the first facts of data.instructions.FACTS (the smoke test asks fewer)
    num_general_train: int = len(general_prompts("train"))
    num_general_held_out: int = len(general_prompts("held_out"))
    gate_steps: int = 5  # PHATGOOSE gate steps per expert (7 experts: 35 more steps than a method of one adapter)
    timing_reps: int = 3
    # prompts per generate call; None: 48 on a CPU (a decoding step costs about as much for 12 prompts as for 48),
    # 128 on a GPU (every task prompt of the test split in one call: the steps are launch-bound there)
    eval_batch_size: Optional[int] = None
    dtype: str = "bfloat16"  # "bfloat16": torch.autocast, weights float32; "float32": no autocast
    device: str = "cpu"

    @property
    def phatgoose_experts(self) -> int:
        """PHATGOOSE's library: one expert per task, plus one for the general rows when there are any."""
        return len(self.all_tasks) if self.general_share > 0 else len(self.tasks)

    def __post_init__(self):
        check_tasks(self.tasks, "RealSuite.tasks")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is invalid: use one of {list(DTYPES)} (--dtype).")
        if not 0 <= self.general_share < 1:
            raise ValueError(f"general_share={self.general_share} is invalid: use a share in [0, 1).")
        if self.steps < 1 or self.batch_size < 1 or not self.lrs or not self.seeds:
            raise ValueError("steps, batch_size, lrs and seeds must be positive / non-empty.")
        for name, most in (
            ("num_facts", len(FACTS)),
            ("num_general_train", len(general_prompts("train"))),
            ("num_general_held_out", len(general_prompts("held_out"))),
        ):
            if not 1 <= getattr(self, name) <= most:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: use 1 to {most}.")

    def quick(self) -> RealSuite:
        """One seed, one learning rate, 16 steps, few prompts and facts: the pipeline end to end in minutes, not the
        comparison."""
        return dataclasses.replace(
            self, steps=16, lrs=(1e-3,), seeds=(0,), test_per_task=4, val_per_task=2, num_facts=30,
            num_general_held_out=12, gate_steps=2, timing_reps=1,
        )  # fmt: skip

    @property
    def all_tasks(self) -> tuple[str, ...]:
        return self.tasks + (GENERAL,)

    @property
    def facts(self) -> tuple:
        return FACTS[: self.num_facts]

    def general(self, split: str) -> list[str]:
        prompts = general_prompts(split)
        return prompts[: self.num_general_train if split == "train" else self.num_general_held_out]

    @property
    def base_dir(self) -> str:
        """The base's checkpoint: a real base by name (converted on first use), else `base` is a local path."""
        return base_path(self.base) if self.base in REAL_BASES else self.base

    @property
    def eval_batch(self) -> int:
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return 128 if torch.device(self.device).type == "cuda" else 48

    @property
    def autocast_dtype(self):
        return DTYPES[self.dtype]

    def autocast(self):
        dtype = self.autocast_dtype
        return torch.autocast(torch.device(self.device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def real_method_table(suite: RealSuite) -> dict[str, Method]:
    """The tiny suite's rows (quality_methods.method_table) that the real suite runs: 6 experts (one per task),
    MHR with 7 task ids (the tasks and the general rows)."""
    table = method_table(len(suite.tasks), len(suite.all_tasks), suite.budget_rank)
    table.update(_real_only_rows(len(suite.tasks)))
    return {name: table[name] for name in REAL_METHODS}


def _real_only_rows(num_experts: int) -> dict[str, Method]:
    """Rows that need the real model's depth: a sequence router reading the middle of SmolLM2's 30 layers (issue 23,
    item 2; the tiny suite's 2-layer form is in benchmarks/quality_ablations.py, study "routing")."""
    row = Method(
        "MoLE top-1 block, sequence, router reads layer 15",
        "moe",
        _mole(num_experts, top_k=1, routing_level="sequence", router_input_layer=15),
        note="every router reads the frozen base's layer-15 output, pooled over the prompt",
    )
    return {row.name: row}


# -- data -----------------------------------------------------------------------------------------------------------
def eval_split(suite: RealSuite, split: str) -> dict[str, list[dict]]:
    """{task: held-out samples}, the same for every method and seed; val is drawn outside test."""
    test = {
        t: make_instruction_samples(suite.test_per_task, [t], 10_000 + i, suite.min_words, suite.max_words)
        for i, t in enumerate(suite.tasks)
    }
    if split == "test":
        return test
    taken = {s["prompt"] for group in test.values() for s in group}
    return {
        t: make_instruction_samples(suite.val_per_task, [t], 20_000 + i, suite.min_words, suite.max_words, taken)
        for i, t in enumerate(suite.tasks)
    }


def held_out_prompts(suite: RealSuite) -> set[str]:
    return {s["prompt"] for split in ("val", "test") for g in eval_split(suite, split).values() for s in g}


def training_mixture(suite: RealSuite, seed: int, general_answers: list[list[int]]) -> list[dict]:
    """steps * batch_size rows in training order: the tasks in equal numbers (no held-out prompt) and
    `general_share` of general rows (the training general prompts with the base's own answers, sample_type 1,
    each prompt about as often), shuffled by `seed`."""
    total = suite.steps * suite.batch_size
    n_general = round(suite.general_share * total)
    rows = make_instruction_samples(
        total - n_general, suite.tasks, 1000 * seed + 1, suite.min_words, suite.max_words, held_out_prompts(suite)
    )
    prompts = suite.general("train")
    order = list(range(len(prompts)))
    rng = random.Random(seed)
    for i in range(n_general):
        if i % len(order) == 0:
            rng.shuffle(order)  # every prompt once before any twice
        j = order[i % len(order)]
        rows.append({"task": GENERAL, "sample_type": 1, "prompt": prompts[j], "completion_ids": general_answers[j]})
    rng.shuffle(rows)
    return rows


def make_batches(suite: RealSuite, rows: list[dict], tokenizer, keep_partial: bool = False) -> list[dict]:
    """Right-padded batches [B, S] with sample_types [B] and task_ids [B] (index into suite.all_tasks); a last
    partial batch is dropped unless keep_partial (a PHATGOOSE expert's own rows)."""
    collate = Collator(tokenizer, with_sample_types=True)
    index = {t: i for i, t in enumerate(suite.all_tasks)}
    batches = []
    end = len(rows) if keep_partial else len(rows) - suite.batch_size + 1
    for i in range(0, end, suite.batch_size):
        chunk = rows[i : i + suite.batch_size]
        batch = collate([{**tokenize_chat(r, tokenizer), "sample_type": r["sample_type"]} for r in chunk])
        batch["task_ids"] = torch.tensor([index[r["task"]] for r in chunk])  # [B]
        batches.append(batch)
    return batches


# -- the base's reference answers (once per suite setting, cached) --------------------------------------------------
def _reference_key(suite: RealSuite) -> str:
    fields = ("base", "general_tokens", "fact_tokens", "dtype", "device", "tasks", "min_words", "max_words")
    fields += ("test_per_task", "answer_tokens")
    blob = {f: getattr(suite, f) for f in fields}
    real = REAL_BASES.get(suite.base)
    blob |= {"weights": real.gguf_sha256 if real else os.path.abspath(suite.base), "facts": suite.facts}
    blob |= {"general": suite.general("train"), "held_out": suite.general("held_out"), "format": 1}
    return hashlib.sha1(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_base(base_dir: str, suite: RealSuite):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir).to(suite.device).eval()


def load_tokenizer(base_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def reference(suite: RealSuite, base_dir: str, cache_dir: str, log: Callable = print) -> dict:
    """What the base does before any fine-tuning, under the suite's dtype and device (cached as JSON):
    its greedy answers to the general prompts (training rows and held-out reference; EOS kept when it ended
    earlier), which facts it answers right, its task scores and its own agreement (a check: 1.00)."""
    path = os.path.join(cache_dir, f"reference-{_reference_key(suite)}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    t0 = time.perf_counter()
    log(f"the base's reference answers (general prompts, {len(suite.facts)} facts, task prompts) -> {path}")
    model, tokenizer = load_base(base_dir, suite), load_tokenizer(base_dir)
    with suite.autocast():
        general = {
            split: generate_chat_ids(
                model, tokenizer, suite.general(split), suite.general_tokens, suite.eval_batch, keep_eos=True
            )
            for split in ("train", "held_out")
        }
        answers = generate_chat(
            model, tokenizer, [q for q, _ in suite.facts], suite.fact_tokens, batch_size=suite.eval_batch
        )
        tasks = score_tasks(model, tokenizer, suite, eval_split(suite, "test"), None)
        agreement, nll = agreement_with_reference(model, tokenizer, suite.general("held_out"), general["held_out"])
    ref = {
        "general_train": general["train"],
        "general_held_out": general["held_out"],
        "fact_answers": answers,
        "facts_known": [mentions(a, accepted) for a, (_, accepted) in zip(answers, suite.facts)],
        "test": tasks,
        "agreement": agreement,
        "nll": nll,
        "seconds": time.perf_counter() - t0,
    }
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(ref, f)
    os.replace(tmp, path)
    log(
        f"  base: knows {sum(ref['facts_known'])} of {len(suite.facts)} facts, task exact match "
        f"{statistics.mean(tasks.values()):.2f}, self-agreement {agreement:.2f} ({ref['seconds']:.0f} s)"
    )
    return ref


# -- evaluation -----------------------------------------------------------------------------------------------------
def _task_ids(suite: RealSuite, task: str, n: int, method: Optional[Method]) -> dict:
    if method is None or not method.task_ids:
        return {}
    return {"task_ids": torch.full((n,), suite.all_tasks.index(task))}  # [N]: MHR is told the task


@torch.no_grad()
def score_tasks(model, tokenizer, suite: RealSuite, split: dict[str, list[dict]], method) -> dict[str, float]:
    """Exact match per task. Every task's prompts go through generate together (full batches: on a CPU a decoding
    step costs about as much for 12 prompts as for 48), MHR with each prompt's task id."""
    samples = [s for task in split for s in split[task]]
    kwargs = {}
    if method is not None and method.task_ids:
        kwargs["task_ids"] = torch.tensor([suite.all_tasks.index(s["task"]) for s in samples])  # [N]
    answers = generate_chat(
        model, tokenizer, [s["prompt"] for s in samples], suite.answer_tokens, batch_size=suite.eval_batch,
        **kwargs,
    )  # fmt: skip
    return {
        task: statistics.mean(exact_match(a, s["completion"]) for a, s in zip(answers, samples) if s["task"] == task)
        for task in split
    }


@torch.no_grad()
def evaluate(model, tokenizer, suite: RealSuite, splits: dict, ref: dict, method) -> dict:
    """Task exact match on each split, retention of the facts the base knew, agreement with the base."""
    result = {}
    with suite.autocast():
        for name, split in splits.items():
            result[name] = score_tasks(model, tokenizer, suite, split, method)
            result[f"{name}_summary"] = {"tasks_mean": statistics.mean(result[name].values())}
        known = [q for (q, _), k in zip(suite.facts, ref["facts_known"]) if k]
        accepted = [a for (_, a), k in zip(suite.facts, ref["facts_known"]) if k]
        answers = generate_chat(
            model, tokenizer, known, suite.fact_tokens, batch_size=suite.eval_batch,
            **_task_ids(suite, GENERAL, len(known), method),
        )  # fmt: skip
        kept = [mentions(a, acc) for a, acc in zip(answers, accepted)]
        result["retention"] = sum(kept) / len(kept) if kept else math.nan
        result["facts_lost"] = [q for q, k in zip(known, kept) if not k]
        prompts = suite.general("held_out")
        result["agreement"], result["nll"] = agreement_with_reference(
            model, tokenizer, prompts, ref["general_held_out"], **_task_ids(suite, GENERAL, len(prompts), method)
        )
    return result


# -- one run --------------------------------------------------------------------------------------------------------
def run_phatgoose(method, suite, base_dir, rank, lr, rows, tokenizer, workdir):
    """One LoRA expert per task and one for the general rows, each trained on its own rows of the mixture (in the
    mixture's order), its gates after it; the library routes top-2 without task ids."""
    from peft import get_peft_model

    from ..tuners import phatgoose

    paths, seconds = [], []
    for group in suite.all_tasks:
        own = [r for r in rows if r["task"] == group]
        if not own:
            continue  # no general rows (general_share 0): no general expert
        batches = make_batches(suite, own, tokenizer, keep_partial=True)
        expert = get_peft_model(load_base(base_dir, suite), method.config(rank))
        _, per_step = train(expert, batches, lr, None, suite.device, suite.autocast_dtype)
        seconds.append(per_step)
        path = os.path.join(workdir, group)
        expert.save_pretrained(path)
        with suite.autocast():  # the gates of the expert just trained (the weights it saved), saved next to it
            gate_batches = [_model_inputs(b, None) for b in batches]
            phatgoose.train_gates(expert, gate_batches, steps=suite.gate_steps, lr=1e-3, save_to=path)
        del expert
        paths.append(path)
    library = phatgoose.assemble(load_base(base_dir, suite), paths, top_k=2)
    return library.eval(), statistics.median(seconds)


def run_one(method: Method, suite: RealSuite, base_dir: str, rank: int, lr: float, seed: int, ref: dict) -> dict:
    """Train one method at one lr and seed, evaluate it (val only on the first seed: the lr choice)."""
    from peft import get_peft_model

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(base_dir)
    rows = training_mixture(suite, seed, ref["general_train"])
    torch.manual_seed(seed)
    if method.kind == "phatgoose":
        with tempfile.TemporaryDirectory() as workdir:
            model, per_step = run_phatgoose(method, suite, base_dir, rank, lr, rows, tokenizer, workdir)
        losses = [math.nan]
    else:
        model = get_peft_model(load_base(base_dir, suite), method.config(rank))
        batches = make_batches(suite, rows, tokenizer)
        losses, per_step = train(model, batches, lr, method, suite.device, suite.autocast_dtype)
    t_eval = time.perf_counter()
    splits = {"test": eval_split(suite, "test")}
    if seed == suite.seeds[0]:
        splits["val"] = eval_split(suite, "val")
    result = {"loss_first": losses[0], "loss_last": statistics.mean(losses[-10:]), "step_s": per_step}
    result |= evaluate(model.eval(), tokenizer, suite, splits, ref, method)
    if method.kind == "moe":  # experts per token from one forward on test prompts (eval: no sample types)
        probe = [s for g in splits["test"].values() for s in g][: suite.batch_size]
        batch = make_batches(suite, probe, tokenizer, keep_partial=True)[0]
        with torch.no_grad(), suite.autocast():
            model(**{k: v.to(suite.device) for k, v in _model_inputs(batch, None).items()})
        result["active"] = moe_active_params(model)
    result["seconds"] = time.perf_counter() - t0
    result["eval_seconds"] = time.perf_counter() - t_eval
    return result


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _worker_run(suite: RealSuite, name: str, rank: int, lr: float, seed: int, base_dir: str, ref_path: str):
    """A run in a worker process: the method is rebuilt from its name (configs hold lambdas, not picklable)."""
    with open(ref_path) as f:
        ref = json.load(f)
    return run_one(real_method_table(suite)[name], suite, base_dir, rank, lr, seed, ref)


# -- sizes and step time --------------------------------------------------------------------------------------------
def meta_base(base_dir: str):
    """The base's architecture on the meta device: parameter counts without weights (fitting ranks is cheap)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))


def fit_ranks(methods: list[Method], suite: RealSuite, base_dir: str) -> tuple[dict, dict, int]:
    """({name: rank}, {name: trainable}, budget): every method sized to LoRA r=budget_rank within 5%
    (quality_methods.fit_rank, on the meta-device base; the search starts just below the rank that a straight
    line through ranks 1 and 2 predicts, so it builds a few adapters, not dozens)."""
    from .quality_methods import params_of

    base = meta_base(base_dir)
    groups = len(suite.all_tasks) if suite.general_share > 0 else len(suite.tasks)
    lora = next(m for m in methods if m.kind == "lora")
    budget = params_of(lora, base, suite.budget_rank, groups)
    ranks, params = {}, {}
    for m in methods:
        if m.kind == "lora":
            ranks[m.name], params[m.name] = suite.budget_rank, budget
        elif m.fixed_rank is not None:
            ranks[m.name], params[m.name] = m.fixed_rank, params_of(m, base, m.fixed_rank, groups)
        else:
            start = 1
            with contextlib.suppress(ValueError):  # a config that refuses rank 1 or 2: search from 1
                one, two = params_of(m, base, 1, groups), params_of(m, base, 2, groups)
                line = (budget - one) / (two - one) + 1  # params(r) = one + (r - 1) (two - one)
                start = max(1, math.floor(line) - 1)
            ranks[m.name], params[m.name] = fit_rank(m, base, budget, groups, min_rank=start)
    return ranks, params, budget


def step_times(methods: list[Method], ranks: dict, suite: RealSuite, base_dir: str, ref: dict) -> dict:
    """{name: (ms per step, ratio to LoRA, ratio spread)}: each method interleaved with LoRA in this process
    (bench/timing.py), one training step of each per round on the suite's first batch, so the pair shares the
    machine's load; two models in memory at a time. PHATGOOSE's step is its LoRA expert's."""
    from peft import get_peft_model

    from .quality_methods import _lora
    from .timing import interleaved, paired_ratio

    tokenizer = load_tokenizer(base_dir)
    batch = make_batches(suite, training_mixture(suite, 0, ref["general_train"])[: suite.batch_size], tokenizer)[0]

    def stepper(m: Method):
        torch.manual_seed(0)
        config = _lora(ranks[m.name]) if m.kind == "phatgoose" else m.config(ranks[m.name])
        model = get_peft_model(load_base(base_dir, suite), config).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        inputs = {k: v.to(suite.device) for k, v in _model_inputs(batch, m if m.kind != "phatgoose" else None).items()}

        def step():
            with suite.autocast():
                loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    lora = next(m for m in methods if m.kind == "lora")
    lora_step = stepper(lora)
    device = torch.device(suite.device)
    out, lora_ms = {}, []
    for m in methods:
        if m.kind == "lora":
            continue
        t = interleaved({"LoRA": lora_step, m.name: stepper(m)}, device, reps=suite.timing_reps, warmup=1)
        ratio = paired_ratio(t[m.name], t["LoRA"])
        out[m.name] = (t[m.name].median, ratio.median, ratio.spread)
        lora_ms.append(t["LoRA"].median)
    out["LoRA"] = (statistics.median(lora_ms) if lora_ms else math.nan, 1.0, 0.0)
    return out


# -- the whole suite ------------------------------------------------------------------------------------------------
def _read_runs(path: str, log: Callable) -> dict[str, dict]:
    done, bad = {}, 0
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill while it was written: that run is redone
                    bad += 1
                    continue
                done[r["key"]] = r
    if bad:
        log(f"{path}: {bad} unreadable line(s) (a run interrupted while written); those runs are redone")
    return done


def bench_quality_real(
    out_dir: str = "out/quality_smollm2",
    quick: bool = False,
    methods: Optional[list[str]] = None,
    cache_dir: Optional[str] = None,
    suite: Optional[RealSuite] = None,
    fresh: bool = False,
    threads: int = 1,
    workers: int = 1,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    log: Callable = print,
) -> list[dict]:
    """Run the real-model suite (module docstring); write results.jsonl (each run as it finishes; a rerun skips the
    recorded ones unless `fresh`), summary.csv, runs.csv and summary.md under out_dir; return the summary rows.
    methods: names of REAL_METHODS (default: DEFAULT_METHODS); device / dtype override the suite's ("cuda" /
    "bfloat16"). With workers > 1 call it under `if __name__ == "__main__":` (the workers are spawned processes)."""
    import transformers

    from ..bases.cache import cache_root
    from .quality_real_report import write_reports

    suite = suite or RealSuite()
    if quick:
        suite = suite.quick()
    if device is not None or dtype is not None:
        suite = dataclasses.replace(suite, device=device or suite.device, dtype=dtype or suite.dtype)
    table = real_method_table(suite)
    names = list(methods or DEFAULT_METHODS)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"methods={unknown} are not rows of the real suite; choose from {list(table)}.")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} is invalid: use a positive number of processes (--workers).")
    if torch.device(suite.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={suite.device!r} but CUDA is not available: use --device cpu.")
    if "LoRA" not in names:
        names = ["LoRA"] + names  # the baseline of every ratio
    chosen = [table[n] for n in names]

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*generation flags.*")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t_start = time.perf_counter()
        cache_dir = cache_dir or os.path.join(cache_root(), "bench_quality_real")
        os.makedirs(out_dir, exist_ok=True)
        base_dir = suite.base_dir
        ref = reference(suite, base_dir, cache_dir, log)
        ref_path = os.path.join(cache_dir, f"reference-{_reference_key(suite)}.json")
        ranks, params, budget = fit_ranks(chosen, suite, base_dir)
        log(f"budget: {budget} trainable parameters (LoRA r={suite.budget_rank} on the 7 projections)")
        for m in chosen:
            log(
                f"  {m.name:34s} rank {ranks[m.name]:3d}  trainable {params[m.name]:9d} ({params[m.name] / budget - 1:+.1%})"
            )

        records_path = os.path.join(out_dir, "results.jsonl")
        done = {} if fresh else _read_runs(records_path, log)
        runs = _schedule(chosen, suite, ranks, base_dir, ref, ref_path, done, records_path, workers, threads, log)
        best_lr = {m.name: runs[m.name][0]["lr"] for m in chosen}
        log("timing one training step of every method against LoRA, interleaved ...")
        times = step_times(chosen, ranks, suite, base_dir, ref)
        return write_reports(
            out_dir, suite, chosen, runs, best_lr, ranks, params, budget, ref, times, meta_base(base_dir),
            wall_s=time.perf_counter() - t_start, quick=quick, log=log,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)


def _schedule(chosen, suite, ranks, base_dir, ref, ref_path, done, records_path, workers, threads, log) -> dict:
    """Run what results.jsonl lacks: every method's lr grid on the first seed, then its other seeds at the best lr
    (submitted as soon as its grid is in). Returns {name: [best run, other seeds...], name + "/grid": [...]}."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    first, rest = suite.seeds[0], suite.seeds[1:]
    key = {}  # (name, lr, seed) -> run key

    def run_key(m, lr, seed):
        return key.setdefault((m.name, lr, seed), _run_key(suite, m, ranks[m.name], lr, seed))

    def record(m, lr, seed, r):
        r.update(key=run_key(m, lr, seed), method=m.name, lr=lr, seed=seed, rank=ranks[m.name])
        with open(records_path, "a") as f:
            f.write(json.dumps(r) + "\n")  # one write per finished run: a restart skips it
        done[r["key"]] = r
        val = f"val {r['val_summary']['tasks_mean']:.2f} " if "val_summary" in r else ""
        log(
            f"  {m.name:34s} lr {lr:.0e} seed {seed}: {val}test {r['test_summary']['tasks_mean']:.2f} retention "
            f"{r['retention']:.2f} agreement {r['agreement']:.2f} ({r['seconds']:.0f}s)"
        )

    pending = [(m, lr, first) for m in chosen for lr in suite.lrs]
    runs: dict[str, list[dict]] = {}

    def followups(m) -> list:
        """Once every grid run of m is in: choose its lr and return its other seeds to run."""
        grid = [done.get(run_key(m, lr, first)) for lr in suite.lrs]
        if any(g is None for g in grid) or m.name in runs:
            return []
        runs[m.name + "/grid"] = grid
        best = choose_lr(grid)
        runs[m.name] = [best]
        return [(m, best["lr"], s) for s in rest]

    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(threads,)
        )
    futures = {}
    try:
        while pending or futures:
            # start what is not recorded yet; record what is
            while pending:
                m, lr, seed = pending.pop(0)
                if run_key(m, lr, seed) in done:
                    pending += followups(m) if seed == first else []
                    continue
                if pool is None:
                    record(m, lr, seed, run_one(m, suite, base_dir, ranks[m.name], lr, seed, ref))
                    pending += followups(m) if seed == first else []
                else:
                    args = (suite, m.name, ranks[m.name], lr, seed, base_dir, ref_path)
                    futures[pool.submit(_worker_run, *args)] = (m, lr, seed)
            if futures:
                finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                for f in finished:
                    m, lr, seed = futures.pop(f)
                    record(m, lr, seed, f.result())
                    if seed == first:
                        pending += followups(m)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    for m in chosen:
        followups(m)  # a method whose runs were all recorded before
        best = runs[m.name][0]
        runs[m.name] = [best] + [done[run_key(m, best["lr"], s)] for s in rest]
    return runs


def choose_lr(grid: list[dict]) -> dict:
    """The tiny suite's rule (quality.choose_lr) on the validation split's mean task exact match: the best score,
    the lower learning rate on a tie. Retention is not part of the choice (no fact is held out for it)."""
    return max(grid, key=lambda r: (r["val_summary"]["tasks_mean"], -r["lr"]))
