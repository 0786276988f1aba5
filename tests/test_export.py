"""moe_peft.export, strategy "merge" (exact) and the plain-LoRA output, the record, atomic writes and the CLI.

Exact merges must equal each tuner's own merge_and_unload bit for bit; every export must load without moe_peft
(plain transformers / plain PEFT in a fresh process) and match the routed model."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import moe_peft
from moe_peft.bases import tiny_llama, tiny_moe
from moe_peft.data import CharTokenizer

from .conftest import MLP, VOCAB, make_config
from .export_fresh import left_padded, load_fresh, routed_outputs
from .test_mhr import mhr_config
from .test_mhr import randomize as randomize_mhr
from .test_phatgoose import (
    library,  # noqa: F401  (a module-scoped fixture: three saved PEFT LoRA experts)
    small_base,
)

TOK = CharTokenizer()
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def ids(seed=0, shape=(3, 9)):
    return torch.randint(4, 40, shape, generator=torch.Generator().manual_seed(seed))


def randomize(model, std=0.2, seed=1, names=("mole_B", "modules_to_save")):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def export(model, out, strategy="merge", **kw):
    kw = {"tokenizer": TOK, "calibration_rows": 16, "verbose": False, **kw}
    return moe_peft.export(model, strategy, out, **kw)


def lora_delta(peft_lora, name):
    layer = peft_lora.base_model.model.get_submodule(name)
    return (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def saved_base(tmp_path):
    tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


# -- exact merges equal each tuner's own merge ------------------------------------------------------------------------
def test_one_expert_mixture_with_modules_to_save_equals_merge_and_unload(saved_base, tmp_path):
    config = moe_peft.MoLEConfig(r=4, num_experts=1, target_modules=MLP + ATTENTION, modules_to_save=["lm_head"])
    model = randomize(get_peft_model(AutoModelForCausalLM.from_pretrained(saved_base), config))
    reference = copy.deepcopy(model)
    result = export(model, tmp_path / "merged")
    same_state(result.model, reference.merge_and_unload())
    assert result.record["exact"] and result.record["output"] == "merged"
    assert result.record["parts"]["modules_to_save"] == ["lm_head"]
    assert result.record["measured_error"]["max_abs_logit_diff"] < 1e-4


@pytest.mark.parametrize(
    "make",
    [
        lambda: moe_peft.LoRAMoEConfig(r=4, num_experts=1, blc_weight=0.0, target_modules=MLP),
        lambda: moe_peft.MoLEConfig(r=4, num_experts=1, router_granularity="linear", target_modules=MLP + ATTENTION),
    ],
    ids=["loramoe", "mole_linear"],
)
def test_other_one_expert_mixtures_equal_merge_and_unload(make, base, tmp_path):
    model = randomize(get_peft_model(base, make()), names=("_B",))
    reference = copy.deepcopy(model)
    result = export(model, tmp_path / "merged", measure_error=False)
    same_state(result.model, reference.merge_and_unload())
    assert result.record["exact"] and not result.record["parts"]["approximated"]


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen3_moe"])
def test_fused_expert_lora_equals_merge_and_unload_and_keeps_the_base_routing(arch, tmp_path):
    """Expert LoRA on an MoE base's fused 3-D experts: each expert's delta folds into that expert (bit for bit what
    merge_and_unload gives), the router is untouched, and the merged model equals the adapted one."""
    config = moe_peft.MoLEConfig(r=4, num_experts=1, target_modules=[], target_parameters=EXPERTS)
    model = randomize(get_peft_model(tiny_moe(arch), config), names=("_B",))
    x = ids(5)
    with torch.no_grad():
        want = model(input_ids=x).logits
    reference = copy.deepcopy(model)
    result = export(model, tmp_path / arch, calibration=[{"input_ids": list(range(4, 20))}] * 4)
    merged = reference.merge_and_unload()
    same_state(result.model, merged)
    assert result.record["parts"]["exact"] == ["expert LoRA 'default' (base routing)"]
    routers = [n for n, _ in result.model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert routers and all(  # the base routing is kept as it was
        torch.equal(result.model.get_parameter(n), model.base_model.model.get_parameter(n)) for n in routers
    )
    changed = [n for n, p in result.model.named_parameters() if "experts" in n]
    base_state = tiny_moe(arch).state_dict()
    assert changed and all(not torch.equal(result.model.get_parameter(n), base_state[n]) for n in changed)
    with torch.no_grad():
        torch.testing.assert_close(result.model(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)


def test_mhr_task_equals_merge_task(tmp_path):
    base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2)
    model = get_peft_model(base, mhr_config("mhr", task_type="CAUSAL_LM"))
    randomize_mhr(model)
    model.eval()
    reference = copy.deepcopy(model)
    result = export(model, tmp_path / "mhr", task_id=2)
    same_state(result.model, moe_peft.mhr.merge_task(reference, 2))
    assert "MHR 'default' task 2" in result.record["parts"]["exact"]
    assert result.record["measured_error"]["max_abs_logit_diff"] < 1e-4  # measured against task_ids=2
    lora = export(
        model, tmp_path / "mhr-lora", task_id=2, merge=False, measure_error=False
    ).model  # as export_task_lora
    for name, (a, b) in moe_peft.mhr.task_lora_weights(model, 2).items():
        torch.testing.assert_close(lora_delta(lora, name), (b @ a) * model.peft_config["default"].scaling)
    other = export(model, tmp_path / "mhr1", task_id=1, measure_error=False).model
    assert not torch.equal(other.model.layers[0].mlp.up_proj.weight, result.model.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="routes per task"):
        export(model, tmp_path / "none")


def test_phatgoose_baselines_equal_set_routing_and_merge_and_unload(library, tmp_path):  # noqa: F811
    lib = moe_peft.phatgoose.assemble(small_base(), library, top_k=2).eval()
    for routing, expert in (("uniform", None), ("single", "e1")):
        reference = copy.deepcopy(lib)
        moe_peft.phatgoose.set_routing(reference, routing, expert=expert)
        kw = dict(phatgoose_routing=routing, expert=expert, measure_error=False)
        out = export(lib, tmp_path / f"pg-{routing}", **kw)
        lora = export(lib, tmp_path / f"pg-{routing}-lora", merge=False, **kw)
        for name, layer in reference.base_model.layers():  # the LoRA factors against the layer's own delta
            torch.testing.assert_close(lora_delta(lora.model, name), layer.get_delta_weight("default"))
        same_state(out.model, reference.merge_and_unload())
    assert lib.peft_config["default"].routing == "top_k"  # the library's own routing is left as it was
    with pytest.raises(ValueError, match="not one fixed weight.*'routing_weighted' or 'svd'"):
        export(lib, tmp_path / "pg-top-k")


def test_roma_routers_equal_roma_merge_and_unload(tmp_path):
    model = get_peft_model(tiny_moe("qwen3_moe"), moe_peft.RoMAConfig(num_last_layers=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    model.eval()
    reference = copy.deepcopy(model)
    result = export(model, tmp_path / "roma", calibration=[{"input_ids": list(range(4, 20))}] * 4)
    same_state(result.model, reference.merge_and_unload())
    with pytest.raises(ValueError, match="nothing here is a LoRA.*merge=True"):
        export(model, tmp_path / "lora", merge=False, calibration=[{"input_ids": list(range(4, 20))}] * 4)


def test_routed_adapters_are_refused_by_merge_naming_the_strategies_that_apply(base, tmp_path):
    model = get_peft_model(base, make_config("mole_block"))  # top-1 block routing on the MLP, router_bias=True
    with pytest.raises(ValueError, match="strategy='merge'.*not one fixed weight.*native_moe.*'svd'"):
        export(model, tmp_path / "x")
    for case, native in (("mole_block", "'native_moe'"), ("mole_linear_top2", "'native_moe' does not apply")):
        routed = get_peft_model(tiny_llama(vocab_size=VOCAB, hidden_size=32), make_config(case))
        with pytest.raises(ValueError, match="cannot be merged into the base layer") as err:
            routed.merge_and_unload()
        assert native in str(err.value) and "'routing_weighted' or 'svd'" in str(err.value)
    assert not (tmp_path / "x").exists()


# -- nested adapters on an MoE base, plain-LoRA output, loading without moe_peft -----------------------------------
def _mixtral_with_roma_and_expert_lora(tmp_path):
    """RoMA on the routers, expert LoRA on the fused experts, a one-expert mixture on attention (all exact)."""
    tiny_moe("mixtral").save_pretrained(tmp_path / "mixtral")
    roma = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral"), moe_peft.RoMAConfig(num_last_layers=2)
    )
    config = moe_peft.MoLEConfig(r=4, num_experts=1, target_modules=["q_proj"], target_parameters=EXPERTS)
    model = get_peft_model(roma.base_model.model, config, adapter_name="experts")  # a second name: see test_experts
    randomize(model)
    with torch.no_grad():
        for p in roma.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)  # the routers moved
    return model.eval()


def test_exports_load_with_plain_transformers_and_peft_in_a_fresh_process(saved_base, tmp_path):
    """merged and plain-LoRA exports of exact adapters, including RoMA + expert LoRA on Mixtral, loaded by a Python
    that never imports moe_peft: logits to 1e-5 (fp32) and the same greedy tokens as the routed model."""
    inputs = left_padded(ids())
    jobs, want = [], {}

    llama = moe_peft.MoLEConfig(
        r=4, num_experts=1, target_modules=MLP, modules_to_save=["lm_head"], task_type="CAUSAL_LM"
    )
    model = randomize(get_peft_model(AutoModelForCausalLM.from_pretrained(saved_base), llama))
    for merge in (True, False):
        result = export(model, tmp_path / f"llama-{merge}", merge=merge)
        assert result.record["output"] == ("merged" if merge else "peft_lora")
        jobs.append({"kind": "full" if merge else "lora", "path": result.path, "base": str(saved_base), **inputs})
        want[result.path] = routed_outputs(model, inputs)

    mixtral = _mixtral_with_roma_and_expert_lora(tmp_path)
    for merge in (True, False):
        result = export(mixtral, tmp_path / f"mixtral-{merge}", merge=merge)
        assert {"RoMA 'default'", "expert LoRA 'experts' (base routing)"} <= set(result.record["parts"]["exact"])
        jobs.append(
            {"kind": "full" if merge else "lora", "path": result.path, "base": str(tmp_path / "mixtral"), **inputs}
        )
        want[result.path] = routed_outputs(mixtral, inputs)
    lora_config = json.loads((tmp_path / "mixtral-False" / "adapter_config.json").read_text())
    assert lora_config["peft_type"] == "LORA" and lora_config["target_parameters"]
    assert any(name.endswith("mlp.gate") for name in lora_config["modules_to_save"])  # RoMA's routers travel whole

    got = load_fresh(tmp_path, jobs)
    for path, (logits, tokens) in want.items():
        torch.testing.assert_close(got[path]["logits"], logits, rtol=1e-5, atol=1e-5, msg=path)
        assert torch.equal(got[path]["tokens"], tokens), path


def test_fused_expert_lora_to_plain_lora_is_the_inverse_of_import_lora_adapter(tmp_path):
    base = tiny_moe("olmoe")
    base.save_pretrained(tmp_path / "base")
    config = moe_peft.MoLEConfig(r=4, lora_alpha=8, num_experts=1, target_modules=["q_proj"], target_parameters=EXPERTS)
    model = randomize(get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config))
    export(model, tmp_path / "lora", merge=False)
    back = moe_peft.import_lora_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "lora")
    x = ids(3)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_export_leaves_the_model_as_it_was(base, tmp_path):
    model = get_peft_model(base, make_config("mole_block", router_bias=False))
    randomize(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    x = ids(4)
    with torch.no_grad():
        model.eval()
        want = model(input_ids=x).logits
        model.train()
    for strategy, merge in (("native_moe", None), ("average", True), ("svd", False)):
        export(model, tmp_path / strategy, strategy=strategy, merge=merge)
    assert model.training  # the training flag is restored
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == grads[n], n
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(input_ids=x).logits, want)


# -- the record, atomic writes, options --------------------------------------------------------------------------------
def test_record_lists_source_strategy_version_and_error(saved_base, tmp_path):
    config = moe_peft.MoLEConfig(r=4, num_experts=1, target_modules=MLP, task_type="CAUSAL_LM")
    model = randomize(get_peft_model(AutoModelForCausalLM.from_pretrained(saved_base), config))
    result = export(model, tmp_path / "out", source="somewhere/adapter")
    record = json.loads((tmp_path / "out" / "moe_peft_export.json").read_text())
    assert record["source"]["adapter"] == "somewhere/adapter" and record["strategy"] == "merge"
    assert record["moe_peft_version"] == moe_peft.__version__ and record["source"]["peft_type"] == "MOLE"
    error = record["measured_error"]
    assert set(error) >= {"kl_mean", "ppl_routed", "ppl_export", "ppl_change", "max_abs_logit_diff", "exact_match"}
    assert error["kl_mean"] < 1e-9 and abs(error["ppl_change"]) < 1e-4
    assert record["calibration"]["source"] == "bundled" and record["calibration"]["eval_rows"] == 4
    assert "mean" in error["exact_match"]["routed"] and set(error["exact_match"]["export"]) <= {
        "cpy",
        "rev",
        "sft",
        "srt",
        "mean",
    }
    assert "char_tokenizer.json" in os.listdir(tmp_path / "out")  # merged models carry the tokenizer
    assert result.path == str(tmp_path / "out")


def test_an_interrupted_export_leaves_no_directory_a_loader_would_accept(saved_base, tmp_path, monkeypatch):
    import transformers.modeling_utils

    config = moe_peft.MoLEConfig(r=4, num_experts=1, target_modules=MLP)
    model = randomize(get_peft_model(AutoModelForCausalLM.from_pretrained(saved_base), config))
    real, calls = transformers.modeling_utils.safe_save_file, []

    def broken(tensors, filename, *args, **kwargs):  # half a file, then death (a full disk; a kill is the same)
        calls.append(filename)
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export(model, tmp_path / "out")
    assert calls, "the writer was not reached"
    assert not (tmp_path / "out").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []  # no temporary directory left behind

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real)
    first = export(model, tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export(model, tmp_path / "out")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export(model, tmp_path / "out", overwrite=True)
    same_state(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), first.model)  # the previous export, intact
    assert sorted(os.listdir(tmp_path / "out")) == sorted(["config.json", "generation_config.json", "model.safetensors",
                                                            "moe_peft_export.json", "char_tokenizer.json"])  # fmt: skip


def test_bad_options_name_the_field(base, tmp_path):
    model = get_peft_model(base, make_config("mole_block"))
    for kwargs, match in [
        (dict(strategy="mean"), "strategy='mean' is invalid"),
        (dict(strategy="svd", rank=0), "rank=0 is invalid"),
        (dict(strategy="merge", rank=4), "rank=4 is invalid.*exact"),
        (dict(strategy="native_moe", merge=False), "merge=False is invalid"),
        (dict(strategy="svd", measure_error=False), "measure_error=False is invalid"),
        (dict(strategy="svd", ridge=0.0), "ridge=0.0 is invalid"),
        (dict(strategy="merge", task_id=-1), "task_id=-1 is invalid"),
        (dict(strategy="merge", phatgoose_routing="top_k"), "phatgoose_routing='top_k' is invalid"),
        (dict(strategy="merge", phatgoose_routing="single"), "expert=None is invalid"),
        (dict(strategy="merge", expert="e0"), "expert='e0' is invalid"),
    ]:
        with pytest.raises(ValueError, match=match):
            export(model, tmp_path / "x", **kwargs)
    with pytest.raises(ValueError, match="calibration.*tokenizer"):
        export(model, tmp_path / "x", strategy="svd", tokenizer=None)


# -- the command --------------------------------------------------------------------------------------------------------
@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # `--threads 1` sets it for the whole process; later tests compare bit for bit
    yield
    torch.set_num_threads(threads)


def test_cli_merge_writes_the_export_and_reports_errors(saved_base, tmp_path, capsys, keep_threads):
    from moe_peft.apps.cli import main

    TOK.save_pretrained(str(saved_base))
    config = moe_peft.MoLEConfig(r=4, num_experts=3, target_modules=MLP, task_type="CAUSAL_LM")
    model = randomize(get_peft_model(AutoModelForCausalLM.from_pretrained(saved_base), config))
    model.save_pretrained(tmp_path / "adapter")
    argv = ["merge", str(tmp_path / "adapter"), "--base", str(saved_base), "--calibration-rows", "16", "--threads", "1"]
    assert main(argv + ["--strategy", "svd", "--rank", "3", "--out", str(tmp_path / "svd")]) == 0
    assert torch.get_num_threads() == 1
    printed = capsys.readouterr().out
    assert "mean KL(routed || export)" in printed and "exact match routed -> export" in printed
    lora = json.loads((tmp_path / "svd" / "adapter_config.json").read_text())
    assert lora["r"] == 3 and lora["peft_type"] == "LORA" and lora["base_model_name_or_path"] == str(saved_base)
    assert main(argv + ["--strategy", "average", "--merge", "--dtype", "bfloat16", "--out", str(tmp_path / "avg")]) == 0
    assert json.loads((tmp_path / "avg" / "config.json").read_text())["dtype"] == "bfloat16"  # merged in bf16
    calibration = tmp_path / "rows.jsonl"
    calibration.write_text("\n".join(json.dumps({"input_ids": list(range(4, 12 + i))}) for i in range(8)))
    # --calibration gives the rows: --calibration-rows (the bundled sample count) has no place next to it
    argv_rows = [a for a in argv if a not in ("--calibration-rows", "16")]
    assert (
        main(
            argv_rows
            + ["--strategy", "routing_weighted", "--calibration", str(calibration), "--out", str(tmp_path / "rw")]
        )
        == 0
    )
    assert json.loads((tmp_path / "rw" / "moe_peft_export.json").read_text())["calibration"]["source"] == str(
        calibration
    )
    assert main(argv + ["--strategy", "merge", "--uniform", "--expert", "e0", "--out", str(tmp_path / "pg")]) == 2
    assert main(argv + ["--strategy", "merge", "--out", str(tmp_path / "m")]) == 2  # routed: refused, named
    assert "not one fixed weight" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    # the base defaults to the adapter's base_model_name_or_path
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert main(["merge", str(tmp_path / "adapter"), "--strategy", "average", "--out", str(tmp_path / "d"),
                 "--calibration-rows", "16"]) == 0  # fmt: skip


def _saved_adapter(saved_base, path, config):
    model = randomize(get_peft_model(AutoModelForCausalLM.from_pretrained(saved_base), config))
    model.save_pretrained(path)
    return model


def test_cli_merge_refuses_options_that_do_not_apply_before_loading(saved_base, tmp_path, capsys, monkeypatch):
    """Every flag the strategy or the adapter would not use (they were ignored without a word) and every bad value
    is refused, naming the flag, before any model is loaded."""
    from moe_peft.apps.cli import main

    mole = tmp_path / "mole"
    _saved_adapter(saved_base, mole, moe_peft.MoLEConfig(r=4, num_experts=3, target_modules=MLP, task_type="CAUSAL_LM"))
    mhr = tmp_path / "mhr"
    _saved_adapter(saved_base, mhr, mhr_config("mhr_det", n_tasks=2, task_type="CAUSAL_LM"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"input_ids": [4, 5, 6]}) for _ in range(4)))
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text("\n".join(json.dumps({"tokens": [4, 5, 6]}) for _ in range(4)))
    (tmp_path / "taken").mkdir()

    def no_loading(*args, **kwargs):
        raise AssertionError("the command loaded a model before checking its options")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    cases = [
        (mole, ["--strategy", "svd", "--lora"], r"--lora applies to --strategy merge.*svd writes a LoRA anyway"),
        (mole, ["--strategy", "native_moe", "--lora"], r"--lora applies.*native_moe writes a full sparse-MoE"),
        (mole, ["--strategy", "merge", "--merge"], r"--merge applies to 'average'.*always writes merged weights"),
        (mole, ["--strategy", "merge", "--rank", "2"], r"--rank applies to 'average'.*merge is exact"),
        (mole, ["--strategy", "svd", "--rank", "0"], r"--rank 0 is invalid"),
        (mole, ["--strategy", "svd", "--task-id", "1"], r"--task-id 1 does not apply to .*mole \(a MOLE adapter\)"),
        (mole, ["--strategy", "svd", "--uniform"], r"--uniform does not apply to .*PHATGOOSE"),
        (mole, ["--strategy", "svd", "--expert", "e0"], r"--expert e0 does not apply to"),
        (mole, ["--strategy", "svd", "--calibration", str(rows), "--calibration-rows", "8"],
         r"--calibration-rows 8 sets how many bundled samples.*drop one"),
        (mole, ["--strategy", "svd", "--calibration-rows", "2"], r"--calibration-rows 2 is invalid: use at least 4"),
        (mole, ["--strategy", "svd", "--calibration", str(tmp_path / "missing.jsonl")], r"missing.jsonl is not a file"),
        (mole, ["--strategy", "svd", "--calibration", str(bad_rows)], r"--calibration .*bad.jsonl: .*row 0 has keys"),
        (mole, ["--strategy", "svd", "--threads", "0"], r"--threads 0 is invalid"),
        (mhr, ["--strategy", "merge"], r"routes per task .*: name the task .* with --task-id T"),
        (mhr, ["--strategy", "merge", "--task-id", "2"], r"--task-id 2 is out of range: .* has 2 tasks, 0\.\.1"),
    ]  # fmt: skip
    import re

    for adapter, extra, match in cases:
        out = tmp_path / "never"
        assert main(["merge", str(adapter), "--base", str(saved_base), "--out", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert re.search(match, err), (extra, err)
        assert not out.exists()
    # an existing --out names the flag, not the Python keyword
    assert (
        main(["merge", str(mole), "--base", str(saved_base), "--strategy", "svd", "--out", str(tmp_path / "taken")])
        == 2
    )
    err = capsys.readouterr().err
    assert "exists; choose another directory, or pass --overwrite" in err and "overwrite=True" not in err


def test_export_refuses_options_nothing_uses(base, tmp_path):
    mole = get_peft_model(base, make_config("mole_block"))
    for kwargs, match in [
        (dict(strategy="svd", task_id=0), r"task_id=0 does not apply to this model"),
        (dict(strategy="svd", phatgoose_routing="uniform"), r"phatgoose_routing='uniform' does not apply"),
        (dict(strategy="svd", calibration="bundled", calibration_tasks=["rev"]), None),  # allowed: bundled
        (dict(strategy="svd", calibration=[{"input_ids": [4, 5]}] * 4, calibration_tasks=["rev"]),
         r"calibration_tasks=\['rev'\] picks bundled tasks, but calibration=.* gives other rows"),
        (dict(strategy="svd", calibration_tasks=["nope"]), r"calibration_tasks=\['nope'\] is invalid"),
        (dict(strategy="native_moe", measure_error=False, calibration_tasks=["rev"]),
         r"calibration_tasks=\['rev'\] is invalid: .*measure_error=False fits and measures nothing"),
    ]:  # fmt: skip
        if match is None:
            assert export(mole, tmp_path / "ok", **kwargs).record["calibration"]["tasks"] == ["rev"]
            continue
        with pytest.raises(ValueError, match=match):
            export(mole, tmp_path / "x", **kwargs)
        assert not (tmp_path / "x").exists()
    fresh = lambda: tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2)  # noqa: E731
    one = get_peft_model(fresh(), make_config("mole_block", num_experts=1))
    with pytest.raises(ValueError, match=r"calibration=\[4 rows\] is invalid: .*nothing would use it"):
        export(one, tmp_path / "x", calibration=[{"input_ids": [4, 5]}] * 4, measure_error=False)
    mhr = get_peft_model(fresh(), mhr_config("mhr_det", n_tasks=2, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"task_id=2 is out of range: this model has 2 tasks, 0\.\.1"):
        export(mhr, tmp_path / "x", task_id=2)


def test_cli_exact_export_without_a_tokenizer_is_measured_on_token_ids(saved_base, tmp_path, capsys):
    """No tokenizer next to the base or the adapter: an exact strategy needs no text to show it is exact, so it is
    measured on token ids drawn from the vocabulary, and the record and the output say so; an approximate one,
    which must fit on real data, is refused naming --calibration."""
    from moe_peft.apps.cli import main

    adapter = tmp_path / "one"
    model = _saved_adapter(saved_base, adapter, make_config("mole_block", num_experts=1, task_type="CAUSAL_LM"))
    assert (
        main(["merge", str(adapter), "--strategy", "merge", "--out", str(tmp_path / "m"), "--calibration-rows", "8"])
        == 0
    )
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "m" / "moe_peft_export.json").read_text())
    calibration = record["calibration"]
    assert calibration["source"] == "random token ids" and "no tokenizer" in calibration["note"]
    assert calibration["eval_rows"] == 2 and calibration["eval_tokens"] == 2 * 32
    assert record["measured_error"]["max_abs_logit_diff"] < 1e-4 and record["measured_error"]["positions"] == 64
    assert "measured on: 2 held-out rows (64 tokens) of random token ids; no tokenizer" in printed
    # the rows are ids below the base's vocabulary (the routed model runs them)
    assert model.config.vocab_size == VOCAB
    assert main(["merge", str(adapter), "--strategy", "svd", "--out", str(tmp_path / "s")]) == 2
    assert "holds a tokenizer for the bundled tasks (text): pass --calibration FILE" in capsys.readouterr().err


def test_cli_measures_on_the_adapters_own_bundled_tasks_or_says_it_cannot(saved_base, tmp_path, capsys):
    from moe_peft.apps.cli import main

    TOK.save_pretrained(str(saved_base))
    adapter = tmp_path / "mole"
    _saved_adapter(
        saved_base, adapter, moe_peft.MoLEConfig(r=4, num_experts=3, target_modules=MLP, task_type="CAUSAL_LM")
    )
    argv = ["merge", str(adapter), "--strategy", "average", "--calibration-rows", "16"]
    (adapter / "tasks.json").write_text(json.dumps(["dup", "rev"]))  # trained on two bundled tasks (not the default)
    assert main(argv + ["--out", str(tmp_path / "own")]) == 0
    record = json.loads((tmp_path / "own" / "moe_peft_export.json").read_text())
    assert record["calibration"]["tasks"] == ["dup", "rev"]
    assert sorted(record["measured_error"]["exact_match"]["routed"]) == ["dup", "mean", "rev"]
    assert "of the bundled tasks dup, rev" in capsys.readouterr().out

    (adapter / "tasks.json").write_text(json.dumps(["support_tickets", "rev"]))  # the user's own data
    assert main(argv + ["--out", str(tmp_path / "theirs")]) == 0
    captured = capsys.readouterr()
    assert "lists tasks ['support_tickets'] that moe-peft does not bundle, so the error is measured on the " \
           "bundled tasks ['rev', 'srt', 'sft', 'cpy']" in captured.err  # fmt: skip
    assert "of the bundled tasks rev, srt, sft, cpy" in captured.out
    record = json.loads((tmp_path / "theirs" / "moe_peft_export.json").read_text())
    assert record["calibration"]["tasks"] == ["rev", "srt", "sft", "cpy"]
