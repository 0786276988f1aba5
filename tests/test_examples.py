"""The examples run end to end (in their --quick form: tiny step counts, meaningless numbers)."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phatgoose_example_runs_and_its_library_reloads(tmp_path):
    example = load_example("phatgoose_zero_shot")
    threads = torch.get_num_threads()
    try:  # one thread: the fastest for tiny matrices, and it does not fight other processes for the cores
        result = example.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    assert {"uniform merge of the experts", "PHATGOOSE top-2", "oracle expert per task"} <= set(rows)
    assert rows["oracle expert per task"]["own expert"] == 1.0  # the oracle always picks the task's own expert
    assert abs(rows["uniform merge of the experts"]["own expert"] - 1.0) < 1e-6  # uniform mixes every expert
    assert all(0.0 <= v <= 1.0 for cells in rows.values() for v in cells.values())
    for task in example.EXPERT_TASKS:
        assert (tmp_path / "experts" / task / "phatgoose_gates.safetensors").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "library")
    assert reloaded.peft_config["default"].experts == list(example.EXPERT_TASKS)


QUICK_MIXTRAL = ["--pretrain-steps", "20", "--steps", "6", "--train-samples", "96", "--eval-samples", "8"]


def _run_mixtral(tmp_path, *extra, example=None):
    example = example or load_example("finetune_mixtral")
    threads = torch.get_num_threads()
    try:
        return example.main(QUICK_MIXTRAL + ["--batch-size", "8", "--out", str(tmp_path), *extra])
    finally:
        torch.set_num_threads(threads)


def test_finetune_mixtral_example_runs_saves_and_reloads(tmp_path):
    result = _run_mixtral(tmp_path)
    assert result["reload_identical"]
    assert len(result["losses"]) == 6 and all(math.isfinite(x) for x in result["losses"])
    assert set(result["acc_after"]) == {"rev", "srt", "sft", "alt"}
    assert len(result["base_load"]) == 4  # every MoE layer of the tiny Mixtral: its experts carry the adapter
    for table in (result["mole_load"], result["base_load"]):
        for per_task in table.values():
            assert all(abs(sum(load) - 1.0) < 1e-5 for load in per_task.values())
    assert (tmp_path / "adapter" / "experts" / "adapter_model.safetensors").exists()


def test_finetune_mixtral_example_with_roma_on_the_routers(tmp_path, monkeypatch):
    import functools

    example = load_example("finetune_mixtral")
    # a 20-step base answers nothing right, and RoMA needs successful samples: flag every other one as successful
    flags = [i % 2 == 0 for i in range(96)]
    monkeypatch.setattr(example, "build_reference", functools.partial(example.build_reference, success=flags))
    result = _run_mixtral(tmp_path, "--roma", example=example)
    assert result["reload_identical"]  # both adapters reload: the routers and the experts
    assert (tmp_path / "roma_adapter" / "adapter_model.safetensors").exists()


def test_finetune_mixtral_example_in_4bit_with_gradient_checkpointing(tmp_path):
    pytest.importorskip("bitsandbytes")
    result = _run_mixtral(tmp_path, "--load-in-4bit", "--gradient-checkpointing")
    assert result["reload_identical"] and all(math.isfinite(x) for x in result["losses"])


def test_multi_adapter_serving_example_trains_saves_and_serves_a_mixed_batch(tmp_path):
    example = load_example("multi_adapter_serving")
    threads = torch.get_num_threads()
    try:
        result = example.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert len(result["answers"]) == len(result["names"]) == 8
    assert set(result["names"]) <= set(example.ADAPTERS) | {"__base__"} and len(set(result["names"])) > 2
    assert result["same_as_peft"]  # the op's answers are PEFT's own mixed-batch answers
    for adapter in example.ADAPTERS:  # each fine-tune in its own directory, loadable alone by plain PEFT
        reloaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapters" / adapter
        )
        assert reloaded.peft_config["default"].r == 8


def test_deploy_example_exports_every_way_and_the_native_checkpoint_loads_without_moe_peft(tmp_path):
    example = load_example("deploy_export")
    threads = torch.get_num_threads()
    try:
        result = example.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    assert set(rows) == {"native_moe", "average", "routing_weighted", "svd", "svd rank 32"}
    assert rows["native_moe"]["exact"] and rows["native_moe"]["measured_error"]["kl_mean"] < 1e-9
    assert all(not rows[k]["exact"] and rows[k]["measured_error"]["kl_mean"] > 0 for k in rows if k != "native_moe")
    assert result["fresh_class"] == "MixtralForCausalLM" and result["fresh_same_tokens"]
    assert result["fresh_max_diff"] < 1e-4 and result["refused"] is None
    try:  # MoLE's default router bias, trained: native_moe refuses it and says so, the approximations still run
        biased = example.main(["--quick", "--router-bias", "--out", str(tmp_path / "biased")])
    finally:
        torch.set_num_threads(threads)
    assert "router_bias=True" in biased["refused"] and "native_moe" not in biased["rows"]
    assert set(biased["rows"]) == {"average", "routing_weighted", "svd", "svd rank 32"}
