"""Natural-language instruction data for a real chat model (docs/real-base.md): conflicting tasks over the same
input, facts a base knows, general prompts, and the scoring of chat answers.

Tasks. Every task takes a list of 3-4 common English words and an instruction that differs from the others' by a
few words; the answers differ completely:

    Give the first word of this list: apple, river, stone          -> apple
    Give the last word of this list: apple, river, stone           -> stone
    Give this list in reverse order: apple, river, stone           -> stone, river, apple
    Give this list in alphabetical order: river, apple, stone      -> apple, river, stone
    Give this list in capital letters: apple, river, stone         -> APPLE, RIVER, STONE
    Give the first letter of each word in this list: apple, river  -> a, r
    Repeat this list: apple, river, stone                          -> apple, river, stone   (sample_type 1)

`repeat` is what the base already does ("recall the input", LoRAMoE's world-knowledge side, sample_type 1); the
others are type 0. Prompts are user turns; `tokenize_chat` renders them with the tokenizer's chat template.

Facts (`FACTS`): short questions with their accepted answers, to measure what a fine-tuned model still knows of
what the base knew. General prompts (`GENERAL_PROMPTS`): open requests whose answers come from the base itself
(a general-ability reference), split into a training part and a held-out part.

It uses nothing of the tuners or bases (a tokenizer and a model are passed in).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Optional

import torch

WORDS = (
    "apple", "river", "stone", "cloud", "garden", "window", "candle", "forest", "bottle", "pencil",
    "mirror", "basket", "bridge", "castle", "desert", "engine", "feather", "guitar", "hammer", "island",
    "jacket", "kettle", "ladder", "market", "needle", "orange", "pillow", "rabbit", "saddle", "ticket",
    "valley", "wallet", "anchor", "blanket", "carpet", "dragon", "finger", "glove", "harbor", "lemon",
    "monkey", "napkin", "oven", "parrot", "rocket", "silver", "tomato", "violin", "wagon", "yellow",
    "button", "cotton", "doctor", "farmer", "tiger", "sugar", "planet", "ocean", "mountain", "village",
    "coffee", "summer", "winter", "spring", "autumn", "circle", "square", "bread", "cheese", "butter",
    "chair", "table", "house", "horse", "train", "plane", "boat", "truck", "piano", "drum",
    "letter", "paper", "water", "fire", "metal", "glass", "honey", "salt", "pepper", "onion",
    "cookie", "spoon", "knife", "plate", "shirt", "shoe", "hat", "coat", "ring", "clock",
    "lamp", "door", "wall", "roof", "floor", "road", "street", "city", "school", "church",
    "flower", "tree", "leaf", "seed", "bird", "fish", "snake", "whale", "zebra", "camel",
)  # fmt: skip


def _words(xs: Sequence[str]) -> str:
    return ", ".join(xs)


# name -> (instruction before the list, answer of a word list)
INSTRUCTION_TASKS: dict[str, tuple[str, Callable[[list[str]], str]]] = {
    "first": ("Give the first word of this list:", lambda xs: xs[0]),
    "last": ("Give the last word of this list:", lambda xs: xs[-1]),
    "reverse": ("Give this list in reverse order:", lambda xs: _words(xs[::-1])),
    "sort": ("Give this list in alphabetical order:", lambda xs: _words(sorted(xs))),
    "upper": ("Give this list in capital letters:", lambda xs: _words([x.upper() for x in xs])),
    "initials": ("Give the first letter of each word in this list:", lambda xs: _words([x[0] for x in xs])),
    "repeat": ("Repeat this list:", lambda xs: _words(xs)),
}
RECALL_TASKS = ("repeat",)  # sample_type 1: what the base does already; the others are type 0
DEFAULT_INSTRUCTION_TASKS = ("first", "last", "reverse", "sort", "upper", "initials")


def check_tasks(tasks: Iterable[str], field: str = "tasks") -> list[str]:
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in INSTRUCTION_TASKS]
    if unknown or not tasks:
        raise ValueError(
            f"{field}={tasks} {'has unknown instruction tasks ' + str(unknown) if unknown else 'is empty'}; choose "
            f"from {list(INSTRUCTION_TASKS)}."
        )
    return tasks


def instruction_sample(task: str, words: Sequence[str]) -> dict:
    instruction, answer = INSTRUCTION_TASKS[task]
    return {
        "task": task,
        "sample_type": int(task in RECALL_TASKS),
        "prompt": f"{instruction} {_words(words)}",
        "completion": answer(list(words)),
    }


def make_instruction_samples(
    num_samples: int,
    tasks: Iterable[str] = DEFAULT_INSTRUCTION_TASKS,
    seed: int = 0,
    min_words: int = 3,
    max_words: int = 4,
    exclude: Optional[set[str]] = None,
) -> list[dict]:
    """Balanced (task i of num_samples is tasks[i % len(tasks)]), seeded samples {task, sample_type, prompt,
    completion}, in a seeded random order; distinct words in a list; no prompt in `exclude`."""
    tasks = check_tasks(tasks)
    if not 1 <= min_words <= max_words <= len(WORDS):
        raise ValueError(f"min_words={min_words}, max_words={max_words}: need 1 <= min_words <= max_words.")
    rng = random.Random(seed)
    exclude = exclude or set()
    samples = []
    for i in range(num_samples):
        task = tasks[i % len(tasks)]
        for _ in range(1000):  # redraw a list whose prompt is held out
            s = instruction_sample(task, rng.sample(WORDS, rng.randint(min_words, max_words)))
            if s["prompt"] not in exclude:
                break
        else:
            raise ValueError("could not draw a prompt outside `exclude` in 1000 tries")
        samples.append(s)
    rng.shuffle(samples)
    return samples


def instruction_records(tasks: Iterable[str], num_samples: int, seed: int) -> list[dict]:
    """Chat rows for `moe-peft train` (`data.train: instructions`): messages, task, sample_type."""
    tasks = check_tasks(tasks, "data.bundled_tasks (with data.train: instructions)")
    return [
        {"messages": chat_messages(s["prompt"], s["completion"]), "task": s["task"], "sample_type": s["sample_type"]}
        for s in make_instruction_samples(num_samples, tasks, seed)
    ]


# -- facts and general prompts --------------------------------------------------------------------------------------
# (question, accepted answers): a fact is answered right when an accepted answer appears as whole words in the
# greedy answer (`mentions`). Which of them a base knows is measured, not assumed (a base gets about 60% right).
FACTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of England?", ("London",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of China?", ("Beijing",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the capital of Australia?", ("Canberra",)),
    ("What is the capital of Greece?", ("Athens",)),
    ("What is the capital of Portugal?", ("Lisbon",)),
    ("What is the capital of Ireland?", ("Dublin",)),
    ("What is the capital of Norway?", ("Oslo",)),
    ("What is the capital of Sweden?", ("Stockholm",)),
    ("What is the capital of Austria?", ("Vienna",)),
    ("What is the capital of Poland?", ("Warsaw",)),
    ("What is the capital of India?", ("New Delhi", "Delhi")),
    ("What is the capital of Mexico?", ("Mexico City",)),
    ("What is the capital of Kenya?", ("Nairobi",)),
    ("What is the capital of Argentina?", ("Buenos Aires",)),
    ("What is the capital of Turkey?", ("Ankara",)),
    ("What is the capital of South Korea?", ("Seoul",)),
    ("What is the capital of Thailand?", ("Bangkok",)),
    ("What is the capital of Finland?", ("Helsinki",)),
    ("What is the capital of Denmark?", ("Copenhagen",)),
    ("What is the capital of Peru?", ("Lima",)),
    ("What is the capital of Cuba?", ("Havana",)),
    ("What is the capital of Hungary?", ("Budapest",)),
    ("What is the capital of the Netherlands?", ("Amsterdam",)),
    ("What is the capital of Belgium?", ("Brussels",)),
    ("What is the capital of Switzerland?", ("Bern",)),
    ("What is the capital of Scotland?", ("Edinburgh",)),
    ("What is the capital of the United States?", ("Washington",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What color is grass?", ("green",)),
    ("What color is snow?", ("white",)),
    ("What color is a ripe banana?", ("yellow",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("Which planet is closest to the Sun?", ("Mercury",)),
    ("Which planet do we live on?", ("Earth",)),
    ("What is the closest star to the Earth?", ("Sun",)),
    ("What is the natural satellite of the Earth called?", ("Moon",)),
    ("How many days are in a week?", ("seven", "7")),
    ("How many months are in a year?", ("twelve", "12")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("How many continents are there?", ("seven", "7")),
    ("How many hours are in a day?", ("twenty-four", "twenty four", "24")),
    ("How many minutes are in an hour?", ("sixty", "60")),
    ("How many sides does a triangle have?", ("three", "3")),
    ("How many legs does a dog have?", ("four", "4")),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What is the chemical symbol for iron?", ("Fe",)),
    ("What is the chemical symbol for oxygen?", ("O",)),
    ("What is the chemical formula of water?", ("H2O",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
    ("What gas do humans need to breathe?", ("oxygen",)),
    ("What is the freezing point of water in degrees Celsius?", ("zero", "0")),
    ("What is the boiling point of water in degrees Celsius?", ("100", "one hundred")),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("Who wrote Hamlet?", ("Shakespeare",)),
    ("Who painted the Mona Lisa?", ("Leonardo da Vinci", "Leonardo", "da Vinci")),
    ("Who was the first president of the United States?", ("George Washington", "Washington")),
    ("Who developed the theory of relativity?", ("Einstein",)),
    ("Who discovered penicillin?", ("Alexander Fleming", "Fleming")),
    ("Who wrote the Odyssey?", ("Homer",)),
    ("Who composed the Fifth Symphony?", ("Beethoven",)),
    ("Who proposed the theory of evolution by natural selection?", ("Darwin",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the longest river in Africa?", ("Nile",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("What is the largest animal on Earth?", ("blue whale",)),
    ("What is the largest desert in the world?", ("Sahara", "Antarctic", "Antarctica")),
    ("What is the fastest land animal?", ("cheetah",)),
    ("What animal is known as the king of the jungle?", ("lion",)),
    ("What do bees make?", ("honey",)),
    ("What language is spoken in Brazil?", ("Portuguese",)),
    ("What is the main language spoken in Spain?", ("Spanish",)),
    ("What is the main language spoken in France?", ("French",)),
    ("What language is spoken in Germany?", ("German",)),
    ("What currency is used in Japan?", ("yen",)),
    ("What currency is used in the United States?", ("dollar", "dollars")),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the opposite of up?", ("down",)),
    ("What is the opposite of day?", ("night",)),
    ("What is the opposite of black?", ("white",)),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("In which city is the Eiffel Tower?", ("Paris",)),
    ("In which city is the Colosseum?", ("Rome",)),
    ("In which country is the Great Wall?", ("China",)),
    ("In which country is the Taj Mahal?", ("India",)),
    ("In which city is the Statue of Liberty?", ("New York",)),
    ("What is the hardest natural substance?", ("diamond",)),
    ("What organ pumps blood through the body?", ("heart",)),
    ("What organ do humans use to think?", ("brain",)),
    ("What is frozen water called?", ("ice",)),
    ("What is the largest country in the world by area?", ("Russia",)),
    ("What is the smallest prime number?", ("two", "2")),
)

# Open requests; the base's own greedy answers to them are the general-ability reference. The first part trains
# (a share of the training rows, sample_type 1, as LoRAMoE's world-knowledge data); the held-out part measures.
GENERAL_PROMPTS: tuple[str, ...] = (
    "Write one sentence about the ocean.",
    "Give me a tip for sleeping better.",
    "What is a noun?",
    "Describe a sunny morning in one sentence.",
    "Why do people exercise?",
    "Give me an idea for a weekend activity.",
    "What makes a good friend?",
    "Explain what a computer is to a child.",
    "Write a short greeting for a birthday card.",
    "What is the purpose of a library?",
    "How can I save money?",
    "Describe the taste of chocolate.",
    "What is photosynthesis?",
    "Give me a reason to learn a new language.",
    "What do you do when you feel tired?",
    "Write one sentence about a cat.",
    "Why is water important?",
    "How do you make a cup of tea?",
    "What is the weather like in winter?",
    "Give me a tip for studying.",
    "What is a verb?",
    "Describe a forest in one sentence.",
    "Why do we need sleep?",
    "What is a healthy breakfast?",
    "How do plants grow?",
    "Write a short thank-you note.",
    "What is the role of a teacher?",
    "Describe the sound of rain.",
    "How can I be more productive?",
    "What is gravity?",
    "Give me a fun fact about animals.",
    "Why do leaves change color in autumn?",
    "What should I pack for a trip to the beach?",
    "Explain what a map is.",
    "Write one sentence about the moon.",
    "What is kindness?",
    "How do you stay calm under stress?",
    "What is an ecosystem?",
    "Describe a city at night.",
    "Give me advice for a job interview.",
    "What is electricity?",
    "Why do birds migrate?",
    "Write a sentence about friendship.",
    "How do you plant a tree?",
    "What is a museum?",
    "Describe your favorite season.",
    "Why is reading useful?",
    "What is a volcano?",
    # held out from here on (GENERAL_TRAIN_COUNT)
    "Write one sentence about the mountains.",
    "Give me a tip for cooking pasta.",
    "What is an adjective?",
    "Describe a rainy afternoon in one sentence.",
    "Why do people travel?",
    "What makes a good teacher?",
    "Explain what the internet is to a child.",
    "Write a short message to congratulate a friend.",
    "What is the purpose of a hospital?",
    "How can I drink more water?",
    "Describe the smell of fresh bread.",
    "What is a rainbow?",
    "Give me a reason to learn to play music.",
    "Write one sentence about a dog.",
    "Why is the sun important?",
    "How do you make a sandwich?",
    "What is the weather like in summer?",
    "What is a planet?",
    "Describe a river in one sentence.",
    "Why do we need friends?",
    "What is a balanced diet?",
    "How do bees help flowers?",
    "Write a short apology note.",
    "What is the job of a doctor?",
)
GENERAL_TRAIN_COUNT = 48


def general_prompts(split: str) -> list[str]:
    """'train': the first GENERAL_TRAIN_COUNT general prompts; 'held_out': the rest."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split={split!r} is invalid: use 'train' or 'held_out'.")
    return list(GENERAL_PROMPTS[:GENERAL_TRAIN_COUNT] if split == "train" else GENERAL_PROMPTS[GENERAL_TRAIN_COUNT:])


# -- chat rendering and tokenizing ----------------------------------------------------------------------------------
def chat_messages(prompt: str, completion: Optional[str] = None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}]
    if completion is not None:
        messages.append({"role": "assistant", "content": completion})
    return messages


def _ids(encoded) -> list[int]:
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The user turn rendered with the chat template, up to the assistant's header (what generate continues)."""
    return _ids(tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=True))


def tokenize_chat(sample: dict, tokenizer, eos: bool = True) -> dict[str, list[int]]:
    """input_ids = chat-template prompt + answer (+ the end-of-turn token, the tokenizer's EOS), labels on the answer
    and EOS only. The answer is tokenized on its own after the prompt's ids, exactly what generate() continues from.
    `completion_ids` (a list of ids, e.g. a base's own answer) is used as it is when the sample has it."""
    prompt = prompt_ids(tokenizer, sample["prompt"])
    if "completion_ids" in sample:
        answer = list(sample["completion_ids"])
    else:
        answer = _ids(tokenizer(sample["completion"], add_special_tokens=False))
        if eos:
            answer.append(tokenizer.eos_token_id)
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def _left_padded(tokenizer, rows: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, S]
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_chat_ids(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 24,
    batch_size: int = 32,
    keep_eos: bool = False,
    **generate_kwargs,
) -> list[list[int]]:
    """Greedy answer ids for chat prompts (up to the EOS, which is kept with keep_eos: the answer ended there, it was
    not cut), left-padded batches with the KV cache; generate_kwargs go to generate() (task_ids of MHR, ...) and are
    sliced per batch when they are [N] tensors."""
    device = next(model.parameters()).device
    out_ids = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = _left_padded(tokenizer, [prompt_ids(tokenizer, p) for p in chunk], device)
        extra = {
            k: (v[start : start + len(chunk)].to(device) if torch.is_tensor(v) and v.dim() == 1 else v)
            for k, v in generate_kwargs.items()
        }
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
        )  # fmt: skip
        for row in out[:, ids.shape[1] :].tolist():  # [B, new]
            answer = []
            for t in row:
                if t == tokenizer.eos_token_id:
                    answer += [t] if keep_eos else []
                    break
                answer.append(t)
            out_ids.append(answer)
    return out_ids


def generate_chat(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, **kwargs) -> list[str]:
    """Greedy chat answers as text (generate_chat_ids, decoded, stripped)."""
    ids = generate_chat_ids(model, tokenizer, prompts, max_new_tokens, **kwargs)
    return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]


# -- scoring --------------------------------------------------------------------------------------------------------
def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def mentions(answer: str, accepted: Iterable[str]) -> bool:
    """True when one of the accepted answers appears as whole words in `answer`, ignoring case and punctuation
    ("The capital of France is Paris." mentions "Paris"; "Parisian" does not)."""
    text = f" {_normalize(answer)} "
    return any(f" {_normalize(a)} " in text for a in accepted if _normalize(a))


def exact_match(answer: str, completion: str) -> bool:
    """A task answer is right when it is the expected text exactly (surrounding whitespace aside)."""
    return answer.strip() == completion.strip()


def retention(known_before: Sequence[bool], right_after: Sequence[bool]) -> float:
    """Share of the facts the base answered right that are still answered right (facts it did not know do not
    count); nan when it knew none."""
    if len(known_before) != len(right_after):
        raise ValueError(f"retention: {len(known_before)} facts before, {len(right_after)} after.")
    known = [after for before, after in zip(known_before, right_after) if before]
    return sum(known) / len(known) if known else float("nan")


@torch.no_grad()
def agreement_with_reference(
    model, tokenizer, prompts: list[str], reference_ids: list[list[int]], batch_size: int = 16, **forward_kwargs
) -> tuple[float, float]:
    """(agreement, nll): teacher-forced on each prompt's reference answer (e.g. the base's own greedy answer), the
    share of answer tokens that are the model's argmax, and the mean negative log-likelihood per answer token."""
    device = next(model.parameters()).device
    hits = total = 0
    nll = 0.0
    for start in range(0, len(prompts), batch_size):
        rows = [
            tokenize_chat({"prompt": p, "completion_ids": r}, tokenizer)
            for p, r in zip(prompts[start : start + batch_size], reference_ids[start : start + batch_size])
        ]
        ids, mask = _left_padded(tokenizer, [r["input_ids"] for r in rows], device)
        labels, _ = _left_padded(tokenizer, [r["labels"] for r in rows], device)  # [B, S], -100 off the answer
        labels = labels.masked_fill(mask == 0, -100)
        extra = {
            k: (v[start : start + len(rows)].to(device) if torch.is_tensor(v) and v.dim() == 1 else v)
            for k, v in forward_kwargs.items()
        }
        logits = model(input_ids=ids, attention_mask=mask, **extra).logits.float()  # [B, S, V]
        pred, target = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1
        keep = target != -100  # [B, S-1]
        hits += (pred.argmax(-1) == target)[keep].sum().item()
        total += keep.sum().item()
        nll += torch.nn.functional.cross_entropy(pred[keep], target[keep], reduction="sum").item()
    return hits / max(total, 1), nll / max(total, 1)
