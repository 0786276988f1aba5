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


def tiny_dense(
    arch: str = "llama",
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_layers: int = 2,
    intermediate_size: int = 48,
    seed: int = 0,
):
    """A randomly initialized dense decoder: "llama", "mistral", "qwen2" (q/k/v biases) or "qwen3" (q/k norms)."""
    import transformers

    names = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "qwen3": (
            "Qwen3Config",
            "Qwen3ForCausalLM",
            dict(head_dim=hidden_size // _DECODER_DEFAULTS["num_attention_heads"]),
        ),
    }
    if arch not in names:
        raise ValueError(f"arch={arch!r} is invalid: use one of {sorted(names)}.")
    config_name, model_name, extra = names[arch]
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        **_DECODER_DEFAULTS,
        **extra,
    )
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def tiny_llava(
    vocab_size: int = 64,
    hidden_size: int = 32,
    seed: int = 0,
    num_layers: int = 2,
    image_size: int = 8,
    patch_size: int = 4,
    vision_hidden_size: int = 16,
    vision_layers: int = 1,
    arch: str = "llava",
):
    """A LLaVA (CLIP vision tower + Llama language model); by default 8x8 images of 4x4 patches (4 image tokens).
    The image token is the last id of the vocabulary. arch="llava_next": LLaVA-NeXT on the same parts (anyres: the
    image at the tower's resolution plus a grid of tiles, a learned newline per row; grids of 1x2, 2x1, 2x2 tiles)."""
    import transformers
    from transformers import CLIPVisionConfig, LlamaConfig

    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    # the last token id is the image placeholder; the last vision layer's patches, CLS dropped ("default")
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=vocab_size - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    s = image_size
    kinds = {
        "llava": ("LlavaConfig", "LlavaForConditionalGeneration", {}),
        "llava_next": (
            "LlavaNextConfig",
            "LlavaNextForConditionalGeneration",
            dict(
                image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]], image_seq_length=(s // patch_size) ** 2
            ),
        ),
    }
    if arch not in kinds:
        raise ValueError(f"arch={arch!r} is invalid: use one of {sorted(kinds)}.")
    config_name, model_name, extra = kinds[arch]
    config = getattr(transformers, config_name)(**common, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def tiny_llava_next(**kwargs):
    """`tiny_llava(arch="llava_next", ...)`: a tiny LLaVA-NeXT."""
    return tiny_llava(arch="llava_next", **kwargs)


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
    """A randomly initialized sparse-MoE causal LM with fused 3-D experts and a router module per layer, as in
    transformers 5. arch: "mixtral", "olmoe", "qwen3_moe", "qwen2_moe" (plus a shared expert), "deepseek_v2",
    "deepseek_v3" (shared experts, multi-head latent attention) or "gpt_oss" (transposed experts with biases)."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_experts_per_tok=top_k,
        **_DECODER_DEFAULTS,
    )
    # DeepSeek's latent attention: one KV head per head, small rope/nope/value head dims, every layer MoE
    deepseek = dict(
        n_routed_experts=num_experts,
        moe_intermediate_size=intermediate_size,
        n_shared_experts=1,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_key_value_heads=_DECODER_DEFAULTS["num_attention_heads"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    specific = {
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=num_experts)),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=num_experts)),
        "qwen3_moe": (
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            dict(num_experts=num_experts, moe_intermediate_size=intermediate_size, decoder_sparse_step=1),
        ),
        "qwen2_moe": (
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            dict(
                num_experts=num_experts,
                moe_intermediate_size=intermediate_size,
                shared_expert_intermediate_size=intermediate_size,
                decoder_sparse_step=1,
            ),
        ),
        "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", deepseek),
        "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(deepseek, n_group=1, topk_group=1)),
        "gpt_oss": (
            "GptOssConfig",
            "GptOssForCausalLM",
            dict(
                num_local_experts=num_experts, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4}
            ),
        ),
    }
    if arch not in specific:
        raise ValueError(f"arch={arch!r} is invalid: use one of {sorted(specific)}.")
    config_name, model_name, extra = specific[arch]
    config = getattr(transformers, config_name)(**{**common, **extra})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def train_on_tasks(
    model,
    tokenizer,
    steps: int,
    tasks=None,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 3e-3,
    shuffle_seed=None,
) -> list[float]:
    """Train the trainable parameters of `model` on `steps` batches of the bundled tasks (AdamW, one-cycle schedule,
    loss on the answers); returns the losses. shuffle_seed fixes the batch order (None: torch's global RNG)."""
    from ..data.bundled import DEFAULT_TASKS, Collator, make_dataset

    data = make_dataset(steps * batch_size, tasks=tuple(tasks or DEFAULT_TASKS), seed=seed, tokenizer=tokenizer)
    loader = torch.utils.data.DataLoader(
        data.remove_columns(["task", "prompt", "completion", "sample_type"]),
        batch_size=batch_size,
        shuffle=True,
        collate_fn=Collator(tokenizer),
        generator=None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for step, batch in enumerate(loader):
        if step == steps:
            break
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def pretrain_tiny_moe(
    arch: str,
    tokenizer,
    steps: int,
    out_dir: str,
    seed: int = 0,
    tasks=None,
    batch_size: int = 32,
    lr: float = 3e-3,
) -> str:
    """A tiny MoE model (4 layers, 8 experts, top-2) trained in full on bundled tasks, saved under `out_dir` and
    reused from there: a base that knows something, for the MoE examples. Returns its directory (the torch thread
    count is in its name: floating-point sums, and so the trained weights, depend on it)."""
    import os

    from ..data.bundled import DEFAULT_TASKS

    tasks = tuple(tasks or DEFAULT_TASKS)
    path = os.path.join(out_dir, f"base-{arch}-{steps}-{seed}-{'-'.join(tasks)}-t{torch.get_num_threads()}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    model = tiny_moe(
        arch,
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_layers=4,
        num_experts=8,
        intermediate_size=128,
        seed=seed,
    )
    train_on_tasks(model, tokenizer, steps, tasks=tasks, seed=seed, batch_size=batch_size, lr=lr)
    model.eval().save_pretrained(path)
    return path


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
