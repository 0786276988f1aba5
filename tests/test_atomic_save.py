"""save_pretrained of a moe-peft adapter (and a PHATGOOSE gate file) never leaves a directory that a loader accepts
but that holds a half-written or mismatched adapter: interrupted at every stage, the directory holds the complete old
adapter or no loadable adapter at all; completed, the new one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

import moe_peft
from moe_peft import _atomic_save
from moe_peft.bases import tiny_llama

from .conftest import MLP, VOCAB, randomize_experts

CONFIGS = {
    "mole": lambda: moe_peft.MoLEConfig(r=4, num_experts=4, target_modules=MLP),
    "smora": lambda: moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP),
    "mhr": lambda: moe_peft.MHRConfig(r=4, n_tasks=2, n_skills=2, target_modules=MLP),
}


def _base():
    return tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)


def _model(method, seed):
    torch.manual_seed(seed)
    model = get_peft_model(_base(), CONFIGS[method]())
    randomize_experts(model, seed=seed)
    return model


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _loaded(path) -> dict[str, torch.Tensor]:
    return _weights(PeftModel.from_pretrained(_base(), path))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("stage", ["weights", "config", "publish_weights", "publish_config"])
def test_an_interrupted_save_leaves_the_old_adapter_or_none(method, stage, tmp_path, monkeypatch):
    old, new = _model(method, 1), _model(method, 2)
    dest = tmp_path / "adapter"
    old.save_pretrained(dest)
    (dest / "optimizer.pt").write_bytes(b"kept")  # a Trainer checkpoint's other files stay
    assert _same(_loaded(dest), _weights(old))

    if stage == "weights":  # PEFT writes half a weights file, then the process dies

        def partial(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"\x00" * 64)
            raise Crash

        monkeypatch.setattr("peft.peft_model.safe_save_file", partial)
    elif stage == "config":  # weights written, the config write dies
        monkeypatch.setattr(
            type(new.peft_config["default"]), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(Crash())
        )
    else:
        original = os.replace
        target = "adapter_model.safetensors" if stage == "publish_weights" else "adapter_config.json"

        def replace(src, dst):
            if os.path.basename(dst) == target:
                raise Crash
            return original(src, dst)

        monkeypatch.setattr(_atomic_save.os, "replace", replace)
    with pytest.raises(Crash):
        new.save_pretrained(dest)
    monkeypatch.undo()

    assert (dest / "optimizer.pt").read_bytes() == b"kept"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".adapter.tmp-")]  # the temporary sibling is gone
    if stage in ("weights", "config"):  # died while writing the temporary copy: the old adapter is untouched
        assert _same(_loaded(dest), _weights(old))
    else:  # died while publishing: the config is withdrawn, so no loader accepts the directory
        assert not (dest / "adapter_config.json").exists()
        with pytest.raises(ValueError):
            PeftModel.from_pretrained(_base(), dest)
    new.save_pretrained(dest)  # a completed save gives the new adapter, whatever came before
    assert _same(_loaded(dest), _weights(new))


def test_every_adapter_of_a_multi_adapter_model_is_published(tmp_path):
    model = _model("mole", 1)
    model.add_adapter("other", CONFIGS["mole"]())
    randomize_experts(model, seed=3)
    model.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both" / "adapter_config.json").exists()
    assert (tmp_path / "both" / "other" / "adapter_config.json").exists()
    assert (tmp_path / "both" / "other" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("writer", ["export_task_lora", "save_adapters"])
def test_plain_lora_adapters_written_by_moe_peft_are_published_whole(writer, tmp_path, monkeypatch):
    """MHR's task export and multi_lora.save_adapters write PEFT LoRA adapters (PEFT's own save is not atomic):
    a write that dies leaves the previous adapter, loadable and unchanged."""
    from moe_peft.mhr import convert
    from peft import LoraConfig

    from moe_peft import multi_lora

    if writer == "export_task_lora":
        model = _model("mhr", 1)
        dest = tmp_path / "lora"

        def write(task):
            convert.export_task_lora(model, task, dest)

        monkeypath, staged = "moe_peft.tuners.mhr.convert.save_file", dest  # the directory that is staged
    else:
        model = get_peft_model(_base(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        dest = tmp_path / "b"

        def write(task):
            with torch.no_grad():  # a different adapter per call
                for n, p in model.named_parameters():
                    if ".b." in n:
                        p.fill_(float(task + 1))
            multi_lora.save_adapters(model, str(tmp_path), adapters=["b"])

        monkeypath, staged = "peft.peft_model.safe_save_file", tmp_path  # PEFT writes <root>/b
    write(0)
    before = load_weights(dest)

    def partial(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 64)
        raise Crash

    monkeypatch.setattr(monkeypath, partial)
    with pytest.raises(Crash):
        write(1)
    monkeypatch.undo()
    assert (dest / "adapter_config.json").exists()
    assert _same(load_weights(dest), before)  # the previous adapter, whole
    assert not [p for p in os.listdir(staged.parent) if p.startswith(f".{staged.name}.tmp-")]  # no leftovers
    write(1)
    assert not _same(load_weights(dest), before)  # a completed write replaces it


def load_weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def test_the_gate_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from moe_peft.phatgoose import GATES_FILE, load_gates, save_gates

    old = {"a": torch.ones(4)}
    save_gates(old, tmp_path)
    monkeypatch.setattr("moe_peft.tuners.phatgoose.gates.save", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        save_gates({"a": torch.zeros(4)}, tmp_path)
    monkeypatch.undo()
    assert torch.equal(load_gates(tmp_path)["a"], old["a"])
    assert os.listdir(tmp_path) == [GATES_FILE]


KILLED = textwrap.dedent(
    """
    import json, os, signal, sys, time, torch, moe_peft
    from peft import get_peft_model
    from safetensors.torch import load_file
    from moe_peft.bases import tiny_llama
    torch.set_num_threads(1)
    dest = sys.argv[1]
    # a larger adapter so that a save takes a while; every weight of save i equals i
    model = get_peft_model(tiny_llama(vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=4),
                           moe_peft.MoLEConfig(r=64, num_experts=8, target_modules=["gate_proj", "up_proj", "down_proj"]))
    params = [p for n, p in model.named_parameters() if "mole_" in n]
    for trial in range(12):  # one import, then 12 forked savers, each SIGKILLed at its own moment
        pid = os.fork()
        if pid == 0:
            for i in range(1000 * trial + 1, 1000 * trial + 1000):
                with torch.no_grad():
                    for p in params:
                        p.fill_(float(i))
                model.save_pretrained(dest)
            os._exit(0)
        time.sleep(0.1 + 0.08 * trial)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        parent = os.path.dirname(dest)
        report = {"mid_save": any(n.startswith(".adapter.tmp-") for n in os.listdir(parent))}
        report["loadable"] = os.path.exists(os.path.join(dest, "adapter_config.json"))
        if report["loadable"]:  # a complete file (load_file raises on a truncated one) of one save
            weights = load_file(os.path.join(dest, "adapter_model.safetensors"))
            report["values"] = sorted({float(x) for k, v in weights.items() if "router" not in k for x in v.unique()})
        for n in os.listdir(parent):  # what a killed save leaves: its hidden temporary sibling only
            if n.startswith(".adapter.tmp-"):
                os.system(f"rm -rf '{os.path.join(parent, n)}'")
        print(json.dumps(report), flush=True)
    """
)


def test_a_process_killed_at_random_moments_leaves_a_complete_adapter_or_none(tmp_path):
    """SIGKILL savers that save in a loop, at 12 moments: what a loader accepts is always one whole save."""
    script = tmp_path / "saver.py"
    script.write_text(KILLED)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "adapter")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(reports) == 12
    assert sum(r["mid_save"] for r in reports) >= 6  # the kills did land inside saves
    assert any(r["loadable"] for r in reports)
    for r in reports:
        if r["loadable"]:
            assert len(r["values"]) == 1, r  # every weight from one and the same save
