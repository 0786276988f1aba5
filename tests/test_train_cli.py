"""Training YAML and `moe-peft train` / `moe-peft stats`: every shipped config maps one-to-one onto its dataclasses
and trains end to end on the bundled tiny model and data (a few steps here; full length in the slow tests)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from trl import SFTConfig

import moe_peft
from moe_peft.apps.cli import main
from moe_peft.data import DataError
from moe_peft.train.config import ConfigError, apply_override, load_config, method_config_class
from moe_peft.train.run import train_from_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
# the configs on the bundled tiny bases; those on a real base (model: smollm2-135m) are checked in tests/test_real_base.py
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.stem.endswith("_smollm2"))
METHODS = ["loramoe", "mhr", "mole", "phatgoose", "roma", "smora"]


def test_one_shipped_config_per_method():
    # configs/<method>.yaml for every method, plus setups of one method on another base (mole_mixtral.yaml)
    assert [p.stem for p in CONFIGS if p.stem in METHODS] == METHODS
    for path in CONFIGS:
        assert load_config(str(path)).method == path.stem.split("_")[0], path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_blocks_map_onto_their_dataclasses(path):
    config = load_config(str(path))
    assert config.model == "tiny" and config.threads == 1
    assembled = dict(experts=["a", "b"], r=8, target_modules=["q_proj"]) if config.method == "phatgoose" else {}
    adapter = method_config_class(config.method)(**config.adapter, **assembled)  # assemble() fills the rest
    for key, value in config.adapter.items():
        got = getattr(adapter, key)
        assert (sorted(got) if isinstance(got, (set, list)) else got) == (
            sorted(value) if isinstance(value, list) else value
        )
    training = SFTConfig(**config.training)
    for key, value in config.training.items():
        assert getattr(training, key) == value or key == "report_to", key
    if config.method == "phatgoose":
        LoraConfig(**config.experts)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"method": "mole", "adaptor": {}}, "unknown key 'adaptor'; did you mean 'adapter'?"),
        ({"method": "molle"}, "method='molle' is invalid; did you mean 'mole'?"),
        ({"method": "mole", "training": {"max_step": 3}}, "unknown key training.max_step; did you mean 'max_steps'?"),
        (
            {"method": "mole", "adapter": {"num_expert": 3}},
            "unknown key adapter.num_expert; did you mean 'num_experts'?",
        ),
        ({"method": "mhr", "adapter": {"n_task": 3}}, "did you mean 'n_tasks'?"),
        ({"method": "mole", "data": {"prompt_fields": "q"}}, "did you mean 'prompt_field'?"),
        ({"method": "mole", "gates": {"steps": 3}}, "for method: phatgoose only"),
        ({"method": "phatgoose", "adapter": {"experts": ["a"]}}, "set by moe_peft.phatgoose.assemble"),
    ],
)
def test_unknown_keys_name_the_closest_valid_one(raw, message):
    with pytest.raises(ConfigError) as error:
        load_config(raw=raw)
    assert message in str(error.value)


def test_set_overrides():
    raw = {"method": "mole", "training": {"max_steps": 600}}
    apply_override(raw, "training.max_steps=20")
    apply_override(raw, "learning_rate=1e-3")  # a key of one block only; YAML's 1e-3 string made a float
    apply_override(raw, "model=/some/path")
    apply_override(raw, "adapter.target_modules=[q_proj, v_proj]")
    apply_override(raw, "data.max_samples=null")
    config = load_config(raw=raw)
    assert config.training == {"max_steps": 20, "learning_rate": 1e-3}
    assert config.model == "/some/path" and config.adapter["target_modules"] == ["q_proj", "v_proj"]
    assert config.data.max_samples is None
    with pytest.raises(ConfigError, match="ambiguous"):
        apply_override(raw, "seed=1")  # training.seed and tiny.seed
    with pytest.raises(ConfigError, match="did you mean 'training.max_steps'"):
        apply_override(raw, "max_stepz=1")
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(raw, "max_steps")


def test_roma_example_reads_the_shipped_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("roma_example", ROOT / "examples" / "roma_router_tuning.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    roma, training = example.load_config(str(ROOT / "configs" / "roma.yaml"))
    assert roma["lambda_reg"] == 0.8 and roma["lambda_warmup_steps"] == 50 and roma["num_neighbours"] == 5
    assert training == {  # the example's TrainingArguments, as before the YAML grew its other blocks
        "learning_rate": 0.003, "max_steps": 300, "per_device_train_batch_size": 32, "weight_decay": 0.01,
        "warmup_steps": 0, "lr_scheduler_type": "constant", "logging_steps": 50, "seed": 0, "bf16": False,
        "gradient_checkpointing": False,
    }  # fmt: skip


# -- end to end ---------------------------------------------------------------------------------------------------------
QUICK = {
    "training.max_steps": 3,
    "training.logging_steps": 1,
    "training.per_device_train_batch_size": 8,
    "data.bundled_samples": 48,
    "stats.samples": 16,
}
QUICK_METHOD = {
    "phatgoose": {"training.max_steps": 2, "gates.steps": 2},
    "roma": {"data.bundled_samples": 64},
    "mole_llava": {"tiny.pretrain_steps": 20},
}


def _quick(path: pathlib.Path, out: pathlib.Path) -> list[str]:
    values = {**QUICK, **QUICK_METHOD.get(path.stem, {}), "training.output_dir": str(out)}
    return [f"{k}={v}" for k, v in values.items()]


def _reload(adapter: pathlib.Path):
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert pathlib.Path(base).is_dir()  # the tiny base was saved: the adapter reloads without the Hub
    auto = AutoModelForImageTextToText if "llava" in pathlib.Path(base).name else AutoModelForCausalLM
    return PeftModel.from_pretrained(auto.from_pretrained(base), adapter).eval()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_trains_end_to_end(path, tmp_path, capsys):
    assert main(["train", str(path), *sum((["--set", s] for s in _quick(path, tmp_path)), [])]) == 0
    printed = capsys.readouterr().out
    adapter = tmp_path / "adapter"
    assert f"adapter            {adapter}" in printed
    for name in (
        "stats.json",
        "expert_load.png",
        "routing_by_task.png" if path.stem != "loramoe" else "routing_by_sample_type.png",
    ):
        assert (tmp_path / "stats" / name).exists(), name
        assert str(tmp_path / "stats" / name) in printed
    stats = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert stats["layers"] and all(abs(sum(layer["load"]) - 1) < 1e-5 for layer in stats["layers"].values())
    model = _reload(adapter)
    assert json.loads((adapter / "tasks.json").read_text()) == sorted(load_config(str(path)).data.bundled_tasks)
    if path.stem == "mole_llava":  # exact match per task and the expert load on held-out image+text rows
        llava = json.loads((tmp_path / "stats" / "llava.json").read_text())
        assert sorted(llava["accuracy"]) == sorted(stats["groups"]) == json.loads((adapter / "tasks.json").read_text())
        assert abs(sum(llava["modality_load"]["all"]["load"]) - 1) < 1e-5
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 6, 7]]), **({"task_ids": torch.tensor([0])} if path.stem == "mhr" else {}))
    if path.stem == "mole_mixtral":  # the YAML's target_parameters reached the fused experts (one LoRA per expert)
        experts = [m for m in model.modules() if isinstance(m, moe_peft.experts.MoELoraExperts)]
        assert len(experts) == 2 and all(set(m.mole_A["default"]) == {"gate_up_proj", "down_proj"} for m in experts)


def test_stats_command_on_a_trained_adapter(tmp_path, capsys):
    path = ROOT / "configs" / "mhr.yaml"
    main(
        [
            "train",
            str(path),
            *sum((["--set", s] for s in _quick(path, tmp_path / "run")), []),
            "--set",
            "stats.enabled=false",
        ]
    )
    data = tmp_path / "mine.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{t} abc=", "response": "x", "task": t}) + "\n" for t in ("rev", "srt"))
    )
    assert (
        main(["stats", str(tmp_path / "run" / "adapter"), "--data", str(data), "--out", str(tmp_path / "stats")]) == 0
    )
    stats = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert stats["groups"] == ["rev", "srt"]  # task names mapped to the adapter's task ids (tasks.json)
    assert (tmp_path / "stats" / "routing_by_task.png").exists()


def test_train_on_a_users_jsonl_file(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"Say {w}!"}, {"role": "assistant", "content": w}]}
        for w in ("hi", "yo") * 8
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(
        str(ROOT / "configs" / "mole.yaml"),
        [f"data.train={data}", "stats.by=null", *_quick(ROOT / "configs" / "mole.yaml", tmp_path)],
    )
    paths = train_from_config(config).paths
    assert pathlib.Path(paths["adapter"], "adapter_model.safetensors").exists()
    assert json.loads(pathlib.Path(paths["json"]).read_text())["groups"] == ["all"]


# -- full length (the shipped settings) ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_full_run(path, tmp_path):
    run = train_from_config(load_config(str(path), [f"training.output_dir={tmp_path}"]))
    assert pathlib.Path(run.paths["expert_load"]).exists()
    for part, losses in run.losses.items():  # the adapter, or each PHATGOOSE expert
        assert len(losses) >= 2, (part, losses)
        if path.stem == "roma":  # router-only tuning, pulled toward the pretrained routing: the loss stays put
            assert abs(losses[-1] - losses[0]) < 0.1, losses
        else:
            assert losses[-1] < 0.8 * losses[0], (part, losses)


def test_cli_reports_config_and_data_errors_without_a_traceback(tmp_path, capsys):
    config = ROOT / "configs" / "mole.yaml"
    assert main(["train", str(config), "--set", "training.max_step=3"]) == 2
    assert "did you mean 'max_steps'?" in capsys.readouterr().err
    assert main(["train", str(config), "--set", "adapter.top_k=9"]) == 2  # the config class names the field
    assert "adapter: top_k=9 is invalid" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    assert main(["train", str(config), "--set", f"data.train={bad}", "--set", f"training.output_dir={tmp_path}"]) == 2
    assert f"{bad}, row 2: field 'response' is missing" in capsys.readouterr().err


def test_llava_config_with_modality_groups_and_llava_next_on_a_users_jsonl_file(tmp_path):
    """configs/mole_llava.yaml on the user's rows (messages with image placeholders, image paths relative to the
    file) with modality groups and the tiny LLaVA-NeXT set from the command line."""
    from moe_peft.llava import make_image_tasks

    rows = []
    for i, row in enumerate(make_image_tasks(24, seed=5)):
        images = []
        for j, image in enumerate(row["images"]):
            image.save(tmp_path / f"{i}_{j}.png")
            images.append(f"{i}_{j}.png")
        rows.append({"messages": row["messages"], "images": images, "task": row["modality"]})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = ROOT / "configs" / "mole_llava.yaml"
    groups = ["adapter.modality_experts={text: 2, image: 2}", "adapter.num_experts=null", f"data.train={data}"]
    groups.append("tiny.arch=llava_next")
    run = train_from_config(load_config(str(path), [*_quick(path, tmp_path / "run"), *groups]))
    adapter = pathlib.Path(run.paths["adapter"])
    assert json.loads((adapter / "tasks.json").read_text()) == ["image", "text"]
    llava = json.loads(pathlib.Path(run.paths["llava"]).read_text())
    assert llava["samples"] == 16 and sorted(llava["accuracy"]) == ["image", "text"]
    for group in ("text", "image"):  # each group's load is over its own two experts
        load = llava["modality_load"][group]
        assert len(load["load"]) == 2 and abs(sum(load["load"]) - 1) < 1e-5 and load["tokens"] > 0
    model = _reload(adapter)
    assert model.peft_config["default"].modality_experts == {"text": 2, "image": 2}
    assert model.get_base_model().config.model_type == "llava_next"
    with pytest.raises(ConfigError, match="tiny.hidden_size / tiny.num_layers / tiny.pretrain_alphabet are fixed"):
        load_config(str(path), ["tiny.hidden_size=32"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "images": []}) + "\n")
    with pytest.raises(DataError, match="row 1: `messages` must be a list of chat turns ending with the assistant"):
        train_from_config(load_config(str(path), [*_quick(path, tmp_path / "bad"), f"data.train={bad}"]))
    with pytest.raises(ConfigError, match="method='smora' on a LLaVA base is not supported"):
        raw = {"method": "smora", "tiny": {"arch": "llava", "pretrain_steps": 20}, "training": {"bf16": False}}
        train_from_config(load_config(raw=raw))


def test_model_can_be_a_local_path(tmp_path):
    """`model: <path>` loads the base and its tokenizer from there (what a hub id does after the download)."""
    from moe_peft.bases import char_tokenizer, tiny_llama

    base = tmp_path / "my_base"
    tokenizer = char_tokenizer()
    tiny_llama(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48).save_pretrained(base)
    tokenizer.save_pretrained(base)
    path = ROOT / "configs" / "mole.yaml"
    run = train_from_config(load_config(str(path), [f"model={base}", *_quick(path, tmp_path / "run")]))
    recorded = json.loads(pathlib.Path(run.paths["adapter"], "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(base)
