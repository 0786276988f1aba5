"""Loading exports in a process that never imports moe_peft: plain transformers for merged and sparse-MoE
checkpoints, plain PEFT for LoRA adapters. One subprocess runs a list of jobs (imports dominate its time)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM

    jobs = torch.load(sys.argv[1])
    results = {}
    for job in jobs:
        if job["kind"] == "lora":
            from peft import PeftModel
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(job["base"]), job["path"])
        else:
            model = AutoModelForCausalLM.from_pretrained(job["path"])
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=job["input_ids"], attention_mask=job["attention_mask"]).logits
            tokens = model.generate(
                input_ids=job["input_ids"], attention_mask=job["attention_mask"], max_new_tokens=job["new_tokens"],
                do_sample=False, pad_token_id=0,
            )
        results[job["path"]] = {"logits": logits, "tokens": tokens, "class": type(model).__name__}
    assert "moe_peft" not in sys.modules, "a plain load imported moe_peft"
    torch.save(results, sys.argv[2])
    print("FRESH-OK")
    """
)


def left_padded(ids: torch.Tensor, pad: int = 0) -> dict[str, torch.Tensor]:
    """Make the first row shorter by 3 tokens of left padding (generation batches are left-padded)."""
    ids = ids.clone()
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = pad, 0
    return {"input_ids": ids, "attention_mask": mask}


def load_fresh(tmp_path, jobs: list[dict]) -> dict:
    """Run `jobs` (kind "full" or "lora", path, base for lora, input_ids, attention_mask, new_tokens) in a fresh
    Python; returns {path: {"logits", "tokens", "class"}}."""
    script, data, out = tmp_path / "fresh_load.py", tmp_path / "jobs.pt", tmp_path / "fresh_results.pt"
    script.write_text(SCRIPT)
    torch.save([{"new_tokens": 6, **job, "path": str(job["path"])} for job in jobs], data)
    result = subprocess.run(
        [sys.executable, str(script), str(data), str(out)], capture_output=True, text=True, timeout=600
    )
    assert "FRESH-OK" in result.stdout, result.stderr[-3000:]
    return torch.load(out)


@torch.no_grad()
def routed_outputs(model, inputs: dict, new_tokens: int = 6, **extra) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits = model(**inputs, **extra).logits
    tokens = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
    return logits, tokens
