"""Tiny models built from configs (no download): the demo, the tests and the examples use them."""

from __future__ import annotations

import torch

# what every tiny decoder shares: 4 heads over 2 KV heads, the CharTokenizer's special ids, an untied head
_DECODER_DEFAULTS = dict(
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def tiny_llama(
    vocab_size: int = 64, hidden_size: int = 64, num_layers: int = 2, intermediate_size: int = 128, seed: int = 0
):
    """A randomly initialized Llama causal LM small enough to train on a laptop CPU in a minute."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        **_DECODER_DEFAULTS,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_llava(vocab_size: int = 64, hidden_size: int = 32, seed: int = 0):
    """A LLaVA (CLIP vision tower + Llama language model) with 8x8 images of 4x4 patches."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=vocab_size - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def tiny_moe(
    arch: str = "mixtral",
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_layers: int = 3,
    num_experts: int = 4,
    top_k: int = 2,
    intermediate_size: int = 48,
    seed: int = 0,
):
    """A randomly initialized sparse-MoE causal LM: arch is "mixtral", "olmoe" or "qwen3_moe" (fused 3-D experts
    and a TopKRouter module per layer, as in transformers 5)."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_experts_per_tok=top_k,
        **_DECODER_DEFAULTS,
    )
    specific = {
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=num_experts)),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=num_experts)),
        "qwen3_moe": (
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            dict(num_experts=num_experts, moe_intermediate_size=intermediate_size, decoder_sparse_step=1),
        ),
    }
    if arch not in specific:
        raise ValueError(f"arch={arch!r} is invalid: use one of {sorted(specific)}.")
    config_name, model_name, extra = specific[arch]
    config = getattr(transformers, config_name)(**common, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


# A chat template the tiny tokenizer understands: one line per turn, the assistant's answer closed by EOS.
# The prompt rendered with add_generation_prompt=True is a prefix of prompt + answer (what TRL's completion-only
# loss needs).
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ 'assistant: ' + message['content'] + eos_token }}"
    "{%- else -%}{{ message['role'] + ': ' + message['content'] + '\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'assistant: ' }}{%- endif -%}"
)


def char_tokenizer():
    """A character-level `PreTrainedTokenizerFast` built locally (no download), for TRL and the tiny models.

    Ids 0..3 are <pad>, <bos>, <eos>, <unk> (the tiny models' special ids), then printable ASCII and newline, one
    token per character; a text is encoded as <bos> + its characters. It has a chat template (`TINY_CHAT_TEMPLATE`)
    and saves / reloads with `save_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # letters, digits, punctuation, " ", "\n"
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer
