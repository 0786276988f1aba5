"""Base models: tiny Llama, dense, MoE (Mixtral, OLMoE, Qwen3-MoE, ...) and LLaVA models built from configs, and
the tiny Llama pre-trained on the bundled string tasks (tiny.py) that the demo, the tests and the examples use; and
real pre-trained models fetched once and cached (real.py: `load("smollm2-135m")`, docs/real-base.md).

It uses the bundled data and nothing of the tuners.
"""

from .cache import cache_root
from .real import REAL_BASES, RealBaseError, base_path, load
from .tiny import (
    TINY_CHAT_TEMPLATE,
    char_tokenizer,
    pretrain_tiny_moe,
    tiny_dense,
    tiny_llama,
    tiny_llava,
    tiny_llava_next,
    tiny_moe,
    train_on_tasks,
)

__all__ = [
    "load",
    "base_path",
    "REAL_BASES",
    "RealBaseError",
    "cache_root",
    "tiny_llama",
    "tiny_dense",
    "tiny_moe",
    "tiny_llava",
    "tiny_llava_next",
    "train_on_tasks",
    "pretrain_tiny_moe",
    "char_tokenizer",
    "TINY_CHAT_TEMPLATE",
]
