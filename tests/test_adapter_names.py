"""An adapter reloads to the same logits under any adapter name, for every tuner and key layout.

A saved adapter's keys hold no adapter name (PEFT's convention): 0.1 kept it in the router keys
(`...mole_router.default.linear.weight`, a module inside a ModuleDict keyed by the name), so loading under another
name (`PeftModel.from_pretrained(..., adapter_name="x")`, `load_adapter`, an adapter of `multi_lora.save_adapters` not
called "default") kept freshly initialised routers. Reloads run in one fresh process for all cases: adapters saved
under a non-default name now, the release-0.1.0 fixtures (saved under "default"), and 0.1 files saved under another
name (the fixtures with their routers' keys renamed as 0.1 wrote them for "math").
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_peft

FIXTURES = Path(__file__).parent / "fixtures" / "release-0.1.0"
MLP = ["gate_proj", "up_proj", "down_proj"]
TASK_IDS = ("mhr", "phatgoose")  # the forward takes task_ids


def configs() -> dict:
    """{case: (base kind, config)}: every tuner and key layout (block and linear routers, null experts, SMoRA's bias
    buffers, MHR's task router, PHATGOOSE's gates, RoMA, MoLE on fused experts)."""
    return {
        "mole_block": ("llama", moe_peft.MoLEConfig(r=4, num_experts=4, top_k=1, target_modules=MLP)),
        "mole_linear": (
            "llama",
            moe_peft.MoLEConfig(
                r=4, num_experts=4, top_k=2, router_granularity="linear", target_modules=MLP + ["q_proj", "v_proj"]
            ),
        ),
        "mole_null": (
            "llama",
            moe_peft.MoLEConfig(r=4, num_experts=4, top_k=2, num_null_experts=2, target_modules=MLP),
        ),
        "loramoe": ("llama", moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=MLP)),
        "smora": ("llama", moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP)),
        "mhr": ("llama", moe_peft.MHRConfig(r=4, n_tasks=4, n_skills=2, n_splits=2, target_modules=MLP)),
        "phatgoose": ("llama", moe_peft.PhatgooseConfig(experts=["e0", "e1", "e2"], r=4, top_k=2, target_modules=MLP)),
        "experts": (
            "mixtral",
            moe_peft.MoLEConfig(
                r=4,
                num_experts=4,
                target_modules=["q_proj", "v_proj"],
                target_parameters=["experts.gate_up_proj", "experts.down_proj"],
            ),
        ),
        "roma": ("mixtral", moe_peft.RoMAConfig(num_last_layers=None)),
    }


ROUTED = ("mole_block", "mole_linear", "mole_null", "loramoe", "smora", "experts")


def _base(kind: str):
    return AutoModelForCausalLM.from_pretrained(FIXTURES / "bases" / kind)


@torch.no_grad()
def _randomize(model, seed: int) -> None:
    """Every trainable tensor and SMoRA's selection biases random, so that each one a reload misses shows."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    for name, b in model.named_buffers():
        if "selection_bias" in name:
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)


def _inputs(case: str) -> dict:
    batch = torch.load(FIXTURES / "logits.pt")["inputs"]
    keep = ("input_ids", "attention_mask", "task_ids") if case in TASK_IDS else ("input_ids", "attention_mask")
    return {k: batch[k] for k in keep}


@torch.no_grad()
def _logits(model, case: str) -> torch.Tensor:
    return model.eval()(**_inputs(case)).logits


SCRIPT = textwrap.dedent(
    """
    import sys, warnings, torch
    import moe_peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    jobs, results = torch.load(sys.argv[1]), []
    for job in jobs:
        base = lambda: AutoModelForCausalLM.from_pretrained(job["base"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # under another name than the file was saved under
            x = PeftModel.from_pretrained(base(), job["path"], adapter_name="x").eval()
            # next to a "default" adapter (the same file under its usual name)
            both = PeftModel.from_pretrained(base(), job["path"]).eval()
            loaded = both.load_adapter(job["path"], adapter_name="other")
        with torch.no_grad():
            out = {"x": x(**job["inputs"]).logits}
            both.set_adapter("other")
            out["other"] = both(**job["inputs"]).logits
            both.set_adapter("default")
            out["default"] = both(**job["inputs"]).logits
        # PEFT lists the missing keys with "other" anywhere in them; the other adapter's own are those with the part
        out["load_adapter"] = ([k for k in loaded.missing_keys if "other" in k.split(".")], list(loaded.unexpected_keys))
        out["warnings"] = [str(w.message) for w in caught if "missing" in str(w.message) or "match no" in str(w.message)]
        results.append(out)
    torch.save(results, sys.argv[2])
    print("FRESH-OK")
    """
)


def _reload_fresh(tmp_path: Path, jobs: list[dict]) -> list[dict]:
    script, data, out = tmp_path / "reload.py", tmp_path / "jobs.pt", tmp_path / "results.pt"
    script.write_text(SCRIPT)
    torch.save([{**j, "path": str(j["path"]), "base": str(j["base"])} for j in jobs], data)
    result = subprocess.run(
        [sys.executable, str(script), str(data), str(out)], capture_output=True, text=True, timeout=600
    )
    assert "FRESH-OK" in result.stdout, result.stderr[-3000:]
    return torch.load(out)


def _as_saved_by_0_1_under(src: Path, dest: Path, name: str) -> Path:
    """A copy of a 0.1.0 fixture (saved under "default") as 0.1.0 wrote it for an adapter called `name`: the name
    stays in the router keys (`<attr>.default.<rest>`), PEFT removed it from the others."""
    weights = load_file(src / "adapter_model.safetensors")
    renamed = {k.replace("_router.default.", f"_router.{name}."): v for k, v in weights.items()}
    assert renamed.keys() != weights.keys()  # the fixture has routers with the name in their keys
    dest.mkdir(parents=True)
    save_file(renamed, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "adapter_config.json", dest / "adapter_config.json")
    return dest


def test_every_tuner_reloads_under_another_name_in_a_fresh_process(tmp_path):
    jobs, fixture_logits = [], torch.load(FIXTURES / "logits.pt")["logits"]
    kinds = json.loads((FIXTURES / "manifest.json").read_text())["bases"]
    for case, (kind, config) in configs().items():
        torch.manual_seed(1)
        model = get_peft_model(_base(kind), config, adapter_name="trained")
        _randomize(model, seed=2)
        want = _logits(model, case)
        model.save_pretrained(tmp_path / case)  # a non-default adapter goes to <dir>/<name>
        saved = tmp_path / case / "trained"
        # the file's keys do not depend on the name it was saved under, and hold no name
        keys = set(load_file(saved / "adapter_model.safetensors"))
        torch.manual_seed(1)
        default_keys = set(get_peft_model_state_dict(get_peft_model(_base(kind), configs()[case][1])))
        assert keys == default_keys, case
        assert not any(".trained" in k for k in keys), case
        jobs.append({"name": f"{case} saved as 'trained'", "path": saved, "base": FIXTURES / "bases" / kind,
                     "inputs": _inputs(case), "want": want})  # fmt: skip
        if case in ROUTED:  # multi_lora.save_adapters: each adapter loadable alone from <dir>/<adapter>
            model.add_adapter("math", configs()[case][1])
            model.set_adapter("math")  # trainable now, "trained" frozen
            _randomize(model, seed=3)
            want_math = _logits(model, case)
            dirs = moe_peft.multi_lora.save_adapters(model, str(tmp_path / "many" / case))
            jobs.append({"name": f"{case} save_adapters 'math'", "path": Path(dirs["math"]),
                         "base": FIXTURES / "bases" / kind, "inputs": _inputs(case), "want": want_math})  # fmt: skip
    for name, kind in kinds.items():  # the 0.1.0 fixtures: saved under "default"
        jobs.append({"name": f"0.1.0 {name}", "path": FIXTURES / name, "base": FIXTURES / "bases" / kind,
                     "inputs": _inputs(name), "want": fixture_logits[name]})  # fmt: skip
    for name in ("mole_block", "mole_linear_top2", "mole_null", "loramoe", "smora", "experts"):
        path = _as_saved_by_0_1_under(FIXTURES / name, tmp_path / "old" / name, "math")
        jobs.append({"name": f"0.1.0 {name} saved as 'math'", "path": path, "base": FIXTURES / "bases" / kinds[name],
                     "inputs": _inputs(name), "want": fixture_logits[name]})  # fmt: skip

    results = _reload_fresh(tmp_path, jobs)
    assert len(results) == len(jobs)
    for job, got in zip(jobs, results):
        for adapter in ("x", "other", "default"):
            torch.testing.assert_close(got[adapter], job["want"], rtol=0, atol=1e-6, msg=f"{job['name']} as {adapter}")
        assert got["load_adapter"] == ([], []), job["name"]  # no missing weight, no key of the file left unused
        assert got["warnings"] == [], job["name"]


@pytest.mark.parametrize("case", ["mole_block", "smora", "experts"])
def test_the_reload_is_not_trivial(case):
    """Reinitialised routers (what the bug left) give other logits than the saved ones: the reload test can fail."""
    kind, config = configs()[case]
    torch.manual_seed(1)
    model = get_peft_model(_base(kind), config)
    _randomize(model, seed=2)
    want = _logits(model, case)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_router" in name:
                p.normal_(0, 0.3)
    assert (_logits(model, case) - want).abs().max() > 1e-2


def test_file_keys_that_match_no_weight_are_named(tmp_path):
    """PEFT drops a file's keys that match no adapter weight without a word; ours are named in a warning."""
    kind, config = configs()["mole_linear"]
    model = get_peft_model(_base(kind), config)
    model.save_pretrained(tmp_path)
    fewer = moe_peft.MoLEConfig(r=4, num_experts=4, top_k=2, router_granularity="linear", target_modules=MLP)
    # q_proj and v_proj of both layers: mole_A, mole_B, the router's weight and bias
    unused = 2 * 2 * 4
    with pytest.warns(UserWarning, match=rf"Adapter 'x': {unused} weight\(s\) of the adapter file match no weight"):
        PeftModel.from_pretrained(_base(kind), tmp_path, adapter_name="x", config=fewer)


def test_the_name_is_removed_only_after_an_adapter_attribute():
    from moe_peft.tuners.routed.model import MoLEModel, SMoRAModel

    layer = "base_model.model.model.layers.0.mlp.gate_proj"
    cases = {
        f"{layer}.mole_A.x": f"{layer}.mole_A",  # a ParameterDict entry
        f"{layer}.mole_router.x.linear.weight": f"{layer}.mole_router.linear.weight",  # a module in a ModuleDict
        f"{layer}.mole_router.x.null.weight": f"{layer}.mole_router.null.weight",
        "m.layers.0.mlp.experts.mole_A.x.gate_up_proj": "m.layers.0.mlp.experts.mole_A.gate_up_proj",  # fused experts
        "m.x.q_proj.mole_A.x": "m.x.q_proj.mole_A",  # a module of the base called like the adapter stays
    }
    for key, want in cases.items():
        assert MoLEModel._remove_adapter_name_from_key(key, "x") == want, key
    # an adapter named like a router's submodule
    assert MoLEModel._remove_adapter_name_from_key(f"{layer}.mole_router.linear.linear.bias", "linear") == (
        f"{layer}.mole_router.linear.bias"
    )
    assert SMoRAModel._remove_adapter_name_from_key(f"{layer}.smora_router.x.selection_bias", "x") == (
        f"{layer}.smora_router.selection_bias"
    )
