"""Bundled synthetic image+text instruction data, and a tokenizer and processor built locally (no download).

Images are drawn with PIL at run time (no binary files): coloured shapes on a grey background. Every sample is a
conversation in the chat format transformers' VLM processors and TRL use, a `messages` list whose user content
holds `{"type": "image"}` placeholders, plus an `images` list (PIL images here; paths work too):

    colour    [image] what colour is the shape ?          -> red        (one shape, in the left or right half)
    shape     [image] what shape is it ?                  -> triangle   (one shape)
    position  [image] is the shape left or right ?        -> left       (one shape)
    count     [image] how many shapes are there ?         -> three      (one to three small shapes)
    add       what is two plus five ?                     -> seven      (text only, sums below ten)
    compare   which is more , six or four ?               -> six        (text only)
    caption   [image] describe the image .                -> red circle left   (the tiny base's pretraining)

Each sample carries its `task` and `modality` ("image" or "text").
"""

from __future__ import annotations

import random
from collections.abc import Iterable

COLOURS = {"red": (220, 50, 50), "green": (40, 170, 70), "blue": (50, 90, 230), "yellow": (235, 205, 40)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BACKGROUND = (128, 128, 128)

QUESTIONS = {
    "colour": "what colour is the shape ?",
    "shape": "what shape is it ?",
    "position": "is the shape left or right ?",
    "count": "how many shapes are there ?",
    "caption": "describe the image .",
}
IMAGE_TASKS = ("colour", "shape", "position", "count")
TEXT_TASKS = ("add", "compare")
TASKS = IMAGE_TASKS + TEXT_TASKS  # the fine-tuning mix
BASE_TASKS = ("caption", "add")  # what the tiny base model learns in full

# the chat template of the locally built tokenizer: LLaVA-1.5's "USER: <image>\n... ASSISTANT: ...</s>" form
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : {% elif message['role'] == 'assistant' %}ASSISTANT : "
    "{% else %}{{ message['role'] }} : {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %} {{ eos_token }}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3; "<image>" is the last id (tiny_llava's image token)
IMAGE_TOKEN = "<image>"


def vocabulary() -> list[str]:
    """Every word the bundled tasks and the chat template use."""
    words = {"USER", "ASSISTANT", ":", ",", "?", ".", "plus", "or", *COLOURS, *SHAPES, *NUMBERS, "left", "right"}
    for text in QUESTIONS.values():
        words.update(text.split())
    words.update("what is which more".split())
    return sorted(words)


def draw_shape(draw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _canvas(size: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUND)
    return image, ImageDraw.Draw(image)


def _one_shape(rng: random.Random, size: int):
    """An image with one shape lying entirely in the left or the right half, and its (colour, shape, side)."""
    colour, shape, side = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(("left", "right"))
    half = size // 2
    extent = rng.randint(max(3, half - 2), half)
    x0 = rng.randint(0, half - extent) + (0 if side == "left" else half)
    y0 = rng.randint(0, size - extent)
    image, draw = _canvas(size)
    draw_shape(draw, shape, (x0, y0, x0 + extent - 1, y0 + extent - 1), COLOURS[colour])
    return image, colour, shape, side


def _many_shapes(rng: random.Random, size: int, count: int):
    """count small shapes in distinct cells of a 2x2 grid."""
    image, draw = _canvas(size)
    cell = size // 2
    extent = max(3, cell - 2)
    for cell_index in rng.sample(range(4), count):
        cx, cy = (cell_index % 2) * cell, (cell_index // 2) * cell
        x0, y0 = cx + rng.randint(0, cell - extent), cy + rng.randint(0, cell - extent)
        colour = COLOURS[rng.choice(list(COLOURS))]
        draw_shape(draw, rng.choice(SHAPES), (x0, y0, x0 + extent - 1, y0 + extent - 1), colour)
    return image


def _conversation(question: str, answer: str, image=None) -> tuple[list[dict], list]:
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    messages = [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return messages, ([image] if image is not None else [])


def make_sample(task: str, rng: random.Random, image_size: int = 16) -> dict:
    """One sample of `task`: {task, modality, messages, images, answer}."""
    image = None
    if task in ("colour", "shape", "position", "caption"):
        image, colour, shape, side = _one_shape(rng, image_size)
        answer = {"colour": colour, "shape": shape, "position": side, "caption": f"{colour} {shape} {side}"}[task]
    elif task == "count":
        count = rng.randint(1, 3)
        image, answer = _many_shapes(rng, image_size, count), NUMBERS[count]
    elif task == "add":
        a = rng.randint(0, 9)
        b = rng.randint(0, 9 - a)
        question, answer = f"what is {NUMBERS[a]} plus {NUMBERS[b]} ?", NUMBERS[a + b]
    elif task == "compare":
        a, b = rng.sample(range(10), 2)
        question, answer = f"which is more , {NUMBERS[a]} or {NUMBERS[b]} ?", NUMBERS[max(a, b)]
    else:
        raise ValueError(f"task={task!r} is unknown; choose from {sorted(TASKS + BASE_TASKS)}.")
    if image is not None:
        question = QUESTIONS[task]
    messages, images = _conversation(question, answer, image)
    return {
        "task": task,
        "modality": "image" if image is not None else "text",
        "messages": messages,
        "images": images,
        "answer": answer,
    }


def make_image_tasks(num_samples: int, tasks: Iterable[str] = TASKS, seed: int = 0, image_size: int = 16) -> list[dict]:
    """Balanced, seeded samples of `tasks` (round robin, then shuffled)."""
    tasks = list(tasks)
    rng = random.Random(seed)
    samples = [make_sample(tasks[i % len(tasks)], rng, image_size) for i in range(num_samples)]
    rng.shuffle(samples)
    return samples


def build_tokenizer():
    """A word-level fast tokenizer over the bundled tasks' words, with LLaVA-1.5's chat template: ids 0..3 are
    <pad>, <s>, </s>, <unk>; the last id is <image> (the image token of moe_peft.bases.tiny's LLaVA models). It adds
    <s> in front, as Llama's tokenizer does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = list(SPECIAL_TOKENS) + vocabulary() + [IMAGE_TOKEN]
    model = models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def _pil_image_processor(kind: str):
    """transformers' PIL image processors (the default ones need torchvision, which moe-peft does not require)."""
    import transformers

    names = {"llava": "CLIPImageProcessor", "llava_next": "LlavaNextImageProcessor"}
    return getattr(transformers, names[kind] + "Pil", None) or getattr(transformers, names[kind])


def build_processor(kind: str = "llava", image_size: int = 16, patch_size: int = 4, tokenizer=None):
    """A LlavaProcessor (kind="llava") or LlavaNextProcessor ("llava_next") for moe_peft.bases.tiny's models: CLIP image
    processing at `image_size` (LLaVA-NeXT: its anyres tiles on the 1x2, 2x1, 2x2 grids of tiny_llava_next), the
    local tokenizer, and the chat template. Saved with `save_pretrained`, it reloads with AutoProcessor."""
    from transformers import LlavaNextProcessor, LlavaProcessor

    if kind not in ("llava", "llava_next"):
        raise ValueError(f"kind={kind!r} is invalid: use 'llava' or 'llava_next'.")
    tokenizer = tokenizer or build_tokenizer()
    size = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    if kind == "llava":
        image_processor = _pil_image_processor(kind)(**size)
        cls = LlavaProcessor
    else:
        s = image_size
        image_processor = _pil_image_processor(kind)(
            **size, image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        )
        cls = LlavaNextProcessor
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
