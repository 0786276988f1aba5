"""target_modules / target_parameters entries that match nothing are named, with the names the base does have.

PEFT 0.21 is silent when only some entries match (its own LoRA trains `["q_proj", "vproj"]` as q_proj alone) and
raises "Target modules ... not found" without the names that would match when none does. Every moe-peft method
keeps PEFT's decision (error when nothing is adapted, carry on otherwise) and names each entry that matched
nothing, with the base's distinct linear module names (fused expert parameters for target_parameters)."""

from __future__ import annotations

import re
import warnings

import pytest
from peft import get_peft_model
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

import moe_peft
from moe_peft.bases import tiny_llama, tiny_moe

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]

METHODS = {
    "mole": lambda targets: moe_peft.MoLEConfig(r=4, num_experts=2, target_modules=targets),
    "loramoe": lambda targets: moe_peft.LoRAMoEConfig(r=4, num_experts=2, target_modules=targets),
    "smora": lambda targets: moe_peft.SMoRAConfig(r=4, top_k=2, target_modules=targets),
    "mhr": lambda targets: moe_peft.MHRConfig(r=4, n_tasks=2, n_skills=2, target_modules=targets),
    "phatgoose": lambda targets: moe_peft.PhatgooseConfig(experts=["e0", "e1"], r=4, top_k=1, target_modules=targets),
}


def linear_suffixes(model: nn.Module) -> list[str]:
    """The oracle: the distinct last name parts of the base's nn.Linear modules, in model order."""
    return list(dict.fromkeys(n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)))


def adapted(model) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def target_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "match no" in str(w.message)]


@pytest.mark.parametrize("method", METHODS)
def test_an_entry_that_matches_nothing_is_named_and_the_others_are_adapted(method, base):
    names = linear_suffixes(base)
    assert names == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(base, METHODS[method](["q_proj", "vproj"]))
    (message,) = target_warnings(caught)
    assert "Adapter 'default': target_modules entries ['vproj'] match no module" in message
    assert f"Its linear modules are: {', '.join(names)}." in message
    assert set(adapted(model)) == {"q_proj"}  # PEFT's decision kept: the matching entry is adapted


@pytest.mark.parametrize("method", METHODS)
def test_nothing_matched_is_an_error_naming_every_entry(method, base):
    names = ", ".join(linear_suffixes(base))
    with pytest.raises(NoMatchingPeftModuleError) as err:
        get_peft_model(base, METHODS[method](["qproj", "vproj"]))
    message = str(err.value)
    assert "target_modules entries ['qproj', 'vproj'] match no module of the base model" in message
    assert f"Its linear modules are: {names}." in message


def test_a_regex_that_matches_nothing_is_an_error_and_one_that_matches_is_silent(base):
    names = ", ".join(linear_suffixes(base))
    with pytest.raises(NoMatchingPeftModuleError, match=re.escape(f"Its linear modules are: {names}.")) as err:
        get_peft_model(base, moe_peft.MoLEConfig(r=4, num_experts=2, target_modules="q_proj"))  # not a whole name
    assert "the target_modules regex 'q_proj' must match a whole module name" in str(err.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(base, moe_peft.MoLEConfig(r=4, num_experts=2, target_modules=r".*\.(q_proj|vproj)"))
    assert target_warnings(caught) == []  # a regex is PEFT's matching: only "nothing matched" applies to it
    assert set(adapted(model)) == {"q_proj"}


def test_every_entry_matching_and_entries_left_out_by_layers_to_transform_are_silent(base):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(base, moe_peft.MoLEConfig(r=4, num_experts=2, target_modules=["q_proj", "self_attn.v_proj"]))
        get_peft_model(
            tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48),
            moe_peft.MoLEConfig(r=4, num_experts=2, target_modules=["q_proj", "down_proj"], layers_to_transform=[0]),
        )
    assert target_warnings(caught) == []


def test_an_added_adapter_with_an_unmatched_entry_is_named(base):
    model = get_peft_model(base, moe_peft.MoLEConfig(r=4, num_experts=2, target_modules=["q_proj"]))
    with pytest.warns(RuntimeWarning, match=r"Adapter 'second': target_modules entries \['gateproj'\] match no"):
        model.add_adapter("second", moe_peft.MoLEConfig(r=4, num_experts=2, target_modules=["up_proj", "gateproj"]))


def test_target_parameters_that_match_nothing_are_named_with_the_fused_parameters():
    base = tiny_moe("mixtral")
    fused = list(
        dict.fromkeys(
            f"{n.rpartition('.')[2]}.{p}"
            for n, m in base.named_modules()
            for p, t in m.named_parameters(recurse=False)
            if t.dim() == 3
        )
    )
    assert fused == EXPERTS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = moe_peft.MoLEConfig(r=4, target_modules=["q_proj"], target_parameters=[EXPERTS[0], "experts.down"])
        model = get_peft_model(base, config)
    (message,) = target_warnings(caught)
    assert "target_parameters entries ['experts.down'] match no parameter of the base model" in message
    assert f"its fused 3-D expert parameters (target_parameters): {', '.join(EXPERTS)}." in message
    assert [n for n, p in model.named_parameters() if p.requires_grad and "experts" in n] == [
        f"base_model.model.model.layers.{i}.mlp.experts.mole_{ab}.default.gate_up_proj"
        for i in range(base.config.num_hidden_layers)
        for ab in "AB"
    ]
    # only PEFT's parameters matched: its own generic warning is replaced by the named one
    assert not [w for w in caught if "were set but no" in str(w.message)]


def test_a_matching_target_parameters_keeps_the_adapter_when_target_modules_match_nothing():
    base = tiny_moe("mixtral")
    with pytest.warns(RuntimeWarning, match=r"target_modules entries \['qproj'\] match no module") as caught:
        get_peft_model(base, moe_peft.MoLEConfig(r=4, target_modules=["qproj"], target_parameters=EXPERTS))
    assert not [w for w in caught if "were set but no" in str(w.message)]


def test_a_reload_names_the_entry_too(base, tmp_path):
    """A saved config with an entry that matches nothing warns where it is loaded, not only where it was trained."""
    from peft import PeftModel

    with pytest.warns(RuntimeWarning):
        model = get_peft_model(base, moe_peft.MoLEConfig(r=4, num_experts=2, target_modules=["q_proj", "vproj"]))
    model.save_pretrained(tmp_path)
    fresh = tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
    with pytest.warns(RuntimeWarning, match=r"\['vproj'\] match no module"):
        PeftModel.from_pretrained(fresh, tmp_path)
