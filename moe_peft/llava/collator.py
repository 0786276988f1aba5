"""A collator for image+text conversations with a LLaVA-family processor.

A row is a conversation in the chat format of transformers' VLM processors and TRL: `messages`, a list of
{"role", "content"} turns whose content is a string (image placeholders written as the processor's image token,
"<image>") or a list of {"type": "text", "text": ...} / {"type": "image"} items, plus `images`, the row's images in
placeholder order (PIL images or paths). The collator renders the conversation with the processor's chat
template, lets the processor expand each placeholder into the image's tokens (LLaVA-NeXT: a number that depends
on the image size), and builds labels on the assistant turns only: the prompt, the image tokens and the padding
are -100.

How the assistant spans are found: for each assistant turn i, the template rendered up to turn i with the
generation prompt must be a prefix of the template rendered through turn i (true of LLaVA's templates; an error
names the turn otherwise). The text is cut at those boundaries and every piece tokenized on its own: prompt
pieces through the processor (so the images in them are expanded), answer pieces by the tokenizer without special
tokens. LLaVA's own training code tokenizes per turn in the same way.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100


def _load_image(image):
    if isinstance(image, str):
        from PIL import Image

        return Image.open(image).convert("RGB")
    return image


class LlavaCollator:
    """Batches conversations for a LLaVA-family model: input_ids, attention_mask, labels, pixel_values (and
    image_sizes for LLaVA-NeXT).

    Args:
        processor: the model's processor (LlavaProcessor, LlavaNextProcessor, ...) with a chat template.
        padding_side: "right" for training; "left" for batched generation (`generation_batch`).
    """

    def __init__(self, processor, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r} is invalid: use 'left' or 'right'.")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.padding_side = padding_side
        self.image_token = getattr(processor, "image_token", "<image>")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    # -- one conversation ----------------------------------------------------------------------------------------
    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_assistant_answer) pieces."""
        full = self._render(messages, False)
        pieces, start = [], 0
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], True)
            through = self._render(messages[: i + 1], False)
            if not (full.startswith(through) and through.startswith(prompt) and len(prompt) >= start):
                raise ValueError(
                    f"the chat template is not prefix-stable at assistant turn {i}: the conversation rendered up to "
                    "that turn (with the generation prompt) is not a prefix of the conversation rendered through it, "
                    "so the answer tokens cannot be told apart from the prompt; use a template without per-turn "
                    "rewriting (LLaVA's are fine)."
                )
            pieces += [(full[start : len(prompt)], False), (full[len(prompt) : len(through)], True)]
            start = len(through)
        pieces.append((full[start:], False))
        return [(text, answer) for text, answer in pieces if text]

    def encode(self, row: dict, with_answer: bool = True) -> dict[str, Any]:
        """One row: input_ids, labels (lists), and its processed images (pixel_values, image_sizes tensors or None).
        with_answer=False encodes the prompt for generation: everything up to the last assistant turn, with the
        generation prompt."""
        messages = row["messages"]
        images = [_load_image(im) for im in (row.get("images") or [])]
        if not with_answer:
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
            pieces = [(self._render(messages[:last], True), False)]
        else:
            pieces = self._pieces(messages)
        ids, labels, pixels, sizes, used = [], [], [], [], 0
        for text, answer in pieces:
            if answer:
                piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                labels += [t if t != self.image_token_id else IGNORE for t in piece]
                continue
            count = text.count(self.image_token)
            kwargs = {} if not ids else {"add_special_tokens": False}  # special tokens (BOS) on the first piece only
            if count:
                out = self.processor(text=[text], images=images[used : used + count], return_tensors="pt", **kwargs)
                pixels.append(out["pixel_values"])
                if "image_sizes" in out:
                    sizes.append(out["image_sizes"])
            else:
                out = self.tokenizer([text], return_tensors="pt", **kwargs)
            used += count
            piece = out["input_ids"][0].tolist()
            ids += piece
            labels += [IGNORE] * len(piece)
        if used != len(images):
            raise ValueError(
                f"the conversation has {used} image placeholders but its `images` column holds {len(images)} "
                f"images: put one {{'type': 'image'}} item (or '{self.image_token}') in the messages per image."
            )
        return {
            "input_ids": ids,
            "labels": labels,
            "pixel_values": torch.cat(pixels) if pixels else None,
            "image_sizes": torch.cat(sizes) if sizes else None,
        }

    # -- a batch -------------------------------------------------------------------------------------------------
    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return self._batch([self.encode(r) for r in rows], self.padding_side)

    def generation_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """The prompts of `rows` (up to their last assistant turn), left-padded, for `model.generate(**batch)`."""
        batch = self._batch([self.encode(r, with_answer=False) for r in rows], "left")
        batch.pop("labels")
        return batch

    def _batch(self, encoded: list[dict], side: str) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)  # [B, S]
        labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)  # [B, S]
        mask = torch.zeros((len(encoded), width), dtype=torch.long)  # [B, S]
        for i, e in enumerate(encoded):
            n = len(e["input_ids"])
            cols = slice(width - n, width) if side == "left" else slice(0, n)
            ids[i, cols] = torch.tensor(e["input_ids"])
            labels[i, cols] = torch.tensor(e["labels"])
            mask[i, cols] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        pixels = [e["pixel_values"] for e in encoded if e["pixel_values"] is not None]
        if pixels:
            batch["pixel_values"] = _stack_pixels(pixels)
        sizes = [e["image_sizes"] for e in encoded if e["image_sizes"] is not None]
        if sizes:
            batch["image_sizes"] = torch.cat(sizes)  # [images, 2]
        return batch


def _stack_pixels(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate the rows' images: [n, C, H, W] each (LLaVA), or [n, tiles, C, H, W] (LLaVA-NeXT, whose tile
    count varies with the image size: zero-padded to the most tiles, as its processor pads a batch; the model
    reads each image's tile count from image_sizes)."""
    if pixels[0].dim() == 5:
        most = max(p.shape[1] for p in pixels)
        pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
    return torch.cat(pixels)  # [images, ...]


def answers_from(collator: LlavaCollator, generated: torch.Tensor, prompt_width: int) -> list[str]:
    """Decode what generate() added after the (left-padded) prompts."""
    return [
        collator.tokenizer.decode(row[prompt_width:], skip_special_tokens=True).strip()
        for row in generated  # [B, S_prompt + new]
    ]
