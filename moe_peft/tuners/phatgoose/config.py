"""PhatgooseConfig: a library of independently trained LoRA experts, routed per token and per module by their
post-hoc gate vectors (PHATGOOSE, Muqeeth et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..._internal.registration import ensure_peft_type
from ..routed.config import ConfigFile, _bad

ROUTINGS = ("top_k", "uniform", "single", "oracle")


@dataclass
class PhatgooseConfig(ConfigFile):
    """Usually built by `moe_peft.phatgoose.assemble(base, adapter_paths)`, which fills every field from the experts.

    Args:
        experts: names of the experts, in the order of the stacked banks (expert e is row e of every bank).
        r: rank of the stacked banks: the largest expert rank (smaller experts are zero-padded, which changes nothing).
        top_k: experts mixed per token and module under routing="top_k" (PHATGOOSE: 2).
        routing: "top_k" is PHATGOOSE's routing (paper fig. 2, mttl's PhatgooseSelector): logits LN(x) . LN(v_e) / sqrt(in), top-k, softmax over the kept.
            The baselines of the paper, in the same model: "uniform" averages the experts' LoRA deltas (merged
            experts), "single" uses only `expert`, "oracle" uses each sample's own expert, given as the forward
            keyword `task_ids` (`[batch]` of expert indices).
        expert: the expert used by routing="single".
        layer_norm_eps: epsilon of the affine-free layer norms of the routing.
        target_modules: the modules every expert adapts (exact names when built by `assemble`).
    """

    experts: list[str] = field(default_factory=list, metadata={"help": "Expert names, in bank order."})
    r: int = field(default=8, metadata={"help": "Rank of the stacked banks (largest expert rank)."})
    top_k: int = field(default=2, metadata={"help": "Experts per token under routing='top_k'."})
    routing: Literal["top_k", "uniform", "single", "oracle"] = field(
        default="top_k", metadata={"help": "'top_k' (PHATGOOSE), or the baselines 'uniform', 'single', 'oracle'."}
    )
    expert: Optional[str] = field(default=None, metadata={"help": "The expert of routing='single'."})
    layer_norm_eps: float = field(default=1e-5, metadata={"help": "Epsilon of the routing layer norms."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules every expert adapts (set by assemble)."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to exclude."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Not used by PHATGOOSE."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type("PHATGOOSE")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        self.experts = list(self.experts)
        self._validate()

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def _validate(self) -> None:
        if not self.experts or len(set(self.experts)) != len(self.experts):
            raise _bad("experts", self.experts, "give each expert a unique name (assemble() uses the directory names).")
        if not isinstance(self.r, int) or self.r < 1:
            raise _bad("r", self.r, "use the largest rank among the experts, a positive integer.")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise _bad("top_k", self.top_k, f"use 1 <= top_k <= {self.num_experts} (the number of experts).")
        if self.routing not in ROUTINGS:
            raise _bad("routing", self.routing, f"use one of {ROUTINGS}.")
        if self.routing == "single" and self.expert not in self.experts:
            raise _bad("expert", self.expert, f"routing='single' needs one of the experts {self.experts}.")
        if not self.layer_norm_eps > 0:
            raise _bad("layer_norm_eps", self.layer_norm_eps, "use a small positive value, e.g. 1e-5.")
        if self.target_modules is None:
            raise _bad(
                "target_modules",
                None,
                "a PHATGOOSE library adapts the modules its experts adapt: build it with "
                "moe_peft.phatgoose.assemble(base_model, adapter_paths), which sets them.",
            )
        if self.modules_to_save:
            raise _bad("modules_to_save", self.modules_to_save, "PHATGOOSE mixes LoRA experts only; leave it unset.")
