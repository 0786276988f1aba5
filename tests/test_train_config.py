"""The training YAML's values and keys, checked when the command line is parsed: every value against its field's type
(TRL's SFTConfig, the method's config class, moe-peft's blocks), in the YAML file and in `--set`, and an unknown key
answered with the few closest valid keys (common names such as lr included), never with hundreds."""

from __future__ import annotations

import pathlib

import pytest

import moe_peft.train.run as run_module
from moe_peft.apps.cli import main
from moe_peft.train.config import ConfigError, block_fields, load_config
from moe_peft.train.fields import ALIASES

ROOT = pathlib.Path(__file__).resolve().parent.parent
MOLE = str(ROOT / "configs" / "mole.yaml")
PHATGOOSE = str(ROOT / "configs" / "phatgoose.yaml")


# -- types --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, assignment, expected",
    [
        ("mole", "training.max_steps=abc", "must be an integer (trl.SFTConfig.max_steps"),
        ("mole", "training.learning_rate=fast", "must be a number (trl.SFTConfig.learning_rate"),
        ("mole", "training.bf16=maybe", "must be true/false or null (trl.SFTConfig.bf16"),
        ("mole", "training.report_to=3", "must be a string, a list of strings or null"),
        ("mole", "training.overwrite_output_dir=1", "must be true/false (moe-peft)"),
        ("mole", "adapter.top_k=two", "must be an integer or null (moe_peft.MoLEConfig.top_k"),
        ("mole", "adapter.target_modules=5", "must be a list of strings, a string or null"),
        ("mole", "data.max_samples=1.5", "must be an integer or null (moe_peft.data.DataConfig.max_samples"),
        ("mole", "data.bundled_tasks=rev", "must be a list of strings (moe_peft.data.DataConfig.bundled_tasks"),
        ("mole", "stats.samples=all", "must be an integer (moe_peft.train.config.StatsConfig.samples"),
        (
            "mole",
            "tiny.pretrain_alphabet=5",
            "must be a string or null (moe_peft.train.config.TinyBaseConfig.pretrain_alphabet",
        ),
        ("phatgoose", "gates.lr=fast", "must be a number (moe_peft.train.config.GatesConfig.lr"),
        ("phatgoose", "experts.r=eight", "must be an integer (peft.LoraConfig.r"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key_the_type_and_the_value(method, assignment, expected):
    key, text = assignment.split("=", 1)
    with pytest.raises(ConfigError) as error:
        load_config(str(ROOT / "configs" / f"{method}.yaml"), [assignment])
    message = str(error.value)
    assert message.startswith(f"--set {assignment}: {key} {expected}"), message
    assert repr(text) in message or text in message  # the value as given


def test_yaml_values_are_checked_too_and_named_by_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("method: mole\ntraining:\n  max_steps: abc\n  save_strategy: no\n")
    with pytest.raises(ConfigError, match=rf"^{path}: training.max_steps must be an integer .*got 'abc'"):
        load_config(str(path))
    # YAML 1.1 reads an unquoted no as false: the message says so
    path.write_text("method: mole\ntraining:\n  save_strategy: no\n")
    with pytest.raises(ConfigError, match=r"save_strategy must be a string .*got false.*quote a string"):
        load_config(str(path))


def test_values_of_the_right_type_pass():
    """Not stricter than the fields: an int for a float, null for a field whose default is null, the shipped configs."""
    config = load_config(MOLE, ["training.learning_rate=1", "adapter.num_experts=null", "data.max_samples=null"])
    assert config.training["learning_rate"] == 1 and config.adapter["num_experts"] is None
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(str(path))


def test_the_cli_refuses_a_bad_value_before_the_base_and_the_data_load(tmp_path, capsys, monkeypatch):
    """The issue: training.max_steps=abc crashed inside transformers after the base and the data had loaded."""

    def loaded(*args, **kwargs):
        raise AssertionError("loaded before the config was checked")

    monkeypatch.setattr(run_module, "resolve_base", loaded)
    monkeypatch.setattr(run_module, "load_data", loaded)
    args = ["train", MOLE, "--set", f"training.output_dir={tmp_path}", "--set", "training.max_steps=abc"]
    assert main(args) == 2
    assert "training.max_steps must be an integer" in capsys.readouterr().err
    # a value of the right type that its block refuses: an error naming the --set, not a ValueError traceback
    assert main(["train", MOLE, "--set", "data.max_samples=0"]) == 2
    assert "--set data.max_samples=0: data.max_samples=0 is invalid" in capsys.readouterr().err


# -- unknown keys -------------------------------------------------------------------------------------------------------
def test_a_bare_common_name_suggests_the_key_with_its_block():
    """`--set lr=1e-3` was answered "the gates block is for method: phatgoose only" (gates.lr is PHATGOOSE's)."""
    with pytest.raises(ConfigError) as error:
        load_config(MOLE, ["lr=1e-3"])
    message = str(error.value)
    assert "keys are block.field" in message and "did you mean 'training.learning_rate'?" in message
    assert "phatgoose" not in message
    # for PHATGOOSE, lr is gates.lr but also the usual name of the learning rate: it needs its block
    with pytest.raises(ConfigError, match=r"'lr' is ambiguous: it is gates.lr.*training.learning_rate=1e-3"):
        load_config(PHATGOOSE, ["lr=1e-3"])
    # batch_size is stats.batch_size, and the usual name of the training batch size
    with pytest.raises(ConfigError, match=r"ambiguous: it is stats.batch_size.*per_device_train_batch_size=8"):
        load_config(MOLE, ["batch_size=8"])


@pytest.mark.parametrize(
    "assignment, suggestion",
    [
        ("training.lr=1e-3", "did you mean 'learning_rate'?"),
        ("steps=3", "did you mean 'training.max_steps'?"),
        ("bs=8", "did you mean 'training.per_device_train_batch_size'?"),
        ("epochs=2", "did you mean 'training.num_train_epochs'?"),
        ("training.r=4", "did you mean 'adapter.r'?"),  # the same field in another block
        ("max_stepz=3", "did you mean 'training.max_steps'?"),
    ],
)
def test_unknown_keys_suggest_the_closest_keys(assignment, suggestion):
    with pytest.raises(ConfigError) as error:
        load_config(MOLE, [assignment])
    assert suggestion in str(error.value)


def test_a_key_close_to_nothing_gets_a_short_answer_not_every_key():
    training = block_fields("mole")["training"]
    assert len(training) > 100  # what used to be printed
    for assignment, words in [
        ("foo=1", ("keys are block.field", "no key is close to 'foo'", "training (trl.SFTConfig)")),
        ("training.xyzzy=1", ("no key of the training block is close", "trl.SFTConfig")),
    ]:
        with pytest.raises(ConfigError) as error:
            load_config(MOLE, [assignment])
        message = str(error.value)
        assert all(w in message for w in words), message
        assert sum(name in message.split() or f"{name}," in message for name in training) < 10, message
    with pytest.raises(ConfigError, match="keys are block.field.*did you mean 'training.learning_rate'"):
        load_config(raw={"method": "mole", "learning_rate": 1e-3})  # a training key written at the top level


def test_every_common_name_points_at_a_real_key():
    """The alias table stays true to the fields (a typo or an upstream rename fails here)."""
    fields = {f"{b}.{n}" for method in ("mole", "roma") for b, names in block_fields(method).items() for n in names}
    for alias, targets in ALIASES.items():
        for target in targets:
            assert target in fields or target in ("model",), (alias, target)
