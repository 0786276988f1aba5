"""The examples run end to end (in their --quick form: tiny step counts, meaningless numbers)."""

from __future__ import annotations

import importlib.util
import pathlib

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
