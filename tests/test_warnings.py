"""Warnings: what is moe-peft's to avoid stays avoided; the upstream ones are listed in docs/reliability.md ("Warnings
you may see"). Each test here fails if the noise it guards against comes back from moe-peft's own code."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moe_peft"


def test_moe_peft_never_imports_bitsandbytes_when_imported():
    """bitsandbytes prints "Failed to load CPU gemm_4bit_forward from kernels-community" when imported on some CPUs.
    PEFT imports it (peft/helpers.py) whenever it is installed; moe-peft itself must import it only where a quantized
    layer needs it. Records the module behind every import of bitsandbytes during `import moe_peft`."""
    code = (
        "import builtins, sys\n"
        "importers = set()\n"
        "real = builtins.__import__\n"
        "def spy(name, globals=None, *args, **kwargs):\n"
        "    if name.split('.')[0] == 'bitsandbytes':\n"
        "        importers.add((globals or {}).get('__name__', '?'))\n"
        "    return real(name, globals, *args, **kwargs)\n"
        "builtins.__import__ = spy\n"
        "import moe_peft, moe_peft.train, moe_peft.export, moe_peft.apps.cli\n"
        "print(sorted(importers))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    importers = eval(out.stdout.strip().splitlines()[-1])
    assert not [m for m in importers if m.split(".")[0] == "moe_peft"], importers


def test_moe_peft_code_never_reads_the_deprecated_is_gradient_checkpointing():
    """transformers 5 warns on `model.is_gradient_checkpointing`; PEFT's PeftModel still reads it (upstream), our code
    must use is_activation_checkpointing."""
    import re

    access = re.compile(r"\.is_gradient_checkpointing\b|[\"']is_gradient_checkpointing[\"']")  # attribute or getattr
    hits = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in PACKAGE.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), start=1)
        if access.search(line)
    ]
    assert not hits, hits


def test_a_trained_adapter_reloads_without_a_hub_lookup_for_its_tokenizer(tmp_path, monkeypatch):
    """AutoPeftModelForCausalLM asks the Hub for tokenizer_config.json when none is beside the adapter (and warns
    "Unable to fetch remote file" offline); `moe-peft train` saves the tokenizer with the adapter. The adapter is
    reloaded by a relative path, which could be a hub id, as a user would type it."""
    import peft.auto
    from peft import AutoPeftModelForCausalLM, get_peft_model
    from transformers import AutoModelForCausalLM

    import moe_peft
    from moe_peft.bases import char_tokenizer, tiny_llama
    from moe_peft.train.run import _save_adapter

    monkeypatch.chdir(tmp_path)
    tokenizer = char_tokenizer()
    tiny_llama(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48).save_pretrained("base")
    config = moe_peft.MoLEConfig(r=2, num_experts=2, top_k=1, target_modules=["down_proj"], task_type="CAUSAL_LM")
    _save_adapter(get_peft_model(AutoModelForCausalLM.from_pretrained("base"), config), tokenizer, [], "run/adapter")
    asked = []
    monkeypatch.setattr(peft.auto, "check_file_exists_on_hf_hub", lambda *a, **k: asked.append(a) or None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AutoPeftModelForCausalLM.from_pretrained("run/adapter")
    assert not asked and not [w for w in caught if "Unable to fetch remote file" in str(w.message)]


def test_the_cli_filters_only_the_upstream_notices_by_message():
    """`moe-peft train` used to ignore every FutureWarning: a deprecated key of the user's YAML went unseen."""
    from moe_peft.apps.cli import _quiet_library_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_library_warnings()
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
            "instead.",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
        warnings.warn("`some_option` is deprecated: use `other_option`.", FutureWarning, stacklevel=1)  # a YAML key
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`some_option` is deprecated: use `other_option`.", "something else"]


@pytest.mark.parametrize("notice", ["is_gradient_checkpointing", "gradient_checkpointing"])
def test_the_filtered_notices_are_the_ones_the_libraries_print(notice):
    """The filters match what the installed transformers prints (a reworded notice would slip through unseen here
    rather than in a user's terminal)."""
    import re

    import transformers.modeling_utils
    import transformers.training_args

    from moe_peft.apps.cli import UPSTREAM_NOTICES

    source = pathlib.Path(
        (transformers.modeling_utils if notice.startswith("is_") else transformers.training_args).__file__
    ).read_text()
    printed = "`is_gradient_checkpointing` is deprecated" if notice.startswith("is_") else "`{old}` is deprecated"
    if printed not in source:
        pytest.skip(f"this transformers does not print the {notice} notice")
    text = printed.replace("{old}", "gradient_checkpointing")
    assert any(re.match(pattern, text) for _, pattern in UPSTREAM_NOTICES), text
