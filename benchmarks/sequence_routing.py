"""What sequence-level routing and routers that read a later layer cost (issue 23), at the quality suite's shape.

    python benchmarks/sequence_routing.py                 # training step (forward + backward) and generation ratios
    python benchmarks/sequence_routing.py --quality       # also a --quick-style quality run of the four rows
    python benchmarks/sequence_routing.py --quality --full  # the suite's 800 steps and 64 test prompts (one seed)

Every row is MoLE top-1 with block routing, 6 experts of rank 5 on the seven Llama projections (the suite's "MoLE
top-1 block" row), on the suite's base shape (hidden 128, MLP 256, 2 layers, 4 heads over 2 KV heads, character
vocabulary) and its batches (32 samples of the six tasks, right-padded, labels on the answers only):

    token               the default: every token routed by its block's router from the block's input
    sequence            routing_level="sequence": each sample routed once from its prompt's mean block input
    sequence, layer 0   + router_input_layer=0: every router reads the frozen base's layer-0 output (pre-pass: 1 layer)
    sequence, layer 1   + router_input_layer=1: the last layer's output (pre-pass: the whole decoder, no LM head)

Timing (docs/methods.md, "Sequence-level routing", has the numbers): one torch thread; the rows interleaved, one
repetition of each per round (moe_peft.bench.timing.interleaved), each row's time divided by the token row's of the
same round, the median of those ratios printed with half their interquartile range. "step" is `loss.backward()` of
`model(**batch).loss` (the optimizer step is the same for every row and left out); "generate" is greedy decoding of 8
tokens for 64 left-padded prompts with the KV cache, in eval mode.

--quality trains each row as `moe-peft bench quality --quick` does (one seed, lr 3e-3, 300 steps, the cached
pre-trained base; --full: the suite's 800 steps, its base and 64 test prompts per task, still one seed and one lr)
and prints exact match per task; a check that the options train, not the comparison (docs/quality.md).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from peft import get_peft_model

import moe_peft
from moe_peft.bases import tiny_llama
from moe_peft.bench.timing import interleaved, paired_ratio

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = {
    "token": {},
    "sequence": {"routing_level": "sequence"},
    "sequence, layer 0": {"routing_level": "sequence", "router_input_layer": 0},
    "sequence, layer 1": {"routing_level": "sequence", "router_input_layer": 1},
}


def config(rank: int = 5, **overrides) -> moe_peft.MoLEConfig:
    """The suite's "MoLE top-1 block" row (moe_peft/bench/quality_methods.py) with the options of issue 23."""
    return moe_peft.MoLEConfig(
        r=rank, lora_alpha=2 * rank, num_experts=6, top_k=1, target_modules=TARGETS, task_type="CAUSAL_LM", **overrides
    )


def timing(reps: int) -> None:
    from moe_peft.bench.quality import Suite, make_batches, training_mixture
    from moe_peft.data import CharTokenizer
    from moe_peft.data.answers import generate_answers

    suite, tokenizer = Suite(), CharTokenizer()
    batches = make_batches(suite, training_mixture(suite, 0, set())[: suite.batch_size * 4], tokenizer)
    batch = {k: batches[0][k] for k in ("input_ids", "attention_mask", "labels")}
    prompts = [s["prompt"] for s in training_mixture(suite, 1, set())[:64]]
    models = {}
    for name, overrides in ROWS.items():
        base = tiny_llama(
            vocab_size=tokenizer.vocab_size,
            hidden_size=suite.hidden_size,
            intermediate_size=suite.intermediate_size,
            num_layers=suite.num_layers,
            seed=0,
        )
        models[name] = get_peft_model(base, config(**overrides))

    def step(model):
        def run():
            model.train()
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()

        return run

    def generate(model):
        def run():
            model.eval()
            with torch.no_grad():
                generate_answers(model, tokenizer, prompts, max_new_tokens=8)

        return run

    print(
        f"batch {tuple(batch['input_ids'].shape)} ({int(batch['attention_mask'].sum())} real tokens, "
        f"{int((batch['labels'] != -100).sum())} labelled); {len(prompts)} prompts for generate; "
        f"torch threads {torch.get_num_threads()}, {reps} rounds"
    )
    for what, make in (("step (fwd+bwd)", step), ("generate", generate)):
        times = interleaved({n: make(m) for n, m in models.items()}, torch.device("cpu"), reps=reps, warmup=2)
        print(f"\n{what}: ms per call (median ± half IQR) and the ratio to 'token' in the same round")
        for name, t in times.items():
            r = paired_ratio(t, times["token"])
            print(f"  {name:<18} {t!s:>16} ms   {r.median:.3f}x ± {r.spread / 2:.3f}")


def quality(full: bool) -> None:
    from moe_peft.bench.quality import (
        Suite,
        eval_split,
        evaluate,
        make_batches,
        pretrained_base,
        summarize,
        train,
        training_mixture,
    )
    from moe_peft.bench.quality_methods import Method
    from moe_peft.data import CharTokenizer

    suite, tokenizer = (Suite() if full else Suite().quick()), CharTokenizer()
    cache = os.path.expanduser("~/.cache/moe_peft/bench_quality")
    base_dir = pretrained_base(suite, cache, tokenizer)
    from transformers import AutoModelForCausalLM

    test = eval_split(suite, "test")
    shape = "the suite's" if full else "--quick"
    print(f"\nquality, {shape} shape: {suite.steps} steps of {suite.batch_size}, lr 3e-3, seed 0")
    for name, overrides in ROWS.items():
        method = Method(name, "moe", lambda r, o=overrides: config(r, **o))
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir).eval(), method.config(5))
        samples = training_mixture(suite, 0, set())
        losses, per_step = train(model, make_batches(suite, samples, tokenizer), 3e-3, method)
        scores = evaluate(model, tokenizer, test, suite, method)
        summary = summarize(scores, suite)
        tasks = " ".join(f"{t} {scores[t]:.2f}" for t in suite.all_tasks)
        print(
            f"  {name:<18} loss {statistics.mean(losses[-20:]):.3f}  tasks {summary['tasks_mean']:.3f}  knowledge "
            f"{summary['knowledge_mean']:.3f}  ({tasks})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--full", action="store_true", help="--quality at the suite's length, not --quick's")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.reps > 0:
        timing(args.reps)
    if args.quality:
        quality(args.full)


if __name__ == "__main__":
    main()
