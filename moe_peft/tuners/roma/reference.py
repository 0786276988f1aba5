"""The reference set: which training samples the pretrained model gets right, their routing r_j, and
each sample's k nearest successful neighbours with kernel weights W_ij (paper section 4). Computed once,
stored (`save`/`load`, or `cache_dir`), refreshable with the model being trained (`refresh`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from .embeddings import (
    base_model_context,
    cache_key,
    encode_text,
    model_fingerprint,
    pad_batch,
    pad_id_of,
    task_embeddings,
)
from .loss import Neighbours, manifold_loss
from .model import roma_tuner, routing_representation

_BATCH_KEYS = ("input_ids", "attention_mask", "labels")
# the config fields a reference depends on (lambda and the refresh schedule only matter in training)
_REFERENCE_KNOBS = (
    "target_routers",
    "layers",
    "num_last_layers",
    "representation",
    "num_neighbours",
    "sigma",
    "kernel",
    "embedding_model",
)


# -- which samples are successful --------------------------------------------------------------------
@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 64,
    extra: Optional[Callable[[int], dict]] = None,
) -> list[str]:
    """Greedy answers (left-padded batches, KV cache on); `extra(batch)` adds keywords to generate (task_ids)."""
    device = next(model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_text(tokenizer, p) for p in prompts[start : start + batch_size]]
        ids, mask = pad_batch(encoded, pad_id_of(tokenizer), left=True)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad_id_of(tokenizer),
            **(extra(ids.shape[0]) if extra is not None else {}),
        )
        for row in out[:, ids.shape[1] :].tolist():  # [B, S + new] -> the new tokens
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def exact_match_success(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_new_tokens: Optional[int] = None,
    batch_size: int = 64,
    extra: Optional[Callable[[int], dict]] = None,
) -> list[bool]:
    """Generation tasks: a sample is successful when the greedy answer equals the reference (stripped)."""
    max_new_tokens = max_new_tokens or max(len(encode_text(tokenizer, a)) for a in answers) + 2
    got = generate_answers(model, tokenizer, list(prompts), max_new_tokens, batch_size, extra)
    return [g.strip() == a.strip() for g, a in zip(got, answers)]


@torch.no_grad()
def multiple_choice_success(
    model: nn.Module, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]], gold: Sequence[int]
) -> list[bool]:
    """Multiple choice: successful when the gold choice has the highest log-likelihood given the prompt."""
    device = next(model.parameters()).device
    success = []
    for prompt, options, answer in zip(prompts, choices, gold):
        context = encode_text(tokenizer, prompt)
        encoded = [context + encode_text(tokenizer, prompt + o)[len(context) :] for o in options]
        ids, mask = pad_batch(encoded, pad_id_of(tokenizer))
        logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
        token_logp = logp[:, :-1].gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)  # [C, S-1, V] -> [C, S-1]
        scored = mask[:, 1:].clone().to(device)
        scored[:, : len(context) - 1] = 0  # only the choice's own tokens count
        success.append(int((token_logp * scored).sum(-1).argmax()) == int(answer))
    return success


# -- routing and neighbours --------------------------------------------------------------------------
@torch.no_grad()
def collect_routing(
    model: nn.Module, rows: Sequence[dict], collate_fn: Callable, batch_size: int = 32, base: bool = True
) -> torch.Tensor:
    """Routing representations `[N, L, E]` of `rows` (float32, CPU): of the pretrained routers with base=True,
    of the adapter being trained with base=False."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with base_model_context(model) if base else torch.no_grad():
            for start in range(0, len(rows), batch_size):
                # row by row: slicing a datasets.Dataset would give columns, not rows
                chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
                chunk = [{k: r[k] for k in _BATCH_KEYS if k in r} for r in chunk]
                batch = collate_fn(chunk)
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                out.append(routing_representation(model).float().cpu())  # [B, L, E]
    finally:
        model.train(was_training)
    return torch.cat(out)


def knn_weights(
    embeddings: torch.Tensor,
    success: torch.Tensor,
    k: int,
    sigma: float,
    kernel: str = "cosine",
    queries: Optional[torch.Tensor] = None,
):
    """The k most cosine-similar successful samples of each query and their kernel weights.

    embeddings `[N, D]` unit rows and success `[N]` bool describe the training set; queries `[M, D]` (default:
    the training set itself, each sample then excluded from its own neighbours) -> index `[M, k]` into the N
    samples and weights `[M, k]` normalized per row (a row without any neighbour is zero: no regularizer).
    """
    pool = success.nonzero().squeeze(-1)  # [S] indices of successful samples
    if pool.numel() == 0:
        raise ValueError(
            "RoMA's reference set is empty: the pretrained model gets no training sample right, so no sample has "
            "successful neighbours. Check the success criterion (or the model) before router tuning."
        )
    cos = (embeddings if queries is None else queries) @ embeddings[pool].T  # [M, D] @ [D, S] -> [M, S]
    if queries is None:
        cos[pool, torch.arange(pool.numel())] = float("-inf")  # a sample is not its own neighbour
    top, slot = cos.topk(min(k, pool.numel()), dim=-1)  # [M, k]
    if kernel == "euclidean":  # paper: ||e_i - e_j||^2 = 2 (1 - cos) for unit vectors
        sim = torch.exp(-2.0 * (1.0 - top) / (2 * sigma**2))
    else:  # released code: exp(-(1 - cos)^2 / (2 sigma^2))
        sim = torch.exp(-((1.0 - top) ** 2) / (2 * sigma**2))
    sim = torch.where(torch.isfinite(top), sim, torch.zeros_like(sim))  # the excluded self slot weighs 0
    weights = sim / sim.sum(-1, keepdim=True).clamp(min=1e-12)  # [M, k]
    return pool[slot], weights  # [M, k] indices into the N samples


@dataclass
class RoMAReference:
    """Per training sample i (in dataset order): task embedding, success flag, routing r_i of the model that
    built it, and the indices/weights of its k successful neighbours."""

    embeddings: torch.Tensor  # [N, D]
    success: torch.Tensor  # [N] bool
    routing: torch.Tensor  # [N, L, E]
    neighbour_index: torch.Tensor  # [N, k]
    neighbour_weight: torch.Tensor  # [N, k]

    def __len__(self) -> int:
        return self.success.numel()

    def neighbours(self, index: torch.Tensor) -> Neighbours:
        """The neighbours of the samples `index` `[B]`: their routing `[B, k, L, E]` and weights `[B, k]`."""
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        nbr = self.neighbour_index[index]  # [B, k]
        return Neighbours(self.routing[nbr], self.neighbour_weight[index])  # [B, k] -> [B, k, L, E]

    def neighbours_of(self, queries: torch.Tensor, config) -> Neighbours:
        """Neighbours of new samples (e.g. held-out ones) from their task embeddings `[M, D]` (config: RoMAConfig)."""
        index, weights = knn_weights(
            self.embeddings, self.success, config.num_neighbours, config.sigma, config.kernel, queries=queries
        )
        return Neighbours(self.routing[index], weights)  # [M, k, L, E], [M, k]

    def distance(
        self, model: nn.Module, rows: Sequence[dict], collate_fn: Callable, neighbours=None, batch_size: int = 32
    ) -> float:
        """mean_i sum_j W_ij ||r_i - r_j||^2 with r_i from the adapter being trained: the training set's own
        neighbours by default, or `neighbours` (from neighbours_of) for other rows."""
        reps = collect_routing(model, rows, collate_fn, batch_size, base=False)  # [N, L, E]
        if neighbours is None:
            neighbours = self.neighbours(torch.arange(len(rows)))
        return float(manifold_loss(reps, neighbours).mean())

    def refresh(self, model: nn.Module, dataset, collate_fn: Callable, batch_size: int = 32) -> None:
        """Recompute the successful samples' routing with the adapter being trained (RoMAConfig.reference_refresh_steps)."""
        pool = self.success.nonzero().squeeze(-1).tolist()
        self.routing[pool] = collect_routing(model, [dataset[i] for i in pool], collate_fn, batch_size, base=False)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(asdict(self), path)

    @classmethod
    def load(cls, path: str) -> RoMAReference:
        return cls(**torch.load(path))


def build_reference(
    model: nn.Module,
    dataset,
    tokenizer,
    collate_fn: Callable,
    success: Optional[Sequence[bool]] = None,
    text_field: str = "prompt",
    answer_field: str = "completion",
    batch_size: int = 32,
    cache_dir: Optional[str] = None,
) -> RoMAReference:
    """Build (or load from cache_dir) the reference set of a RoMA-adapted `model` on `dataset`.

    dataset: rows with `input_ids` (and `labels` if collate_fn needs them) and a text field for the task
    embedding. success: one flag per row; None computes it with the pretrained model by exact match of the
    greedy answer to `answer_field` (for multiple choice, pass `multiple_choice_success(...)`).
    """
    config = roma_tuner(model).peft_config[roma_tuner(model).active_adapters[0]]
    rows = [dataset[i] for i in range(len(dataset))]
    texts = [r[text_field] for r in rows]
    path = None
    if cache_dir is not None:
        knobs = {k: getattr(config, k) for k in _REFERENCE_KNOBS}
        flags = None if success is None else [bool(s) for s in success]
        key = cache_key(model_fingerprint(model), texts, [r["input_ids"] for r in rows], knobs, flags)
        path = os.path.join(cache_dir, f"roma_reference_{key}.pt")
        if os.path.exists(path):
            return RoMAReference.load(path)
    embeddings = task_embeddings(texts, model, tokenizer, config.embedding_model, cache_dir, batch_size)
    if success is None:
        was_training = model.training
        model.eval()
        with base_model_context(model):
            success = exact_match_success(model, tokenizer, texts, [r[answer_field] for r in rows])
        model.train(was_training)
    success = torch.as_tensor([bool(s) for s in success], dtype=torch.bool)
    if success.numel() != len(rows):
        raise ValueError(f"success has {success.numel()} flags for {len(rows)} samples; give one per sample.")
    routing = collect_routing(model, rows, collate_fn, batch_size, base=True)
    index, weights = knn_weights(embeddings, success, config.num_neighbours, config.sigma, config.kernel)
    reference = RoMAReference(embeddings, success, routing, index, weights)
    if path is not None:
        reference.save(path)
    return reference
