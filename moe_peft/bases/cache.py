"""Where moe-peft keeps what it builds or fetches once: the tiny bases trained for `moe-peft train`, the real bases
converted from GGUF (real.py), the quality suites' references."""

from __future__ import annotations

import os


def cache_root() -> str:
    """$MOE_PEFT_CACHE, else ~/.cache/moe_peft."""
    return os.environ.get("MOE_PEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moe_peft")
