"""Answers of a model to the bundled tasks' prompts, and their exact match: what the demo, the examples and the
quality benchmark score a trained adapter by."""

from __future__ import annotations

from collections import defaultdict

import torch

from .bundled import CharTokenizer


@torch.no_grad()
def generate_answers(
    model, tokenizer: CharTokenizer, prompts: list[str], max_new_tokens: int = 14, **generate_kwargs
) -> list[str]:
    """Greedy answers for a batch of prompts (left-padded, with the KV cache); generate_kwargs go to generate()."""
    encoded = [tokenizer.encode(p, add_bos=True) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, S]
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **generate_kwargs,
    )
    return [tokenizer.decode(row[width:]) for row in out]


def exact_match_by_task(model, tokenizer, samples: list[dict]) -> dict[str, float]:
    answers = generate_answers(model, tokenizer, [s["prompt"] for s in samples])
    hits, totals = defaultdict(int), defaultdict(int)
    for s, a in zip(samples, answers):
        totals[s["task"]] += 1
        hits[s["task"]] += int(a == s["completion"])
    return {t: hits[t] / totals[t] for t in sorted(totals)}
