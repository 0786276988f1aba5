"""What moe-peft writes is readable as the umask allows: every atomic write (exports, moe-peft adapters'
save_pretrained, PHATGOOSE gate files, multi_lora.save_adapters) gives its files and directories the modes a plain
`open(path, "w")` / `os.makedirs` gives under the same umask, not the private modes of its temporary files; a file
that replaces an existing one keeps that file's mode, as writing over it in place does."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from peft import get_peft_model

import moe_peft
from moe_peft import multi_lora
from moe_peft.bases import tiny_llama
from moe_peft.tuners.phatgoose.gates import save_gates

from .conftest import MLP, VOCAB


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _plain_modes(where) -> tuple[int, int]:
    """The oracle: the modes the kernel gives a new file and directory under the current umask."""
    os.makedirs(where / "plain_dir")
    with open(where / "plain_file", "w") as f:
        f.write("x")
    return _mode(where / "plain_file"), _mode(where / "plain_dir")


def _modes(root) -> dict[str, int]:
    """{path relative to root (directories end with /): mode} of root and everything under it."""
    out = {"./": _mode(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = _mode(os.path.join(dirpath, name))
        for name in filenames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = _mode(os.path.join(dirpath, name))
    return out


def _assert_plain(root, file_mode: int, dir_mode: int) -> None:
    modes = _modes(root)
    assert len(modes) > 1, f"{root} is empty"
    want = {path: dir_mode if path.endswith("/") else file_mode for path in modes}
    assert {p: oct(m) for p, m in modes.items()} == {p: oct(m) for p, m in want.items()}


def _model():
    base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
    return get_peft_model(base, moe_peft.MoLEConfig(r=2, num_experts=2, target_modules=MLP, task_type="CAUSAL_LM"))


def test_exports_and_adapters_get_the_modes_of_a_plain_write(umask, tmp_path):
    file_mode, dir_mode = _plain_modes(tmp_path)
    assert (file_mode, dir_mode) == (0o666 & ~umask, 0o777 & ~umask)  # the oracle is what the umask says

    model = _model()
    model.save_pretrained(tmp_path / "adapter")  # a moe-peft adapter: atomic_saves -> staged_adapter/publish
    _assert_plain(tmp_path / "adapter", file_mode, dir_mode)

    one_expert = get_peft_model(
        tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0),
        moe_peft.MoLEConfig(r=2, num_experts=1, target_modules=MLP, task_type="CAUSAL_LM"),
    )
    moe_peft.export(one_expert, "merge", tmp_path / "merged", measure_error=False, verbose=False)  # atomic_directory
    assert (tmp_path / "merged" / "moe_peft_export.json").exists()  # write_json's file is covered too
    _assert_plain(tmp_path / "merged", file_mode, dir_mode)

    save_gates({"model.layers.0.mlp.up_proj": torch.zeros(32)}, tmp_path / "gates")  # atomic_file
    _assert_plain(tmp_path / "gates", file_mode, dir_mode)

    model.add_adapter("second", moe_peft.MoLEConfig(r=2, num_experts=2, target_modules=MLP, task_type="CAUSAL_LM"))
    multi_lora.save_adapters(model, str(tmp_path / "many"))
    assert sorted(os.listdir(tmp_path / "many")) == ["README.md", "default", "second"]
    _assert_plain(tmp_path / "many", file_mode, dir_mode)

    mhr = get_peft_model(
        tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0),
        moe_peft.MHRConfig(r=2, n_tasks=2, n_skills=2, target_modules=MLP),
    )
    moe_peft.mhr.export_task_lora(mhr, 1, tmp_path / "task_lora")  # a plain LoRA through staged_adapter
    _assert_plain(tmp_path / "task_lora", file_mode, dir_mode)


def test_a_replaced_file_keeps_its_mode(umask, tmp_path):
    """Saving over an existing adapter or gate file keeps the mode its owner gave it (as an in-place write would);
    files that are new there get the plain mode."""
    file_mode, _ = _plain_modes(tmp_path)
    model = _model()
    model.save_pretrained(tmp_path / "adapter")
    weights, config, card = (tmp_path / "adapter" / n for n in ("adapter_model.safetensors", "adapter_config.json",
                                                                 "README.md"))  # fmt: skip
    os.chmod(weights, 0o604)
    os.chmod(config, 0o640)
    card.unlink()
    model.save_pretrained(tmp_path / "adapter")
    assert (_mode(weights), _mode(config), _mode(card)) == (0o604, 0o640, file_mode)

    gates = save_gates({"model.layers.0.mlp.up_proj": torch.zeros(32)}, tmp_path / "gates")
    os.chmod(gates, 0o640)
    save_gates({"model.layers.0.mlp.up_proj": torch.ones(32)}, tmp_path / "gates")
    assert _mode(gates) == 0o640
