"""Task embeddings E(x) for the neighbourhoods (paper section 4), computed once per dataset and cached.

Default: the frozen base model's last hidden state, mean-pooled over the non-padding tokens (no extra
model, no download). Option: a sentence-transformers model directory (the released code uses
all-MiniLM-L6-v2), which needs the optional extra `pip install "moe-peft[roma]"`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids with the tokenizer's usual special tokens: moe_peft's CharTokenizer or a transformers tokenizer."""
    if getattr(tokenizer, "char_level", False):  # moe_peft.data.CharTokenizer (the tuners do not import the data)
        return tokenizer.encode(text, add_bos=True)
    return list(tokenizer(text)["input_ids"])


def pad_batch(encoded: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask `[B, S]`, padded on the right (or on the left, for generation)."""
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # [B, S]
    mask = torch.zeros_like(ids)  # [B, S]
    for i, e in enumerate(encoded):
        span = slice(width - len(e), width) if left else slice(0, len(e))
        ids[i, span] = torch.tensor(e, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def pad_id_of(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else getattr(tokenizer, "eos_token_id", 0) or 0)


def base_model_context(model: nn.Module):
    """Run `model` as the pretrained base: adapters disabled when it is a PeftModel."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


@torch.no_grad()
def embed_with_model(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled last hidden state of the frozen base model: `[N, H]`, float32."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with base_model_context(model):
            for start in range(0, len(texts), batch_size):
                ids, mask = pad_batch(
                    [encode_text(tokenizer, t) for t in texts[start : start + batch_size]], pad_id_of(tokenizer)
                )
                hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
                last = hidden.hidden_states[-1].float()  # [B, S, H]
                weights = mask.to(device, last.dtype).unsqueeze(-1)  # [B, S, 1]
                out.append(((last * weights).sum(1) / weights.sum(1).clamp(min=1.0)).cpu())  # [B, H]
    finally:
        model.train(was_training)
    return torch.cat(out)


def embed_with_sentence_transformer(path: str, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(
            f"embedding_model={path!r} needs sentence-transformers: pip install 'moe-peft[roma]' "
            "(or leave embedding_model=None to use the base model's mean-pooled hidden states)."
        ) from err
    encoder = SentenceTransformer(path, device="cpu")
    return torch.as_tensor(encoder.encode(list(texts), batch_size=batch_size, convert_to_numpy=True)).float()


def model_fingerprint(model: nn.Module) -> str:
    """Cheap identity of a base model: its config and statistics of its input embedding."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    parts = [config.to_json_string() if config is not None else type(base).__name__]
    embed = base.get_input_embeddings().weight.detach().double() if hasattr(base, "get_input_embeddings") else None
    if embed is not None:
        parts.append(f"{embed.sum().item():.10e} {embed.abs().sum().item():.10e} {tuple(embed.shape)}")
    return "\n".join(parts)


def cache_key(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def task_embeddings(
    texts: Sequence[str],
    model: Optional[nn.Module] = None,
    tokenizer=None,
    embedding_model: Optional[str] = None,
    cache_dir: Optional[str] = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Unit-norm task embeddings `[N, D]` (float32). With cache_dir, computed once per (texts, embedder) and
    loaded from `cache_dir/task_embeddings_<key>.pt` afterwards."""
    texts = list(texts)
    if embedding_model is None and (model is None or tokenizer is None):
        raise ValueError("task embeddings need embedding_model=<sentence-transformers dir>, or model and tokenizer.")
    identity = embedding_model if embedding_model is not None else model_fingerprint(model)
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, f"task_embeddings_{cache_key(identity, texts)}.pt")
        if os.path.exists(path):
            return torch.load(path)
    if embedding_model is not None:
        embeddings = embed_with_sentence_transformer(embedding_model, texts, batch_size)
    else:
        embeddings = embed_with_model(model, tokenizer, texts, batch_size)
    embeddings = torch.nn.functional.normalize(embeddings, dim=-1)  # [N, D], unit rows: cosine = dot product
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        torch.save(embeddings, path)
    return embeddings
