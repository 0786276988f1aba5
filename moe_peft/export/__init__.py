"""Deploy trained adapters: exact merges, native sparse-MoE checkpoints, and measured approximations.

    moe_peft.export(model, strategy="merge", out="out/merged")              # exact, where routing is fixed
    moe_peft.export(model, strategy="native_moe", out="out/mixtral")       # exact: top-1 block MoLE -> Mixtral
    moe_peft.export(model, strategy="svd", out="out/lora", tokenizer=tok)  # one LoRA, error measured
    moe-peft merge ADAPTER --strategy svd --out DIR [--base PATH_OR_ID] [--calibration FILE] [--merge]

parts.py reads what an adapted model is made of; plain.py builds the plain model and merges into it; native.py
writes Mixtral / Qwen-MoE checkpoints; approximate.py turns routed layers into one LoRA; lora.py writes plain PEFT
LoRA adapters; calibration.py and measure.py load the calibration rows and measure the error; api.py is `export`;
cli.py is `moe-peft merge`.
"""

from ..tuners.routed.merge_hint import merge_hint
from .api import EXACT, RECORD_FILE, STRATEGIES, ExportResult, export
from .native import NativeMoEError

__all__ = ["EXACT", "RECORD_FILE", "STRATEGIES", "ExportResult", "NativeMoEError", "export", "merge_hint"]
