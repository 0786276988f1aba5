"""Adapters saved by earlier releases reload to the logits they gave when saved, in a fresh process.

tests/fixtures/release-<version>/ holds one tiny adapter per method and routing variant, the bases under them, and
their logits, written by that release's own code (tests/fixtures/make_release_fixtures.py). A moved module, a
renamed attribute or a changed default that would make an old adapter load differently fails here."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
RELEASES = sorted(p.name for p in FIXTURES.glob("release-*") if p.is_dir())

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, warnings
    warnings.simplefilter("error", DeprecationWarning)  # a reload must not go through a deprecated path of ours
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="(?!moe_peft)")
    import moe_peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = sys.argv[1]
    manifest = json.load(open(f"{root}/manifest.json"))
    saved = torch.load(f"{root}/logits.pt")
    batch, out = saved["inputs"], {}
    for name, kind in manifest["bases"].items():
        base = AutoModelForCausalLM.from_pretrained(f"{root}/bases/{kind}")
        model = PeftModel.from_pretrained(base, f"{root}/{name}").eval()
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if name in ("mhr", "phatgoose"):
            kwargs["task_ids"] = batch["task_ids"]
        with torch.no_grad():
            out[name] = model(**kwargs).logits
    torch.save(out, sys.argv[2])
    print("FRESH-OK")
    """
)


@pytest.mark.parametrize("release", RELEASES)
def test_saved_adapters_of_a_release_reload_to_their_logits(release, tmp_path):
    root = FIXTURES / release
    script, out = tmp_path / "reload.py", tmp_path / "logits.pt"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(root), str(out)], capture_output=True, text=True)
    assert "FRESH-OK" in result.stdout, result.stderr[-3000:]
    want, got = torch.load(root / "logits.pt")["logits"], torch.load(out)
    assert set(got) == set(want) and len(want) == 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def test_the_fixtures_are_not_trivial():
    """Each fixture's adapter changes the base's logits, so a reload that dropped its weights would show."""
    root = FIXTURES / RELEASES[-1]
    saved = torch.load(root / "logits.pt")
    import json

    from transformers import AutoModelForCausalLM

    kinds = json.loads((root / "manifest.json").read_text())["bases"]
    bases = {k: AutoModelForCausalLM.from_pretrained(root / "bases" / k).eval() for k in set(kinds.values())}
    inputs = {k: saved["inputs"][k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        plain = {k: m(**inputs).logits for k, m in bases.items()}
    for name, logits in saved["logits"].items():
        assert (logits - plain[kinds[name]]).abs().max() > 1e-2, name
