"""`moe-peft train` into an output_dir that holds a previous run: refused before anything loads unless the run
overwrites it (`--overwrite`, training.overwrite_output_dir) or resumes it (training.resume_from_checkpoint); when
overwriting, none of the previous run's outputs is left beside the new adapter, and entries moe-peft did not write are
named rather than deleted or left behind."""

from __future__ import annotations

import json
import pathlib

import pytest

import moe_peft.train.run as run_module
from moe_peft.apps.cli import main
from moe_peft.train.config import ConfigError, load_config
from moe_peft.train.run import train_from_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
MOLE = ROOT / "configs" / "mole.yaml"
QUICK = [
    "training.max_steps=2",
    "training.logging_steps=1",
    "training.per_device_train_batch_size=8",
    "data.bundled_samples=32",
    "stats.samples=8",
]


def _previous_run(out: pathlib.Path) -> dict[str, str]:
    """What a 600-step run leaves: its adapter, statistics, checkpoints and TRL's model card (marker contents)."""
    files = {
        "adapter/adapter_config.json": '{"old": "600 steps"}',
        "adapter/adapter_model.safetensors": "old weights",
        "stats/stats.json": '{"old": true}',
        "checkpoint-500/trainer_state.json": '{"global_step": 500}',
        "checkpoint-600/trainer_state.json": '{"global_step": 600}',
        "README.md": "---\ntags:\n- generated_from_trainer\n- trl\n---\n# Model Card",
    }
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return files


def _contents(out: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the run gets as far as loading the base or the data."""

    def loaded(*args, **kwargs):
        raise AssertionError("the base or the data loaded before the output_dir was checked")

    monkeypatch.setattr(run_module, "resolve_base", loaded)
    monkeypatch.setattr(run_module, "load_data", loaded)


def test_a_previous_run_is_refused_before_any_work_naming_both_ways_out(tmp_path, capsys, no_work):
    _previous_run(tmp_path)
    before = _contents(tmp_path)
    assert (
        main(["train", str(MOLE), "--set", f"training.output_dir={tmp_path}", *sum((["--set", s] for s in QUICK), [])])
        == 2
    )
    error = capsys.readouterr().err
    assert f"training.output_dir={str(tmp_path)!r} holds a previous run's outputs" in error
    for name in ("adapter/ (a trained adapter)", "stats/", "checkpoint-500/", "checkpoint-600/"):
        assert name in error, name
    assert "--overwrite" in error and "training.overwrite_output_dir: true" in error  # one way out
    assert "training.resume_from_checkpoint=true (continues from checkpoint-600/)" in error  # the other
    assert _contents(tmp_path) == before  # nothing touched


def test_without_checkpoints_the_refusal_says_the_run_cannot_be_resumed_as_it_is(tmp_path, no_work):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r'saved no checkpoint-N/.*save_strategy other than "no"'):
        train_from_config(load_config(str(MOLE), [f"training.output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="holds no checkpoint-N directory"):
        train_from_config(
            load_config(str(MOLE), [f"training.output_dir={tmp_path}", "training.resume_from_checkpoint=true"])
        )
    with pytest.raises(ConfigError, match="contradict each other"):
        config = load_config(str(MOLE), [f"training.output_dir={tmp_path}", "training.resume_from_checkpoint=true"])
        config.overwrite_output_dir = True
        train_from_config(config)


def test_overwrite_refuses_to_leave_entries_it_did_not_write_beside_the_new_adapter(tmp_path, capsys, no_work):
    _previous_run(tmp_path)
    (tmp_path / "merged").mkdir()  # an export made from the old adapter
    (tmp_path / "merged" / "model.safetensors").write_text("merged from the 600-step adapter")
    before = _contents(tmp_path)
    assert main(["train", str(MOLE), "--set", f"training.output_dir={tmp_path}", "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert "also holds merged/, which moe-peft train did not write" in error and "Move or delete them" in error
    assert _contents(tmp_path) == before


def test_overwrite_removes_every_output_of_the_previous_run(tmp_path, capsys):
    """--overwrite with stats off: the old statistics, checkpoints and model card go too, not only the adapter."""
    old = _previous_run(tmp_path)
    args = [
        "train",
        str(MOLE),
        "--overwrite",
        "--set",
        f"training.output_dir={tmp_path}",
        "--set",
        "stats.enabled=false",
    ]
    assert main([*args, *sum((["--set", s] for s in QUICK), [])]) == 0
    assert (
        "removing the previous run's adapter/, stats/, checkpoint-500/, checkpoint-600/, README.md"
        in capsys.readouterr().out
    )
    after = _contents(tmp_path)
    assert not any(after.get(name) == text.encode() for name, text in old.items())  # no old file survives
    assert not (tmp_path / "stats").exists() and not list(tmp_path.glob("checkpoint-*"))
    assert json.loads(after["adapter/adapter_config.json"])["peft_type"] == "MOLE"  # the new run's adapter


def test_resume_from_checkpoint_continues_the_previous_run(tmp_path):
    """training.resume_from_checkpoint=true continues from the last checkpoint in output_dir (Trainer itself never
    reads the field: moe-peft passes it to train()); the first steps' losses come back from the checkpoint."""
    saving = [*QUICK, f"training.output_dir={tmp_path}", "training.save_strategy=steps", "training.save_steps=2"]
    first = train_from_config(load_config(str(MOLE), saving), log=lambda *a: None)
    assert len(first.losses["adapter"]) == 2 and (tmp_path / "checkpoint-2").is_dir()
    # a resumed run equals the uninterrupted one (tests/test_resume.py), so a run that ignored the checkpoint would
    # log the same losses: mark the checkpoint's logged losses, which only a resumed run reports back
    state_file = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for entry in state["log_history"]:
        if "loss" in entry:
            entry["loss"] += 100.0
    state_file.write_text(json.dumps(state))
    longer = [*saving, "training.max_steps=4", "training.resume_from_checkpoint=true"]
    resumed = train_from_config(load_config(str(MOLE), longer), log=lambda *a: None)
    assert resumed.losses["adapter"][:2] == [loss + 100.0 for loss in first.losses["adapter"]]
    assert len(resumed.losses["adapter"]) == 4 and max(resumed.losses["adapter"][2:]) < 100
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
