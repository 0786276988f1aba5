"""Data: the bundled synthetic tasks (bundled.py), the loader for your own rows (user.py: JSON, JSONL, CSV,
`datasets`), and the scoring of answers to the bundled tasks (answers.py).

It uses nothing of the tuners: every capability and application above may use it.
"""

from .answers import exact_match_by_task, generate_answers
from .bundled import (
    DEFAULT_TASKS,
    KNOWLEDGE_TASKS,
    TASKS,
    CharTokenizer,
    Collator,
    make_dataset,
    make_samples,
    tokenize_rows,
    tokenize_sample,
)
from .user import DataConfig, DataError, UserData, load_data, tokenize_example

__all__ = [
    "TASKS",
    "KNOWLEDGE_TASKS",
    "DEFAULT_TASKS",
    "CharTokenizer",
    "Collator",
    "make_samples",
    "make_dataset",
    "tokenize_sample",
    "tokenize_rows",
    "generate_answers",
    "exact_match_by_task",
    "DataConfig",
    "DataError",
    "UserData",
    "load_data",
    "tokenize_example",
]
