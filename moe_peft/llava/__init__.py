"""LLaVA-MoLE: MoLE on a LLaVA-family model's language model, modality-aware expert groups, and image+text data.

    from moe_peft.llava import mole_llava_config, build_processor, LlavaCollator, make_image_tasks
    model = get_peft_model(llava, mole_llava_config(llava, modality_experts={"text": 2, "image": 2}))

Supported: LlavaForConditionalGeneration and LlavaNextForConditionalGeneration (`SUPPORTED_MODEL_TYPES`).
examples/finetune_llava.py trains one; docs/methods.md ("Modality-aware expert groups") has the routing rule.
"""

from .collator import LlavaCollator, answers_from
from .config import (
    ATTENTION_REGEX,
    MLP_REGEX,
    SUPPORTED_MODEL_TYPES,
    check_supported,
    mole_llava_config,
)
from .data import (
    BASE_TASKS,
    IMAGE_TASKS,
    TASKS,
    TEXT_TASKS,
    build_processor,
    build_tokenizer,
    make_image_tasks,
    make_sample,
)
from .stats import modality_load

__all__ = [
    "ATTENTION_REGEX",
    "BASE_TASKS",
    "IMAGE_TASKS",
    "LlavaCollator",
    "MLP_REGEX",
    "SUPPORTED_MODEL_TYPES",
    "TASKS",
    "TEXT_TASKS",
    "answers_from",
    "build_processor",
    "build_tokenizer",
    "check_supported",
    "make_image_tasks",
    "make_sample",
    "modality_load",
    "mole_llava_config",
]
